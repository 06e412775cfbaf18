"""``megatron-dapo train CONFIG --dry-run``: check a cluster run before spending a cluster hour, on CPU.

1. validates the config as the cluster will see it (paths and GPU-only features are not checked here);
2. builds every (PP rank, TP rank) shard of the megatron-core model on the **meta** device (no memory, no
   process group: megatron-core's parallel-state setters stand in for the real groups) and prints per-rank
   parameter counts, separating vocabulary padding rows and TP-replicated copies, next to the planner's
   analytic counts (they must agree, rank by rank and in total). MoE models are built at the actor's
   expert parallelism (``actor.expert_model_parallel_size`` / ``expert_tensor_parallel_size``): each row is
   the GPU at that (PP, TP) rank on expert-parallel rank 0 (every EP rank holds as many experts), and its
   routed-expert parameters are listed apart; total and active-per-token parameter counts are printed;
3. prints the planner's per-GPU memory estimate for the layout;
4. prints the ``sbatch`` command the launcher would submit (for ``--nodes``, default: the ``NODES`` of the
   example's ``submit.sh`` beside the config, else the fewest nodes that hold the model-parallel groups).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .actor.parallel import free_port
from .config import ConfigError, DAPOConfig
from .cpu_shims import apply_cpu_shims
from .launch.nemo import build_launch_plan, render_dry_run
from .launch.planner import Arch, Layout, PlanError, PlanRequest, check_ep, count_parameters, estimate_memory
from .models import mapping
from .models.hf_config import gpt_model_kwargs, read_hf_config, spec_from_hf_config, transformer_config_kwargs
from .models.hf_config import layer_spec as moe_layer_spec


@dataclass
class ShardCount:
    pp_rank: int
    tp_rank: int
    params: int
    padding: int
    duplicate: int
    experts: int = 0
    """MoE: routed-expert parameters inside ``params`` (one EP/ETP shard)."""

    @property
    def unique(self) -> int:
        return self.params - self.padding - self.duplicate


class _FakeGroup:
    """Stands in for a process group when only its size and this rank's index matter (meta build)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _fake_pg_collection(tp: int, t: int, pp: int, p: int, ep: Optional[int] = None, etp: int = 1):
    """Fake groups of the rank at TP rank ``t``, PP rank ``p``; with ``ep`` (MoE) also the expert groups of
    expert-parallel rank 0 and expert-tensor rank ``t % etp``."""
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.process_groups_config import ProcessGroupCollection

    one = _FakeGroup(1, 0)
    groups = dict(tp=_FakeGroup(tp, t), pp=_FakeGroup(pp, p), cp=one, dp=one, dp_cp=one, tp_cp=_FakeGroup(tp, t),
                  embd=_FakeGroup(2 if pp > 1 else 1, 0 if p == 0 else 1), pos_embd=one)
    if ep is not None:
        groups.update(ep=_FakeGroup(ep, 0), expt_tp=_FakeGroup(etp, t % etp), expt_dp=one,
                      tp_ep=_FakeGroup(etp * ep, t % etp), tp_dp_cp=_FakeGroup(tp, t))
    return ProcessGroupCollection(**groups)


@contextmanager
def _fake_parallel_state(tp: int, pp: int, vpp: Optional[int], ep: int = 1, etp: int = 1):
    """Make megatron-core believe it runs at TP×PP (and EP×ETP for experts) without any process group
    (single process, meta device)."""
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import parallel_state as ps

    ps.set_tensor_model_parallel_world_size(tp)
    ps.set_pipeline_model_parallel_world_size(pp)
    ps.set_expert_model_parallel_world_size(ep)
    ps.set_expert_model_parallel_rank(0)
    ps.set_expert_tensor_parallel_world_size(etp)
    if vpp:
        ps.set_virtual_pipeline_model_parallel_world_size(vpp)
    try:
        yield ps
    finally:
        ps.set_tensor_model_parallel_world_size(None)
        ps.set_pipeline_model_parallel_world_size(None)
        ps.set_tensor_model_parallel_rank(None)
        ps.set_pipeline_model_parallel_rank(None)
        ps.set_expert_model_parallel_world_size(None)
        ps.set_expert_model_parallel_rank(None)
        ps.set_expert_tensor_parallel_world_size(None)
        ps.set_expert_tensor_parallel_rank(None)
        if vpp:
            ps.set_virtual_pipeline_model_parallel_world_size(None)


