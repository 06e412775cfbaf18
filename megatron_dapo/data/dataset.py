"""Prompt data: loading verl-schema rows, a resumable shuffled prompt sampler, prompt rendering.

Row schema (verl RL datasets, e.g. DAPO-Math-17k; see ``verl/utils/dataset/rl_dataset.py``)::

    {"data_source": str,
     "prompt": [{"role": str, "content": str}, ...],   # chat messages, non-empty
     "ability": str,                                    # optional here
     "reward_model": {"ground_truth": str, "style": str},
     "extra_info": {"index": int | str, ...}}           # optional

Both layouts in ``../shared/data/dapo-math-17k`` load: integer ``extra_info.index`` (the 17,917-row
file) and UUID-string ``extra_info.index`` (``dapo_math_original_rows16.parquet``).
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TYPE_CHECKING

from ..errors import MegatronDapoError
from .tasks import generate_tasks

if TYPE_CHECKING:
    from ..config import DAPOConfig

logger = logging.getLogger(__name__)


class RowValidationError(MegatronDapoError, ValueError):
    """A data row violates the verl schema; the message names the file, row number and field."""

    def __init__(self, source: str, row_number: int, field_name: str, problem: str):
        self.source = source
        self.row_number = row_number
        self.field = field_name
        self.problem = problem
        super().__init__(f"{source}: row {row_number} (0-based): field '{field_name}': {problem}")


def validate_row(row: Any, *, source: str = "<rows>", row_number: int = 0) -> dict:
    """Check one row against the verl schema and return it.

    Checks: the row is a dict; ``data_source`` is a str; ``prompt`` is a non-empty list of dicts each
    with str ``role`` (non-empty) and str ``content``; ``reward_model`` is a dict whose ``ground_truth``
    is a non-empty str.  Raises :class:`RowValidationError` naming ``source``, ``row_number`` and the field.
    """
    def fail(field_name: str, problem: str):
        raise RowValidationError(source, row_number, field_name, problem)

    if not isinstance(row, dict):
        fail("<row>", f"expected an object/dict, got {type(row).__name__}")
    if "data_source" not in row:
        fail("data_source", "missing")
    if not isinstance(row["data_source"], str):
        fail("data_source", f"expected str, got {type(row['data_source']).__name__}")
    prompt = row.get("prompt")
    if prompt is None:
        fail("prompt", "missing")
    if not isinstance(prompt, (list, tuple)):
        fail("prompt", f"expected a list of {{role, content}} messages, got {type(prompt).__name__}")
    if len(prompt) == 0:
        fail("prompt", "empty message list")
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            fail(f"prompt[{j}]", f"expected a dict with role/content, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                fail(f"prompt[{j}].{key}", "missing")
            if not isinstance(msg[key], str):
                fail(f"prompt[{j}].{key}", f"expected str, got {type(msg[key]).__name__}")
        if not msg["role"]:
            fail(f"prompt[{j}].role", "empty string")
    rm = row.get("reward_model")
    if rm is None:
        fail("reward_model", "missing")
    if not isinstance(rm, dict):
        fail("reward_model", f"expected a dict with ground_truth, got {type(rm).__name__}")
    if "ground_truth" not in rm or rm["ground_truth"] is None:
        fail("reward_model.ground_truth", "missing")
    if not isinstance(rm["ground_truth"], str):
        fail("reward_model.ground_truth",
             f"expected str, got {type(rm['ground_truth']).__name__} ({rm['ground_truth']!r})")
    if not rm["ground_truth"].strip():
        fail("reward_model.ground_truth", "empty string")
    return row


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RowValidationError(str(path), len(rows), "<json>",
                                         f"invalid JSON on line {line_no}: {e.msg}") from e
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq  # heavy: pyarrow, only for parquet files

    return pq.read_table(path).to_pylist()


def load_rows(paths: str | Path | Sequence[str | Path], *, limit: int | None = None) -> list[dict]:
    """Load and validate verl-schema rows from ``.parquet`` and/or ``.jsonl`` files.

    Args:
        paths: one path or a list of paths; rows are concatenated in the given order.
        limit: keep at most this many rows from each file (``None`` = all).

    Returns:
        list of row dicts (python types; parquet via ``pyarrow.Table.to_pylist``).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: unsupported suffix, or no paths given.
        RowValidationError: (a ``ValueError``) a row breaks the schema; names file, row and field.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("load_rows: no data files given")
    out: list[dict] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            rows = _read_parquet(p)
        elif suffix == ".jsonl":
            rows = _read_jsonl(p)
        else:
            raise ValueError(f"{p}: unsupported data file suffix {p.suffix!r} (use .parquet or .jsonl)")
        if limit is not None:
            rows = rows[:limit]
        for i, row in enumerate(rows):
            out.append(validate_row(row, source=str(p), row_number=i))
        logger.info("loaded %d rows from %s", len(rows), p)
    return out


