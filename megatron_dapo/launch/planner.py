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

MoE models (``num_experts`` in the config) also enumerate expert parallelism: every EP in
``ep_sizes`` (default: the divisors of ``num_experts`` with ``EP·ETP <= gpus_per_node``) and ETP in
``etp_sizes`` (default 1 and TP), with megatron-core's constraints (EP divides the experts, ETP the expert FFN
size, ``ETP·EP·PP`` the world size; sequence parallelism when TP > 1 and EP > 1).

The ranking of feasible layouts is a heuristic, not a measurement: fewer optimizer offloads, then no
recomputation before full recomputation, then a smaller model-parallel group (TP·PP·CP), a smaller
pipeline bubble, and a larger token budget; for MoE, among otherwise equal layouts, a smaller ETP (whole
experts per GPU: fine-grained experts split over ETP make GEMMs smaller still) and then a larger EP (fewer
experts, weights and optimizer state per GPU, with the all-to-all kept inside one node by the default
``ep_sizes``).
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
    MOE_TOKEN_DISPATCHERS, GiB, Layout, MemoryEstimate, PlanRequest, _in_flight_units, activation_bytes_per_layer,
    auto_engine_tp, estimate_memory, korthikanti_activation_bytes_per_layer, kv_cache_bytes_per_token,
    moe_mlp_activation_bytes,
)
from megatron_dapo.launch.param_count import (  # noqa: F401
    Arch, ParamCount, PlanError, RankParams, check_ep, check_tp, count_parameters, padded_vocab_size, stage_layers,
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


def _sort_key(c: Candidate, moe: bool = False) -> tuple:
    lay, mem = c.layout, c.memory
    assert mem is not None
    expert = (lay.expert_tp, -lay.ep) if moe else (0, 0)  # dense layouts: no expert preference
    return (lay.optimizer_offload, {"none": 0, "selective": 1, "full": 2}[lay.recompute], lay.model_parallel,
            round(mem.pipeline_bubble, 3), -lay.token_budget, lay.vpp or 0, *expert, mem.train_total)


def _expert_choices(arch: Arch, req: PlanRequest, tp: int) -> list[tuple[int, Optional[int]]]:
    """(EP, ETP) pairs to try at TP ``tp``: ``[(1, None)]`` for dense models (ETP ``None`` = TP)."""
    if not arch.is_moe:
        return [(1, None)]
    etps = sorted({tp if e is None else e for e in req.etp_sizes})
    out = []
    for etp in etps:
        eps = req.ep_sizes or [e for e in _divisors(arch.num_experts) if e * etp <= req.gpus_per_node]
        out += [(ep, None if etp == tp else etp) for ep in eps]
    return out


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
    if req.moe_token_dispatcher not in MOE_TOKEN_DISPATCHERS:
        raise PlanError(f"--moe-token-dispatcher={req.moe_token_dispatcher!r}: must be one of "
                        f"{', '.join(MOE_TOKEN_DISPATCHERS)}")
    arch = req.hf_config if isinstance(req.hf_config, Arch) else Arch.from_hf_config(req.hf_config)
    if not arch.is_moe and (req.ep_sizes and set(req.ep_sizes) != {1} or req.sglang_ep != 1):
        raise PlanError(f"--ep / --sglang-ep: {arch.name} is not a MoE model (no num_experts)")
    for ep in req.ep_sizes or ():
        check_ep(arch, ep, 1)
    if arch.is_moe and (req.sglang_ep < 1 or arch.num_experts % req.sglang_ep):
        raise PlanError(f"--sglang-ep={req.sglang_ep} must divide num_experts={arch.num_experts}")
    world = req.world_size
    seq = req.max_seq_len
    budgets = list(req.token_budgets or [seq, 2 * seq, 4 * seq])
    etp = req.sglang_tp or auto_engine_tp(arch, req)
    if req.sglang_tp is not None:
        if req.gpus_per_node % etp or arch.num_attention_heads % etp:
            raise PlanError(f"--sglang-tp={etp} must divide --gpus-per-node={req.gpus_per_node} "
                            f"and num_attention_heads={arch.num_attention_heads}")
    if etp % req.sglang_ep:
        raise PlanError(f"--sglang-ep={req.sglang_ep} must divide the engine TP ({etp}): SGLang's expert "
                        f"parallelism splits the engine's TP group")
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
                    for ep, etp_choice in _expert_choices(arch, req, tp):
                        etp_size = tp if etp_choice is None else etp_choice
                        expert: list[str] = []
                        try:
                            check_ep(arch, ep, etp_size if arch.is_moe else 1)
                        except PlanError as e:
                            expert.append(str(e))
                        if arch.is_moe and world % (etp_size * ep * pp):
                            expert.append(f"ETP×EP×PP={etp_size * ep * pp} does not divide {world} GPUs")
                        if arch.is_moe and tp > 1 and ep > 1 and not req.sequence_parallel:
                            expert.append("megatron-core needs sequence parallelism with TP > 1 and EP > 1")
                        if expert:
                            rejected.append(Candidate(Layout(tp, pp, vpp, cp, dp, 0, "-", False, False, ep, etp_choice),
                                                      None, expert))
                            continue
                        key = (tp, pp, vpp, ep, etp_size)
                        if key not in counts_cache:
                            counts_cache[key] = count_parameters(arch, tp, pp, vpp, req.make_vocab_size_divisible_by,
                                                                 ep=ep, etp=etp_size if arch.is_moe else 1)
                        moe_kw = dict(ep=ep, etp=etp_choice, dispatcher=req.moe_token_dispatcher)
                        for budget in budgets:
                            for recompute in req.recompute_options:
                                for offload in ([False, True] if req.allow_optimizer_offload else [False]):
                                    lay = Layout(tp, pp, vpp, cp, dp, budget, recompute, offload,
                                                 req.sequence_parallel and tp > 1, **moe_kw)
                                    reasons: list[str] = []
                                    if budget < seq:
                                        reasons.append(f"token budget {budget} < one full sequence ({seq} tokens)")
                                    if recompute == "selective" and req.flash_attention:
                                        reasons.append("selective (core-attention) recompute saves nothing with "
                                                       "flash attention; use none or full")
                                    if cp > 1 and (budget // cp) % 2:
                                        reasons.append(f"token budget/CP={budget / cp:g} must be even "
                                                       f"(CP load balancing)")
                                    mem = estimate_memory(arch, lay, req, counts_cache[key], etp)
                                    if mem.train_total > limit:
                                        reasons.append(f"training needs {mem.train_total / GiB:.1f} GiB > "
                                                       f"{req.gpu_memory_gb:g} GiB")
                                    if offload and not reasons:
                                        no_off = estimate_memory(arch, Layout(tp, pp, vpp, cp, dp, budget, recompute,
                                                                              False, lay.sequence_parallel,
                                                                              **moe_kw),
                                                                 req, counts_cache[key], etp)
                                        if no_off.train_total <= limit:
                                            reasons.append("optimizer offload not needed (fits without it)")
                                    if req.colocated and mem.kv_tokens_per_engine < seq:
                                        reasons.append(f"SGLang KV cache holds {mem.kv_tokens_per_engine} tokens "
                                                       f"< one sequence ({seq}) at mem fraction "
                                                       f"{req.sglang_mem_fraction}")
                                    if req.colocated and mem.rollout_offload_required:
                                        rollout_use = (req.sglang_mem_fraction * limit + mem.engine_idle + mem.reserved)
                                        if rollout_use > limit:
                                            reasons.append(f"rollout needs {rollout_use / GiB:.1f} GiB even with "
                                                           f"actor.offload (lower --sglang-mem-fraction)")
                                    (rejected if reasons else feasible).append(Candidate(lay, mem, reasons))
    feasible.sort(key=lambda c: _sort_key(c, arch.is_moe))
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
    arch = req.hf_config if isinstance(req.hf_config, Arch) else Arch.from_hf_config(req.hf_config)
    if arch.is_moe:
        out += [f"actor.expert_model_parallel_size={lay.ep}",
                f"actor.expert_tensor_parallel_size={lay.expert_tp}",
                f"actor.moe_token_dispatcher_type={lay.dispatcher}"]
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
        f"tied={arch.tied_embeddings}" + (
            f"  MoE: {arch.num_experts} experts top-{arch.moe_topk} ffn={arch.moe_ffn_hidden_size} "
            f"on {arch.num_moe_layers} layers, active params/token={arch.num_active_parameters():,}; "
            f"dispatcher={req.moe_token_dispatcher}, engine EP={req.sglang_ep}" if arch.is_moe else ""),
        f"cluster: {req.nodes} node(s) x {req.gpus_per_node} GPUs x {req.gpu_memory_gb:g} GiB; sequence = "
        f"{req.max_prompt_length} prompt + {req.max_response_length} response = {req.max_seq_len} tokens; "
        f"{'colocated' if req.colocated else 'separate'} SGLang TP={result.engine_tp} mem_fraction={req.sglang_mem_fraction}",
        f"KV cache: {result.kv_bytes_per_token:,.0f} B/token/GPU at engine TP={result.engine_tp}; "
        f"reserved {req.reserved_gb:g} GiB (trainer) + {req.engine_overhead_gb if req.colocated else 0:g} GiB "
        f"(idle engine)",
        "",
        f"{len(result.feasible)} feasible layouts (GiB per GPU, peak pipeline stage):",
        " #  TP PP VPP CP  DP  tokens  recomp  optoff  weights grads  optim  activ logits  TOTAL  "
        "act.offload  KV tok/engine  ubatches bubble" + ("  EP ETP EDP" if arch.is_moe else ""),
    ]
    for i, c in enumerate(result.feasible[:top]):
        lay, m = c.layout, c.memory
        assert m is not None
        lines.append(
            f"{i + 1:2d} {lay.tp:3d} {lay.pp:2d} {str(lay.vpp or '-'):>3} {lay.cp:2d} {lay.dp:3d} {lay.token_budget:7d} "
            f"{lay.recompute:>7} {str(lay.optimizer_offload):>7} {_gib(m.weights)} {_gib(m.grads)} {_gib(m.optimizer)} "
            f"{_gib(m.activations)} {_gib(m.logits)} {_gib(m.train_total)}  {str(m.rollout_offload_required):>11} "
            f"{m.kv_tokens_per_engine:14,d} {m.num_microbatches:9d} {m.pipeline_bubble:6.2f}"
            + (f" {lay.ep:3d} {lay.expert_tp:3d} {lay.expert_dp:3d}" if arch.is_moe else ""))
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
    ap.add_argument("--ep", type=str, default=None,
                    help="MoE: comma-separated expert-parallel sizes to try (default: divisors of num_experts "
                         "with EP x ETP <= --gpus-per-node)")
    ap.add_argument("--etp", type=str, default=None,
                    help="MoE: comma-separated expert tensor-parallel sizes, 'tp' = the layout's TP (default: 1,tp)")
    ap.add_argument("--moe-token-dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    ap.add_argument("--sglang-ep", type=int, default=1, help="MoE: engine expert parallelism (SGLang --ep-size)")
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
    ep_sizes = etp_sizes = None
    try:
        if args.ep:
            ep_sizes = [int(x) for x in args.ep.split(",") if x.strip()]
        if args.etp:
            etp_sizes = [None if x.strip() == "tp" else int(x) for x in args.etp.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--ep / --etp: expected comma-separated integers ('tp' allowed in --etp), got "
                 f"{args.ep!r} / {args.etp!r}")
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
        num_microbatches=args.num_microbatches, ep_sizes=ep_sizes, etp_sizes=etp_sizes or (1, None),
        moe_token_dispatcher=args.moe_token_dispatcher, sglang_ep=args.sglang_ep)
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