def count_shards_on_meta(hf_config: dict, tp: int, pp: int, vpp: Optional[int] = None,
                         make_vocab_size_divisible_by: int = 128, ep: int = 1,
                         etp: Optional[int] = None) -> list[ShardCount]:
    """Build each rank's GPTModel chunks on the meta device and count their parameters.

    ``padding`` = vocabulary rows beyond the HF vocabulary on this rank; ``duplicate`` = parameters another
    rank already owns (TP-replicated norms and MoE routers on TP ranks > 0, the tied output-embedding copy on
    the last stage). MoE models are built at expert parallelism ``ep`` / ``etp`` (``None``: TP) on
    expert-parallel rank 0; ``experts`` are that rank's routed-expert parameters (one of ``ep·etp`` distinct
    shards per stage). So ``sum(unique - experts) + sum over stages of experts·ep·etp`` over the grid is the
    HF parameter count (``sum(unique)`` for dense models). Raises UnsupportedModelError when the layout does
    not divide the model.
    """
    apply_cpu_shims()

    own_pg = not dist.is_initialized()
    if own_pg:  # megatron-core reads group sizes only when torch.distributed is initialised
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return _count(hf_config, tp, pp, vpp, make_vocab_size_divisible_by, ep, etp)
    finally:
        if own_pg:
            dist.destroy_process_group()


