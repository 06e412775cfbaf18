"""Validation of engine responses before they enter a training batch (issue 16). Pure Python, no I/O.

Every response an engine returns (a :class:`~megatron_dapo.engines.payloads.GenerateOutput`) is checked:

* every token id lies in ``[0, vocab_size)`` (the model's vocabulary, ``config.json`` ``vocab_size``);
* there is exactly one logprob per output token (``output_token_logprobs`` of SGLang's ``/generate``);
* every logprob is finite and ``<= 0`` (a log-probability; ``logprob_tolerance`` absorbs rounding);
* ``len(output_ids) <= max_response_length`` (the ``max_new_tokens`` that was requested);
* the finish reason is ``stop`` or ``length`` (``abort`` and anything else are not trainable).

Rule for groups (documented in the README): a malformed response is dropped and counted under its reason;
its group, now short of ``G`` responses, is dropped as a whole, exactly like a group that dynamic
sampling filters out (DAPO eq. 11): it never enters the batch, and the sampler requests replacement
prompts in the next generation round (``algorithm.max_num_gen_batches`` still bounds the rounds).
Group-normalised advantages (eq. 9) and the ``0 < #correct < G`` filter are defined over ``G``
samples, so a group is trained on whole or not at all. When one engine returns
``max_consecutive_malformed`` malformed responses in a row, :class:`MalformedEngineOutput` stops the
step with one line naming that engine's URL.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from ..errors import MegatronDapoError

__all__ = ["MALFORMED_REASONS", "MalformedEngineOutput", "ResponseValidator", "check_response"]

MALFORMED_REASONS = ("token_id", "logprob_count", "logprob_nonfinite", "logprob_positive", "length",
                     "finish_reason")
"""Reasons a response is dropped (the metric ``rollout/malformed/<reason>`` counts each)."""

TRAINABLE_FINISH_REASONS = ("stop", "length")


class MalformedEngineOutput(MegatronDapoError, RuntimeError):
    """One engine keeps returning malformed responses; the message names its URL and the last reason."""


def check_response(output_ids: Sequence[int], output_logprobs: Optional[Sequence[float]], finish_reason: Any, *,
                   vocab_size: int, max_response_length: int, require_logprobs: bool = True,
                   logprob_tolerance: float = 1e-4) -> Optional[tuple[str, str]]:
    """Check one response; ``None`` when it is well-formed, else ``(reason, detail)``.

    Args:
        output_ids: generated token ids (ints).
        output_logprobs: their log-probabilities (nats, one per token) or ``None``.
        finish_reason: ``"stop"`` / ``"length"`` are accepted.
        vocab_size: number of token ids of the model (valid ids are ``0 .. vocab_size - 1``).
        max_response_length: the ``max_new_tokens`` of the request.
        require_logprobs: ``None`` logprobs count as ``logprob_count`` (they were requested).
        logprob_tolerance: largest accepted logprob (rounding slack above 0).

    ``reason`` is one of :data:`MALFORMED_REASONS`; the first failed check (in that order) is reported.
    """
    for pos, t in enumerate(output_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            return "token_id", f"token id {t!r} at position {pos} is outside the vocabulary [0, {vocab_size})"
    if output_logprobs is None:
        if require_logprobs:
            return "logprob_count", f"no logprobs for {len(output_ids)} output tokens"
    else:
        if len(output_logprobs) != len(output_ids):
            return "logprob_count", f"{len(output_logprobs)} logprobs for {len(output_ids)} output tokens"
        for pos, lp in enumerate(output_logprobs):
            if not isinstance(lp, (int, float)) or not math.isfinite(lp):
                return "logprob_nonfinite", f"logprob {lp!r} at position {pos}"
            if lp > logprob_tolerance:
                return "logprob_positive", f"logprob {lp!r} > 0 at position {pos}"
    if len(output_ids) > max_response_length:
        return "length", f"{len(output_ids)} tokens > max_response_length={max_response_length}"
    if finish_reason not in TRAINABLE_FINISH_REASONS:
        return "finish_reason", f"finish reason {finish_reason!r} (expected one of {TRAINABLE_FINISH_REASONS})"
    return None


class ResponseValidator:
    """Screens each group's engine outputs, counts malformed ones, and watches each engine's streak.

    Args:
        vocab_size: the model's vocabulary size (token ids ``0 .. vocab_size - 1``).
        max_response_length: ``rollout.max_response_length``.
        max_consecutive_malformed: ``rollout.max_consecutive_malformed_per_engine`` (>= 1).
        require_logprobs: logprobs were requested (the trainer always requests them).
        logprob_tolerance: see :func:`check_response`.

    Raises:
        ValueError: a non-positive size or threshold.
    """

    def __init__(self, vocab_size: int, max_response_length: int, max_consecutive_malformed: int = 8, *,
                 require_logprobs: bool = True, logprob_tolerance: float = 1e-4) -> None:
        for name, v in (("vocab_size", vocab_size), ("max_response_length", max_response_length),
                        ("max_consecutive_malformed", max_consecutive_malformed)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        self.vocab_size = int(vocab_size)
        self.max_response_length = int(max_response_length)
        self.max_consecutive_malformed = int(max_consecutive_malformed)
        self.require_logprobs = bool(require_logprobs)
        self.logprob_tolerance = float(logprob_tolerance)
        self._streak: dict[str, int] = {}
        self.total_malformed = 0
        self.start_step()

    def start_step(self) -> None:
        """Reset the per-step counters (the per-engine streaks carry over: "keeps returning" spans steps)."""
        self.counts = {r: 0 for r in MALFORMED_REASONS}
        self.groups_dropped = 0
        self.examples: list[str] = []

    def screen_group(self, outs: Sequence[Any]) -> bool:
        """Check a group's outputs (``GenerateOutput``-like: ``output_ids``, ``output_logprobs``,
        ``finish_reason``, ``engine_url``). Returns True when all are well-formed; False when the group is
        to be dropped (every malformed response counted).

        Raises:
            MalformedEngineOutput: an engine reached ``max_consecutive_malformed`` malformed responses in a row.
        """
        ok = True
        for o in outs:
            url = getattr(o, "engine_url", None) or "<unknown engine>"
            bad = check_response(list(o.output_ids), o.output_logprobs, o.finish_reason,
                                 vocab_size=self.vocab_size, max_response_length=self.max_response_length,
                                 require_logprobs=self.require_logprobs,
                                 logprob_tolerance=self.logprob_tolerance)
            if bad is None:
                self._streak[url] = 0
                continue
            ok = False
            reason, detail = bad
            self.counts[reason] += 1
            self.total_malformed += 1
            if len(self.examples) < 5:
                self.examples.append(f"{url}: {reason}: {detail}")
            self._streak[url] = self._streak.get(url, 0) + 1
            if self._streak[url] >= self.max_consecutive_malformed:
                raise MalformedEngineOutput(
                    f"engine {url} returned {self._streak[url]} malformed responses in a row (last: {detail}); "
                    f"check that engine (log, model, version) or remove it from rollout.engine_urls "
                    f"(threshold: rollout.max_consecutive_malformed_per_engine={self.max_consecutive_malformed})")
        if not ok:
            self.groups_dropped += 1
        return ok

    def metrics(self) -> dict[str, float]:
        """This step's counts (floats), unprefixed (the trainer scopes them under ``rollout/``):
        ``malformed_responses``, ``malformed/<reason>`` and ``malformed_groups_dropped``."""
        out = {"malformed_responses": float(sum(self.counts.values())),
               "malformed_groups_dropped": float(self.groups_dropped)}
        out.update({f"malformed/{r}": float(n) for r, n in self.counts.items()})
        return out
