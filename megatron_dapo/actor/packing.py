"""Padding-free sequence packing (THD layout) for the Megatron actor.

A micro-batch of right-padded rows ``[b, L]`` becomes ONE packed row ``[1, T]``: the valid tokens of every
sequence, one after the other, each sequence padded only up to a multiple of ``pad_multiple``. Attention is
restricted to each sequence by megatron-core's ``PackedSeqParams(qkv_format="thd")`` (TE's THD kernels on
GPU; the per-segment CPU path of :mod:`megatron_dapo.cpu_shims` on CPU), and rotary positions restart at 0
for every sequence (megatron-core 0.16.1 ``rope_utils._apply_rotary_pos_emb_thd``, which splits the
packed row at ``cu_seqlens_q_padded`` and gives every segment ``freqs[0:len]``).

Layout of a packed row (``n`` sequences with valid lengths ``len_i``)::

    segment i = tokens [cu_seqlens_padded[i], cu_seqlens_padded[i + 1])
              = len_i valid tokens, then padded_len_i - len_i filler tokens (pad_token_id)
    cu_seqlens        = [0, len_0, len_0 + len_1, ...]                       (int32, [n + 1])
    cu_seqlens_padded = [0, padded_len_0, padded_len_0 + padded_len_1, ...]  (int32, [n + 1])

Padding rule (:func:`packing_pad_multiple`): every sequence is padded to a multiple of
``(TP if sequence_parallel else 1) × (2·CP if CP > 1 else 1) × (16 if FP8 else 1)``. Sequence parallelism
splits the packed row over the TP ranks (the row length must divide by TP); context parallelism splits
every sequence into 2·CP chunks (TE's load-balanced THD split needs each sequence length to divide by
2·CP); FP8 GEMMs need token counts that divide by 16. Using the product makes every rank-local slice
satisfy all constraints at once. With none of them the multiple is 1: no padding at all.

The inverse map (:meth:`PackedMicroBatch.unpack`) scatters per-token outputs of the packed row back to
the ``[b, L]`` positions of the source rows, so logprobs/entropies keep the meaning of
:class:`~megatron_dapo.batch.ActorBatch` (entry ``[i, j]`` = token ``j`` of row ``i``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..cpu_shims import apply_cpu_shims


class PackingError(ValueError):
    """Invalid input to packing (names the offending row or argument)."""


def packing_pad_multiple(tensor_parallel_size: int = 1, context_parallel_size: int = 1,
                         sequence_parallel: bool = False, fp8: bool = False) -> int:
    """Multiple every packed sequence is padded to (see the module docstring for the rule).

    Args:
        tensor_parallel_size: TP size (only matters with ``sequence_parallel``).
        context_parallel_size: CP size (> 1 requires a multiple of 2·CP per sequence).
        sequence_parallel: Megatron sequence parallelism (the packed row is split over TP).
        fp8: Transformer Engine FP8 GEMMs (token counts divisible by 16).

    Returns:
        int >= 1.

    Raises:
        PackingError: a size < 1.
    """
    if tensor_parallel_size < 1 or context_parallel_size < 1:
        raise PackingError(f"tensor_parallel_size ({tensor_parallel_size}) and context_parallel_size "
                           f"({context_parallel_size}) must be >= 1")
    m = tensor_parallel_size if sequence_parallel else 1
    if context_parallel_size > 1:
        m *= 2 * context_parallel_size
    if fp8:
        m *= 16
    return m


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (both ints >= 1)."""
    return -(-int(length) // int(multiple)) * int(multiple)


@dataclass
class PackedMicroBatch:
    """One packed row and the maps between it and the ``[n, L]`` source rows.

    Attributes:
        input_ids: int64 ``[1, T]`` packed tokens (filler = ``pad_token_id``).
        position_ids: int64 ``[1, T]`` position of each token inside its sequence (restarts at 0 for
            every sequence; filler tokens continue the count of their segment).
        cu_seqlens: int32 ``[n + 1]`` cumulative valid lengths (``cu_seqlens[-1] = Σ len_i``).
        cu_seqlens_padded: int32 ``[n + 1]`` cumulative padded lengths (segment starts in the packed row;
            ``cu_seqlens_padded[-1] = T``).
        max_seqlen: longest padded segment (int; what megatron sizes the rotary table with).
        seq_lengths: int64 ``[n]`` valid lengths ``len_i``.
        width: ``L``, the width of the source rows (shape of :meth:`unpack` outputs).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int
    seq_lengths: torch.Tensor
    width: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lengths.numel())

    @property
    def total_len(self) -> int:
        """``T``: length of the packed row, padding included."""
        return int(self.input_ids.shape[1])

    @property
    def num_valid_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def packed_seq_params(self, device: Optional[torch.device | str] = None):
        """megatron-core ``PackedSeqParams`` for self-attention over this row.

        ``cu_seqlens_q/kv`` are the valid lengths, ``cu_seqlens_q/kv_padded`` the segment boundaries
        (TE skips the filler between them); ``max_seqlen_q/kv`` is the longest padded segment.
        Source: ``megatron/core/packed_seq_params.py`` and TE ``DotProductAttention`` (``qkv_format="thd"``).
        """
        apply_cpu_shims()  # before the first megatron import (a no-op with CUDA)
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        cu_pad = self.cu_seqlens_padded.to(device=device, dtype=torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                               cu_seqlens_kv_padded=cu_pad, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)

    def token_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid tokens as ``(row, col, packed_pos)`` int64 ``[Σ len_i]`` each (row-major order):
        token ``[row, col]`` of the source batch sits at ``packed_pos`` of the packed row."""
        lens = self.seq_lengths.to(torch.long)
        rows = torch.repeat_interleave(torch.arange(self.num_seqs), lens)
        starts = self.cu_seqlens[:-1].to(torch.long)
        cols = torch.arange(int(lens.sum())) - starts[rows]
        pos = self.cu_seqlens_padded[:-1].to(torch.long)[rows] + cols
        return rows, cols, pos

    def packed_offsets(self) -> torch.Tensor:
        """int64 ``[n]``: packed position of token 0 of each sequence (``packed_pos = offset[row] + col``)."""
        return self.cu_seqlens_padded[:-1].to(torch.long)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter per-token values of the packed row back to the source layout.

        Args:
            values: ``[T, ...]`` or ``[1, T, ...]`` (any dtype/device), one entry per packed position.

        Returns:
            ``[n, L, ...]`` same dtype/device; entry ``[i, j]`` is the value at token ``j`` of row ``i``,
            zero for ``j >= len_i`` (filler positions are dropped).

        Raises:
            PackingError: the leading dimension is not ``T``.
        """
        v = values[0] if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == self.total_len else values
        if v.shape[0] != self.total_len:
            raise PackingError(f"unpack: expected {self.total_len} packed positions, got shape {tuple(values.shape)}")
        rows, cols, pos = self.token_index()
        dev = v.device
        out = v.new_zeros((self.num_seqs, self.width) + tuple(v.shape[1:]))
        out[rows.to(dev), cols.to(dev)] = v.index_select(0, pos.to(dev))
        return out

    def pack(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Inverse of :meth:`unpack`: ``[n, L, ...]`` source-layout values to ``[T, ...]`` packed order
        (filler positions get ``fill``).

        Raises:
            PackingError: the leading dimensions are not ``[n, >= max len]``.
        """
        if values.dim() < 2 or values.shape[0] != self.num_seqs or values.shape[1] < int(self.seq_lengths.max()):
            raise PackingError(f"pack: expected [{self.num_seqs}, >= {int(self.seq_lengths.max())}, ...], "
                               f"got shape {tuple(values.shape)}")
        rows, cols, pos = self.token_index()
        dev = values.device
        out = values.new_full((self.total_len,) + tuple(values.shape[2:]), fill)
        out[pos.to(dev)] = values[rows.to(dev), cols.to(dev)]
        return out


def pack_sequences(input_ids: torch.Tensor, seq_lengths: torch.Tensor | list[int], *, pad_multiple: int = 1,
                   pad_to: Optional[int] = None, pad_token_id: int = 0) -> PackedMicroBatch:
    """Pack right-padded rows into one THD row.

    Args:
        input_ids: integer ``[n, L]`` right-padded token ids (only the first ``seq_lengths[i]`` of row ``i``
            are read).
        seq_lengths: ``[n]`` valid tokens per row, each in ``[1, L]``.
        pad_multiple: each sequence is padded to a multiple of this (:func:`packing_pad_multiple`).
        pad_to: pad the whole row to exactly this length (fixed pipeline shapes, e.g. the interleaved
            schedule on gloo); the extra filler extends the LAST segment. Must be a multiple of
            ``pad_multiple`` and ``>=`` the natural packed length.
        pad_token_id: token id of filler positions.

    Returns:
        :class:`PackedMicroBatch` (tensors on CPU except ``input_ids``, which stays on the input's device).

    Raises:
        PackingError: empty batch, non-integer / non-2-D ids, a row length outside ``[1, L]`` (names the
            row), ``pad_multiple < 1`` or an unusable ``pad_to``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise PackingError(f"input_ids must be a 2-D tensor [n, L], got "
                           f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise PackingError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    n, L = input_ids.shape
    if n == 0:
        raise PackingError("cannot pack an empty batch (0 rows)")
    lens = torch.as_tensor(seq_lengths, dtype=torch.long).cpu().reshape(-1)
    if lens.numel() != n:
        raise PackingError(f"seq_lengths has {lens.numel()} entries for {n} rows of input_ids")
    if int(pad_multiple) < 1:
        raise PackingError(f"pad_multiple must be >= 1, got {pad_multiple}")
    for i, v in enumerate(lens.tolist()):
        if not 1 <= v <= L:
            raise PackingError(f"row {i}: seq_length {v} is outside [1, {L}] (row width)")
    padded = (lens + pad_multiple - 1) // pad_multiple * pad_multiple
    natural = int(padded.sum())
    if pad_to is not None:
        if pad_to < natural:
            raise PackingError(f"pad_to={pad_to} is shorter than the packed length {natural}")
        if pad_to % pad_multiple:
            raise PackingError(f"pad_to={pad_to} must be a multiple of pad_multiple={pad_multiple}")
        padded[-1] += pad_to - natural
    total = int(padded.sum())
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
    cu_pad = torch.zeros(n + 1, dtype=torch.int32)
    cu_pad[1:] = torch.cumsum(padded, 0).to(torch.int32)
    seg = torch.repeat_interleave(torch.arange(n), padded)
    position_ids = (torch.arange(total) - cu_pad[:-1].to(torch.long)[seg]).unsqueeze(0)
    packed = PackedMicroBatch(input_ids=input_ids.new_full((1, total), pad_token_id), position_ids=position_ids,
                              cu_seqlens=cu, cu_seqlens_padded=cu_pad, max_seqlen=int(padded.max()),
                              seq_lengths=lens.clone(), width=L)
    rows, cols, pos = packed.token_index()
    dev = input_ids.device
    packed.input_ids[0, pos.to(dev)] = input_ids[rows.to(dev), cols.to(dev)]
    return packed


def make_packed_micro_batches(lengths: list[int], max_tokens: int, pad_multiple: int = 1,
                              micro_batch_size: Optional[int] = None) -> list[list[int]]:
    """Group row indices into packed micro-batches under a token budget.

    With ``micro_batch_size`` fixed-size groups in order. Otherwise first-fit decreasing bin packing:
    rows sorted longest first, each placed into the first micro-batch whose packed length
    ``Σ padded_length(len_i, pad_multiple)`` stays ``<= max_tokens``; a row longer than the budget gets a
    micro-batch of its own. Deterministic; indices inside a group ascend.

    Raises:
        PackingError: ``max_tokens < 1``, ``pad_multiple < 1`` or a length < 1 (names the row).
    """
    if micro_batch_size:
        n = len(lengths)
        return [list(range(s, min(n, s + micro_batch_size))) for s in range(0, n, micro_batch_size)]
    if max_tokens < 1 or pad_multiple < 1:
        raise PackingError(f"max_tokens ({max_tokens}) and pad_multiple ({pad_multiple}) must be >= 1")
    for i, v in enumerate(lengths):
        if v < 1:
            raise PackingError(f"row {i}: length {v} < 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        cost = padded_length(lengths[i], pad_multiple)
        for k, load in enumerate(loads):
            if load + cost <= max_tokens:
                bins[k].append(i)
                loads[k] += cost
                break
        else:
            bins.append([i])
            loads.append(cost)
    return [sorted(b) for b in bins]
