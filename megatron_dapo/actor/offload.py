"""Offload / onload of everything the Megatron actor keeps on its device (GPU colocation with rollout engines).

While colocated SGLang engines generate, the actor's parameters, gradients and optimizer state must leave
the GPU. :class:`ActorOffloader` collects every tensor the actor holds on its device:

* the DDP parameter / gradient buffers (``DistributedDataParallel.buffers`` and
  ``expert_parallel_buffers``: ``param_data`` and ``grad_data`` of each ``_ParamAndGradBuffer``),
* the model's parameters and registered buffers (with the regular optimizer the parameters are not
  views of ``param_data``; with the distributed optimizer they are),
* the optimizer's fp32 master parameters: ``fp32_from_float16_groups`` / ``fp32_from_fp32_groups`` of
  ``Float16OptimizerWithFloat16Params``, ``shard_fp32_from_float16_groups`` / ``shard_fp32_groups`` /
  ``shard_float16_groups`` of ``DistributedOptimizer`` (megatron-core ``optimizer/optimizer.py``,
  ``optimizer/distrib_optimizer.py``), for every member of a ``ChainedOptimizer``,
* the inner ``torch.optim`` optimizer's parameters, their ``.grad`` and its per-parameter state
  (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``),

deduplicated by storage (``untyped_storage().data_ptr()``): a parameter that is a view of a DDP buffer,
``main_grad`` views of ``grad_data``, distributed-optimizer shards of ``param_data`` are moved once, with
their buffer. :meth:`ActorOffloader.offload` copies each storage to host memory and frees the device
storage with ``untyped_storage().resize_(0)``; all views (``param.data``, ``param.main_grad``, bucket
views) keep pointing at the same storage object, so :meth:`ActorOffloader.onload` only has to resize it
back and copy the bytes in, and every alias is valid again without re-wiring anything.

On a CUDA machine the host copies are pinned (allocated once, reused by later cycles), the copies are
``non_blocking`` and followed by ``torch.cuda.synchronize()`` before any device storage is freed (offload)
or used (onload), then ``torch.cuda.empty_cache()`` hands the freed blocks back to the driver. That path
cannot run in the CPU-only test container; it is the same code with ``pin`` / ``non_blocking`` switched on.

On CPU, offloading is a no-op by default (there is no device memory to give back), with the same
contract: the actor is marked offloaded and must be onloaded before use. ``force=True`` runs the real
path on CPU: the storages are freed and restored from a separate (unpinned) host copy, which is how the
contract is tested (tests/test_offload.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from ..backend import has_cuda

logger = logging.getLogger(__name__)

#: Optimizer attributes (megatron-core 0.16.1) holding lists of parameter groups.
_OPTIMIZER_GROUP_ATTRS = (
    ("master_params", "fp32_from_float16_groups"),   # Float16OptimizerWithFloat16Params
    ("params", "float16_groups"),
    ("params", "fp32_from_fp32_groups"),
    ("master_params", "shard_fp32_from_float16_groups"),   # DistributedOptimizer
    ("params", "shard_fp32_groups"),
    ("params", "shard_float16_groups"),
    ("params", "model_float16_groups"),
    ("params", "model_fp32_groups"),
)

#: Metric-name categories, in reporting order.
CATEGORIES = ("ddp_buffers", "params", "master_params", "grads", "optimizer_state", "module_buffers")


@dataclass
class OffloadEntry:
    """One device storage to move.

    Attributes:
        name: where it was found first, e.g. ``chunk0.buffers[0].grad_data`` or
            ``optimizer0.state[3].exp_avg``.
        category: one of :data:`CATEGORIES`.
        tensor: a tensor viewing the storage (kept so the storage object stays the same one).
        nbytes: size of the whole storage in bytes, taken when collected.
    """

    name: str
    category: str
    tensor: torch.Tensor
    nbytes: int

    @property
    def storage(self) -> torch.UntypedStorage:
        return self.tensor.untyped_storage()


def _ddp_buffers(chunk) -> list:
    """``buffers`` + ``expert_parallel_buffers`` of a megatron-core DDP wrapper (``[]`` for other modules,
    whose ``buffers`` is the ``nn.Module`` method)."""
    out = []
    for attr in ("buffers", "expert_parallel_buffers"):
        bufs = getattr(chunk, attr, None)
        if isinstance(bufs, (list, tuple)):
            out.extend(bufs)
    return out


def _unwrap(module):
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def leaf_optimizers(optimizer) -> list:
    """The non-chained optimizers inside ``optimizer`` (``ChainedOptimizer.chained_optimizers``,
    recursively; ``[optimizer]`` otherwise; ``[]`` for ``None``)."""
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [leaf for member in chained for leaf in leaf_optimizers(member)]
    return [optimizer]


def _state_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _state_tensors(v, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _state_tensors(v, f"{prefix}.{k}")


def iter_actor_tensors(chunks: Iterable[torch.nn.Module], optimizer) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every tensor the actor holds, as ``(name, category, tensor)``, with duplicates and aliases.

    Args:
        chunks: the model chunks (megatron-core ``DistributedDataParallel`` wrappers or plain modules).
        optimizer: a megatron-core optimizer (``MegatronOptimizer``, ``ChainedOptimizer``), a plain
            ``torch.optim.Optimizer``, or ``None``.
    """
    for ci, chunk in enumerate(chunks):
        for bi, buf in enumerate(_ddp_buffers(chunk)):
            for attr in ("param_data", "grad_data"):
                t = getattr(buf, attr, None)
                if isinstance(t, torch.Tensor):
                    yield f"chunk{ci}.buffers[{bi}].{attr}", "ddp_buffers", t
        module = _unwrap(chunk)
        for name, p in module.named_parameters():
            yield f"chunk{ci}.param:{name}", "params", p
            main_grad = getattr(p, "main_grad", None)
            if isinstance(main_grad, torch.Tensor):
                yield f"chunk{ci}.main_grad:{name}", "grads", main_grad
            if p.grad is not None:
                yield f"chunk{ci}.grad:{name}", "grads", p.grad
        for name, b in module.named_buffers():
            yield f"chunk{ci}.module_buffer:{name}", "module_buffers", b
    for oi, opt in enumerate(leaf_optimizers(optimizer)):
        for category, attr in _OPTIMIZER_GROUP_ATTRS:
            groups = getattr(opt, attr, None)
            if not isinstance(groups, (list, tuple)):
                continue
            for gi, group in enumerate(groups):
                for pi, t in enumerate(group):
                    if isinstance(t, torch.Tensor):
                        yield f"optimizer{oi}.{attr}[{gi}][{pi}]", category, t
        inner = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        index = {}
        for gi, group in enumerate(inner.param_groups):
            for p in group["params"]:
                index[id(p)] = len(index)
                yield f"optimizer{oi}.param_groups[{gi}][{index[id(p)]}]", "master_params", p
                if p.grad is not None:
                    yield f"optimizer{oi}.param_groups[{gi}][{index[id(p)]}].grad", "grads", p.grad
        for p, state in inner.state.items():
            key = index.get(id(p), "?")
            yield from ((n, "optimizer_state", t) for n, t in _state_tensors(state, f"optimizer{oi}.state[{key}]"))


