"""Every CPU shim megatron-core needs, in one place. Applied only when no CUDA device is present.

megatron-core is written for CUDA. On a CPU-only machine with the gloo backend it runs unchanged once a
few CUDA entry points are given CPU meanings (measured with megatron-core 0.16.1 and 0.19.2):

1. ``transformer/moe/ops/paged_stash.py`` (0.19+) imports triton at module import: a stub module is
   registered when triton is missing (its kernels raise if ever called; dense models never call them).
2. ``torch.cuda.current_device()`` is used for allocations (rotary embedding inv_freq, GlobalMemoryBuffer,
   pipeline p2p buffers): it returns ``torch.device("cpu")``; ``torch.cuda.current_stream()`` /
   ``synchronize()`` become no-ops.
3. ``model_parallel_cuda_manual_seed`` keeps CUDA RNG states in ``CudaRNGStatesTracker``: replaced by a
   tracker that keeps CPU generator states (TP-distinct dropout seeds keep working).
4. ``device="cuda"`` literals and ``.cuda()`` calls (optimizer, grad scaler, clip_grads, DDP buffers,
   pipeline schedules) and ``param.type() == 'torch.cuda.FloatTensor'`` checks: a
   ``TorchFunctionMode`` (:func:`device_remap`) maps CUDA devices to CPU and reports CUDA tensor types.
5. The local ``DotProductAttention`` asserts ``packed_seq_params is None`` (THD packing is TE-only): its
   forward is wrapped (:func:`enable_local_thd_attention`) so that with ``qkv_format="thd"`` it runs the
   original kernel once per ``cu_seqlens`` segment with a causal mask (filler between ``cu_seqlens`` and
   ``cu_seqlens_padded`` gets zeros, as TE does). RoPE needs no shim: megatron's unfused
   ``_apply_rotary_pos_emb_thd`` already restarts positions at every ``cu_seqlens_q_padded`` boundary.
6. The local layer spec's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` (only TE/apex norms
   take part in sequence parallelism). Nothing in a norm depends on the layout: under sequence parallelism
   it sees ``[s/TP, b, h]`` and its weight gradient is partial per TP rank, which megatron sums across TP
   for parameters flagged ``sequence_parallel`` (``finalize_model_grads``). :func:`enable_local_sequence_parallel_norm`
   builds the same ``torch.nn.LayerNorm``/``RMSNorm`` without the assertion and sets that flag, as TE's
   norms do. gloo itself implements the ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` that the
   sequence-parallel linear layers use.

7. megatron-core 0.16.1's ``transformer/moe/moe_utils.py`` imports ``te_general_gemm`` from Transformer Engine
   inside a ``try`` (line 34) and later tests ``te_general_gemm is not None`` in the router's gating GEMM
   (``RouterGatingLinearFunction``, lines 1192 and 1225); without TE
   the name was never bound (``NameError`` on the first MoE forward). :func:`define_missing_te_names` binds
   it to ``None`` there, which selects the plain ``torch.mm`` path. Needed on GPUs without TE too.
   MoE models use the ``allgather`` token dispatcher on CPU: the ``alltoall`` one records CUDA events on a
   device-to-host stream (``token_dispatcher.py``), which the CPU stand-ins of shim 2 do not provide.

Config-level requirements (not patches; enforced by :mod:`megatron_dapo.models.hf_config`):
``pipeline_dtype`` must be set when PP > 1, and ``batch_p2p_comm=False`` with interleaved (virtual)
pipelining — with the default ``True`` gloo gives silently wrong gradients. ``dist_checkpointing`` needs
``psutil`` and its callers need an ``if __name__ == "__main__"`` guard (it may spawn a process).
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

from .backend import has_cuda

_APPLIED = False


def _stub_paged_stash() -> None:
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    try:
        # optional: a GPU-only package
        import triton  # noqa: F401

        return
    except ImportError:
        pass

    def _unavailable(*_a, **_k):
        raise RuntimeError("megatron paged_stash uses triton kernels, unavailable on this CPU-only machine")

    mod = types.ModuleType(name)
    mod.GLOBAL_BLOCK_SIZE = 1024
    mod.paged_stash_copy_kernel = _unavailable
    mod.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = mod


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` on CPU (a class, so type annotations using it still work)."""

    def __init__(self, *_a, **_k):
        pass

    def wait_event(self, *_a, **_k):
        return None

    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def record_event(self, *_a, **_k):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *_a):
        return False


