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

Config-level requirements (not patches; enforced by :mod:`megatron_dapo.models.hf_config`):
``pipeline_dtype`` must be set when PP > 1, and ``batch_p2p_comm=False`` with interleaved (virtual)
pipelining — with the default ``True`` gloo gives silently wrong gradients. ``dist_checkpointing`` needs
``psutil`` and its callers need an ``if __name__ == "__main__"`` guard (it may spawn a process).
"""
from __future__ import annotations

import contextlib
import sys
import types

_APPLIED = False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _stub_paged_stash() -> None:
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    try:
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
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _install_cpu_rng_tracker() -> None:
    import torch
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


def apply_cpu_shims() -> bool:
    """Apply shims 1-3 (idempotent). Returns True when applied, False on a CUDA machine (no-op).

    Call before importing megatron.core model code.
    """
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _stub_paged_stash()
    _patch_cuda_entry_points()
    _install_cpu_rng_tracker()
    _APPLIED = True
    return True


def _make_remap_mode():
    import torch
    from torch.overrides import TorchFunctionMode

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
    if cuda_available():
        yield
        return
    apply_cpu_shims()
    with _make_remap_mode():
        yield
