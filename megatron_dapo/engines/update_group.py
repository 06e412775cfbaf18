"""A stand-alone weight-update process group shared by the trainer and the rollout engines.

The trainer (rank 0, the source of every broadcast) and each engine (ranks ``rank_offset ..``)
build a SEPARATE communicator that never touches ``torch.distributed``'s default process group,
so the trainer's Megatron groups and the engine's own groups stay untouched.

This mirrors SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed``
protocol (``InitWeightsUpdateGroupReqInput``: ``master_address``, ``master_port``,
``rank_offset``, ``world_size``, ``group_name``, ``backend``).  On GPU clusters SGLang itself
builds the NCCL group inside its server; this helper is what the *trainer* side uses there and
what the CPU engine (:mod:`megatron_dapo.engines.cpu.server`) uses on both sides.

Rendezvous: rank 0 hosts a ``torch.distributed.TCPStore`` on ``master_address:master_port``;
the other ranks connect to it.  The store keys are laid out exactly as SGLang's side lays them out,
so a trainer using this module and a real SGLang server meet: ``sglang.srt.utils.init_custom_process_group``
wraps the rendezvous store in ``PrefixStore(group_name, store)`` and hands it to torch's
``_new_process_group_helper``, which adds ``PrefixStore(f"{group_name}/", .)`` and
``PrefixStore(f"{device}/", .)`` (gloo: ``cpu``, nccl: ``cuda``), under which it builds the group's one
backend and sets its sequence number.  :func:`store_prefixes` names that layout.
Creating the group blocks until all ``world_size`` ranks have joined (or ``timeout_s`` passes).
"""
from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..backend import has_cuda

logger = logging.getLogger(__name__)

_SUPPORTED_BACKENDS = ("gloo", "nccl")
BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
"""The device prefix under which torch builds a group's one backend: the first device of
``Backend.backend_capability`` (gloo: cpu, cuda; nccl: cuda) - torch registers that single backend
for every device when they all map to the same backend."""


def store_prefixes(group_name: str, device: str) -> list[str]:
    """The ``PrefixStore`` prefixes, outermost first, under which a weight-update group's ``device``
    backend keeps its rendezvous keys - those of ``sglang.srt.utils.init_custom_process_group``
    (``group_name``) followed by torch's ``_new_process_group_helper`` (``group_name/``, ``device/``)."""
    return [group_name, f"{group_name}/", f"{device}/"]


def parse_torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name as sent in SGLang's ``dtypes`` field to a ``torch.dtype``.

    Accepts ``"bfloat16"``, ``"torch.bfloat16"``, ``"float32"`` ... (the form SGLang's model
    runner resolves with ``getattr(torch, name)``) or a ``torch.dtype``.

    Raises:
        ValueError: unknown dtype name.
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip()
    if key.startswith("torch."):
        key = key[len("torch."):]
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (expected e.g. 'bfloat16', 'float32', 'torch.float16')")
    return dtype


def dtype_to_str(dtype: torch.dtype) -> str:
    """Inverse of :func:`parse_torch_dtype`: ``torch.bfloat16 -> "bfloat16"`` (SGLang's form)."""
    return str(dtype).replace("torch.", "")