def _patch_cuda_entry_points() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _install_cpu_rng_tracker() -> None:
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    import megatron.core.tensor_parallel.random as mrandom

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Keeps named CPU generator states where the original keeps CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def thd_segments_attention(packed_seq_params, t: int, hidden_per_partition: int, like: torch.Tensor,
                           attend, who: str) -> torch.Tensor:
    """Packed (THD) self-attention one document at a time, for core-attention modules without a varlen kernel.

    Args:
        packed_seq_params: megatron-core ``PackedSeqParams``: ``cu_seqlens_q`` (``[docs + 1]`` int, real token
            boundaries), ``cu_seqlens_q_padded`` (padded starts/ends; ``None``: unpadded), and the same for kv.
        t: packed tokens in the row (``query.shape[0]``).
        hidden_per_partition: heads x head size on this TP rank.
        like: a tensor of the output's dtype and device (the query).
        attend: ``attend(start, n) -> [n, ...]`` attention of the document at packed positions
            ``[start, start + n)`` over itself, reshaped here to ``[n, hidden_per_partition]``.
        who: the backend, named in errors.

    Returns:
        ``[t, hidden_per_partition]``: each document's attention at its positions, zeros at filler positions.

    Raises:
        ValueError: ``qkv_format`` other than ``"thd"``, different q/kv boundaries (cross attention), or boundaries
            that do not fit the ``t`` packed tokens.
    """
    p = packed_seq_params
    if p.qkv_format != "thd":
        raise ValueError(f"{who} supports packed_seq_params.qkv_format='thd' only, got {p.qkv_format!r}")
    cu = p.cu_seqlens_q
    cu_pad = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else cu
    cu_kv = p.cu_seqlens_kv if p.cu_seqlens_kv is not None else cu
    cu_kv_pad = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else cu_kv
    if not (torch.equal(cu.cpu(), cu_kv.cpu()) and torch.equal(cu_pad.cpu(), cu_kv_pad.cpu())):
        raise ValueError(f"{who}: THD attention is self-attention only; cu_seqlens_q/kv (and their padded forms) "
                         f"must be equal")
    lens = (cu[1:] - cu[:-1]).tolist()
    starts, ends = cu_pad[:-1].tolist(), cu_pad[1:].tolist()
    if (ends[-1] if ends else 0) != t or any(s + n > e for s, n, e in zip(starts, lens, ends)):
        raise ValueError(f"packed_seq_params boundaries (cu_seqlens_q={cu.tolist()}, "
                         f"cu_seqlens_q_padded={cu_pad.tolist()}) do not fit {t} packed tokens")
    pieces, cursor = [], 0
    for s, n in zip(starts, lens):
        if s > cursor:
            pieces.append(like.new_zeros(s - cursor, hidden_per_partition))
        if n > 0:
            pieces.append(attend(s, n).reshape(n, hidden_per_partition))
        cursor = s + n
    if t > cursor:
        pieces.append(like.new_zeros(t - cursor, hidden_per_partition))
    return torch.cat(pieces, dim=0)


