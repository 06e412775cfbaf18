"""HF safetensors ↔ megatron-core ``torch_dist`` checkpoints (shared logic of the two conversion tools).

* :func:`hf_to_megatron` builds a megatron-core ``GPTModel`` (local layer spec, no optimizer) at the
  current TP/PP layout, copies the HF weights into this rank's shards (:mod:`megatron_dapo.models.mapping`)
  and saves ``model.sharded_state_dict()`` with ``dist_checkpointing`` (torch_dist). The result is
  layout-agnostic: any TP/PP/VPP loads it (``MegatronActor`` + :func:`megatron_dapo.actor.checkpoint.
  load_checkpoint` with ``load_optimizer=False``). ``config.json``, ``generation_config.json`` and the
  tokenizer files are copied next to it for the way back.
* :func:`megatron_to_hf` builds the model at TP=1/PP=1 in one process (dist_checkpointing reshards
  any saved layout on load), and writes HF safetensors (sharded at ``max_shard_bytes`` with a
  ``model.safetensors.index.json`` when larger) in the dtype of the copied ``config.json``.
* :func:`verify_against_hf` compares transformers' logits/log-probs with Megatron's on a fixed batch.

Errors: missing files → ``FileNotFoundError`` naming the path; unsupported architecture →
:class:`~megatron_dapo.models.hf_config.UnsupportedModelError`; wrong tensor shape →
:class:`~megatron_dapo.models.mapping.MappingError` naming the tensor, expected and found shapes.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from ..actor.parallel import init_parallel
from ..backend import has_cuda
from ..cpu_shims import apply_cpu_shims, device_remap
from . import mapping
from .export import copy_side_files, write_safetensors_shards
from .hf_config import (ModelSpec, UnsupportedModelError, gpt_model_kwargs, layer_spec, read_hf_config,
                        spec_from_hf_config, transformer_config_kwargs)
from .mapping import MappingError

CONVERT_INFO = "convert_info.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it

    return tqdm(it, total=total, desc=desc, unit="tensor")


def hf_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The checkpoint dtype named by ``config.json`` (``dtype`` or legacy ``torch_dtype``; fp32 default)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def copy_hf_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config / generation config / tokenizer files that exist in ``src`` to ``dst``."""
    return copy_side_files(src, dst)


