"""Rule-based math reward: ``compute_score`` / ``score_batch`` / ``summarize``.

Outcome reward of DAPO (arXiv 2503.14476, Eq. 8 / Sec. 2.4): ``R(y_hat, y) = +1 if is_equivalent(
y_hat, y) else -1``. Three checkers, chosen by ``data_source``:

* **DAPO rule** (``math_dapo``, ``aime*``, and unknown sources whose ground truth is an integer):
  the prediction is the value after the last ``Answer:`` (see :func:`extract.find_answer_line`);
  with ``strict=False`` the last ``\\boxed{}`` is accepted when no ``Answer:`` marker exists. Both
  sides are normalised to canonical integer strings (:func:`extract.normalize_integer`) and
  compared as strings: no symbolic evaluation, no ``int()``. Runs in-process, ~10 us per 64 KB
  response.
* **math-verify** (``math500``, ``math``, ``HuggingFaceH4/MATH-500``, ``lighteval/MATH`` and unknown
  sources with a non-integer ground truth; also DAPO sources whose ground truth is not an
  integer): answer from the last ``Answer:`` line, else the last ``\\boxed{}``; compared with
  ``math_verify.parse``/``verify`` in a worker process with a hard per-item time limit
  (:mod:`.math_verify_pool`). When both sides are plain integers they are compared in-process.
* **GSM8K** (``gsm8k``, ``openai/gsm8k``): reference = number after ``####`` (or the whole string);
  prediction = last ``Answer:`` line, else last ``####`` line, else (``strict=False``) last
  ``\\boxed{}``; decimals compared exactly after normalisation (``18.50`` == ``18.5``).

Status values: ``ok`` (compared), ``no_answer`` (no marker / empty value), ``parse_error`` (value
found but not a number / unparseable LaTeX / bad input), ``timeout`` (math-verify exceeded the limit).
Every non-``ok`` status scores -1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from . import extract as ex
from .math_verify_pool import OK, PARSE_ERROR, TIMEOUT, get_pool

__all__ = ["RewardResult", "RewardStats", "compute_score", "score_batch", "summarize",
           "checker_for", "NO_ANSWER", "STATUSES", "MAX_MATH_VERIFY_CHARS"]

logger = logging.getLogger(__name__)

NO_ANSWER = "no_answer"
STATUSES = (OK, NO_ANSWER, PARSE_ERROR, TIMEOUT)
#: Longest extracted answer sent to math-verify (characters); longer ones are parse errors.
MAX_MATH_VERIFY_CHARS = 2000

DAPO, MATH_VERIFY, GSM8K = "dapo", "math_verify", "gsm8k"
_MATH_VERIFY_SOURCES = {"math", "math500", "math-500", "huggingfaceh4/math-500", "lighteval/math",
                        "hendrycks_math", "digitallearninggmbh/math-lighteval"}


@dataclass(frozen=True)
class RewardResult:
    """Outcome of scoring one response.

    Attributes:
        score: +1.0 if correct else -1.0 (DAPO outcome reward).
        acc: whether the prediction matched the ground truth.
        pred: the extracted (for integers: normalised) answer, or None when none was found.
        status: one of ``"ok"``, ``"no_answer"``, ``"parse_error"``, ``"timeout"``.
    """

    score: float
    acc: bool
    pred: str | None
    status: str


def _result(acc: bool, pred: str | None, status: str) -> RewardResult:
    return RewardResult(1.0 if acc else -1.0, bool(acc), pred, status)


def checker_for(data_source: str, ground_truth: str) -> str:
    """Which checker scores ``data_source``: ``"dapo"``, ``"math_verify"`` or ``"gsm8k"``.

    ``math_dapo``/``*dapo*``/``aime*``: DAPO rule when the ground truth normalises to an integer,
    else math-verify. ``*gsm8k*``: GSM8K. MATH / MATH-500 names: math-verify. Anything else: DAPO
    rule for integer ground truths, else math-verify.
    """
    ds = (data_source or "").strip().lower()
    if "gsm8k" in ds:
        return GSM8K
    if ds in _MATH_VERIFY_SOURCES or "math500" in ds or "math-500" in ds:
        return MATH_VERIFY
    return DAPO if ex.normalize_integer(ground_truth) is not None else MATH_VERIFY


def _as_text(x, field: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    if isinstance(x, int) and not isinstance(x, bool) and field == "ground_truth":
        return str(x)
    raise TypeError(f"{field} must be str, got {type(x).__name__}")


def _judge(value: Optional[str], normalize: Callable[[str], Optional[str]], reference: str) -> RewardResult:
    """The result for an extracted answer ``value`` (``None``/empty: no answer): ``normalize`` it (``None``: a
    parse error) and compare it with the normalised ``reference``."""
    if not value:
        return _result(False, None, NO_ANSWER)
    pred = normalize(value)
    if pred is None:
        return _result(False, value, PARSE_ERROR)
    return _result(pred == reference, pred, OK)


def _score_dapo(response: str, gt_int: str, strict: bool) -> RewardResult:
    value = ex.find_answer_line(response)
    if value is None and not strict:
        value = ex.find_last_boxed(response)
    return _judge(value, ex.normalize_integer, gt_int)


def _score_gsm8k(response: str, ground_truth: str, strict: bool) -> RewardResult:
    gt = ex.gsm8k_reference(ground_truth)
    if gt is None:
        raise ValueError(f"ground_truth is not a GSM8K number: {ground_truth[:80]!r}")
    value = ex.find_answer_line(response)
    if value is None:
        value = ex.find_gsm8k_marker(response)
    if value is None and not strict:
        value = ex.find_last_boxed(response)
    return _judge(value, ex.normalize_number, gt)


def _sanitize(s: str) -> str:
    """Drop control characters and replace lone surrogates (invalid UTF-8)."""
    s = s.translate(ex._CONTROL_DELETE)
    if not s.isascii():
        s = s.encode("utf-8", errors="replace").decode("utf-8")
    return s


def _as_latex(s: str) -> str:
    """Delimit an answer for math-verify's LaTeX extractor: ``\\$`` (currency) is dropped, and
    text without ``$``/``\\(``/``\\[``/``\\boxed`` is wrapped in ``$...$``."""
    s = s.replace("\\$", "").strip().strip("*").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s:
        return s
    return f"${s}$"


def _prepare_math_verify(response: str, ground_truth: str
                         ) -> tuple[RewardResult | None, tuple[str, str, str] | None]:
    """Extract and screen the prediction. Returns a final result, or the job
    ``(gold_latex, pred_latex, extracted_value)``."""
    value = ex.find_answer_line(response)
    if not value:
        boxed = ex.find_last_boxed(response)
        if boxed:
            value = boxed
    if not value:
        return _result(False, None, NO_ANSWER), None
    if len(value) > MAX_MATH_VERIFY_CHARS:
        return _result(False, value[:200], PARSE_ERROR), None
    value = _sanitize(value)
    # Python dunders never occur in mathematics; refuse them outright (defence in depth: the
    # worker's LaTeX parser does not evaluate code anyway).
    if "__" in value:
        return _result(False, value, PARSE_ERROR), None
    gt_int = ex.normalize_integer(ground_truth)
    if gt_int is not None:
        pred_int = ex.normalize_integer(value)
        if pred_int is not None:  # both plain integers: math-verify would compare them exactly
            return _result(pred_int == gt_int, value, OK), None
    gold = _sanitize(ground_truth)
    if len(gold) > MAX_MATH_VERIFY_CHARS:
        raise ValueError(f"ground_truth longer than {MAX_MATH_VERIFY_CHARS} characters")
    return None, (_as_latex(gold), _as_latex(value), value)


def _score_one_local(response, ground_truth, data_source: str, strict: bool
                     ) -> tuple[RewardResult | None, tuple[str, str, str] | None]:
    response = _as_text(response, "response")
    ground_truth = _as_text(ground_truth, "ground_truth")
    kind = checker_for(data_source, ground_truth)
    if kind == DAPO:
        return _score_dapo(response, ex.normalize_integer(ground_truth), strict), None
    if kind == GSM8K:
        return _score_gsm8k(response, ground_truth, strict), None
    return _prepare_math_verify(response, ground_truth)


def compute_score(response: str, ground_truth: str, *, data_source: str = "math_dapo",
                  strict: bool = True, timeout_s: float = 1.0) -> RewardResult:
    """Score one response against its reference answer (DAPO outcome reward, +1 / -1).

    Args:
        response: the model's decoded response text (any length; NUL/control characters and lone
            surrogates are tolerated).
        ground_truth: reference answer (``reward_model.ground_truth``); an ``int`` is accepted.
        data_source: dataset name selecting the checker (see :func:`checker_for`).
        strict: DAPO/GSM8K rule: if False, a last ``\\boxed{}`` is accepted when no ``Answer:``
            line exists. math-verify path: passed to ``math_verify.verify(strict=...)``.
        timeout_s: hard limit (seconds) for the math-verify worker on this item.

    Returns:
        :class:`RewardResult`.

    Raises:
        TypeError: ``response``/``ground_truth`` of the wrong type.
        ValueError: a GSM8K reference that is not a number; ``timeout_s <= 0``.
        MathVerifyWorkerError: the math-verify worker processes cannot be started.
    """
    res, job = _score_one_local(response, ground_truth, data_source, strict)
    if res is not None:
        return res
    status, acc = get_pool(1).verify_many([(job[0], job[1], strict)], timeout_s)[0]
    return _result(acc, job[2], status)


def score_batch(responses: Sequence[str], ground_truths: Sequence[str],
                data_sources: Sequence[str] | str, *, num_workers: int = 1, strict: bool = True,
                timeout_s: float = 1.0) -> list[RewardResult]:
    """Score a batch; results keep the input order.

    DAPO-rule and GSM8K items are scored in-process; math-verify items go to the worker pool
    (``num_workers`` processes, each item limited to ``timeout_s`` seconds). An item that raises
    (wrong type, unparseable reference) is logged with its row index and scores -1 with status
    ``parse_error``; it never fails the batch.

    Args:
        responses, ground_truths: equal-length sequences of strings.
        data_sources: one name per item, or a single name for all items.

    Raises:
        ValueError: the sequences differ in length, ``num_workers < 1`` or ``timeout_s <= 0``.
        MathVerifyWorkerError: the math-verify worker processes cannot be started.
    """
    n = len(responses)
    if isinstance(data_sources, str):
        data_sources = [data_sources] * n
    if len(ground_truths) != n or len(data_sources) != n:
        raise ValueError(f"score_batch: len(responses)={n}, len(ground_truths)="
                         f"{len(ground_truths)}, len(data_sources)={len(data_sources)} differ")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    out: list[RewardResult | None] = [None] * n
    jobs: list[tuple[str, str, bool]] = []
    job_rows: list[tuple[int, str]] = []
    for i in range(n):
        try:
            res, job = _score_one_local(responses[i], ground_truths[i], data_sources[i], strict)
        except Exception as e:  # noqa: BLE001 - one bad row never fails the batch
            logger.warning("score_batch row %d (data_source=%r) scored as parse_error: %s: %s",
                           i, data_sources[i], type(e).__name__, e)
            res, job = _result(False, None, PARSE_ERROR), None
        if res is not None:
            out[i] = res
        else:
            jobs.append((job[0], job[1], strict))
            job_rows.append((i, job[2]))
    if jobs:
        verdicts = get_pool(num_workers).verify_many(jobs, timeout_s)
        for (row, value), (status, acc) in zip(job_rows, verdicts):
            out[row] = _result(acc, value, status)
    return out  # type: ignore[return-value]


@dataclass
class RewardStats:
    """Running counters over scored items, for TensorBoard (``add_scalar(key, value, step)``).

    ``update(results, data_sources)`` accumulates; ``as_dict()`` returns the same keys as
    :func:`summarize`; ``reset()`` clears.
    """

    n: int = 0
    no_answer: int = 0
    timeouts: int = 0
    parse_errors: int = 0
    score_sum: float = 0.0
    per_source: dict | None = None  # data_source -> [n, n_correct]

    def update(self, results: Sequence[RewardResult], data_sources: Sequence[str] | str) -> None:
        if isinstance(data_sources, str):
            data_sources = [data_sources] * len(results)
        if len(data_sources) != len(results):
            raise ValueError(f"len(results)={len(results)} != len(data_sources)="
                             f"{len(data_sources)}")
        if self.per_source is None:
            self.per_source = {}
        for r, ds in zip(results, data_sources):
            self.n += 1
            self.score_sum += r.score
            self.no_answer += r.status == NO_ANSWER
            self.timeouts += r.status == TIMEOUT
            self.parse_errors += r.status == PARSE_ERROR
            c = self.per_source.setdefault(str(ds), [0, 0])
            c[0] += 1
            c[1] += bool(r.acc)

    def as_dict(self) -> dict[str, float]:
        d = {
            "reward/count": float(self.n),
            "reward/mean": self.score_sum / self.n if self.n else 0.0,
            "reward/no_answer": float(self.no_answer),
            "reward/no_answer_frac": self.no_answer / self.n if self.n else 0.0,
            "reward/timeouts": float(self.timeouts),
            "reward/parse_errors": float(self.parse_errors),
        }
        for ds, (cnt, ok) in sorted((self.per_source or {}).items()):
            d[f"reward/acc/{ds}"] = ok / cnt if cnt else 0.0
        return d

    def reset(self) -> None:
        self.n = self.no_answer = self.timeouts = self.parse_errors = 0
        self.score_sum = 0.0
        self.per_source = {}


def summarize(results: Sequence[RewardResult], data_sources: Sequence[str] | str
              ) -> dict[str, float]:
    """TensorBoard scalars for one batch of results.

    Keys: ``reward/count``, ``reward/mean`` (mean score in [-1, 1]), ``reward/no_answer`` (count),
    ``reward/no_answer_frac``, ``reward/timeouts`` (count), ``reward/parse_errors`` (count) and
    ``reward/acc/<data_source>`` (fraction correct per source).

    Raises:
        ValueError: lengths differ.
    """
    s = RewardStats()
    s.update(results, data_sources)
    return s.as_dict()