def _count(hf_config, tp, pp, vpp, make_vocab_size_divisible_by, ep=1, etp=None):
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    spec = spec_from_hf_config(hf_config)
    vpad = spec.padded_vocab_size(tp, make_vocab_size_divisible_by)
    rows = vpad // tp
    etp = (tp if spec.is_moe else 1) if etp is None else etp
    out = []
    with _fake_parallel_state(tp, pp, vpp, ep, etp) as ps:
        # megatron-core requires sequence parallelism for MoE with TP > 1; it does not change parameter shapes
        kw = transformer_config_kwargs(spec, tp=tp, pp=pp, vpp=vpp, params_dtype="bf16", on_cpu=True,
                                       sequence_parallel=spec.is_moe and tp > 1, ep=ep, etp=etp)
        kw.update(perform_initialization=False, use_cpu_initialization=False)
        config = TransformerConfig(**kw)
        layer_spec = get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
        for p in range(pp):
            ps.set_pipeline_model_parallel_rank(p)
            for t in range(tp):
                ps.set_tensor_model_parallel_rank(t)
                ps.set_expert_tensor_parallel_rank(t % etp)
                total = padding = duplicate = experts = 0
                for vp in range(vpp or 1):
                    vp_stage = vp if vpp else None
                    chunk_spec = moe_layer_spec(spec, config, vp_stage=vp_stage) if spec.is_moe else layer_spec
                    with torch.device("meta"):
                        model = GPTModel(config=config, transformer_layer_spec=chunk_spec,
                                         pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                                         vp_stage=vp_stage, pg_collection=_fake_pg_collection(
                                             tp, t, pp, p, ep if spec.is_moe else None, etp),
                                         **gpt_model_kwargs(spec, vpad))
                    for name, prm in model.named_parameters():
                        n = prm.numel()
                        total += n
                        if ".mlp.experts." in name:  # the expert grid: one of EP x ETP distinct shards
                            experts += n
                        elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                            pad_rows = max(0, (t + 1) * rows - max(t * rows, spec.vocab_size))
                            padding += pad_rows * prm.shape[1]
                            if name == "output_layer.weight" and spec.tie_word_embeddings:
                                duplicate += n - pad_rows * prm.shape[1]
                        elif t > 0 and mapping.partition_dim(name) is None:
                            duplicate += n
                    del model
                out.append(ShardCount(p, t, total, padding, duplicate, experts))
    return out


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def dry_run(cfg: DAPOConfig, config_path: str, overrides: list[str], *, hf_config: Optional[str] = None,
            nodes: Optional[int] = None, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0) -> int:
    """Run the checks above and print the report. Returns 0, or 2 with a message on a config error.

    ``nodes`` ``None``: the example's planned node count (:func:`submit_script_nodes`), else the fewest nodes
    that hold one TP×PP×CP (and ETP×EP×PP) group."""
    try:
        cfg.validate(target="cluster")
        src = hf_config or cfg.model.hf_path
        if not (Path(src) / "config.json").exists() and not Path(src).is_file():
            raise ConfigError(f"model.hf_path: no config.json in {src!r}; pass --hf-config DIR (a HF config.json)")
        hfc = read_hf_config(src)
    except (ConfigError, FileNotFoundError) as e:
        print(f"megatron-dapo: dry run: config error: {e}")
        return 2
    a = cfg.actor
    tp, pp, vpp, cp = (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                       a.virtual_pipeline_model_parallel_size, a.context_parallel_size)
    try:
        arch = _arch(hfc)
        ep = a.expert_model_parallel_size
        etp = (tp if a.expert_tensor_parallel_size is None else a.expert_tensor_parallel_size) if arch.is_moe else 1
        check_ep(arch, ep, etp)
    except PlanError as e:  # one line naming the actor.expert_* key (or the hf_config field)
        print(f"megatron-dapo: dry run: config error: {'actor.' if str(e).startswith('expert_') else ''}{e}")
        return 2
    mp = tp * pp * cp
    if nodes is None:
        nodes = submit_script_nodes(config_path) or max(1, math.ceil(max(mp, etp * ep * pp) / gpus_per_node))
    world = nodes * gpus_per_node
    if world % mp:
        print(f"megatron-dapo: dry run: TP x PP x CP = {mp} does not divide {nodes} nodes x {gpus_per_node} GPUs")
        return 2
    try:
        cfg.validate(world_size=world, target="cluster")
    except ConfigError as e:
        print(f"megatron-dapo: dry run: config error: {e}")
        return 2
    moe_note = f", EP {ep}, ETP {etp}, expert DP {world // (etp * ep * pp)}" if arch.is_moe else ""
    print(f"config {config_path}: valid for {nodes} node(s) x {gpus_per_node} GPUs (world {world}, "
          f"DP {world // mp}{moe_note})")
    shards = count_shards_on_meta(hfc, tp, pp, vpp, a.make_vocab_size_divisible_by, ep=ep, etp=etp)
    analytic = count_parameters(hfc, tp, pp, vpp, a.make_vocab_size_divisible_by, ep=ep, etp=etp)
    print(f"actor.attention_backend: {a.attention_backend}"
          + (" (te where Transformer Engine imports, else sdpa)" if a.attention_backend == "auto" else ""))
    what = f"TP={tp} PP={pp} VPP={vpp or '-'}" + (f" EP={ep} ETP={etp}, expert-parallel rank 0" if arch.is_moe else "")
    print(f"\nper-rank parameters (meta-device build, {what}):")
    ex_head = f" {'experts':>16}" if arch.is_moe else ""
    print(f"{'pp':>3} {'tp':>3} {'params':>16}{ex_head} {'vocab padding':>14} {'replicated':>14} {'unique':>16} "
          f"{'planner':>16}")
    by_rank = {(r.pp_rank, r.tp_rank): r for r in analytic.ranks}
    mismatched = []
    for s in shards:
        ref = by_rank.get((s.pp_rank, s.tp_rank))
        if ref is None or (ref.params, ref.expert_params) != (s.params, s.experts):
            mismatched.append((s.pp_rank, s.tp_rank))
        ex = f" {_fmt(s.experts):>16}" if arch.is_moe else ""
        print(f"{s.pp_rank:>3} {s.tp_rank:>3} {_fmt(s.params):>16}{ex} {_fmt(s.padding):>14} {_fmt(s.duplicate):>14} "
              f"{_fmt(s.unique):>16} {_fmt(ref.params) if ref else '-':>16}")
    # dense parts once per (PP, TP) rank; each stage's expert shard stands for its EP x ETP distinct shards
    # (the TP ranks' rows show the same expert-parallel rank 0, see count_shards_on_meta)
    total_unique = sum(s.unique - s.experts for s in shards)
    total_unique += sum(ep * etp * next(s.experts for s in shards if s.pp_rank == p) for p in range(pp))
    print(f"sum of unique parameters: {_fmt(total_unique)} (HF model: {_fmt(analytic.total)}; "
          f"vocab padded to {analytic.padded_vocab_size:,} rows -> "
          f"{_fmt(sum(s.padding for s in shards))} padding parameters, reported separately)")
    if arch.is_moe:
        print(f"MoE: total parameters {_fmt(analytic.total)}, active per token {_fmt(analytic.active)} "
              f"({arch.moe_topk} of {arch.num_experts} experts in {arch.num_moe_layers} MoE layers); each GPU holds "
              f"{arch.num_experts // ep} experts per MoE layer, split over ETP={etp}")
    if total_unique != analytic.total or mismatched:
        print(f"megatron-dapo: dry run: meta-device count disagrees with the analytic count (ranks {mismatched})")
        return 2
    req = PlanRequest(hf_config=hfc, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=gpu_memory_gb,
                      max_prompt_length=cfg.data.max_prompt_length, max_response_length=cfg.rollout.max_response_length,
                      colocated=cfg.rollout.colocated, sglang_mem_fraction=cfg.rollout.mem_fraction_static,
                      sglang_tp=cfg.rollout.engine_tp_size, ppo_mini_batch_size=a.ppo_mini_batch_size,
                      params_dtype=a.params_dtype, distributed_optimizer=a.use_distributed_optimizer,
                      sequence_parallel=a.sequence_parallel, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                      logprob_chunk_size=a.logprob_chunk_size)
    moe_kw = dict(ep=ep, etp=etp, dispatcher=a.moe_token_dispatcher_type or "alltoall") if arch.is_moe else {}
    layout = Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=world // mp, token_budget=a.max_tokens_per_gpu,
                    recompute=a.recompute or "none", optimizer_offload=False, sequence_parallel=a.sequence_parallel,
                    **moe_kw)
    mem = estimate_memory(arch, layout, req, analytic, engine_tp=cfg.rollout.engine_tp_size)
    print("\nplanner memory estimate (per GPU, peak pipeline stage):")
    print(memory_table(mem, gpu_memory_gb))

    mode = "colocated" if cfg.rollout.colocated else "disaggregated"
    plan = build_launch_plan(config_path, overrides, nodes=nodes, gpus_per_node=gpus_per_node, mode=mode)
    print("\nsbatch command (not submitted):")
    print(render_dry_run(plan, backend="sbatch"))
    return 0


