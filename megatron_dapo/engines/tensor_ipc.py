"""Tensor handles for ``/update_weights_from_tensor``: SGLang's wire format, written without importing sglang.

SGLang's ``UpdateWeightsFromTensorReqInput.serialized_named_tensors`` holds, per engine TP rank, one string:
the base64 text of a ``multiprocessing.reduction.ForkingPickler`` pickle of a ``list[(name, tensor)]``
(``sglang.srt.utils.MultiprocessingSerializer``; the engine base64-decodes and unpickles it). Pickling a
tensor with ForkingPickler does not copy its data: torch's reducers (``torch.multiprocessing.reductions``)
write a *handle* that the receiving process opens -

* CUDA tensors: a CUDA-IPC memory handle (``rebuild_cuda_tensor``), the colocated GPU path;
* CPU tensors: with the ``file_system`` sharing strategy, the name of a shared-memory segment
  (``rebuild_storage_filename``), which any process on the same host can map. The CPU rollout engine uses
  this, so the ``tensor`` transport runs on CPU with the same format, endpoint and client code.

:func:`serialize_named_tensors` builds the string; :func:`deserialize_named_tensors` reads it with an
unpickler that only resolves the handful of torch globals these pickles contain (the rebuild functions,
tensor/storage classes, dtypes), so a request cannot make the engine import or call anything else.

The sender must keep the tensors alive until the engine has answered (the handles point at them);
:func:`share_bucket` gives CPU buckets one shared-memory segment per dtype, so the data is copied once.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import pickle
import sys
import types
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Iterator, Sequence

import torch
import torch.multiprocessing as tmp
import torch.multiprocessing.reductions

_REDUCTIONS = "torch.multiprocessing.reductions"
_ALLOWED_GLOBALS = {
    (_REDUCTIONS, "rebuild_tensor"),
    (_REDUCTIONS, "rebuild_cuda_tensor"),
    (_REDUCTIONS, "rebuild_typed_storage"),
    (_REDUCTIONS, "rebuild_typed_storage_child"),
    (_REDUCTIONS, "rebuild_storage_filename"),
    (_REDUCTIONS, "rebuild_storage_fd"),
    (_REDUCTIONS, "rebuild_storage_empty"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"),
    ("torch", "TypedStorage"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
}


class TensorPayloadError(ValueError):
    """A ``serialized_named_tensors`` entry is not a valid tensor-handle payload (says why)."""


_MANAGER_STARTED = False


def _start_shm_manager_detached() -> None:
    """Start this process's ``torch_shm_manager`` with stdin/stdout/stderr on /dev/null (once).

    torch's ``file_system`` strategy forks a manager daemon on the first shared allocation; it lives while
    any process still maps a segment (the engines do, until they stop). Started plainly it inherits our
    stdout/stderr, so a parent that reads our output through a pipe (``subprocess.run(capture_output=True)``,
    a log collector) would wait for it forever. The descriptors are swapped only for the instant of the
    fork; output written by other threads in that instant goes to /dev/null.
    """
    global _MANAGER_STARTED
    if _MANAGER_STARTED:
        return

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    devnull = os.open(os.devnull, os.O_RDWR)
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        with _file_system_sharing(start_manager=False):
            torch.empty(1).share_memory_()
    finally:
        for fd, keep in zip((0, 1, 2), saved):
            os.dup2(keep, fd)
            os.close(keep)
        os.close(devnull)
    _MANAGER_STARTED = True


@contextlib.contextmanager
def _file_system_sharing(start_manager: bool = True) -> Iterator[None]:
    if start_manager:
        _start_shm_manager_detached()
    old = tmp.get_sharing_strategy()
    if old != "file_system":
        tmp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        if old != "file_system":
            tmp.set_sharing_strategy(old)


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One ``serialized_named_tensors`` entry: base64 text of a ForkingPickler pickle of the list.

    Args:
        named_tensors: ``(hf_name, tensor)`` pairs; CUDA tensors travel as CUDA-IPC handles, CPU tensors
            as shared-memory segment names (their storage is moved to shared memory if it is not there
            yet: pass tensors from :func:`share_bucket` to avoid touching the caller's storage).

    Returns:
        ASCII text (what SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` returns).

    Raises:
        TypeError: an entry is not a ``(str, Tensor)`` pair.
    """
    return _pickle_b64(_check_named(named_tensors))


