"""HF weight I/O of the Megatron actor: HF safetensors into this rank's shards, full tensors out.

Functions of a :class:`~megatron_dapo.actor.megatron_actor.MegatronActor` (its public methods
``load_hf_weights``, ``iter_full_params``, ``iter_full_grads`` and ``iter_hf_tensors`` delegate here). Names
are megatron-core's canonical global names (:func:`megatron_dapo.models.mapping.canonical_name`, layer
numbers global over the pipeline); :mod:`megatron_dapo.models.mapping` converts them to and from HF names
and layouts (TP slices, fused QKV / gate-up, vocabulary padding).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..backend import default_device
from ..models import mapping
from ..models.hf_config import ModelSpec


class ShardedActor(Protocol):
    """What these functions read of the actor; :class:`~megatron_dapo.actor.megatron_actor.MegatronActor`
    implements it (a protocol, so that this module need not import the actor's)."""

    spec: ModelSpec
    cfg: Any
    ps: Any
    """megatron-core's ``parallel_state`` module."""
    chunks: list
    padded_vocab: int
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    dp_rank: int
    ep: int
    """Expert-parallel size (1: dense model or every expert on every rank)."""
    ep_rank: int
    etp: int
    """Expert-tensor-parallel size (routed experts are split over it instead of TP)."""
    etp_rank: int
    _owners: Optional[dict[str, tuple[int, int, str]]]

    def _local_params(self) -> Iterator[tuple[str, int, str, torch.nn.Parameter]]: ...


@torch.no_grad()
def load_hf_weights(actor: ShardedActor, hf_path: str | Path) -> None:
    """Copy HF safetensors weights into ``actor``'s shards on this rank (TP slice, PP stage, vocab padding; MoE:
    only this expert-parallel rank's experts, split over expert tensor parallelism).

    After the optimizer exists (a reload) the DDP chunks re-broadcast their parameters and the optimizer
    copies them into its fp32 master weights.

    Raises:
        FileNotFoundError: no ``*.safetensors`` file in ``hf_path``.
        mapping.MappingError: a tensor's shape does not match this rank's shard of the parameter.
    """
    files = sorted(Path(hf_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {hf_path}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def get(name: str) -> torch.Tensor:
        return where[name].get_tensor(name)

    for cname, _, lname, p in actor._local_params():
        src = "output_layer.weight" if cname == "output_layer.weight(tied)" else cname
        full = mapping.hf_to_mcore(actor.spec, src, get, actor.padded_vocab)
        if mapping.expert_index(src) is None:
            shard = mapping.tp_shard(src, full, actor.tp_rank, actor.tp)
        else:  # this expert-parallel rank's routed expert: split over expert tensor parallelism
            shard = mapping.tp_shard(src, full, actor.etp_rank, actor.etp)
        if tuple(shard.shape) != tuple(p.shape):
            raise mapping.MappingError(f"{lname}: expected shape {tuple(p.shape)}, found {tuple(shard.shape)}")
        p.data.copy_(shard.to(p.dtype))
    for chunk in actor.chunks if hasattr(actor, "optimizer") else []:
        chunk.broadcast_params()
    if hasattr(actor, "optimizer"):
        actor.optimizer.reload_model_params()


def _owner_map(actor: ShardedActor) -> dict[str, tuple[int, int, str]]:
    """Canonical name -> ``(pipeline rank, chunk index, local name)`` of the stage that owns it.

    Gathered once over the pipeline group (collective on first use) and cached in ``actor._owners``
    (a checkpoint load resets that cache). With expert parallelism a rank sees only its own experts; the
    others are on the same pipeline stage as their layer's router and are listed with that stage and the local
    name ``""`` (another expert-parallel rank holds them).

    Raises:
        mapping.MappingError: a parameter of the model is on no pipeline stage.
    """
    if actor._owners is None:
        mine = {c: (actor.pp_rank, ci, ln) for c, ci, ln, _ in actor._local_params() if not c.endswith("(tied)")}
        gathered: list[Any] = [None] * actor.pp
        dist.all_gather_object(gathered, mine, group=actor.ps.get_pipeline_model_parallel_group())
        owners: dict[str, tuple[int, int, str]] = {}
        for d in gathered:
            for k, v in d.items():
                owners.setdefault(k, v)
        for n in mapping.mcore_names(actor.spec):
            router = _router_of(n)
            if n not in owners and router is not None and router in owners:
                owners[n] = (owners[router][0], owners[router][1], "")
        missing = [n for n in mapping.mcore_names(actor.spec) if n not in owners]
        if missing:
            raise mapping.MappingError(f"parameters not found on any pipeline stage: {missing[:5]}")
        actor._owners = owners
    return actor._owners


def _router_of(name: str) -> Optional[str]:
    """The router of a routed expert's layer (``None`` for any other name)."""
    if mapping.expert_index(name) is None:
        return None
    return ".".join(name.split(".")[:3]) + ".mlp.router.weight"


def _expert_full(actor: ShardedActor, name: str, params: dict[str, torch.nn.Parameter], owner_pp: int,
                 p_dtype: torch.dtype, grads: bool) -> Optional[torch.Tensor]:
    """The full tensor of routed expert ``name`` on the ranks of its pipeline stage (``None`` elsewhere).

    Collective over the stage: every expert-TP group gathers its expert of the same local index, then each
    expert-parallel group broadcasts the owner's copy, so all ranks of the stage (every data-parallel rank)
    take part.
    """
    if actor.pp_rank != owner_pp:
        return None
    n_local = actor.spec.num_experts // actor.ep
    e = mapping.expert_index(name)
    owner, j = divmod(e, n_local)
    mine = name.replace(f"local_experts.{e}.", f"local_experts.{actor.ep_rank * n_local + j}.")
    shard = _master_or_param(params[mine], grads).to(p_dtype)
    if actor.etp > 1 and mapping.partition_dim(name) is not None:
        parts = [torch.empty_like(shard) for _ in range(actor.etp)]
        dist.all_gather(parts, shard.contiguous(), group=actor.ps.get_expert_tensor_parallel_group())
        full = mapping.tp_unshard(name, parts)
    else:
        full = shard
    full = full.contiguous()
    if actor.ep > 1:
        group = actor.ps.get_expert_model_parallel_group()
        full = full if actor.ep_rank == owner else torch.empty_like(full)
        dist.broadcast(full, src=dist.get_global_rank(group, owner), group=group)
    return full


@torch.no_grad()
def iter_full_params(actor: ShardedActor, dtype: Optional[torch.dtype] = None, *,
                     grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_name, full tensor)`` for every parameter, on data-parallel rank 0 ranks.

    Moves only what is needed: TP all-gather inside the owning stage, then one broadcast across the
    pipeline group. Memory peak: one full tensor plus one shard. Collective: every rank must call it.
    Routed experts (MoE): expert-TP all-gather and a broadcast from the owning expert-parallel rank, in which
    every rank of the stage takes part; with expert parallelism the data-parallel ranks > 0 therefore run the
    expert collectives too (and still yield nothing).

    Args:
        dtype: cast to this dtype before moving (fewer bytes on the wire, bit-identical result); ``None``:
            the parameters' dtype (bf16 with ``params_dtype=bf16``, else fp32).
        grads: yield the DP-reduced gradients (``main_grad``, fp32; ``dtype`` then only casts the result)
            instead of the parameters (see :func:`iter_full_grads`).
    """
    owners = _owner_map(actor)
    params = {c: p for c, _, _, p in actor._local_params()}
    tp_group = actor.ps.get_tensor_model_parallel_group()
    pp_group = actor.ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    dev = default_device()
    experts_split = actor.spec.is_moe and (actor.ep > 1 or actor.etp != actor.tp)
    if actor.dp_rank != 0 and not experts_split:
        return
    for name in mapping.mcore_names(actor.spec):
        owner_pp = owners[name][0]
        shape = mapping.full_shape(actor.spec, name, actor.padded_vocab)
        p_dtype = torch.bfloat16 if actor.cfg.params_dtype == "bf16" and not grads else torch.float32
        if dtype is not None and not grads:
            p_dtype = dtype  # cast before moving: fewer bytes on the wire, bit-identical result
        is_expert = mapping.expert_index(name) is not None
        if experts_split and is_expert:
            full = _expert_full(actor, name, params, owner_pp, p_dtype, grads)
            if actor.dp_rank != 0:
                continue
            if full is None:
                full = torch.empty(shape, dtype=p_dtype, device=dev)
        elif actor.dp_rank != 0:
            continue
        elif actor.pp_rank == owner_pp:
            shard = _master_or_param(params[name], grads).to(p_dtype)
            tp_size, group = ((actor.etp, actor.ps.get_expert_tensor_parallel_group()) if is_expert
                              else (actor.tp, tp_group))
            if tp_size > 1 and mapping.partition_dim(name) is not None:
                parts = [torch.empty_like(shard) for _ in range(tp_size)]
                dist.all_gather(parts, shard.contiguous(), group=group)
                full = mapping.tp_unshard(name, parts)
            else:
                full = shard
            full = full.to(p_dtype).contiguous()
        else:
            full = torch.empty(shape, dtype=p_dtype, device=dev)
        if actor.pp > 1:
            dist.broadcast(full, src=pp_ranks[owner_pp], group=pp_group)
        yield name, (full if dtype is None else full.to(dtype))


def _master_or_param(p: torch.nn.Parameter, grads: bool) -> torch.Tensor:
    """The parameter's DP-reduced gradient ``main_grad`` when ``grads``, else the parameter (detached)."""
    if grads:
        return p.main_grad.detach()
    return p.detach()


def iter_full_grads(actor: ShardedActor) -> Iterator[tuple[str, torch.Tensor]]:
    """Like :func:`iter_full_params` but for the DP-reduced gradients (``main_grad``, fp32) left by
    ``train_step(apply_update=False)``. Not available with the distributed optimizer (its gradients
    are reduce-scattered).

    Raises:
        RuntimeError: ``use_distributed_optimizer`` is set.
    """
    if actor.cfg.use_distributed_optimizer:
        raise RuntimeError("iter_full_grads needs use_distributed_optimizer=false (grads are sharded otherwise)")
    yield from iter_full_params(actor, torch.float32, grads=True)


def iter_hf_tensors(actor: ShardedActor, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` (HF layout, vocab padding dropped). Collective; see iter_full_params."""
    for name, full in iter_full_params(actor, dtype):
        yield from mapping.mcore_to_hf(actor.spec, name, full)


def output_weight(actor: ShardedActor, gpt) -> torch.Tensor:
    """The output layer's weight of ``gpt`` (``[padded_vocab / TP, h]``, this TP rank's vocabulary slice): the
    shared embedding when the model ties them."""
    if actor.spec.tie_word_embeddings:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