def collect_actor_storages(chunks: Iterable[torch.nn.Module], optimizer, device_type: str,
                           skipped: Optional[list[str]] = None) -> list[OffloadEntry]:
    """The distinct storages on ``device_type`` behind :func:`iter_actor_tensors`, first occurrence wins.

    Deduplicated by ``untyped_storage().data_ptr()``; empty storages (already freed, or zero-size tensors)
    are skipped.

    Args:
        chunks, optimizer: see :func:`iter_actor_tensors`.
        device_type: ``"cuda"`` or ``"cpu"``; tensors on other devices are ignored (e.g. Adam's ``step``
            counters, which torch keeps on the CPU for a CUDA model).
        skipped: if given, the names of tensors without a plain storage (wrapper subclasses whose
            ``untyped_storage()`` raises, e.g. some FP8 tensor types) are appended to it; they stay put.

    Returns:
        One :class:`OffloadEntry` per storage, in discovery order (DDP buffers first).
    """
    seen: set[int] = set()
    out: list[OffloadEntry] = []
    for name, category, t in iter_actor_tensors(chunks, optimizer):
        if t.device.type != device_type:
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            if skipped is not None:
                skipped.append(name)
            continue
        nbytes = storage.nbytes()
        if nbytes == 0:
            continue
        ptr = storage.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out.append(OffloadEntry(name=name, category=category, tensor=t, nbytes=nbytes))
    return out


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat ``uint8`` tensor over the whole of ``storage`` (same storage object, no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def ensure_onloaded(actor, method: str) -> None:
    """Raise if ``actor.offloaded`` (cheap guard at the start of its public compute methods).

    Raises:
        RuntimeError: naming ``method`` and telling to call ``onload()`` first.
    """
    if actor.offloaded:
        raise RuntimeError(f"{type(actor).__name__}.{method}() called while the actor is offloaded "
                           f"(parameters/optimizer state are off the device); call onload() first")


class ActorOffloader:
    """Moves an actor's device tensors to host memory and back (see the module docstring).

    Args:
        chunks: model chunks (DDP-wrapped ``GPTModel`` s or plain modules).
        optimizer: the actor's optimizer (megatron-core or ``torch.optim``), or ``None``.
        keep_host_buffers: keep the host copies after :meth:`onload` and reuse them for the next
            offload when the storage sizes are unchanged (saves re-pinning memory every cycle).
            ``None`` (default): keep them on CUDA machines, drop them on CPU.

    State: :attr:`offloaded` (bool), :attr:`entries` (what was moved by the last offload),
    :attr:`metrics` (the latest offload and onload figures).
    """

    def __init__(self, chunks: Iterable[torch.nn.Module], optimizer, *, keep_host_buffers: Optional[bool] = None):
        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.cuda = has_cuda()
        self.keep_host_buffers = self.cuda if keep_host_buffers is None else bool(keep_host_buffers)
        self.offloaded = False
        self.entries: list[OffloadEntry] = []
        self._host: list[torch.Tensor] = []
        self._restored: set[int] = set()
        self.metrics: dict[str, float] = {}

    def _host_buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """Host copies of the given sizes: pinned on CUDA machines (plain memory where pinning fails)."""
        if [h.numel() for h in self._host] == sizes:
            return self._host
        self._host = []
        pin = self.cuda
        for n in sizes:
            if pin:
                try:
                    self._host.append(torch.empty(n, dtype=torch.uint8, pin_memory=True))
                    continue
                except RuntimeError as e:
                    logger.warning("actor offload: pinned host memory unavailable (%s); using pageable memory", e)
                    pin = False
            self._host.append(torch.empty(n, dtype=torch.uint8))
        return self._host

    def offload(self, force: bool = False) -> dict[str, float]:
        """Copy every device storage of the actor to host memory and free it on the device.

        A no-op (marks :attr:`offloaded` only, moves nothing) on a machine without CUDA unless ``force``;
        a no-op when already offloaded.

        Args:
            force: on CPU, really free the (CPU) storages and keep a separate host copy. Ignored on CUDA
                machines, where the CUDA storages are always moved.

        Returns:
            ``memory/actor_offload_bytes`` (bytes moved, float), ``memory/actor_offload_tensors``
            (storages moved), ``memory/actor_offload_<category>_bytes`` for each of :data:`CATEGORIES`,
            ``memory/actor_offload_skipped_tensors`` (tensors without a plain storage, left in place and
            logged), ``timing/actor_offload_s`` (seconds, including the device synchronisation). Zeros for
            a no-op.
            Merged into :attr:`metrics`, except for the no-op of an already offloaded actor.

        Raises:
            RuntimeError: a storage cannot be resized (e.g. memory-mapped); raised before anything is freed.
        """
        t0 = time.perf_counter()
        if self.offloaded:
            return self._report("offload", [], t0, record=False)
        active = self.cuda or force
        skipped: list[str] = []
        entries = collect_actor_storages(self.chunks, self.optimizer, "cuda" if self.cuda else "cpu",
                                         skipped) if active else []
        if skipped:
            logger.warning("actor offload: %d tensors without a plain storage stay on the device: %s",
                           len(skipped), ", ".join(skipped[:5]))
        for e in entries:
            if not e.storage.resizable():
                raise RuntimeError(f"cannot offload {e.name}: its storage ({e.nbytes} bytes) is not resizable")
        host = self._host_buffers([e.nbytes for e in entries])
        for e, h in zip(entries, host):
            h.copy_(_byte_view(e.storage), non_blocking=h.is_pinned())
        if self.cuda and entries:
            torch.cuda.synchronize()  # host copies complete before the device memory is released
        for e in entries:
            e.storage.resize_(0)
        if self.cuda and entries:
            torch.cuda.empty_cache()
        self.entries = entries
        self._restored = set()
        self.offloaded = True
        out = self._report("offload", entries, t0)
        out["memory/actor_offload_skipped_tensors"] = float(len(skipped))
        return out

    def onload(self) -> dict[str, float]:
        """Inverse of :meth:`offload`: re-allocate each freed storage at its old size and copy the bytes back.

        A no-op when not offloaded (including a CPU offload without ``force``, which moved nothing).

        Returns:
            ``memory/actor_onload_bytes``, ``memory/actor_onload_tensors``, ``timing/actor_onload_s``;
            merged into :attr:`metrics` unless it was a no-op.

        Raises:
            RuntimeError: a storage was resized by someone else while offloaded (its size is not 0), or the
                re-allocation failed (device out of memory: the rollout engine must release its memory
                first). Storages restored before the failure stay restored; calling again resumes.
        """
        t0 = time.perf_counter()
        if not self.offloaded:
            return self._report("onload", [], t0, record=False)
        entries = self.entries
        for i, e in enumerate(entries):
            if i not in self._restored and e.storage.nbytes() != 0:
                raise RuntimeError(f"cannot onload {e.name}: its storage was re-allocated while offloaded "
                                   f"({e.storage.nbytes()} bytes instead of 0)")
        for i, (e, h) in enumerate(zip(entries, self._host)):
            if i in self._restored:
                continue
            try:
                e.storage.resize_(e.nbytes)
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
                raise RuntimeError(f"cannot onload {e.name} ({e.nbytes} bytes): {err}") from err
            _byte_view(e.storage).copy_(h, non_blocking=h.is_pinned())
            self._restored.add(i)
        if self.cuda and entries:
            torch.cuda.synchronize()  # device copies complete before anything reads them
        self.offloaded = False
        self.entries = []
        self._restored = set()
        if not self.keep_host_buffers:
            self._host = []
        return self._report("onload", entries, t0)

    def _report(self, kind: str, entries: list[OffloadEntry], t0: float, record: bool = True) -> dict[str, float]:
        out = {f"memory/actor_{kind}_bytes": float(sum(e.nbytes for e in entries)),
               f"memory/actor_{kind}_tensors": float(len(entries))}
        if kind == "offload":  # the breakdown once per cycle is enough for the log
            for cat in CATEGORIES:
                out[f"memory/actor_offload_{cat}_bytes"] = float(sum(e.nbytes for e in entries if e.category == cat))
        out[f"timing/actor_{kind}_s"] = time.perf_counter() - t0
        if record:  # an idempotent no-op call does not overwrite the figures of the real move
            self.metrics.update(out)
        return out