def enable_local_thd_attention() -> None:
    """Shim 5: let megatron-core's local ``DotProductAttention`` accept ``PackedSeqParams(qkv_format="thd")``.

    Packed inputs arrive as ``query [t, np, hn]``, ``key/value [t, ng, hn]`` (``Attention.forward``
    squeezes the batch dimension for THD). Each segment ``i`` holds ``cu_seqlens_q[i+1] - cu_seqlens_q[i]``
    valid tokens starting at ``cu_seqlens_q_padded[i]`` (or ``cu_seqlens_q[i]`` when no padded boundaries
    are given); the original forward runs on each segment alone with a ``[1, 1, s, s]`` causal mask, so a
    token attends exactly to the earlier tokens of its own sequence. Returns ``[t, np·hn]`` with zeros at
    filler positions. Idempotent; also usable on GPU without Transformer Engine (the local layer spec).

    Raises (at forward time):
        ValueError: ``qkv_format`` other than ``"thd"``, different q/kv boundaries (cross attention), or
            boundaries that do not fit the packed length.
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if getattr(DotProductAttention.forward, "_megatron_dapo_thd", False):
        return
    original = DotProductAttention.forward

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return original(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias)
        def attend(s: int, n: int) -> torch.Tensor:
            causal = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1).view(1, 1, n, n)
            return original(self, query[s: s + n].unsqueeze(1), key[s: s + n].unsqueeze(1),
                            value[s: s + n].unsqueeze(1), causal, attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias)

        return thd_segments_attention(packed_seq_params, query.shape[0], self.hidden_size_per_partition, query,
                                      attend, "local attention")

    forward._megatron_dapo_thd = True
    forward.__doc__ = original.__doc__
    DotProductAttention.forward = forward


def enable_local_sequence_parallel_norm() -> None:
    """Shim 6: let megatron's local-spec ``WrappedTorchNorm`` run under sequence parallelism (idempotent).

    The replacement keeps every other check of the original (zero-centred gamma, persistent and
    memory-efficient layer norm stay unsupported) and, with ``config.sequence_parallel``, marks the weight
    (and bias) ``sequence_parallel = True`` so megatron-core all-reduces their gradients across TP ranks
    (``megatron/core/distributed/finalize_model_grads.py``). Without sequence parallelism the module is
    exactly the original's.
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "_megatron_dapo_sp", False):
        return
    original_new = cls.__new__

    def __new__(klass, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                                normalization)
        config.sequence_parallel = False  # build through the original (its other assertions still apply)
        try:
            norm = original_new(klass, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                                normalization)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(__new__)
    cls._megatron_dapo_sp = True


def define_missing_te_names() -> None:
    """Shim 7: bind ``megatron.core.transformer.moe.moe_utils.te_general_gemm = None`` when Transformer Engine
    did not (idempotent; a no-op when the name exists)."""
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_cpu_shims() -> bool:
    """Apply shims 1-3 and 5-7 (idempotent). Returns True when applied, False on a CUDA machine (no-op).

    Call before importing megatron.core model code.
    """
    global _APPLIED
    if has_cuda():
        return False
    if _APPLIED:
        return True
    _stub_paged_stash()
    _patch_cuda_entry_points()
    _install_cpu_rng_tracker()
    enable_local_thd_attention()
    enable_local_sequence_parallel_norm()
    define_missing_te_names()
    _APPLIED = True
    return True


def _make_remap_mode():
    def fix(dev):
        if isinstance(dev, str) and dev.startswith("cuda"):
            return "cpu"
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return torch.device("cpu")
        return dev

    tensor_type = torch.Tensor.type

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs:
                kwargs = dict(kwargs)
                kwargs["device"] = fix(kwargs["device"])
            if func is torch.Tensor.cuda:
                return args[0]
            if func is tensor_type and len(args) == 1 and not kwargs:
                name = func(*args)
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
                args = (args[0], fix(args[1])) + tuple(args[2:])
            return func(*args, **kwargs)

    return CudaToCpu()


@contextlib.contextmanager
def device_remap():
    """Context in which CUDA device literals mean CPU (shim 4). A no-op on CUDA machines."""
    if has_cuda():
        yield
        return
    apply_cpu_shims()
    with _make_remap_mode():
        yield