class HFTensorReader:
    """Lazy reader over the ``*.safetensors`` files of a HF directory (``get(name)`` → tensor)."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def conversion_world_size(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None) -> int:
    """Processes a conversion at this layout runs on: ``pp × lcm(tp, ep × etp)`` (data-parallel copies of the
    dense weights fill the ranks expert parallelism needs beyond TP; ``etp`` ``None`` means TP)."""
    etp = tp if etp is None else etp
    return pp * math.lcm(tp, ep * etp)


@contextlib.contextmanager
def megatron_model(spec: ModelSpec, *, tp: int = 1, pp: int = 1, params_dtype: str = "fp32",
                   divisible_by: int = 128, seed: int = 1234, ep: int = 1,
                   etp: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Initialise parallel state (if needed) and build this rank's ``GPTModel`` (local spec, no DDP).

    MoE models get local experts (``ep``: expert-parallel size, ``etp``: expert-tensor-parallel size, ``None``:
    TP) and the default token dispatcher of :func:`~megatron_dapo.models.hf_config.transformer_config_kwargs`.

    Yields ``{"model", "padded_vocab", "ps"}``; tears megatron's model-parallel groups down on exit.
    """
    apply_cpu_shims()
    init_parallel(tp=tp, pp=pp, seed=seed, ep=ep, etp=etp)
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    padded = spec.padded_vocab_size(tp, divisible_by)
    with device_remap():
        cfg = TransformerConfig(**transformer_config_kwargs(spec, tp=tp, pp=pp, params_dtype=params_dtype,
                                                            on_cpu=not has_cuda(), ep=ep, etp=etp))
        model = GPTModel(config=cfg, transformer_layer_spec=layer_spec(spec, cfg),
                         pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                         **gpt_model_kwargs(spec, padded))
        if has_cuda():
            model.cuda(torch.cuda.current_device())
        model.eval()
        try:
            yield {"model": model, "padded_vocab": padded, "ps": ps}
        finally:
            ps.destroy_model_parallel()


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                   divisible_by: int = 128, progress: bool = True, ep: int = 1, etp: Optional[int] = None) -> Path:
    """Convert a HF checkpoint into a megatron-core torch_dist checkpoint at ``out_dir`` (collective).

    Run in one process (TP=PP=EP=1) or under torchrun with ``world_size ==`` :func:`conversion_world_size`
    (each rank writes its shard; each expert-parallel rank reads and writes only its own experts).
    Weights are stored in the HF dtype (fp32 or bf16).

    Returns ``Path(out_dir)``.

    Raises:
        FileNotFoundError: ``hf_dir`` lacks config.json or safetensors files.
        UnsupportedModelError: architecture / fields megatron_dapo cannot build.
        MappingError: a HF tensor is missing or has the wrong shape.
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import dist_checkpointing

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_hf_config(hf_dir)
    spec = spec_from_hf_config(cfg)
    dtype = hf_dtype(cfg)
    reader = HFTensorReader(hf_dir)
    params_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    if ep > 1 and not spec.is_moe:
        raise ValueError(f"expert_model_parallel_size={ep} needs a MoE model; {spec.family} is dense")
    world = conversion_world_size(tp, pp, ep, etp)
    with megatron_model(spec, tp=tp, pp=pp, params_dtype=params_dtype, divisible_by=divisible_by,
                        ep=ep, etp=etp) as mm:
        model, padded, ps = mm["model"], mm["padded_vocab"], mm["ps"]
        if dist.get_world_size() != world:
            raise ValueError(f"hf_to_megatron needs world_size == {world} (TP={tp} PP={pp} EP={ep}), "
                             f"got {dist.get_world_size()}")
        tp_rank = ps.get_tensor_model_parallel_rank()
        etp_size = tp if etp is None else etp
        etp_rank = ps.get_expert_tensor_parallel_rank() if spec.is_moe else 0
        rank = dist.get_rank()
        items = list(mapping.local_params(model, spec))
        with torch.no_grad():
            for cname, lname, p in _progress(items, len(items), "HF -> Megatron", progress and rank == 0):
                src = "output_layer.weight" if cname == "output_layer.weight(tied)" else cname
                full = mapping.hf_to_mcore(spec, src, reader.get, padded)
                if mapping.expert_index(src) is None:
                    shard = mapping.tp_shard(src, full, tp_rank, tp)
                else:
                    shard = mapping.tp_shard(src, full, etp_rank, etp_size)
                if tuple(shard.shape) != tuple(p.shape):
                    raise mapping.MappingError(f"{lname}: expected shape {tuple(p.shape)}, found {tuple(shard.shape)}")
                p.copy_(shard.to(p.dtype))
        if rank == 0:
            if out_dir.exists() and any(out_dir.iterdir()):
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        with device_remap():
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out_dir))
        if rank == 0:
            copy_hf_side_files(hf_dir, out_dir)
            info = {"source": str(hf_dir.resolve()), "tp": tp, "pp": pp, "vpp": None, "dp": world // (tp * pp),
                    "ep": ep, "etp": etp_size, "world_size": world, "use_distributed_optimizer": False,
                    "params_dtype": params_dtype,
                    "family": spec.family, "num_layers": spec.num_layers, "vocab_size": spec.vocab_size,
                    "model_only": True}
            (out_dir / CONVERT_INFO).write_text(json.dumps(info, indent=2) + "\n")
            # lets megatron_dapo.actor.checkpoint.load_checkpoint(load_optimizer=False) start from it
            (out_dir / "layout.json").write_text(json.dumps(info, indent=2) + "\n")
            (out_dir / "trainer_state.json").write_text(json.dumps({"step": 0, "converted_from": str(hf_dir)}) + "\n")
        dist.barrier()
    return out_dir


def load_megatron_model(model, ckpt_dir: Path) -> None:
    """Load ``ckpt_dir`` (any saved layout) into ``model`` (this rank's stage/shard).

    Raises:
        FileNotFoundError: no ``metadata.json`` in ``ckpt_dir``.
        MappingError: a parameter is missing from the checkpoint.
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import dist_checkpointing

    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-core dist checkpoint (no metadata.json)")
    with device_remap():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
        res = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise mapping.MappingError(f"{ckpt_dir}: parameters missing from the checkpoint: {missing[:5]}")


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, hf_config_dir: Optional[str | Path] = None,
                   max_shard_bytes: int = 5 * 1024 ** 3, progress: bool = True) -> Path:
    """Export a Megatron torch_dist checkpoint (a converted one or a training ``iter_*`` directory) to
    HF safetensors + config/tokenizer files. Runs in one process at TP=PP=1.

    ``hf_config_dir`` supplies config.json/tokenizer when ``ckpt_dir`` has no copy (training
    checkpoints: the run's HF model directory).

    Raises:
        FileNotFoundError: checkpoint or config.json missing.
        UnsupportedModelError / MappingError: see the module docstring.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint directory not found: {ckpt_dir}")
    cfg_src = ckpt_dir if (ckpt_dir / "config.json").is_file() else (Path(hf_config_dir) if hf_config_dir else None)
    if cfg_src is None or not (cfg_src / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {ckpt_dir}; pass the HF model directory (--hf-config)")
    cfg = read_hf_config(cfg_src)
    spec = spec_from_hf_config(cfg)
    dtype = hf_dtype(cfg)
    with megatron_model(spec, tp=1, pp=1, params_dtype="bf16" if dtype == torch.bfloat16 else "fp32") as mm:
        model = mm["model"]
        load_megatron_model(model, ckpt_dir)
        params = {c: p for c, _, p in mapping.local_params(model, spec) if not c.endswith("(tied)")}
        missing = [n for n in mapping.mcore_names(spec) if n not in params]
        if missing:
            raise mapping.MappingError(f"model lacks parameters {missing[:5]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
            old.unlink()
        names = mapping.mcore_names(spec)

        def hf_tensors():
            for name in _progress(names, len(names), "Megatron -> HF", progress):
                yield from ((h, t.to(dtype)) for h, t in mapping.mcore_to_hf(spec, name, params[name].detach()))

        with torch.no_grad():
            write_safetensors_shards(hf_tensors(), out_dir, max_shard_bytes=max_shard_bytes)
    copy_hf_side_files(cfg_src, out_dir)
    return out_dir


def fixed_batch(vocab_size: int, n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    """int64 ``[n, length]`` token ids in ``[0, vocab_size)`` (the verification batch)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


