"""Export side of the weight sync: dtype resolution and bucketing of ``(hf_name, tensor)`` streams.

The actor's :meth:`~megatron_dapo.actor.megatron_actor.MegatronActor.iter_hf_tensors` yields one full
(TP-gathered, PP-broadcast) tensor at a time. :func:`iter_buckets` packs that stream, in order, into
buckets of at most ``bucket_bytes`` without ever materialising more than the current bucket plus the
one tensor that did not fit, so the export memory peak is ``bucket_bytes`` + one layer's largest tensor.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch

_DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

MB = 1 << 20
_MAX_STORAGE_OVERHEAD = 1.25


def resolve_dtype(dtype: torch.dtype | str | None, *, default: torch.dtype | str = "fp32") -> torch.dtype:
    """The dtype weights are sent to the engines in.

    Args:
        dtype: a ``torch.dtype``, one of ``fp32|bf16|fp16`` (or their torch names, optionally with the
            ``torch.`` prefix), or ``None`` = ``default`` (``weight_sync.dtype``).
        default: the dtype used when ``dtype`` is ``None``, given the same ways: the actor's params dtype
            (``actor.params_dtype``); ``fp32`` when not given.

    Returns:
        A floating ``torch.dtype``.

    Raises:
        ValueError: unknown name or a non-floating dtype (names the ``weight_sync.dtype`` flag, or
            ``actor.params_dtype`` for a bad ``default`` used in its place).
    """
    if dtype is None:
        return _floating_dtype(default, "actor.params_dtype")
    return _floating_dtype(dtype, "weight_sync.dtype")


def _floating_dtype(dtype: torch.dtype | str, flag: str) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"{flag}={dtype!r} is not one of fp32, bf16, fp16")
        dtype = _DTYPE_ALIASES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{flag}={dtype!r} must be a floating torch dtype")
    return dtype


def bucket_bytes_from_mb(bucket_mb: float) -> int:
    """``bucket_mb`` (MiB, may be fractional; ``0`` = unbounded) to bytes.

    Raises:
        ValueError: negative or non-finite ``bucket_mb`` (names ``weight_sync.bucket_mb``).
    """
    try:
        value = float(bucket_mb)
    except (TypeError, ValueError):
        raise ValueError(f"weight_sync.bucket_mb={bucket_mb!r} is not a number") from None
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"weight_sync.bucket_mb must be a finite number >= 0 (0 = unbounded), got {bucket_mb!r}")
    return int(value * MB)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Payload size of ``t`` in bytes (``numel * element_size``)."""
    return t.numel() * t.element_size()


def _compact(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Cast to ``dtype``, make ``t`` contiguous, and copy it out of a much larger backing storage.

    A view that covers most of its storage (the vocab rows of a padded embedding: 99.9 %) is kept as it
    is (a copy would cost a full extra pass over the largest tensor); views into big shared buffers (a
    replicated parameter inside the DDP parameter buffer, the k/v slices of one-group ``linear_qkv``) are
    copied, so a bucket never pins more than ~1.25x its payload and no two bucket tensors share storage
    (safetensors refuses shared storage).
    """
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    if t.untyped_storage().nbytes() > _MAX_STORAGE_OVERHEAD * tensor_nbytes(t):
        t = t.clone()
    return t


def iter_buckets_with_last(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
                           dtype: Optional[torch.dtype] = None,
                           ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """:func:`iter_buckets`, also telling whether each bucket is the final one.

    The flag costs nothing extra: a bucket is closed only when the next tensor (already in hand)
    does not fit, or when the stream ends.

    Yields:
        ``(bucket, is_last)``.
    """
    if bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be >= 0 (0 = unbounded), got {bucket_bytes}")
    seen: set[str] = set()
    cur: list[tuple[str, torch.Tensor]] = []
    cur_bytes = 0
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, tensor) pairs, got {type(item).__name__} after {len(seen)} tensors")
        name, t = item
        if name in seen:
            raise ValueError(f"tensor {name!r} was exported twice")
        seen.add(name)
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} has non-floating dtype {t.dtype}")
        t = _compact(t, dtype)
        nb = tensor_nbytes(t)
        if cur and bucket_bytes and cur_bytes + nb > bucket_bytes:
            yield cur, False
            cur, cur_bytes = [], 0
        cur.append((name, t))
        cur_bytes += nb
    if cur:
        yield cur, True


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
                 dtype: Optional[torch.dtype] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Pack a ``(hf_name, tensor)`` stream, in order, into buckets of at most ``bucket_bytes`` bytes.

    The input is consumed lazily: at any time only the current bucket and the next tensor are held.
    A tensor larger than ``bucket_bytes`` gets a bucket of its own; ``bucket_bytes = 0`` means one
    unbounded bucket. Every tensor is cast to ``dtype`` (when given) and made contiguous and compact
    (it owns exactly its bytes), so buckets can be written, broadcast or IPC-shared as they are.

    Args:
        named_tensors: iterable of ``(name, tensor)``; tensors of any shape, floating dtypes.
        bucket_bytes: bucket capacity in bytes (``0`` = unbounded), measured after the cast.
        dtype: target dtype or ``None`` to keep each tensor's dtype.

    Yields:
        Lists of ``(name, tensor)`` in input order; their concatenation is the whole input.

    Raises:
        ValueError: negative ``bucket_bytes``, a duplicate name, or a non-floating tensor (named).
        TypeError: an item that is not a ``(str, Tensor)`` pair.
    """
    for bucket, _ in iter_buckets_with_last(named_tensors, bucket_bytes, dtype=dtype):
        yield bucket


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Total payload bytes of a bucket."""
    return sum(tensor_nbytes(t) for _, t in bucket)
