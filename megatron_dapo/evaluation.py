"""Evaluation of a policy on held-out math sets (AIME 2024 etc.): avg@k, pass@k, response statistics.

The DAPO paper (arXiv 2503.14476, Sec. 4.1) reports **avg@32** on AIME 2024: every problem is sampled
32 times (temperature 1.0, top-p 0.7) and the accuracy is averaged over all 30 x 32 samples.  Next to
it this module reports **pass@k**, the unbiased estimator of Chen et al. 2021 ("Evaluating Large
Language Models Trained on Code", arXiv 2107.03374, Eq. 1)::

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

with ``n`` samples per problem of which ``c`` are correct.

Pieces:

* pure metrics: :func:`avg_at_k`, :func:`pass_at_k`, :func:`mean_pass_at_k`, :func:`per_problem_accuracy`;
* :func:`evaluate` / :func:`evaluate_async`: render the prompts with the chat template, send one
  ``/generate`` request per prompt (``n = n_samples``) to SGLang-compatible engines concurrently through
  :class:`~megatron_dapo.engines.client.EngineClient`, score with
  :func:`~megatron_dapo.reward.score_batch` and aggregate per ``data_source`` into an :class:`EvalResult`;
* :func:`log_eval_to_tensorboard`: scalars + the per-problem markdown table;
* :func:`eval_main`: the ``megatron-dapo eval CONFIG [key=value ...]`` command line.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from megatron_dapo.backend import MissingBackendError
from megatron_dapo.config import ConfigError, load_config
from megatron_dapo.data import RowValidationError, load_tokenizer, render_prompt, val_rows, validate_row
from megatron_dapo.data.tokenizer import stop_token_ids as default_stop_ids
from megatron_dapo.engines.client import SyncEngineClient
from megatron_dapo.engines.engine_set import Endpoints, LaunchRequest, engine_client, launch_engines
from megatron_dapo.engines.launch_common import EngineLaunchError
from megatron_dapo.engines.transport import EngineError
from megatron_dapo.reward import score_batch, scoring_resources
from megatron_dapo.rollout.generation import stop_ids_for_model

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "avg_at_k", "pass_at_k", "mean_pass_at_k", "per_problem_accuracy", "pass_k_values",
           "metric_prefix", "evaluate", "evaluate_async", "log_eval_to_tensorboard", "eval_main"]

#: k values reported as pass@k (those <= n_samples, plus n_samples itself).
PASS_K_VALUES = (1, 2, 4, 8, 16, 32)
_SAMPLE_ANSWER_CHARS = 32


# --------------------------------------------------------------------------------------------
# Pure metrics
# --------------------------------------------------------------------------------------------


def _as_bool_matrix(correct: Any, name: str = "correct"):
    if hasattr(correct, "detach"):  # torch tensor
        correct = correct.detach().cpu().numpy()
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [num_problems, k] array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1), got dtype {arr.dtype} with other values")
        arr = arr.astype(bool)
    return arr


def avg_at_k(correct: Any) -> float:
    """avg@k: mean accuracy over all ``P * k`` samples (the DAPO paper's AIME avg@32).

    Args:
        correct: ``[P, k]`` booleans (numpy array, torch tensor or nested lists; 0/1 accepted):
            ``correct[i, j]`` = sample ``j`` of problem ``i`` is right.

    Returns:
        float in ``[0, 1]``.

    Raises:
        ValueError: not a non-empty 2-D boolean / 0-1 array.
    """
    return float(_as_bool_matrix(correct).mean())


def per_problem_accuracy(correct: Any) -> list[float]:
    """Per-problem accuracy ``correct[i].mean()`` of a ``[P, k]`` boolean matrix; ``P`` floats in [0, 1].

    Raises:
        ValueError: as :func:`avg_at_k`.
    """
    return [float(x) for x in _as_bool_matrix(correct).mean(axis=1)]


def pass_at_k(num_correct: int, n: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem (Chen et al. 2021, arXiv 2107.03374, Eq. 1).

    ``1 - C(n - c, k) / C(n, k)``, the probability that at least one of ``k`` samples drawn without
    replacement from the ``n`` generated ones is correct, computed as
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no huge binomials; exact 1.0 when ``n - c < k``).

    Args:
        num_correct: ``c``, correct samples (int, ``0 <= c <= n``).
        n: samples generated (int ``>= 1``).
        k: budget (int, ``1 <= k <= n``).

    Returns:
        float in ``[0, 1]``.

    Raises:
        ValueError: a non-integer argument or one outside the ranges above (names it).
    """
    for name, v in (("num_correct", num_correct), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    c, n, k = int(num_correct), int(n), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: num_correct must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(num_correct: Sequence[int], n: int, k: int) -> float:
    """Mean of :func:`pass_at_k` over problems (``num_correct[i]`` of ``n`` samples each).

    Raises:
        ValueError: empty ``num_correct`` or an invalid entry (names its index).
    """
    if len(num_correct) == 0:
        raise ValueError("mean_pass_at_k: num_correct is empty")
    total = 0.0
    for i, c in enumerate(num_correct):
        try:
            total += pass_at_k(int(c), n, k)
        except ValueError as exc:
            raise ValueError(f"mean_pass_at_k: problem {i}: {exc}") from None
    return total / len(num_correct)


def pass_k_values(n: int) -> list[int]:
    """The k reported for ``n`` samples: ``1, 2, 4, 8, 16, 32`` up to ``n``, plus ``n`` itself."""
    ks = [k for k in PASS_K_VALUES if k <= n]
    if n not in ks:
        ks.append(n)
    return ks


def metric_prefix(data_source: str) -> str:
    """``val/<data_source>`` with ``/`` and whitespace in the name replaced by ``_`` (one TB group)."""
    name = "_".join(str(data_source).replace("/", "_").split()) or "unknown"
    return f"val/{name}"


# --------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------


def _md_cell(x: Any) -> str:
    s = str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return s


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        metrics: scalar metrics, per data source ``val/<data_source>/...``: ``avg@<n>`` (mean accuracy
            over all samples), ``pass@<k>`` (unbiased estimator, k in :func:`pass_k_values`),
            ``response_length_mean`` (tokens), ``truncated_frac`` (``finish_reason == "length"``),
            ``aborted_frac``, ``no_answer_frac``, ``num_prompts``; ``val/all/...`` (same keys) when
            there are several sources; ``val/prompts_skipped`` (prompts over ``max_prompt_length``).
        per_problem: one dict per evaluated prompt, in row order: ``row`` (position in ``rows``),
            ``index`` (``extra_info.index`` when present, else ``row``), ``data_source``,
            ``ground_truth``, ``num_correct``, ``n``, ``acc``, ``response_length_mean``,
            ``num_truncated``, ``sample_answer`` (the extracted answer of the first correct sample, else
            of the first sample; at most 32 characters, ``""`` when none was found).
        n_samples: samples per prompt.
        num_skipped: prompts skipped for exceeding ``max_prompt_length``.
        elapsed_s: wall-clock seconds of generation + scoring.
        responses: ``[P][n]`` decoded responses when ``return_responses=True``, else ``None``.
    """

    metrics: dict[str, float]
    per_problem: list[dict]
    n_samples: int
    num_skipped: int = 0
    elapsed_s: float = 0.0
    responses: list[list[str]] | None = None

    def markdown_table(self, max_rows: int | None = None) -> str:
        """Per-problem GitHub-markdown table (``|``-escaped cells); ``max_rows`` truncates with a note."""
        lines = ["| # | data_source | ground truth | correct / n | acc | mean len | sample answer |",
                 "|---:|---|---|---:|---:|---:|---|"]
        rows = self.per_problem if max_rows is None else self.per_problem[:max_rows]
        for p in rows:
            lines.append(f"| {_md_cell(p['index'])} | {_md_cell(p['data_source'])} | {_md_cell(p['ground_truth'])} "
                         f"| {p['num_correct']} / {p['n']} | {p['acc']:.3f} | {p['response_length_mean']:.1f} "
                         f"| {_md_cell(p['sample_answer'])} |")
        if max_rows is not None and len(self.per_problem) > max_rows:
            lines.append(f"\n({len(self.per_problem) - max_rows} more problems not shown)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Evaluation loop
# --------------------------------------------------------------------------------------------


def _prompt_seed(seed: int, row: int) -> int:
    """Stable 56-bit ``sampling_seed`` of prompt ``row`` (copies ``j`` use ``+ j``, see the client)."""
    return int.from_bytes(hashlib.sha256(f"eval:{int(seed)}:{int(row)}".encode()).digest()[:7], "big")


def _check_eval_args(n_samples, temperature, top_p, max_response_length, max_prompt_length, max_prompts,
                     num_reward_workers, max_concurrent_prompts) -> None:
    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"evaluate: {name} {msg}")

    need(isinstance(n_samples, int) and n_samples >= 1, "n_samples", f"must be an int >= 1, got {n_samples!r}")
    need(math.isfinite(float(temperature)) and float(temperature) >= 0, "temperature",
         f"must be a finite number >= 0, got {temperature!r}")
    need(0.0 < float(top_p) <= 1.0, "top_p", f"must be in (0, 1], got {top_p!r}")
    need(isinstance(max_response_length, int) and max_response_length >= 1, "max_response_length",
         f"must be an int >= 1, got {max_response_length!r}")
    need(max_prompt_length is None or (isinstance(max_prompt_length, int) and max_prompt_length >= 1),
         "max_prompt_length", f"must be None or an int >= 1, got {max_prompt_length!r}")
    need(isinstance(max_prompts, int) and max_prompts >= 0, "max_prompts", f"must be an int >= 0, got {max_prompts!r}")
    need(isinstance(num_reward_workers, int) and num_reward_workers >= 1, "num_reward_workers",
         f"must be an int >= 1, got {num_reward_workers!r}")
    need(isinstance(max_concurrent_prompts, int) and max_concurrent_prompts >= 0, "max_concurrent_prompts",
         f"must be an int >= 0, got {max_concurrent_prompts!r}")


def _aggregate(prefix: str, probs: list[dict], n: int, lengths: list[int], finishes: list[str],
               statuses: list[str]) -> dict[str, float]:
    counts = [p["num_correct"] for p in probs]
    total = len(probs) * n
    m = {f"{prefix}/avg@{n}": sum(counts) / total}
    for k in pass_k_values(n):
        m[f"{prefix}/pass@{k}"] = mean_pass_at_k(counts, n, k)
    m[f"{prefix}/response_length_mean"] = sum(lengths) / total
    m[f"{prefix}/truncated_frac"] = sum(f == "length" for f in finishes) / total
    m[f"{prefix}/aborted_frac"] = sum(f == "abort" for f in finishes) / total
    m[f"{prefix}/no_answer_frac"] = sum(s == "no_answer" for s in statuses) / total
    m[f"{prefix}/num_prompts"] = float(len(probs))
    return m


async def evaluate_async(client, tokenizer, rows: Sequence[dict], *, n_samples: int = 32,
                         temperature: float = 1.0, top_p: float = 0.7, max_response_length: int,
                         max_prompt_length: int | None, seed: int = 0, max_prompts: int = 0,
                         stop_token_ids: Sequence[int] | None = None, num_reward_workers: int = 1,
                         progress: bool = True, max_concurrent_prompts: int = 0,
                         return_responses: bool = False) -> EvalResult:
    """Coroutine version of :func:`evaluate` for an :class:`~megatron_dapo.engines.client.EngineClient`
    (or any object with the same ``async generate(input_ids, sampling_params, *, return_logprob, rid)``)
    used inside a running event loop.  Arguments, result and errors as :func:`evaluate`."""
    _check_eval_args(n_samples, temperature, top_p, max_response_length, max_prompt_length, max_prompts,
                     num_reward_workers, max_concurrent_prompts)
    rows = list(rows)
    if not rows:
        raise ValueError("evaluate: rows is empty (no validation data)")
    if max_prompts:
        rows = rows[:max_prompts]
    t0 = time.perf_counter()
    prepared: list[tuple[int, dict, list[int]]] = []
    skipped = 0
    for pos, row in enumerate(rows):
        validate_row(row, source="evaluate rows", row_number=pos)
        ids = render_prompt(tokenizer, row["prompt"], max_prompt_length, row_index=pos)
        if ids is None:
            skipped += 1
            continue
        prepared.append((pos, row, ids))
    if skipped:
        logger.warning("evaluate: skipped %d/%d prompts longer than max_prompt_length=%s; they are NOT "
                       "counted in the metrics", skipped, len(rows), max_prompt_length)
    if not prepared:
        raise ValueError(f"evaluate: all {len(rows)} prompts are longer than max_prompt_length={max_prompt_length}")

    stops = sorted({int(t) for t in (default_stop_ids(tokenizer) if stop_token_ids is None else stop_token_ids)})
    base_sp: dict[str, Any] = {"max_new_tokens": int(max_response_length), "temperature": float(temperature),
                               "top_p": float(top_p), "n": int(n_samples)}
    if stops:
        base_sp["stop_token_ids"] = stops

    sem = asyncio.Semaphore(max_concurrent_prompts) if max_concurrent_prompts else None
    tag = uuid.uuid4().hex[:8]
    bar = tqdm(total=len(prepared), desc=f"eval (n={n_samples})", unit="prompt", disable=not progress,
               dynamic_ncols=True)

    async def one(pos: int, ids: list[int]):
        sp = dict(base_sp, sampling_seed=_prompt_seed(seed, pos))
        if sem is None:
            outs = await client.generate([ids], sp, return_logprob=False, rid=f"eval-{tag}-{pos}")
        else:
            async with sem:
                outs = await client.generate([ids], sp, return_logprob=False, rid=f"eval-{tag}-{pos}")
        if len(outs) != n_samples:
            raise RuntimeError(f"evaluate: row {pos}: engine returned {len(outs)} samples, expected {n_samples}")
        bar.update(1)
        return outs

    try:
        all_outs = await asyncio.gather(*(one(pos, ids) for pos, _, ids in prepared))
    finally:
        bar.close()

    texts, gts, dss, lengths, finishes = [], [], [], [], []
    for (pos, row, _), outs in zip(prepared, all_outs):
        gt = row["reward_model"]["ground_truth"]
        for o in outs:
            texts.append(tokenizer.decode(o.output_ids, skip_special_tokens=True))
            gts.append(gt)
            dss.append(row["data_source"])
            lengths.append(len(o.output_ids))
            finishes.append(o.finish_reason)
    results = score_batch(texts, gts, dss, num_workers=num_reward_workers)

    n = n_samples
    per_problem: list[dict] = []
    by_source: dict[str, list[int]] = {}
    for i, (pos, row, _) in enumerate(prepared):
        res = results[i * n:(i + 1) * n]
        c = sum(r.acc for r in res)
        first = next((r for r in res if r.acc), res[0])
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        per_problem.append({
            "row": pos,
            "index": extra.get("index", pos),
            "data_source": row["data_source"],
            "ground_truth": row["reward_model"]["ground_truth"],
            "num_correct": int(c),
            "n": n,
            "acc": c / n,
            "response_length_mean": sum(lengths[i * n:(i + 1) * n]) / n,
            "num_truncated": sum(f == "length" for f in finishes[i * n:(i + 1) * n]),
            "sample_answer": (first.pred or "")[:_SAMPLE_ANSWER_CHARS],
        })
        by_source.setdefault(row["data_source"], []).append(i)

    metrics: dict[str, float] = {}
    groups = [(metric_prefix(ds), idx) for ds, idx in sorted(by_source.items())]
    if len(groups) > 1:
        groups.append(("val/all", list(range(len(prepared)))))
    for prefix, idx in groups:
        flat = [i * n + j for i in idx for j in range(n)]
        metrics.update(_aggregate(prefix, [per_problem[i] for i in idx], n, [lengths[k] for k in flat],
                                  [finishes[k] for k in flat], [results[k].status for k in flat]))
    metrics["val/prompts_skipped"] = float(skipped)
    responses = [texts[i * n:(i + 1) * n] for i in range(len(prepared))] if return_responses else None
    return EvalResult(metrics=metrics, per_problem=per_problem, n_samples=n, num_skipped=skipped,
                      elapsed_s=time.perf_counter() - t0, responses=responses)


def evaluate(client, tokenizer, rows: Sequence[dict], *, n_samples: int = 32, temperature: float = 1.0,
             top_p: float = 0.7, max_response_length: int, max_prompt_length: int | None, seed: int = 0,
             max_prompts: int = 0, stop_token_ids: Sequence[int] | None = None, num_reward_workers: int = 1,
             progress: bool = True, max_concurrent_prompts: int = 0, return_responses: bool = False) -> EvalResult:
    """Sample ``n_samples`` responses per prompt and report avg@n / pass@k per data source.

    Defaults follow the DAPO paper's AIME protocol (Sec. 4.1: avg@32, temperature 1.0, top-p 0.7).
    Each prompt is rendered with the tokenizer's chat template (:func:`megatron_dapo.data.render_prompt`)
    and sent as ONE ``/generate`` request with SGLang sampling params ``n = n_samples``,
    ``max_new_tokens``, ``temperature``, ``top_p``, ``stop_token_ids`` and ``sampling_seed`` (a hash
    of ``(seed, row position)``, so results do not depend on ``max_prompts`` or on which prompts were
    skipped); all requests are in flight concurrently (a tqdm bar counts finished prompts).  Responses
    are decoded with ``skip_special_tokens=True`` and scored by :func:`megatron_dapo.reward.score_batch`
    with each row's ``data_source`` and ``reward_model.ground_truth``.

    Args:
        client: :class:`~megatron_dapo.engines.client.SyncEngineClient` (runs on its loop) or
            :class:`~megatron_dapo.engines.client.EngineClient` / compatible (run with ``asyncio.run``;
            its HTTP session is closed afterwards).  Inside a running loop use :func:`evaluate_async`.
        tokenizer: HF tokenizer with a chat template.
        rows: verl-schema rows (:func:`megatron_dapo.data.load_rows`).
        n_samples: samples per prompt (``n``).
        temperature, top_p: sampling parameters.
        max_response_length: ``max_new_tokens`` (tokens).
        max_prompt_length: prompts with more tokens are skipped (counted in ``val/prompts_skipped``
            and logged); ``None`` = no limit.
        seed: base of the per-prompt ``sampling_seed`` (same seed + same engines/weights = same samples).
        max_prompts: evaluate only the first ``max_prompts`` rows (0 = all).
        stop_token_ids: stop tokens; default :func:`megatron_dapo.data.stop_token_ids` of ``tokenizer``.
        num_reward_workers: math-verify worker processes.
        progress: show the tqdm bar.
        max_concurrent_prompts: cap on prompts in flight (0 = all at once).
        return_responses: keep the decoded responses in :attr:`EvalResult.responses`.

    Returns:
        :class:`EvalResult`.

    Raises:
        ValueError: a bad argument (named), empty ``rows``, every prompt too long;
            :class:`megatron_dapo.data.RowValidationError` for a malformed row (names it).
        RuntimeError: called with an async client inside a running event loop, or an engine returned a
            wrong number of samples.
        megatron_dapo.engines.client.EngineError: an engine failed after retries.
    """
    kwargs = dict(n_samples=n_samples, temperature=temperature, top_p=top_p, max_response_length=max_response_length,
                  max_prompt_length=max_prompt_length, seed=seed, max_prompts=max_prompts,
                  stop_token_ids=stop_token_ids, num_reward_workers=num_reward_workers, progress=progress,
                  max_concurrent_prompts=max_concurrent_prompts, return_responses=return_responses)

    if isinstance(client, SyncEngineClient):
        return client.run(evaluate_async(client.client, tokenizer, rows, **kwargs))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("evaluate() was called inside a running event loop with an async client; "
                           "use `await evaluate_async(...)` instead")

    async def run_and_close():
        try:
            return await evaluate_async(client, tokenizer, rows, **kwargs)
        finally:
            close = getattr(client, "close", None)
            if close is not None and asyncio.iscoroutinefunction(close):
                await close()

    return asyncio.run(run_and_close())


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------


def log_eval_to_tensorboard(writer, result: EvalResult, step: int) -> None:
    """Write ``result`` to a TensorBoard ``SummaryWriter`` at global step ``step``.

    ``writer.add_scalar(key, value, step)`` for every metric and
    ``writer.add_text("val/per_problem", result.markdown_table(), step)``
    (``torch.utils.tensorboard.SummaryWriter`` API).  Does not flush or close the writer.
    """
    for key, value in sorted(result.metrics.items()):
        writer.add_scalar(key, float(value), int(step))
    writer.add_text("val/per_problem", result.markdown_table(), int(step))


# --------------------------------------------------------------------------------------------
# CLI: megatron-dapo eval
# --------------------------------------------------------------------------------------------


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-dapo eval",
        description="Evaluate a model on data.val_files: avg@n and pass@k per data source (DAPO paper: "
                    "AIME 2024 avg@32, temperature 1.0, top-p 0.7; set with trainer.eval_* keys).")
    p.add_argument("config", help="run config YAML (megatron_dapo.config)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.eval_n_samples=4")
    p.add_argument("--model", default=None, help="HF model directory (default: model.hf_path)")
    p.add_argument("--out", default=None, help="metrics JSON file (default: <output_dir>/<run_name>/eval/step<STEP>.json)")
    p.add_argument("--engine-url", action="append", default=[], metavar="URL",
                   help="running engine base URL (repeatable); default rollout.engine_urls, else launch engines")
    p.add_argument("--step", type=int, default=0, help="TensorBoard global step of the logged metrics")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    p.add_argument("--num-reward-workers", type=int, default=1, help="math-verify worker processes")
    p.add_argument("--save-responses", action="store_true", help="also store every decoded response in the JSON")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _eval_settings(cfg, args) -> dict:
    """Check the config keys evaluation needs; returns the resolved settings (raises ConfigError)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    t, d, r = cfg.trainer, cfg.data, cfg.rollout
    need(bool(d.val_files) or not d.train_files, "data.val_files", "is empty; set it to the evaluation parquet/jsonl file(s), e.g. "
         "data.val_files=[../shared/data/aime-2024/aime-2024.parquet]")
    for f in d.val_files:
        need(Path(f).is_file(), "data.val_files", f"file not found: {f}")
    need(t.eval_n_samples >= 1, "trainer.eval_n_samples", f"must be >= 1, got {t.eval_n_samples}")
    need(math.isfinite(t.eval_temperature) and t.eval_temperature >= 0, "trainer.eval_temperature",
         f"must be >= 0, got {t.eval_temperature}")
    need(0.0 < t.eval_top_p <= 1.0, "trainer.eval_top_p", f"must be in (0, 1], got {t.eval_top_p}")
    need(t.eval_max_prompts >= 0, "trainer.eval_max_prompts", f"must be >= 0, got {t.eval_max_prompts}")
    need(r.max_response_length >= 1, "rollout.max_response_length", f"must be >= 1, got {r.max_response_length}")
    need(d.max_prompt_length >= 1, "data.max_prompt_length", f"must be >= 1, got {d.max_prompt_length}")
    need(r.backend in ("cpu", "sglang", "vllm"), "rollout.backend", f"must be cpu, sglang or vllm, got {r.backend!r}")
    need(r.num_engines >= 1, "rollout.num_engines", f"must be >= 1, got {r.num_engines}")
    need(bool(cfg.run_name) and "/" not in cfg.run_name, "run_name", "must be a non-empty name without '/'")
    model = args.model or cfg.model.hf_path
    need(bool(model), "model.hf_path", "is empty and no --model given")
    urls = list(args.engine_url) or list(r.engine_urls)
    if not urls:
        need(Path(model, "config.json").is_file(), "--model" if args.model else "model.hf_path",
             f"{model!r} has no config.json (an HF model directory is needed to launch engines)")
    tok = cfg.model.tokenizer_path or model
    need(Path(tok).is_dir(), "model.tokenizer_path" if cfg.model.tokenizer_path else
         ("--model" if args.model else "model.hf_path"), f"tokenizer directory {tok!r} not found")
    if args.num_reward_workers < 1:
        raise ConfigError(f"--num-reward-workers: must be >= 1, got {args.num_reward_workers}")
    return {"model": str(model), "tokenizer": str(tok), "urls": urls}


def eval_main(argv: list[str] | None = None) -> int:
    """``megatron-dapo eval CONFIG [key=value ...] [--model DIR] [--out FILE.json] [--engine-url URL ...]``.

    Loads the config (:func:`megatron_dapo.config.load_config` with ``validate=False``, then checks only
    what evaluation needs), loads ``data.val_files``, and evaluates the model (``--model`` or
    ``model.hf_path``) with ``trainer.eval_n_samples`` / ``eval_temperature`` / ``eval_top_p`` /
    ``eval_max_prompts``, ``rollout.max_response_length`` and ``data.max_prompt_length``.  Engines:
    ``--engine-url`` (repeatable), else ``rollout.engine_urls``, else launched here (CPU engines for
    ``rollout.backend=cpu``, SGLang servers for ``sglang``, vLLM servers for ``vllm``; logs in
    ``<run_dir>/eval_engine_logs``)
    and stopped on exit.  Prints the per-problem table and the metrics, writes the JSON
    (``--out`` or ``<output_dir>/<run_name>/eval/step<STEP>.json``) and TensorBoard events in
    ``<output_dir>/<run_name>/tb`` at ``--step``.

    Returns:
        0 on success; 2 on a configuration / input error (message on stderr); 1 when an engine fails.
    """
    parser = _eval_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, validate=False)
        settings = _eval_settings(cfg, args)
        rows = val_rows(cfg)  # data.val_files, or held-out demo problems for the demo task
        tokenizer = load_tokenizer(settings["tokenizer"])
        settings["stop_token_ids"] = stop_ids_for_model(tokenizer, settings["model"])  # the trainer's rule
    except (ConfigError, RowValidationError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-dapo eval: error: {exc}", file=sys.stderr)
        return 2

    t, r = cfg.trainer, cfg.rollout

    # the trainer's launch code; the engines run alone here (not colocated) and are used directly (no router)
    r = dataclasses.replace(r, engine_urls=settings["urls"])
    with ExitStack() as stack:
        stack.enter_context(scoring_resources())
        try:
            try:
                endpoints = launch_engines(r, LaunchRequest(settings["model"], cfg.run_dir / "eval_engine_logs",
                                                            cfg.seed, colocated=False), stack, use_router=False)
            except MissingBackendError as exc:
                print(f"megatron-dapo eval: error: {exc} (or pass --engine-url)", file=sys.stderr)
                return 2
            client = engine_client(r, Endpoints(endpoints.urls, router_url=None), stack)
            result = evaluate(client, tokenizer, rows, n_samples=t.eval_n_samples, temperature=t.eval_temperature,
                              top_p=t.eval_top_p, max_response_length=r.max_response_length,
                              max_prompt_length=cfg.data.max_prompt_length,
                              stop_token_ids=settings["stop_token_ids"],
                              seed=cfg.seed if args.seed is None else args.seed, max_prompts=t.eval_max_prompts,
                              num_reward_workers=args.num_reward_workers, progress=not args.quiet,
                              return_responses=args.save_responses)
        except (EngineLaunchError, EngineError) as exc:
            print(f"megatron-dapo eval: engine error: {exc}", file=sys.stderr)
            return 1

    print(result.markdown_table())
    print()
    width = max(len(k) for k in result.metrics)
    for key, value in sorted(result.metrics.items()):
        print(f"{key:<{width}}  {value:.4f}")
    print(f"({len(result.per_problem)} prompts x {result.n_samples} samples in {result.elapsed_s:.1f} s)")

    out = Path(args.out) if args.out else cfg.run_dir / "eval" / f"step{args.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": args.step, "model": settings["model"], "val_files": list(cfg.data.val_files),
               "sampling": {"n_samples": t.eval_n_samples, "temperature": t.eval_temperature, "top_p": t.eval_top_p,
                            "max_response_length": r.max_response_length,
                            "seed": cfg.seed if args.seed is None else args.seed},
               **result.to_dict()}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    if not args.no_tensorboard:
        writer = SummaryWriter(log_dir=str(cfg.tb_dir))
        try:
            log_eval_to_tensorboard(writer, result, args.step)
        finally:
            writer.close()
        print(f"TensorBoard events in {cfg.tb_dir} (step {args.step})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(eval_main(sys.argv[1:]))