def megatron_logits(model, tokens: torch.Tensor, tp: int, true_vocab: int) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[n, length, true_vocab]`` of a PP=1 ``GPTModel`` (TP gathered); fp64 when
    the model was cast with ``.double()``."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1).view(1, 1, s, s)
    with torch.no_grad(), device_remap():
        out = model(tokens, pos, causal)
        if tp > 1:
            # heavy: megatron-core, imported once a model is built (after the CPU shims)
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            out = gather_from_tensor_model_parallel_region(out)
    out = out[..., :true_vocab]
    return out if out.dtype == torch.float64 else out.float()


def exact_rmsnorm(model: torch.nn.Module) -> int:
    """Make every HF RMSNorm instance of ``model`` compute in its input dtype (transformers' Llama / Qwen2 /
    Qwen3 RMSNorm up-cast to fp32 internally, which caps an fp64 forward at fp32 accuracy). Instance-level
    ``forward`` override (same formula: ``w * x * rsqrt(mean(x^2) + eps)``); returns the number changed."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "variance_epsilon") and isinstance(getattr(mod, "weight", None), torch.Tensor):
            def fwd(x, _m=mod):
                return _m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _m.variance_epsilon))
            mod.forward = fwd
            n += 1
    return n


def exact_hf_router(model: torch.nn.Module) -> int:
    """Make every HF top-k softmax router of ``model`` compute its probabilities in the input dtype instead of
    fp32, so a float64 model routes in float64; returns the number of routers changed (0 for dense models).

    A router is a module with ``top_k``, ``norm_topk_prob`` and a ``[E, hidden]`` ``weight`` (transformers 5.x
    ``models/qwen3_moe/modeling_qwen3_moe.py``, ``Qwen3MoeTopKRouter``). The instance-level ``forward`` keeps
    the original's formula and outputs: softmax over all experts, top-k, optional renormalisation; it returns
    ``(router_logits [T, E], top-k weights [T, k], top-k indices [T, k] int64)``."""
    n = 0
    for mod in model.modules():
        if not (hasattr(mod, "top_k") and hasattr(mod, "norm_topk_prob") and isinstance(mod.weight, torch.Tensor)):
            continue

        def fwd(x, _m=mod):
            logits = torch.nn.functional.linear(x.reshape(-1, _m.weight.shape[1]), _m.weight)
            top, idx = torch.topk(torch.softmax(logits, dim=-1), _m.top_k, dim=-1)
            if _m.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top, idx
        mod.forward = fwd
        n += 1
    return n


_FP64_ROUTING = False


def exact_moe_routing() -> None:
    """Let megatron-core's top-k softmax routing keep float64 logits in float64 (idempotent, process-wide).

    megatron-core 0.16.1 (``moe_utils.topk_routing_with_score_function``) always takes the router softmax in
    fp32, which caps an fp64 forward at fp32 accuracy. The replacement handles fp64 logits with plain softmax
    scoring (no groups, scaling, expert bias, fusion or router replay) with the same formula in fp64 and passes
    everything else to the original: returns ``(probs [T, E] float64, routing_map [T, E] bool)``.
    """
    global _FP64_ROUTING
    if _FP64_ROUTING:
        return
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.transformer.moe import router

    original = router.topk_routing_with_score_function

    def routing(logits, topk, use_pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None,
                score_function="softmax", expert_bias=None, fused=False, router_replay=None):
        plain = (logits.dtype == torch.float64 and score_function == "softmax" and not group_topk
                 and not scaling_factor and expert_bias is None and not fused and router_replay is None)
        if not plain:
            return original(logits, topk, use_pre_softmax=use_pre_softmax, num_groups=num_groups,
                            group_topk=group_topk, scaling_factor=scaling_factor, score_function=score_function,
                            expert_bias=expert_bias, fused=fused, router_replay=router_replay)
        if use_pre_softmax:
            probs, idx = torch.topk(torch.softmax(logits, dim=-1), topk, dim=1)
        else:
            top, idx = torch.topk(logits, topk, dim=1)
            probs = torch.softmax(top, dim=-1)
        routing_probs = torch.zeros_like(logits).scatter(1, idx, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        return routing_probs, routing_map

    router.topk_routing_with_score_function = routing
    _FP64_ROUTING = True


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, *, fp64: bool = False) -> torch.Tensor:
    """transformers' fp32 logits ``[n, length, vocab]`` for ``tokens``; ``fp64=True``: the model cast to
    float64 with :func:`exact_rmsnorm` and :func:`exact_hf_router` (RoPE tables stay fp32-computed, as in
    Megatron), fp64 logits."""
    from transformers import AutoModelForCausalLM  # heavy: transformers, only loaded where a model or tokenizer is

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if fp64:
        model.double()
        exact_rmsnorm(model)
        if exact_hf_router(model):
            # transformers' default MoE expert kernel (torch grouped_mm) has no float64
            model.set_experts_implementation("eager")
    with torch.no_grad():
        out = model(tokens).logits
    return out.double() if fp64 else out.float()


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs differences of logits and of log-softmax (log-probs) between two ``[n, s, V]`` tensors."""
    return {"max_abs_logits": float((a - b).abs().max()),
            "max_abs_logprobs": float((torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().max())}


#: fp64 comparison bound: both sides in float64 agree to ~1e-13 when the weight mapping is right.
FP64_TOLERANCE = 1e-9


def verify_against_hf(hf_dir: str | Path, ckpt_dir: str | Path, *, fp64_if_above: Optional[float] = None
                      ) -> dict[str, float]:
    """Load ``ckpt_dir`` at TP=PP=1 and compare its logits with transformers' on :func:`fixed_batch`.

    Returns ``{"max_abs_logits", "max_abs_logprobs"}`` (fp32). Tiny models agree to ≤ 1e-5; deep real
    models do not, because fp32 rounding alone moves transformers' own log-probs that far from the exact
    result (SmolLM2-135M, 30 layers: 7.7e-5). So when ``fp64_if_above`` is given and the fp32 log-prob
    difference exceeds it, the check is repeated in float64 (both models cast, see :func:`hf_logits`) and the
    dict also gets ``fp64_max_abs_logprobs`` (mapping error; ~1e-13 when right), ``megatron_fp32_error`` and
    ``hf_fp32_error`` (each fp32 model's max abs log-prob distance from the fp64 transformers result).
    Memory: the fp64 pass holds both models in float64 (16 bytes per parameter).
    """
    spec = spec_from_hf_config(hf_dir)
    tokens = fixed_batch(spec.vocab_size)
    with megatron_model(spec, tp=1, pp=1) as mm:
        load_megatron_model(mm["model"], Path(ckpt_dir))
        meg = megatron_logits(mm["model"], tokens, 1, spec.vocab_size)
        hf32 = hf_logits(hf_dir, tokens)
        out = compare_logits(meg, hf32)
        if fp64_if_above is None or out["max_abs_logprobs"] <= fp64_if_above:
            return out
        mm["model"].double()
        if spec.is_moe:
            exact_moe_routing()
        meg64 = megatron_logits(mm["model"], tokens, 1, spec.vocab_size)
    hf64 = hf_logits(hf_dir, tokens, fp64=True)
    out["fp64_max_abs_logprobs"] = compare_logits(meg64, hf64)["max_abs_logprobs"]
    out["megatron_fp32_error"] = compare_logits(meg.double(), hf64)["max_abs_logprobs"]
    out["hf_fp32_error"] = compare_logits(hf32.double(), hf64)["max_abs_logprobs"]
    return out


def report_verify(diff: dict, tolerance: float) -> int:
    """Print a ``--verify`` result (max abs logits / logprobs difference) and return the tool's exit code.

    Passes when the fp32 log-probs agree within ``tolerance``, or — when :func:`verify_against_hf` ran the
    fp64 check — when the fp64 log-probs agree within :data:`FP64_TOLERANCE` and Megatron's fp32 error is at
    most twice transformers' own fp32 error (both measured against the fp64 result).
    """
    print(f"verify: max abs diff logits={diff['max_abs_logits']:.3e} logprobs={diff['max_abs_logprobs']:.3e} "
          f"(tolerance {tolerance:g})")
    if diff["max_abs_logprobs"] <= tolerance:
        return 0
    if "fp64_max_abs_logprobs" not in diff:
        return 1
    ok = (diff["fp64_max_abs_logprobs"] <= FP64_TOLERANCE
          and diff["megatron_fp32_error"] <= 2 * diff["hf_fp32_error"])
    print(f"verify (fp64, both models cast): max abs diff logprobs={diff['fp64_max_abs_logprobs']:.3e} "
          f"(tolerance {FP64_TOLERANCE:g}); fp32 error vs fp64: megatron {diff['megatron_fp32_error']:.3e}, "
          f"transformers {diff['hf_fp32_error']:.3e} -> {'ok: the fp32 difference is rounding' if ok else 'FAILED'}")
    return 0 if ok else 1


def tool_errors() -> tuple:
    """Exceptions the conversion tools turn into one ``error: ...`` line and exit code 2."""
    return (UnsupportedModelError, MappingError, FileNotFoundError, ValueError)