_SUBMIT_NODES = re.compile(r"^NODES=\$\{NODES:-(\d+)\}", re.MULTILINE)


def submit_script_nodes(config_path: str) -> Optional[int]:
    """The node count an example was planned for: ``NODES=${NODES:-N}`` in the ``submit.sh`` beside the config
    (``examples/*/submit.sh``); ``None`` when there is no such script or line."""
    script = Path(config_path).parent / "submit.sh"
    if not script.is_file():
        return None
    m = _SUBMIT_NODES.search(script.read_text())
    return int(m.group(1)) if m else None


def memory_table(mem, gpu_memory_gb: float) -> str:
    """Human-readable rows of a planner ``MemoryEstimate`` (GiB)."""
    g = 1 << 30
    rows = [("weights", mem.weights), ("gradients", mem.grads), ("optimizer state", mem.optimizer),
            ("activations", mem.activations), ("logits (chunked)", mem.logits), ("reserved", mem.reserved),
            ("paused engine", mem.engine_idle), ("training total", mem.train_total)]
    lines = [f"  {k:<22} {v / g:8.2f} GiB" for k, v in rows]
    if mem.expert_params_per_gpu:
        lines.append(f"  (MoE: {mem.expert_params_per_gpu:,} routed-expert parameters of {mem.params_per_gpu:,} "
                     f"per GPU; activations include a {mem.dispatcher_buffer / g:.2f} GiB token-dispatcher buffer)")
    lines.append(f"  {'GPU memory':<22} {gpu_memory_gb:8.2f} GiB  -> "
                 f"{'fits' if mem.train_total / g <= gpu_memory_gb else 'DOES NOT FIT'}")
    lines.append(f"  rollout: engine TP {mem.engine_tp}, engine weights {mem.engine_weights / g:.2f} GiB, "
                 f"KV pool {mem.kv_pool / g:.2f} GiB = {mem.kv_tokens_per_engine:,} tokens per engine"
                 f"{' (actor offloaded during rollout)' if mem.rollout_offload_required else ''}")
    lines.append(f"  micro-batches per step per DP rank: {mem.num_microbatches}, pipeline bubble "
                 f"{mem.pipeline_bubble:.1%}")
    return "\n".join(lines)


def _arch(hfc):
    return Arch.from_hf_config(hfc)