def demo_rows(cfg: DAPOConfig) -> list[dict]:
    """The embedded default task: the project's own arithmetic problems (deterministic in ``seed``)."""
    return generate_tasks(cfg.data.demo_num_rows, seed=cfg.seed)


def val_rows(cfg: DAPOConfig) -> list[dict]:
    """Evaluation rows: ``data.val_files``, else (demo task only) held-out generated problems, else none."""
    if cfg.data.val_files:
        return load_rows(cfg.data.val_files)
    if not cfg.data.train_files:
        return generate_tasks(cfg.data.demo_num_val_rows, seed=cfg.seed + 1)
    return []


class PromptDataset:
    """Infinite, deterministic, resumable sampler of prompt rows.

    Epoch ``e`` visits every row once in the order ``permutation(seed, e)`` (a ``random.Random``
    seeded with the string ``f"{seed}:{e}"``, which is stable across processes and Python runs);
    with ``shuffle=False`` the order is ``0..N-1``.  :meth:`next_batch` continues across epoch
    boundaries, so batch sizes need not divide the dataset size.  ``state_dict()`` captures
    ``(epoch, position, seed)``; loading it into a dataset over the same rows reproduces the
    following batches exactly.

    Raises ``ValueError`` for an empty ``rows``.
    """

    def __init__(self, rows: Sequence[dict], seed: int = 0, shuffle: bool = True):
        if len(rows) == 0:
            raise ValueError("PromptDataset: no rows")
        self.rows = rows
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _current_order(self) -> list[int]:
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        return self._order

    def next_batch(self, n: int) -> list[tuple[int, dict]]:
        """Return the next ``n`` ``(row_index, row)`` pairs, crossing epochs seamlessly.

        ``row_index`` indexes ``self.rows``.  Raises ``ValueError`` if ``n < 1``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"next_batch: n must be a positive int, got {n!r}")
        out: list[tuple[int, dict]] = []
        while len(out) < n:
            order = self._current_order()
            take = min(n - len(out), len(order) - self.position)
            for idx in order[self.position:self.position + take]:
                out.append((idx, self.rows[idx]))
            self.position += take
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def batches(self, batch_size: int, num_batches: int | None = None) -> Iterator[list[tuple[int, dict]]]:
        """Yield ``num_batches`` batches (forever if ``None``) of :meth:`next_batch` ``(batch_size)``."""
        k = 0
        while num_batches is None or k < num_batches:
            yield self.next_batch(batch_size)
            k += 1

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "shuffle", "num_rows"}`` (all plain ints/bools)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_rows": len(self.rows)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises ``ValueError`` if ``num_rows`` differs from this dataset's size (resuming over other
        data would silently change the order) or ``position`` is out of range; ``KeyError`` names a
        missing key.
        """
        for key in ("epoch", "position", "seed"):
            if key not in state:
                raise KeyError(f"PromptDataset.load_state_dict: missing key '{key}'")
        if "num_rows" in state and int(state["num_rows"]) != len(self.rows):
            raise ValueError(f"PromptDataset.load_state_dict: state is for {state['num_rows']} rows, "
                             f"this dataset has {len(self.rows)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.rows):
            raise ValueError(f"PromptDataset.load_state_dict: bad epoch/position {epoch}/{position} "
                             f"for {len(self.rows)} rows")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch, self.position = epoch, position
        self._order = None


@dataclass(frozen=True)
class PromptTooLong:
    """Why a prompt was skipped: its rendered length exceeds ``max_prompt_length`` (tokens)."""

    num_tokens: int
    max_prompt_length: int
    row_index: int | None = None

    @property
    def reason(self) -> str:
        where = "" if self.row_index is None else f"row {self.row_index}: "
        return f"{where}prompt has {self.num_tokens} tokens > max_prompt_length={self.max_prompt_length}"


@dataclass
class PromptSkipStats:
    """Counter of skipped prompts (``counts[reason_kind]``) plus the most recent skip records."""

    counts: Counter = field(default_factory=Counter)
    recent: list = field(default_factory=list)
    keep_recent: int = 16

    def add(self, skip: PromptTooLong) -> None:
        self.counts["prompt_too_long"] += 1
        self.recent.append(skip)
        del self.recent[:-self.keep_recent]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _as_id_list(encoded: Any) -> list[int]:
    """Normalise ``apply_chat_template(tokenize=True)`` output to ``list[int]``.

    transformers 5.x returns a ``BatchEncoding`` (``return_dict=True`` default); 4.x a list.
    """
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"expected one tokenized conversation, got a batch of {len(ids)}")
        ids = list(ids[0])
    return [int(t) for t in ids]