FLATTENED_BUCKET = "flattened_bucket"
"""``load_format`` of SGLang's flattened-bucket payload: ONE pickled dict ``{"flattened_tensor": uint8
tensor, "metadata": [entry, ...]}`` where each entry has ``name``, ``shape`` (``torch.Size``), ``dtype``,
``start_idx``, ``end_idx`` (byte offsets into the flat tensor) and ``numel`` (bytes) - the fields of
``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``, read by attribute in
``WeightUpdater._update_weights_from_flattened_bucket`` (SGLang 0.5.x)."""


@dataclass
class BucketEntry:
    """One tensor of a flattened bucket (the fields of SGLang's ``FlattenedTensorMetadata``): bytes
    ``[start_idx, end_idx)`` of the flat ``uint8`` tensor viewed as ``dtype`` and reshaped to ``shape``."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


class _HandleUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _BUCKET_GLOBALS:
            return _BUCKET_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise TensorPayloadError(f"serialized tensors reference {module}.{name}, which is not a tensor-handle "
                                 f"global (refused)")


_ALIGN = 16
_BUCKET_GLOBALS = {
    # what our sender writes (no sglang import needed on either side) ...
    ("types", "SimpleNamespace"): types.SimpleNamespace,
    # ... and what SGLang's own FlattenedTensorBucket pickles (a dataclass rebuilt field by field)
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): BucketEntry,
    ("copyreg", "__newobj__"): lambda cls, *args: _new_bucket_entry(cls, *args),
}


def _new_bucket_entry(cls, *args):
    if cls is not BucketEntry:
        raise TensorPayloadError(f"serialized tensors construct {cls!r}, which is not a bucket entry (refused)")
    return cls.__new__(cls, *args)


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """One ``serialized_named_tensors`` entry in SGLang's ``load_format="flattened_bucket"`` format.

    The tensors are copied once, byte by byte, into ONE ``uint8`` tensor (shared memory on CPU, a new
    allocation on the tensors' GPU; each entry starts on a 16-byte boundary, as a view of mixed dtypes
    needs - SGLang's own bucket packs them back to back and reads entries by their byte range) and described by :class:`BucketEntry`-shaped records (pickled as
    ``types.SimpleNamespace``, which SGLang's ``SafeUnpickler`` admits; SGLang reads them by attribute).
    Layout and field meanings: :data:`FLATTENED_BUCKET`; it equals what
    ``FlattenedTensorBucket(named_tensors=...).get_flattened_tensor() / get_metadata()`` produce.

    Args:
        named_tensors: non-empty ``(hf_name, tensor)`` pairs, all on one device (any dtypes).

    Returns:
        ASCII text (``MultiprocessingSerializer.serialize(obj, output_str=True)``'s format).

    Raises:
        ValueError: empty list or tensors on different devices.  TypeError: not ``(str, Tensor)`` pairs.
    """
    items = _check_named(named_tensors)
    if not items:
        raise ValueError("a flattened bucket needs at least one tensor")
    devices = {t.device for _, t in items}
    if len(devices) != 1:
        raise ValueError(f"a flattened bucket holds tensors of one device, got {sorted(map(str, devices))}")
    starts, off = [], 0
    for _, t in items:  # each entry starts on a multiple of _ALIGN bytes (a byte view needs dtype alignment)
        off = -(-off // _ALIGN) * _ALIGN
        starts.append(off)
        off += t.numel() * t.element_size()
    flat = torch.zeros(off, dtype=torch.uint8, device=devices.pop())
    if not flat.is_cuda:
        with _file_system_sharing():
            flat.share_memory_()
    meta = []
    for (name, t), off in zip(items, starts):
        nbytes = t.numel() * t.element_size()
        flat[off: off + nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        meta.append(types.SimpleNamespace(name=name, shape=torch.Size(t.shape), dtype=t.dtype, start_idx=off,
                                          end_idx=off + nbytes, numel=nbytes))
    return _pickle_b64({"flattened_tensor": flat, "metadata": meta})


def _check_named(named_tensors) -> list[tuple[str, torch.Tensor]]:
    items = []
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"named_tensors[{i}] must be a (str, torch.Tensor) pair, got {type(item).__name__}")
        items.append((item[0], item[1].detach()))
    return items


def _pickle_b64(obj) -> str:
    buf = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def unflatten_bucket(obj) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` views of a flattened-bucket dict (see :data:`FLATTENED_BUCKET`).

    Raises:
        TensorPayloadError: not such a dict, or an entry outside the flat tensor / of the wrong size.
    """
    if not (isinstance(obj, dict) and isinstance(obj.get("flattened_tensor"), torch.Tensor)
            and isinstance(obj.get("metadata"), list)):
        raise TensorPayloadError("a flattened bucket must be a dict with a 'flattened_tensor' tensor and a "
                                 "'metadata' list")
    flat = obj["flattened_tensor"]
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise TensorPayloadError(f"flattened_tensor must be 1-D uint8, got {flat.dtype} of shape {tuple(flat.shape)}")
    out = []
    for i, m in enumerate(obj["metadata"]):
        try:
            name, shape, dtype = str(m.name), torch.Size(m.shape), m.dtype
            start, end = int(m.start_idx), int(m.end_idx)
        except (AttributeError, TypeError, ValueError) as exc:
            raise TensorPayloadError(f"metadata[{i}] is not a bucket entry: {exc}") from None
        if not isinstance(dtype, torch.dtype):
            raise TensorPayloadError(f"metadata[{i}].dtype is not a torch dtype")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not (0 <= start <= end <= flat.numel()) or end - start != shape.numel() * itemsize:
            raise TensorPayloadError(f"metadata[{i}] ({name}): bytes [{start}, {end}) do not fit shape "
                                     f"{tuple(shape)} of {dtype} inside {flat.numel()} bytes")
        out.append((name, flat[start:end].view(dtype).reshape(shape)))
    return out


def deserialize_payload(data: str | bytes, load_format: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """Read one ``serialized_named_tensors`` entry of either format (``load_format`` ``None`` or
    :data:`FLATTENED_BUCKET`) as ``[(name, tensor)]`` (engine side).

    Raises:
        TensorPayloadError: see :func:`deserialize_named_tensors` / :func:`unflatten_bucket`;
            ``ValueError`` for another ``load_format``.
    """
    if load_format is None:
        return deserialize_named_tensors(data)
    if load_format != FLATTENED_BUCKET:
        raise ValueError(f"load_format={load_format!r} unsupported (null or {FLATTENED_BUCKET!r})")
    return unflatten_bucket(_load(data))


def _load(data: str | bytes):
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else bytes(data)
    except (binascii.Error, ValueError) as exc:
        raise TensorPayloadError(f"serialized tensors are not base64 text: {exc}") from None
    try:
        return _HandleUnpickler(io.BytesIO(raw)).load()
    except TensorPayloadError:
        raise
    except Exception as exc:  # truncated pickle, missing shared-memory segment, CUDA handle on CPU, ...
        raise TensorPayloadError(f"cannot open serialized tensors: {type(exc).__name__}: {exc}") from None


def deserialize_named_tensors(data: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`serialize_named_tensors` in the receiving (engine) process.

    Returns:
        ``[(name, tensor)]``; the tensors map the sender's memory (valid while the sender keeps them).

    Raises:
        TensorPayloadError: not base64, not a pickle of ``list[(str, Tensor)]``, a global outside the
            tensor-handle allowlist, or a handle that cannot be opened (e.g. another host's segment).
    """
    obj = _load(data)
    if not isinstance(obj, list):
        raise TensorPayloadError(f"serialized tensors must be a list of (name, tensor), got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TensorPayloadError(f"serialized tensors[{i}] is not a (name, tensor) pair")
    return obj


def share_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Copy CPU tensors into one fresh shared-memory buffer per dtype; returns views of it in order.

    One segment per dtype (instead of one per tensor) keeps the number of shared-memory files and pickle
    handles small; the data is copied exactly once and the caller's storage is never moved. CUDA tensors
    are returned unchanged (CUDA IPC shares their allocation directly).
    """
    out: list = [None] * len(named_tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (name, t) in enumerate(named_tensors):
        if t.is_cuda:
            out[i] = (name, t)
        else:
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        total = sum(named_tensors[i][1].numel() for i in idx)
        flat = torch.empty(total, dtype=dtype)
        if total:
            with _file_system_sharing():
                flat.share_memory_()
        off = 0
        for i in idx:
            name, t = named_tensors[i]
            view = flat[off: off + t.numel()].view(t.shape)
            view.copy_(t)
            out[i] = (name, view)
            off += t.numel()
    return out