@dataclass
class WeightUpdateGroup:
    """A point-to-multipoint communicator for weight broadcasts (trainer = rank 0 = src).

    Attributes:
        rank: this process' rank in the group.
        world_size: number of ranks (trainer + all engine ranks).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        group_name: namespace used in the rendezvous store.
    """

    rank: int
    world_size: int
    backend: str
    group_name: str
    _pg: Any = field(repr=False, default=None)
    _store: Any = field(repr=False, default=None)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def destroyed(self) -> bool:
        """True after :meth:`destroy`."""
        return self._pg is None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``tensor`` in place from rank ``src`` to every rank (blocking).

        Args:
            tensor: on ``src`` the data to send; elsewhere a pre-allocated receive buffer of the
                same shape and dtype (any dtype gloo supports, incl. bfloat16).  Must be
                contiguous; CPU for gloo, CUDA for nccl.
            src: the source rank (the trainer is 0).

        Returns:
            ``tensor`` (filled on receivers).

        Raises:
            RuntimeError: group destroyed, non-contiguous tensor, or a communication failure /
                timeout (propagated from torch).
        """
        if self._pg is None:
            raise RuntimeError(f"weight update group {self.group_name!r} was destroyed")
        if not tensor.is_contiguous():
            raise RuntimeError("WeightUpdateGroup.broadcast needs a contiguous tensor")
        if not 0 <= src < self.world_size:
            raise RuntimeError(f"broadcast src={src} outside [0, {self.world_size})")
        opts = dist.BroadcastOptions()
        opts.rootRank = int(src)
        opts.rootTensor = 0
        with self._lock:
            work = self._pg.broadcast([tensor], opts)
            work.wait()
        return tensor

    def barrier(self) -> None:
        """Synchronise all ranks with a 1-element broadcast (works for gloo and nccl)."""
        device = "cuda" if self.backend == "nccl" else "cpu"
        self.broadcast(torch.zeros(1, device=device), src=0)

    def destroy(self) -> None:
        """Release the communicator and the rendezvous store (idempotent)."""
        pg, self._pg = self._pg, None
        if pg is not None:
            for meth in ("shutdown", "abort"):
                fn = getattr(pg, meth, None)
                if fn is None:
                    continue
                try:
                    fn()
                    break
                except Exception as exc:  # pragma: no cover - best-effort teardown
                    logger.debug("weight update group %s: %s() failed: %s", self.group_name, meth, exc)
        self._store = None


def create_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 120,
    group_name: str = "weight_update_group",
) -> WeightUpdateGroup:
    """Create (join) the weight-update group without touching the default process group.

    Rank 0 hosts the ``TCPStore``; every rank then builds its backend under the store prefixes of
    :func:`store_prefixes` - the layout SGLang's ``init_custom_process_group`` produces, so either side
    may be a real SGLang server.  Blocks until all ``world_size`` ranks joined.

    Args:
        master_address: host of rank 0 (the trainer), e.g. ``"127.0.0.1"``.
        master_port: free TCP port on which rank 0 listens.
        rank: this process' rank; 0 = trainer, engines use ``rank_offset + tp_rank``.
        world_size: trainer + all engine ranks.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA; requires a CUDA build of torch with
            ``torch.distributed.ProcessGroupNCCL``; SGLang builds its own side itself).
        timeout_s: rendezvous and per-collective timeout in seconds.
        group_name: SGLang's ``group_name`` (the store namespace, see :func:`store_prefixes`).

    Returns:
        A :class:`WeightUpdateGroup`.

    Raises:
        ValueError: bad rank / world size / backend.
        RuntimeError: nccl requested but unavailable; rendezvous timeout.
    """
    if backend not in _SUPPORTED_BACKENDS:
        raise ValueError(f"backend={backend!r} unsupported; choose one of {_SUPPORTED_BACKENDS}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
    if not 0 < int(master_port) < 65536:
        raise ValueError(f"master_port={master_port} is not a valid TCP port")
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if backend == "nccl":
        nccl_cls = getattr(dist, "ProcessGroupNCCL", None)
        if nccl_cls is None or not has_cuda():
            raise RuntimeError(
                "backend='nccl' needs a CUDA build of torch with torch.distributed.ProcessGroupNCCL "
                "and a visible GPU; on CPU use backend='gloo' (on GPU clusters SGLang creates its "
                "NCCL side of the group itself via /init_weights_update_group)"
            )
    store = dist.TCPStore(
        master_address,
        int(master_port),
        world_size,
        rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    device_store = store
    for prefix in store_prefixes(group_name, BACKEND_DEVICE[backend]):
        device_store = dist.PrefixStore(prefix, device_store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(device_store, rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(device_store, rank, world_size, opts)
    pg._set_sequence_number_for_group()  # a store round-trip SGLang's side makes too
    group = WeightUpdateGroup(rank=rank, world_size=world_size, backend=backend, group_name=group_name,
                              _pg=pg, _store=store)
    # ProcessGroupGloo's constructor already performs the full-mesh rendezvous (bounded by
    # ``timeout``); no extra collective is issued so that the protocol stays identical to SGLang's.
    logger.info("joined weight update group %s rank %d/%d (%s) via %s:%s",
                group_name, rank, world_size, backend, master_address, master_port)
    return group
