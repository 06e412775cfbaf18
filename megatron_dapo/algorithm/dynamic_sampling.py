"""DAPO dynamic sampling (arXiv 2503.14476, Sec. 3.2 and Algorithm 1, lines 4-6), pure Python.

DAPO over-samples prompts and keeps only groups whose accuracy is neither 0 nor 1 (eq. 11:
``0 < |{o_i : is_equivalent(a, o_i)}| < G``), generating more rounds until ``rollout_batch_size``
such groups are collected.  :class:`DynamicSampler` holds that per-step bookkeeping; the rollout
driver owns the generation loop::

    sampler.start_step()
    while not sampler.is_full:
        prompts = next_prompts(sampler.num_prompts_to_request())
        for group in generate_and_score(prompts):     # groups can be added as they complete
            sampler.add_group(group)
            if sampler.is_full:
                break                                  # abort the in-flight rest ...
        sampler.record_aborted(num_cancelled)          # ... and count it
        sampler.record_round()                         # raises DynamicSamplingExhausted at the cap
    batch = sampler.take_batch()                       # exactly rollout_batch_size groups
    log(sampler.metrics())

Partial rollout (slime's ``--partial-rollout``): a group whose requests were aborted because the pool
filled is parked as a :class:`PendingGroup` (``add_pending``) instead of being dropped; the next step takes
it back (``take_pending``) before asking for new prompts and continues only its unfinished samples. The
sampler owns these groups because it already owns what crosses a step boundary (the carried-over
surplus), so :meth:`DynamicSampler.state_dict` holds them and an exact resume restores them.

Staleness is judged per sample (:func:`reset_stale_samples`): a parked sample holding a token more than
``max_age`` weight versions older than the engines' is reset (its tokens are discarded and it is generated
again from scratch), the others are kept, so a parked group is never lost while partial rollout is on.
Carried surplus groups obey the same bound when :meth:`DynamicSampler.start_step` is given the engines' version
and ``max_age``: a carried group with a token that old is parked (:meth:`PendingGroup.from_group`) instead of
being trained on, and its stale samples are then reset like any parked sample's.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import MegatronDapoError

__all__ = ["Group", "PendingGroup", "StaleReset", "reset_stale_samples", "DynamicSampler",
           "DynamicSamplingExhausted"]


class DynamicSamplingExhausted(MegatronDapoError, RuntimeError):
    """Raised when ``max_num_gen_batches`` rounds did not yield ``rollout_batch_size`` kept groups."""


@dataclass
class Group:
    """The ``G`` sampled responses of one prompt, with their scores.

    Attributes:
        prompt_index: index of the prompt in the dataset (for logging/dedup).
        prompt_ids: prompt token ids.
        responses: ``G`` lists of response token ids.
        rewards: ``G`` scalar rewards (after any shaping).
        correct: ``G`` bools -- the answer-equivalence verdict used by dynamic sampling (eq. 11).
        finish_reasons: ``G`` strings (``"stop"``, ``"length"`` = truncated, ``"abort"``, ...).
        rollout_logprobs: ``G`` lists of per-token log-probs from the rollout engine (lengths equal
            to the responses'), or None.
        meta: anything else (ground truth, data source, ...); copied with the group.
        token_versions: per response, the ``[start, end, version]`` spans (token positions
            ``start <= t < end`` of the response, ``version`` the integer weight version of the
            engine that generated them), in order and covering the response exactly; or None
            (unknown). A response continued by partial rollout has one span per generation step.

    Raises:
        ValueError: the per-response lists differ in length (the field is named), a
            ``rollout_logprobs`` entry does not match its response's length, or ``token_versions``
            does not tile a response.
    """

    prompt_index: int
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    correct: list[bool]
    finish_reasons: list[str]
    rollout_logprobs: Optional[list[list[float]]] = None
    meta: dict = field(default_factory=dict)
    token_versions: Optional[list[list[list[int]]]] = None

    def __post_init__(self) -> None:
        n = len(self.responses)
        for name in ("rewards", "correct", "finish_reasons"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Group(prompt_index={self.prompt_index}): {name} has {len(getattr(self, name))} "
                    f"entries but responses has {n}"
                )
        for i, c in enumerate(self.correct):
            if not isinstance(c, bool):
                raise ValueError(
                    f"Group(prompt_index={self.prompt_index}): correct[{i}] must be a bool, got {c!r}"
                )
        if self.rollout_logprobs is not None:
            if len(self.rollout_logprobs) != n:
                raise ValueError(
                    f"Group(prompt_index={self.prompt_index}): rollout_logprobs has "
                    f"{len(self.rollout_logprobs)} entries but responses has {n}"
                )
            for i, (resp, lp) in enumerate(zip(self.responses, self.rollout_logprobs)):
                if len(resp) != len(lp):
                    raise ValueError(
                        f"Group(prompt_index={self.prompt_index}): rollout_logprobs[{i}] has {len(lp)} "
                        f"values for a response of {len(resp)} tokens"
                    )
        if self.token_versions is not None:
            _check_spans(f"Group(prompt_index={self.prompt_index})", self.responses, self.token_versions)

    @property
    def num_samples(self) -> int:
        """Number of responses ``G`` in the group."""
        return len(self.responses)

    @property
    def num_correct(self) -> int:
        """Number of responses judged correct."""
        return sum(1 for c in self.correct if c)

    @property
    def num_response_tokens(self) -> int:
        """Total response tokens over the group's ``G`` responses."""
        return sum(len(r) for r in self.responses)

    def to_dict(self) -> dict[str, Any]:
        """Deep-copied plain-dict form (used by :meth:`DynamicSampler.state_dict`)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Group":
        """Inverse of :meth:`to_dict`."""
        return cls(**copy.deepcopy(data))


def _check_spans(where: str, responses: list[list[int]], spans: list[list[list[int]]]) -> None:
    """Raise ValueError unless ``spans[i]`` tiles ``responses[i]`` with ``[start, end, version]`` spans."""
    if len(spans) != len(responses):
        raise ValueError(f"{where}: token_versions has {len(spans)} entries but responses has {len(responses)}")
    for i, (resp, sp) in enumerate(zip(responses, spans)):
        pos = 0
        for span in sp:
            if len(span) != 3 or span[0] != pos or span[1] <= span[0]:
                raise ValueError(f"{where}: token_versions[{i}] span {list(span)!r} does not continue at "
                                 f"token {pos} (spans are [start, end, version], contiguous, non-empty)")
            pos = span[1]
        if pos != len(resp):
            raise ValueError(f"{where}: token_versions[{i}] covers {pos} tokens of a {len(resp)}-token response")


@dataclass
class PendingGroup:
    """A group whose generation was aborted, parked for continuation next step (partial rollout).

    The unit that is parked is the whole group (one prompt, ``G`` samples); the unit that is continued
    is the sample: finished samples (``finish_reasons[j]`` ``"stop"`` / ``"length"``) are kept as they
    are, unfinished ones (``"abort"``) are resubmitted with ``prompt_ids + responses[j]`` as input.
    A group is scored only once all ``G`` samples are finished (group-normalised advantages, eq. 9,
    need all of them).

    Attributes:
        prompt_index, prompt_ids: as in :class:`Group`.
        row: the dataset row (ground truth and data source, to score it later); JSON-like.
        responses: ``G`` token-id lists generated so far (a prefix for unfinished samples).
        rollout_logprobs: ``G`` per-token logprob lists (same lengths), or None when not returned.
        finish_reasons: ``G`` strings; ``"abort"`` marks a sample to continue.
        token_versions: ``G`` lists of ``[start, end, version]`` spans (see :attr:`Group.token_versions`).

    Raises:
        ValueError: inconsistent lengths (the field is named).
    """

    prompt_index: int
    prompt_ids: list[int]
    row: dict
    responses: list[list[int]]
    rollout_logprobs: Optional[list[list[float]]]
    finish_reasons: list[str]
    token_versions: list[list[list[int]]]

    def __post_init__(self) -> None:
        where = f"PendingGroup(prompt_index={self.prompt_index})"
        n = len(self.responses)
        if len(self.finish_reasons) != n:
            raise ValueError(f"{where}: finish_reasons has {len(self.finish_reasons)} entries but responses has {n}")
        if self.rollout_logprobs is not None:
            if len(self.rollout_logprobs) != n or any(len(a) != len(b) for a, b in zip(self.rollout_logprobs,
                                                                                       self.responses)):
                raise ValueError(f"{where}: rollout_logprobs do not match the responses' lengths")
        _check_spans(where, self.responses, self.token_versions)

    @property
    def unfinished(self) -> list[int]:
        """Indices of the samples to continue (``finish_reason == "abort"``)."""
        return [j for j, r in enumerate(self.finish_reasons) if r == "abort"]

    @property
    def oldest_version(self) -> Optional[int]:
        """Smallest weight version of any token of the group (finished samples included); None if empty."""
        versions = [v for v in self.sample_oldest_versions if v is not None]
        return min(versions) if versions else None

    @property
    def sample_oldest_versions(self) -> list[Optional[int]]:
        """Per sample, the smallest weight version of its tokens (None for a sample without tokens)."""
        return [min(span[2] for span in sp) if sp else None for sp in self.token_versions]

    @property
    def num_response_tokens(self) -> int:
        """Tokens generated so far over the ``G`` samples."""
        return sum(len(r) for r in self.responses)

    @property
    def num_prefix_samples(self) -> int:
        """Unfinished samples that already have tokens (a prefix to continue)."""
        return sum(1 for j in self.unfinished if self.responses[j])

    def to_dict(self) -> dict[str, Any]:
        """Deep-copied plain-dict form (JSON-serialisable when ``row`` is)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PendingGroup":
        """Inverse of :meth:`to_dict`."""
        return cls(**copy.deepcopy(data))

    @classmethod
    def from_group(cls, group: Group) -> "PendingGroup":
        """A complete (scored) group parked again, every sample finished: its responses, logprobs, finish reasons
        and spans are copied, and the row to score it with is rebuilt from ``group.meta`` (``ground_truth``,
        ``data_source``, default ``"math_dapo"``). Used for a carried surplus group grown too old
        (:meth:`DynamicSampler.start_step`): :func:`reset_stale_samples` then empties its stale samples.

        Raises:
            ValueError: ``group.meta`` has no ``ground_truth`` (it could not be scored again), or
                ``group.token_versions`` is None (no age to judge by).
        """
        where = f"Group(prompt_index={group.prompt_index})"
        if "ground_truth" not in group.meta:
            raise ValueError(f"{where}: meta has no 'ground_truth', so the group cannot be parked and scored again")
        if group.token_versions is None:
            raise ValueError(f"{where}: token_versions is None, so the group cannot be parked by age")
        row = scoring_row(group.meta["ground_truth"], group.meta.get("data_source", "math_dapo"))
        return cls(prompt_index=int(group.prompt_index), prompt_ids=list(group.prompt_ids), row=row,
                   responses=[list(r) for r in group.responses],
                   rollout_logprobs=(None if group.rollout_logprobs is None
                                     else [list(a) for a in group.rollout_logprobs]),
                   finish_reasons=list(group.finish_reasons),
                   token_versions=[[list(span) for span in sp] for sp in group.token_versions])


@dataclass(frozen=True)
class StaleReset:
    """The outcome of :func:`reset_stale_samples` for one parked group.

    Attributes:
        group: the group with its stale samples reset (a new object; the input is not modified).
        reset: indices of the samples that were reset (ascending; empty when nothing was stale).
        tokens_dropped: response tokens those samples held (discarded; finished samples included).
    """

    group: PendingGroup
    reset: tuple[int, ...]
    tokens_dropped: int


def _check_age_args(where: str, version: int, max_age: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}: version must be an int (weight version), got {version!r}")
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
        raise ValueError(f"{where}: max_age must be an int >= 0 (weight versions), got {max_age!r}")


def _is_stale(spans: list[list[int]], version: int, max_age: int) -> bool:
    """Whether one response's ``[start, end, version]`` spans hold a token more than ``max_age`` versions older
    than ``version`` (an empty response is never stale)."""
    return any(version - span[2] > max_age for span in spans)


def scoring_row(ground_truth: Any, data_source: Any = "math_dapo") -> dict:
    """The part of a dataset row that scoring needs (:attr:`PendingGroup.row`), JSON-safe."""
    return {"reward_model": {"ground_truth": str(ground_truth)}, "data_source": str(data_source)}


def reset_stale_samples(group: PendingGroup, version: int, max_age: int) -> StaleReset:
    """Reset the samples of a parked group that hold a token older than ``max_age`` weight versions.

    Sample ``j`` is stale when ``version - v > max_age`` for the weight version ``v`` of any of its
    ``token_versions[j]`` spans (``version``: the engines' current integer weight version; ages in weight
    versions, i.e. optimizer updates pushed to the engines). A stale sample, finished or not, is reset to an
    empty unfinished sample -- ``responses[j] = []``, ``rollout_logprobs[j] = []`` (when logprobs are kept),
    ``token_versions[j] = []``, ``finish_reasons[j] = "abort"`` -- so the next continuation generates it
    again from scratch (it reuses no token). The other samples are kept unchanged (finished ones as they
    are, unfinished ones to be continued from their prefix), so the prompt and its fresh samples survive;
    when every sample is stale the result is a group of ``G`` empty samples to regenerate. Pure: ``group``
    is not modified.

    Args:
        group: the parked group.
        version: the engines' current weight version (int).
        max_age: the largest age a kept token may have (int ``>= 0``; ``rollout.partial_max_age``).

    Returns:
        :class:`StaleReset` with the new group, the reset sample indices and the tokens discarded.

    Raises:
        TypeError: ``group`` is not a :class:`PendingGroup`.
        ValueError: ``version`` is not an int, or ``max_age`` is not an int ``>= 0``.
    """
    if not isinstance(group, PendingGroup):
        raise TypeError(f"reset_stale_samples expects a PendingGroup, got {type(group).__name__}")
    _check_age_args("reset_stale_samples", version, max_age)
    reset = tuple(j for j, spans in enumerate(group.token_versions) if _is_stale(spans, version, max_age))
    if not reset:
        return StaleReset(group=group, reset=(), tokens_dropped=0)
    fresh = copy.deepcopy(group)
    for j in reset:
        fresh.responses[j] = []
        if fresh.rollout_logprobs is not None:
            fresh.rollout_logprobs[j] = []
        fresh.token_versions[j] = []
        fresh.finish_reasons[j] = "abort"
    return StaleReset(group=fresh, reset=reset, tokens_dropped=sum(len(group.responses[j]) for j in reset))


_COUNTERS = (
    "prompts_tried",
    "kept_groups",
    "all_correct",
    "all_wrong",
    "num_gen_batches",
    "aborted_requests",
    "surplus_dropped",
    "surplus_carried",
    "carried_in",
    "carried_stale",
    "generated_response_tokens",
    "aborted_response_tokens",
    "batch_response_tokens",
    "reused_response_tokens",
)


class DynamicSampler:
    """Collect ``rollout_batch_size`` informative groups per training step (DAPO dynamic sampling).

    Args:
        rollout_batch_size: groups (prompts) per training step; must be >= 1.
        n_samples_per_prompt: ``G``, responses per group; must be >= 1.  Every added group must
            have exactly ``G`` responses.
        enabled: False keeps every group (plain GRPO); counters are still maintained.
        oversample_factor: prompts requested per missing group (> 0); e.g. 1.5 with a ~65 % keep
            rate usually fills a step in one round.
        max_num_gen_batches: cap on generation rounds per step; 0 = unlimited.
        carry_over_surplus: keep complete surplus groups for the next step instead of dropping them.

    It also holds the aborted groups parked for partial rollout (:meth:`add_pending`,
    :meth:`take_pending`, :meth:`reset_stale_pending`, :meth:`drop_pending`); the generation loop decides
    what to park and when to continue (:mod:`megatron_dapo.rollout.generation`).

    Raises:
        ValueError: invalid arguments (named).
    """

    def __init__(
        self,
        rollout_batch_size: int,
        n_samples_per_prompt: int,
        *,
        enabled: bool = True,
        oversample_factor: float = 1.0,
        max_num_gen_batches: int = 0,
        carry_over_surplus: bool = False,
    ) -> None:
        for name, val in (("rollout_batch_size", rollout_batch_size), ("n_samples_per_prompt", n_samples_per_prompt)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if isinstance(max_num_gen_batches, bool) or not isinstance(max_num_gen_batches, int) or max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be an int >= 0 (0 = unlimited), got {max_num_gen_batches!r}")
        if not (isinstance(oversample_factor, (int, float)) and math.isfinite(oversample_factor) and oversample_factor > 0):
            raise ValueError(f"oversample_factor must be a finite number > 0, got {oversample_factor!r}")
        self.rollout_batch_size = rollout_batch_size
        self.n_samples_per_prompt = n_samples_per_prompt
        self.enabled = bool(enabled)
        self.oversample_factor = float(oversample_factor)
        self.max_num_gen_batches = max_num_gen_batches
        self.carry_over_surplus = bool(carry_over_surplus)
        self._kept: list[Group] = []
        self._carry: list[Group] = []
        self._pending: list[PendingGroup] = []
        self._taken = False
        self._counts: dict[str, int] = {k: 0 for k in _COUNTERS}

    # ------------------------------------------------------------------ step protocol
    def start_step(self, version: Optional[int] = None, max_age: Optional[int] = None) -> None:
        """Reset the per-step counters and move carried-over groups into the kept pool.

        With ``version`` and ``max_age`` (partial rollout: the engines' integer weight version and
        ``rollout.partial_max_age``), a carried group holding a token more than ``max_age`` versions older than
        ``version`` is not trained on: it is parked instead (:meth:`PendingGroup.from_group`, ahead of the groups
        parked last step, being older), counted in ``carried_stale``, so that
        :meth:`reset_stale_pending` regenerates its stale samples while its prompt and fresh samples are kept.
        A carried group whose token versions are unknown (None) is kept. Without them, every carried group is
        kept, whatever its age.

        Raises:
            ValueError: only one of ``version`` / ``max_age`` given, a bad value, or a stale carried group that
                cannot be parked (:meth:`PendingGroup.from_group`).
        """
        if (version is None) != (max_age is None):
            raise ValueError("start_step: give both version and max_age (partial rollout) or neither")
        carry, parked = [], []
        if version is not None:
            _check_age_args("start_step", version, max_age)
        for g in self._carry:
            if version is not None and any(_is_stale(sp, version, max_age) for sp in g.token_versions or ()):
                parked.append(PendingGroup.from_group(g))
            else:
                carry.append(g)
        self._counts = {k: 0 for k in _COUNTERS}
        self._pending = parked + self._pending
        self._kept = carry
        self._carry = []
        self._counts["carried_in"] = len(self._kept)
        self._counts["carried_stale"] = len(parked)
        self._taken = False

    @property
    def num_kept(self) -> int:
        """Groups currently in the kept pool (carried-in ones included)."""
        return len(self._kept)

    @property
    def is_full(self) -> bool:
        """True once the kept pool holds at least ``rollout_batch_size`` groups."""
        return len(self._kept) >= self.rollout_batch_size

    def num_prompts_to_request(self) -> int:
        """Prompts to generate next: ``ceil(oversample_factor * missing)``, at least 1.

        ``missing = rollout_batch_size - num_kept``; returns 0 when the pool is already full.
        With ``enabled=False`` every group is kept, so exactly ``missing`` is returned.
        """
        missing = self.rollout_batch_size - len(self._kept)
        if missing <= 0:
            return 0
        if not self.enabled:
            return missing
        # subtract a tiny slack so that e.g. 1.1 * 10 = 11.000000000000002 requests 11, not 12
        return max(1, math.ceil(self.oversample_factor * missing - 1e-9))

    def add_group(self, group: Group, reused_tokens: int = 0) -> bool:
        """Score one completed group; return True if it is kept.

        Kept when ``0 < num_correct < G`` (or always, with ``enabled=False``).  Groups added after
        the pool is full are kept as surplus (dropped or carried by :meth:`take_batch`).
        ``reused_tokens``: response tokens of the group generated in an earlier step (a continued
        :class:`PendingGroup`); they are not counted again as generated this step.

        Raises:
            TypeError: not a :class:`Group`.
            ValueError: the group does not have ``n_samples_per_prompt`` responses.
        """
        if not isinstance(group, Group):
            raise TypeError(f"add_group expects a Group, got {type(group).__name__}")
        if group.num_samples != self.n_samples_per_prompt:
            raise ValueError(
                f"Group(prompt_index={group.prompt_index}) has {group.num_samples} responses, "
                f"expected n_samples_per_prompt={self.n_samples_per_prompt}"
            )
        c = self._counts
        if isinstance(reused_tokens, bool) or not isinstance(reused_tokens, int) or not (
                0 <= reused_tokens <= group.num_response_tokens):
            raise ValueError(f"add_group: reused_tokens must be an int in [0, {group.num_response_tokens}], "
                             f"got {reused_tokens!r}")
        c["prompts_tried"] += 1
        c["generated_response_tokens"] += group.num_response_tokens
        c["reused_response_tokens"] += reused_tokens
        n_correct = group.num_correct
        if n_correct == group.num_samples:
            c["all_correct"] += 1
        elif n_correct == 0:
            c["all_wrong"] += 1
        keep = (not self.enabled) or (0 < n_correct < group.num_samples)
        if keep:
            c["kept_groups"] += 1
            self._kept.append(group)
        return keep

    def record_aborted(self, n: int, num_tokens: int = 0) -> None:
        """Count ``n`` generation requests aborted (e.g. cancelled once the pool filled).

        ``num_tokens`` (optional) are tokens generated by those requests before the abort; they
        are added to the generated-token count of ``waste_ratio``.

        Raises:
            ValueError: negative ``n`` or ``num_tokens``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"record_aborted: n must be an int >= 0, got {n!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"record_aborted: num_tokens must be an int >= 0, got {num_tokens!r}")
        self._counts["aborted_requests"] += n
        self._counts["aborted_response_tokens"] += num_tokens

    # ------------------------------------------------------------------ partial rollout
    @property
    def num_pending(self) -> int:
        """Aborted groups parked for continuation (:class:`PendingGroup`)."""
        return len(self._pending)

    def add_pending(self, group: PendingGroup) -> None:
        """Park an aborted group for continuation in a later step (first in, first out).

        Raises:
            TypeError: not a :class:`PendingGroup`.
            ValueError: it does not have ``n_samples_per_prompt`` samples.
        """
        if not isinstance(group, PendingGroup):
            raise TypeError(f"add_pending expects a PendingGroup, got {type(group).__name__}")
        if len(group.responses) != self.n_samples_per_prompt:
            raise ValueError(f"PendingGroup(prompt_index={group.prompt_index}) has {len(group.responses)} samples, "
                             f"expected n_samples_per_prompt={self.n_samples_per_prompt}")
        self._pending.append(group)

    def take_pending(self, n: int) -> list[PendingGroup]:
        """Remove and return up to ``n`` parked groups, oldest first."""
        n = max(0, int(n))
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def reset_stale_pending(self, version: int, max_age: int) -> list[StaleReset]:
        """Apply :func:`reset_stale_samples` to every parked group, in place (partial rollout on).

        No group is removed: a stale sample is emptied to be generated again, the rest is kept, and the
        groups keep their order. Returns one :class:`StaleReset` per group that had a sample reset (its
        ``group`` is the one now parked), in parking order.

        Raises:
            ValueError: as :func:`reset_stale_samples` (bad ``version`` / ``max_age``).
        """
        results = [reset_stale_samples(g, version, max_age) for g in self._pending]
        self._pending = [r.group for r in results]
        return [r for r in results if r.reset]

    def drop_pending(self) -> list[PendingGroup]:
        """Remove and return every parked group (partial rollout off: nothing is continued)."""
        out, self._pending = self._pending, []
        return out

    def record_round(self) -> None:
        """Mark the end of one generation round (one generation batch).

        Raises:
            DynamicSamplingExhausted: ``max_num_gen_batches > 0`` rounds are done and the pool is
                still not full.  The message gives the observed keep rate, the round count and the
                settings to change.
        """
        self._counts["num_gen_batches"] += 1
        rounds = self._counts["num_gen_batches"]
        if self.max_num_gen_batches > 0 and rounds >= self.max_num_gen_batches and not self.is_full:
            raise DynamicSamplingExhausted(self._exhausted_message())

    def _exhausted_message(self) -> str:
        c = self._counts
        tried, kept = c["prompts_tried"], c["kept_groups"]
        rate = kept / tried if tried else 0.0
        need = self.rollout_batch_size
        have = len(self._kept)
        if kept > 0:
            est = math.ceil((need - c["carried_in"]) / rate)
            estimate = f" At this rate about {est} prompts are needed per step."
        else:
            estimate = " No group has been kept so far."
        if c["all_wrong"] >= c["all_correct"]:
            skew = f"most filtered groups were all-wrong ({c['all_wrong']} vs {c['all_correct']} all-correct)"
        else:
            skew = f"most filtered groups were all-correct ({c['all_correct']} vs {c['all_wrong']} all-wrong)"
        return (
            f"dynamic sampling exhausted: after {c['num_gen_batches']} generation rounds "
            f"(max_num_gen_batches={self.max_num_gen_batches}) only {have}/{need} groups with mixed "
            f"correctness were collected; observed keep rate {kept}/{tried} = {rate:.1%}; {skew}.{estimate} "
            "To fix: raise max_num_gen_batches or set it to 0 (unlimited), lower rollout_batch_size, "
            "raise n_samples_per_prompt (more chances of a mixed group), raise oversample_factor, "
            "or use an easier dataset / a stronger model (if groups are mostly all-wrong) -- a harder "
            "dataset if they are mostly all-correct."
        )

    def take_batch(self) -> list[Group]:
        """Return exactly ``rollout_batch_size`` kept groups, in the order they were kept.

        Surplus groups are dropped (``surplus_dropped``) or, with ``carry_over_surplus``, kept for
        the next :meth:`start_step` (``surplus_carried``).

        Raises:
            RuntimeError: the pool is not full yet (or the batch of this step was already taken).
        """
        if self._taken:
            raise RuntimeError("take_batch was already called this step; call start_step() first")
        if not self.is_full:
            raise RuntimeError(
                f"take_batch called with {len(self._kept)}/{self.rollout_batch_size} kept groups; "
                "keep generating (num_prompts_to_request) until is_full"
            )
        batch = self._kept[: self.rollout_batch_size]
        surplus = self._kept[self.rollout_batch_size :]
        if self.carry_over_surplus:
            self._carry.extend(surplus)
            self._counts["surplus_carried"] += len(surplus)
        else:
            self._counts["surplus_dropped"] += len(surplus)
        self._kept = []
        self._taken = True
        self._counts["batch_response_tokens"] = sum(g.num_response_tokens for g in batch)
        return batch

    # ------------------------------------------------------------------ reporting / state
    def metrics(self) -> dict[str, float]:
        """Per-step metrics (floats).

        Keys: ``prompts_tried``, ``kept_groups`` (kept among the freshly generated groups),
        ``all_correct``, ``all_wrong``, ``num_gen_batches`` (rounds), ``aborted_requests``,
        ``surplus_dropped``, ``surplus_carried``, ``carried_in`` (groups carried in from the previous
        step), ``carried_stale`` (carried groups parked again instead, too old: :meth:`start_step`),
        ``keep_rate`` (``kept_groups / prompts_tried``; 0 if none tried), ``waste_ratio``
        (response tokens generated this step -- filtered, surplus and aborted included -- divided by
        the response tokens of the taken batch; 0 before :meth:`take_batch`.  Carried-in groups
        were generated in an earlier step, so it can fall below 1 with carry-over), plus the raw
        ``generated_response_tokens`` and ``batch_response_tokens``. Tokens of a continued partial
        rollout that were generated in an earlier step count in that step only.
        """
        c = self._counts
        out = {k: float(c[k]) for k in (
            "prompts_tried", "kept_groups", "all_correct", "all_wrong", "num_gen_batches",
            "aborted_requests", "surplus_dropped", "surplus_carried", "carried_in", "carried_stale",
        )}
        generated = c["generated_response_tokens"] + c["aborted_response_tokens"] - c["reused_response_tokens"]
        batch_tokens = c["batch_response_tokens"]
        out["generated_response_tokens"] = float(generated)
        out["batch_response_tokens"] = float(batch_tokens)
        out["keep_rate"] = c["kept_groups"] / c["prompts_tried"] if c["prompts_tried"] else 0.0
        out["waste_ratio"] = generated / batch_tokens if (self._taken and batch_tokens > 0) else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable if ``meta`` is) snapshot for exact resume.

        Includes the configuration (checked on load), the counters, the kept pool of the current
        step, the groups carried over to the next step and the parked partial-rollout groups.
        """
        return {
            "config": {
                "rollout_batch_size": self.rollout_batch_size,
                "n_samples_per_prompt": self.n_samples_per_prompt,
                "enabled": self.enabled,
                "oversample_factor": self.oversample_factor,
                "max_num_gen_batches": self.max_num_gen_batches,
                "carry_over_surplus": self.carry_over_surplus,
            },
            "counts": dict(self._counts),
            "taken": self._taken,
            "kept": [g.to_dict() for g in self._kept],
            "carry": [g.to_dict() for g in self._carry],
            "pending": [g.to_dict() for g in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot.

        Raises:
            ValueError: missing keys, or the snapshot's ``rollout_batch_size`` /
                ``n_samples_per_prompt`` differ from this sampler's (groups would not fit).
        """
        missing = [k for k in ("config", "counts", "taken", "kept", "carry") if k not in state]
        if missing:
            raise ValueError(f"DynamicSampler state_dict is missing keys {missing}")
        cfg = state["config"]
        for key in ("rollout_batch_size", "n_samples_per_prompt"):
            if cfg.get(key) != getattr(self, key):
                raise ValueError(
                    f"DynamicSampler state_dict has {key}={cfg.get(key)!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        unknown = [k for k in state["counts"] if k not in _COUNTERS]
        if unknown:
            raise ValueError(f"DynamicSampler state_dict has unknown counters {unknown}")
        self._counts = {k: int(state["counts"].get(k, 0)) for k in _COUNTERS}
        self._taken = bool(state["taken"])
        self._kept = [Group.from_dict(g) for g in state["kept"]]
        self._carry = [Group.from_dict(g) for g in state["carry"]]
        self._pending = [PendingGroup.from_dict(g) for g in state.get("pending", [])]  # absent: older checkpoint
