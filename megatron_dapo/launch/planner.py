"""Parallelism planner: which (TP, PP, VPP, CP, token budget, recompute, offload) layouts fit in GPU memory.

Everything here is analytic (no torch, no GPU). Units: parameter counts are elements; memory is bytes
internally and GiB (2**30 bytes) in reports; ``gpu_memory_gb`` is read as GiB (an "80 GB" H100 reports
81,559 MiB ≈ 79.6 GiB, which the default ``reserved_gb`` absorbs).

:func:`plan` enumerates every (TP, PP, VPP, CP) that divides the cluster and the model, every token
budget, recompute mode and optimizer-offload choice, estimates each one's per-GPU memory and keeps
the layouts that fit; :func:`format_plan` prints them and :func:`config_overrides` turns one into
``megatron_dapo.config`` overrides. The formulas and their sources are documented where they are
implemented: parameter counts in :mod:`megatron_dapo.launch.param_count` (:func:`count_parameters`),
weights / gradients / optimizer state, activations (Korthikanti et al. 2022), the pipeline schedule,
logits and the colocated SGLang KV cache in :mod:`megatron_dapo.launch.memory`
(:func:`estimate_memory`). Every public name of those two modules is importable from here.

The ranking of feasible layouts is a heuristic, not a measurement: fewer optimizer offloads, then no
recomputation before full recomputation, then a smaller model-parallel group (TP·PP·CP), a smaller
pipeline bubble, and a larger token budget.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

# Re-exported: these names were defined here before param_count.py / memory.py were split out (PlanRequest
# moved to memory.py, which uses it, so that memory.py need not import this module),
# and callers import them from this module.
from megatron_dapo.launch.memory import (  # noqa: F401
    GiB, Layout, MemoryEstimate, PlanRequest, _in_flight_units, activation_bytes_per_layer, auto_engine_tp,
    estimate_memory, korthikanti_activation_bytes_per_layer, kv_cache_bytes_per_token,
)
from megatron_dapo.launch.param_count import (  # noqa: F401
    Arch, ParamCount, PlanError, RankParams, check_tp, count_parameters, padded_vocab_size, stage_layers,
)


# --------------------------------------------------------------------------- planning


@dataclass
class Candidate:
    layout: Layout
    memory: Optional[MemoryEstimate]
    reasons: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons


@dataclass
class PlanResult:
    request: PlanRequest
    arch: Arch
    feasible: list[Candidate]
    rejected: list[Candidate]
    engine_tp: int
    kv_bytes_per_token: float

    @property
    def best(self) -> Optional[Candidate]:
        return self.feasible[0] if self.feasible else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sort_key(c: Candidate) -> tuple:
    lay, mem = c.layout, c.memory
    assert mem is not None
    return (lay.optimizer_offload, {"none": 0, "selective": 1, "full": 2}[lay.recompute], lay.model_parallel,
            round(mem.pipeline_bubble, 3), -lay.token_budget, lay.vpp or 0, mem.train_total)


def plan(req: PlanRequest) -> PlanResult:
    """Enumerate layouts for ``req``; return feasible ones ranked (see module doc) and rejected ones with
    reasons. Raises PlanError for invalid requests (non-positive sizes, a fraction outside (0, 1))."""
    if req.nodes < 1 or req.gpus_per_node < 1:
        raise PlanError(f"--nodes={req.nodes} and --gpus-per-node={req.gpus_per_node} must be >= 1")
    if req.gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory-gb={req.gpu_memory_gb} must be > 0")
    if not 0 < req.sglang_mem_fraction < 1:
        raise PlanError(f"--sglang-mem-fraction={req.sglang_mem_fraction} must be in (0, 1)")
    if req.max_prompt_length < 1 or req.max_response_length < 1:
        raise PlanError("--max-prompt-length and --max-response-length must be >= 1")
    if req.params_dtype not in ("bf16", "fp32"):
        raise PlanError(f"params_dtype={req.params_dtype!r}: must be bf16 or fp32")
    arch = req.hf_config if isinstance(req.hf_config, Arch) else Arch.from_hf_config(req.hf_config)
    world = req.world_size
    seq = req.max_seq_len
    budgets = list(req.token_budgets or [seq, 2 * seq, 4 * seq])
    etp = req.sglang_tp or auto_engine_tp(arch, req)
    if req.sglang_tp is not None:
        if req.gpus_per_node % etp or arch.num_attention_heads % etp:
            raise PlanError(f"--sglang-tp={etp} must divide --gpus-per-node={req.gpus_per_node} "
                            f"and num_attention_heads={arch.num_attention_heads}")
    max_tp = req.max_tp or req.gpus_per_node
    feasible: list[Candidate] = []
    rejected: list[Candidate] = []
    counts_cache: dict[tuple, ParamCount] = {}
    limit = req.gpu_memory_gb * GiB

    for tp in [t for t in _divisors(req.gpus_per_node) if t <= max_tp]:
        for pp in range(1, req.max_pp + 1):
            for vpp in req.vpp_sizes:
                for cp in req.cp_sizes:
                    structural: list[str] = []
                    try:
                        check_tp(arch, tp)
                    except PlanError as e:
                        structural.append(str(e))
                    if arch.num_layers % pp:
                        structural.append(f"PP={pp} does not divide num_layers={arch.num_layers}")
                    if vpp is not None:
                        if pp < 2:
                            structural.append(f"VPP={vpp} needs PP >= 2")
                        elif arch.num_layers % (pp * vpp):
                            structural.append(f"PP×VPP={pp}×{vpp} does not divide num_layers={arch.num_layers}")
                    if world % (tp * pp * cp):
                        structural.append(f"TP×PP×CP={tp * pp * cp} does not divide {world} GPUs")
                    dp = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else 0
                    if dp and req.ppo_mini_batch_size and req.ppo_mini_batch_size % dp:
                        structural.append(f"DP={dp} does not divide ppo_mini_batch_size={req.ppo_mini_batch_size}")
                    if structural:
                        # PP values that divide neither layers nor GPUs are noise: record them only once.
                        if world % pp == 0 or arch.num_layers % pp == 0:
                            rejected.append(Candidate(Layout(tp, pp, vpp, cp, dp, 0, "-", False, False),
                                                      None, structural))
                        continue
                    key = (tp, pp, vpp)
                    if key not in counts_cache:
                        counts_cache[key] = count_parameters(arch, tp, pp, vpp, req.make_vocab_size_divisible_by)
                    for budget in budgets:
                        for recompute in req.recompute_options:
                            for offload in ([False, True] if req.allow_optimizer_offload else [False]):
                                lay = Layout(tp, pp, vpp, cp, dp, budget, recompute, offload,
                                             req.sequence_parallel and tp > 1)
                                reasons: list[str] = []
                                if budget < seq:
                                    reasons.append(f"token budget {budget} < one full sequence ({seq} tokens)")
                                if recompute == "selective" and req.flash_attention:
                                    reasons.append("selective (core-attention) recompute saves nothing with "
                                                   "flash attention; use none or full")
                                if cp > 1 and (budget // cp) % 2:
                                    reasons.append(f"token budget/CP={budget / cp:g} must be even (CP load balancing)")
                                mem = estimate_memory(arch, lay, req, counts_cache[key], etp)
                                if mem.train_total > limit:
                                    reasons.append(f"training needs {mem.train_total / GiB:.1f} GiB > "
                                                   f"{req.gpu_memory_gb:g} GiB")
                                if offload and not reasons:
                                    no_off = estimate_memory(arch, Layout(tp, pp, vpp, cp, dp, budget, recompute,
                                                                          False, lay.sequence_parallel),
                                                             req, counts_cache[key], etp)
                                    if no_off.train_total <= limit:
                                        reasons.append("optimizer offload not needed (fits without it)")
                                if req.colocated and mem.kv_tokens_per_engine < seq:
                                    reasons.append(f"SGLang KV cache holds {mem.kv_tokens_per_engine} tokens "
                                                   f"< one sequence ({seq}) at mem fraction {req.sglang_mem_fraction}")
                                if req.colocated and mem.rollout_offload_required:
                                    rollout_use = (req.sglang_mem_fraction * limit + mem.engine_idle + mem.reserved)
                                    if rollout_use > limit:
                                        reasons.append(f"rollout needs {rollout_use / GiB:.1f} GiB even with "
                                                       f"actor.offload (lower --sglang-mem-fraction)")
                                (rejected if reasons else feasible).append(Candidate(lay, mem, reasons))
    feasible.sort(key=_sort_key)
    return PlanResult(req, arch, feasible, rejected, etp, kv_cache_bytes_per_token(arch, etp))


def config_overrides(c: Candidate, req: PlanRequest) -> list[str]:
    """``key=value`` overrides for :mod:`megatron_dapo.config` that realise candidate ``c``."""
    lay, mem = c.layout, c.memory
    assert mem is not None
    out = [
        f"actor.tensor_model_parallel_size={lay.tp}",
        f"actor.pipeline_model_parallel_size={lay.pp}",
        f"actor.virtual_pipeline_model_parallel_size={lay.vpp if lay.vpp else 'null'}",
        f"actor.context_parallel_size={lay.cp}",
        f"actor.sequence_parallel={'true' if lay.sequence_parallel else 'false'}",
        f"actor.use_distributed_optimizer={'true' if req.distributed_optimizer else 'false'}",
        f"actor.recompute={'null' if lay.recompute == 'none' else lay.recompute}",
        f"actor.max_tokens_per_gpu={lay.token_budget}",
        f"actor.params_dtype={req.params_dtype}",
        f"actor.offload={'true' if mem.rollout_offload_required else 'false'}",
        f"rollout.engine_tp_size={mem.engine_tp}",
        f"rollout.mem_fraction_static={req.sglang_mem_fraction}",
        f"rollout.colocated={'true' if req.colocated else 'false'}",
    ]
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:6.1f}"


def format_plan(result: PlanResult, top: int = 10, show_rejected: bool = False) -> str:
    """Human-readable report: model facts, ranked feasible layouts (GiB per GPU), the best layout's
    config overrides, and rejection reasons (counted; listed with ``show_rejected``)."""
    req, arch = result.request, result.arch
    lines = [
        f"model: {arch.name}  params={arch.num_parameters():,}  layers={arch.num_layers} hidden={arch.hidden_size} "
        f"heads={arch.num_attention_heads}/{arch.num_query_groups} ffn={arch.ffn_hidden_size} vocab={arch.vocab_size} "
        f"tied={arch.tied_embeddings}",
        f"cluster: {req.nodes} node(s) x {req.gpus_per_node} GPUs x {req.gpu_memory_gb:g} GiB; sequence = "
        f"{req.max_prompt_length} prompt + {req.max_response_length} response = {req.max_seq_len} tokens; "
        f"{'colocated' if req.colocated else 'separate'} SGLang TP={result.engine_tp} mem_fraction={req.sglang_mem_fraction}",
        f"KV cache: {result.kv_bytes_per_token:,.0f} B/token/GPU at engine TP={result.engine_tp}; "
        f"reserved {req.reserved_gb:g} GiB (trainer) + {req.engine_overhead_gb if req.colocated else 0:g} GiB "
        f"(idle engine)",
        "",
        f"{len(result.feasible)} feasible layouts (GiB per GPU, peak pipeline stage):",
        " #  TP PP VPP CP  DP  tokens  recomp  optoff  weights grads  optim  activ logits  TOTAL  "
        "act.offload  KV tok/engine  ubatches bubble",
    ]
    for i, c in enumerate(result.feasible[:top]):
        lay, m = c.layout, c.memory
        assert m is not None
        lines.append(
            f"{i + 1:2d} {lay.tp:3d} {lay.pp:2d} {str(lay.vpp or '-'):>3} {lay.cp:2d} {lay.dp:3d} {lay.token_budget:7d} "
            f"{lay.recompute:>7} {str(lay.optimizer_offload):>7} {_gib(m.weights)} {_gib(m.grads)} {_gib(m.optimizer)} "
            f"{_gib(m.activations)} {_gib(m.logits)} {_gib(m.train_total)}  {str(m.rollout_offload_required):>11} "
            f"{m.kv_tokens_per_engine:14,d} {m.num_microbatches:9d} {m.pipeline_bubble:6.2f}")
    if result.best is not None:
        lines += ["", "best layout as config overrides:", "  " + " ".join(config_overrides(result.best, req))]
    else:
        lines += ["", "no feasible layout: add nodes, lower the token budget/response length, or allow offload"]
    counts = Counter(re.sub(r"\d+(\.\d+)?", "N", r) for c in result.rejected for r in c.reasons)
    lines += ["", f"{len(result.rejected)} rejected layouts; reasons (count):"]
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {n:5d}  {reason}")
    if show_rejected:
        lines += ["", "all rejected layouts:"]
        for c in result.rejected:
            lines.append(f"  {c.layout.describe()}: {'; '.join(c.reasons)}")
    return "\n".join(lines)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``tools/plan_parallelism.py`` entry point (see ``--help``). Returns 0, or 1 when nothing fits."""
    ap = argparse.ArgumentParser(description="List Megatron parallel layouts that fit in GPU memory (analytic).")
    ap.add_argument("--hf-config", required=True, help="HF model directory or config.json")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per-GPU memory in GiB")
    ap.add_argument("--max-prompt-length", type=int, default=2048)
    ap.add_argument("--max-response-length", type=int, default=20480)
    ap.add_argument("--colocated", action="store_true", help="SGLang engines share the training GPUs")
    ap.add_argument("--sglang-mem-fraction", type=float, default=0.6)
    ap.add_argument("--sglang-tp", type=int, default=None)
    ap.add_argument("--token-budgets", type=str, default=None, help="comma-separated tokens per micro-batch")
    ap.add_argument("--ppo-mini-batch-size", type=int, default=512)
    ap.add_argument("--params-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--no-flash-attention", action="store_true")
    ap.add_argument("--no-optimizer-offload", action="store_true")
    ap.add_argument("--logprob-chunk-size", type=int, default=1024)
    ap.add_argument("--reserved-gb", type=float, default=5.0)
    ap.add_argument("--engine-overhead-gb", type=float, default=3.0)
    ap.add_argument("--max-tp", type=int, default=None)
    ap.add_argument("--max-pp", type=int, default=16)
    ap.add_argument("--num-microbatches", type=int, default=None)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--show-rejected", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the best layout's overrides as JSON")
    args = ap.parse_args(list(argv) if argv is not None else None)
    budgets = None
    if args.token_budgets:
        try:
            budgets = [int(x) for x in args.token_budgets.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--token-budgets: expected comma-separated integers, got {args.token_budgets!r}")
    req = PlanRequest(
        hf_config=args.hf_config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb, max_prompt_length=args.max_prompt_length,
        max_response_length=args.max_response_length, colocated=args.colocated,
        sglang_mem_fraction=args.sglang_mem_fraction, sglang_tp=args.sglang_tp, token_budgets=budgets,
        ppo_mini_batch_size=args.ppo_mini_batch_size or None, params_dtype=args.params_dtype,
        distributed_optimizer=not args.no_distributed_optimizer, sequence_parallel=not args.no_sequence_parallel,
        flash_attention=not args.no_flash_attention, allow_optimizer_offload=not args.no_optimizer_offload,
        logprob_chunk_size=args.logprob_chunk_size, reserved_gb=args.reserved_gb,
        engine_overhead_gb=args.engine_overhead_gb, max_tp=args.max_tp, max_pp=args.max_pp,
        num_microbatches=args.num_microbatches)
    try:
        result = plan(req)
    except PlanError as e:
        ap.error(str(e))
    if args.json:
        best = result.best
        print(json.dumps({"overrides": config_overrides(best, req) if best else [],
                          "layout": best.layout.describe() if best else None}))
    else:
        print(format_plan(result, top=args.top, show_rejected=args.show_rejected))
    return 0 if result.feasible else 1
