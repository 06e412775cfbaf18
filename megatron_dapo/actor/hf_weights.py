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
    _owners: Optional[dict[str, tuple[int, int, str]]]

    def _local_params(self) -> Iterator[tuple[str, int, str, torch.nn.Parameter]]: ...


@torch.no_grad()
def load_hf_weights(actor: ShardedActor, hf_path: str | Path) -> None:
    """Copy HF safetensors weights into ``actor``'s shards on this rank (TP slice, PP stage, vocab padding).

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
        shard = mapping.tp_shard(src, full, actor.tp_rank, actor.tp)
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
    (a checkpoint load resets that cache).

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
        missing = [n for n in mapping.mcore_names(actor.spec) if n not in owners]
        if missing:
            raise mapping.MappingError(f"parameters not found on any pipeline stage: {missing[:5]}")
        actor._owners = owners
    return actor._owners


@torch.no_grad()
def iter_full_params(actor: ShardedActor, dtype: Optional[torch.dtype] = None, *,
                     grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_name, full tensor)`` for every parameter, on data-parallel rank 0 ranks.

    Moves only what is needed: TP all-gather inside the owning stage, then one broadcast across the
    pipeline group. Memory peak: one full tensor plus one shard. Collective: every rank must call it.

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
    if actor.dp_rank != 0:
        return
    for name in mapping.mcore_names(actor.spec):
        owner_pp = owners[name][0]
        shape = mapping.full_shape(actor.spec, name, actor.padded_vocab)
        p_dtype = torch.bfloat16 if actor.cfg.params_dtype == "bf16" and not grads else torch.float32
        if dtype is not None and not grads:
            p_dtype = dtype  # cast before moving: fewer bytes on the wire, bit-identical result
        if actor.pp_rank == owner_pp:
            shard = _master_or_param(params[name], grads).to(p_dtype)
            if actor.tp > 1 and mapping.partition_dim(name) is not None:
                parts = [torch.empty_like(shard) for _ in range(actor.tp)]
                dist.all_gather(parts, shard.contiguous(), group=tp_group)
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