def _render(tokenizer, messages, max_prompt_length, row_index):
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    ids = _as_id_list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                    tokenize=True))
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return None, PromptTooLong(len(ids), max_prompt_length, row_index)
    return ids, None


def render_prompt(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    max_prompt_length: int | None,
    *,
    row_index: int | None = None,
    skip_stats: PromptSkipStats | None = None,
) -> list[int] | None:
    """Token ids of ``messages`` with the chat template and the generation prompt.

    Exactly ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``
    (transformers chat-template API), returned as a plain ``list[int]`` whatever the transformers
    version returns (5.x gives a ``BatchEncoding``).

    Returns ``None`` — a counted skip, not an error — when the prompt has more than
    ``max_prompt_length`` tokens (``None`` = no limit); the :class:`PromptTooLong` record is logged at
    DEBUG and added to ``skip_stats`` when given (:func:`render_batch` also returns the records).
    Raises ``ValueError`` for ``max_prompt_length < 1``.
    """
    ids, skip = _render(tokenizer, messages, max_prompt_length, row_index)
    if skip is not None:
        logger.debug("skipping prompt: %s", skip.reason)
        if skip_stats is not None:
            skip_stats.add(skip)
    return ids


def render_batch(
    tokenizer,
    batch: Sequence[tuple[int, dict]],
    max_prompt_length: int | None,
    skip_stats: PromptSkipStats | None = None,
) -> tuple[list[tuple[int, dict, list[int]]], list[PromptTooLong]]:
    """Render a :meth:`PromptDataset.next_batch` batch.

    Returns ``(kept, skipped)``: ``kept`` = ``[(row_index, row, prompt_ids), ...]`` in batch order,
    ``skipped`` = the :class:`PromptTooLong` records of prompts over ``max_prompt_length`` (also added
    to ``skip_stats`` when given; one WARNING is logged per batch that skips anything).
    """
    kept: list[tuple[int, dict, list[int]]] = []
    skipped: list[PromptTooLong] = []
    for idx, row in batch:
        ids, skip = _render(tokenizer, row["prompt"], max_prompt_length, idx)
        if skip is None:
            kept.append((idx, row, ids))
        else:
            skipped.append(skip)
            if skip_stats is not None:
                skip_stats.add(skip)
    if skipped:
        total = skip_stats.total if skip_stats is not None else len(skipped)
        logger.warning("skipped %d/%d prompts longer than max_prompt_length=%s (first: %s); "
                       "%d skipped so far", len(skipped), len(batch), max_prompt_length,
                       skipped[0].reason, total)
    return kept, skipped
