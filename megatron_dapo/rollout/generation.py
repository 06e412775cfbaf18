"""Generate, score and filter groups until the dynamic sampler is full (DAPO Algorithm 1, lines 3-6).

One round requests ``sampler.num_prompts_to_request()`` prompts; each prompt's ``G`` samples form one
request. Groups are scored as they complete (rule-based reward, then overlong shaping) and handed to the
:class:`~megatron_dapo.algorithm.DynamicSampler`; once it is full the requests still in flight are aborted
so little is generated for nothing.

Streaming scoring: a group's reward is computed in a worker thread
(:func:`~megatron_dapo.reward.get_score_executor`) awaited from the event loop, so the other groups'
requests keep generating while it is scored; a group being scored is past generation and is never
aborted (when the sampler fills meanwhile it is kept as surplus).

Partial rollout (``rollout.mode: partial``, slime's ``--partial-rollout``): an aborted group is not
dropped but parked in the sampler (:class:`~megatron_dapo.algorithm.PendingGroup`) with whatever each
sample had generated (tokens, logprobs, the weight version of each span). The next step takes the
parked groups back before asking the dataset for new prompts and continues them sample by sample:

* a finished sample (``stop`` / ``length``) is kept as it is;
* an unfinished sample ``j`` is resubmitted as one request, input ``prompt + responses[j]``,
  ``max_new_tokens = max_response_length - len(responses[j])``; its final response is the prefix plus
  the continuation, its logprobs the two lists concatenated, its ``token_versions`` one
  ``[start, end, version]`` span per step that generated tokens;
* the group is screened, scored and handed to the sampler once all ``G`` samples are finished (it may
  be aborted and parked again, growing another span);
* surplus groups -- finished, kept by the sampler after it filled (they were being scored, or finished
  generating, when the batch filled) -- are carried to the next step too (``algorithm.carry_over_surplus``
  defaults to on with partial rollout): slime's ``--partial-rollout`` likewise returns every group still
  in flight at the abort to its buffer, finished ones included;
* at the start of each step, a parked sample holding a token more than ``partial_max_age`` weight
  versions older than the engines' is reset -- its tokens discarded (counted), generated again from
  scratch -- while the group's other samples and its prompt are kept
  (:func:`~megatron_dapo.algorithm.dynamic_sampling.reset_stale_samples`); so a group is never lost, even
  when aborted twice. A carried surplus group that old is parked first and reset the same way. With
  partial rollout off every parked group is dropped. (When the carried groups alone fill a step's batch,
  nothing is generated that step and the parked groups wait, one version older. Continuing them anyway was
  measured: no fewer tokens generated per trained token, so it is not done.)

The unit parked is the group (advantages are normalised over its ``G`` samples, eq. 9) and the unit
continued is the sample: the simplest design that keeps both finished samples and prefixes. The
deterministic path (one ordered request per round) never aborts, so it never parks anything.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..algorithm import DynamicSampler, Group, PendingGroup, StaleReset, soft_overlong_penalty
from ..algorithm.dynamic_sampling import scoring_row
from ..algorithm.train_batch import offpolicy_prefix_mask
from ..config import DAPOConfig
from ..reward import RewardResult, get_score_executor, score_batch
from ..engines.payloads import GenerateOutput
from .validate import ResponseValidator


@dataclass
class RolloutSettings:
    """What the generation loop needs. ``stop_token_ids`` end a response (EOS / ``<|im_end|>``)."""

    n_samples_per_prompt: int
    max_response_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: Sequence[int] = ()
    soft_overlong_punishment: bool = True
    overlong_buffer_length: int = 4096
    overlong_penalty_factor: float = 1.0
    seed: int = 0
    deterministic: bool = False
    """Send each round as one ordered request and score groups in prompt order (no mid-round abort):
    reproducible rollouts for exact resume and tests. ``False``: score as groups complete, abort on full."""
    response_validator: Optional[ResponseValidator] = None
    """Malformed responses (:class:`~megatron_dapo.rollout.validate.ResponseValidator`) drop their group; ``None``:
    no screening."""
    partial_rollout: bool = False
    """Continue aborted groups next step instead of dropping them (module docstring)."""
    partial_max_age: int = 1
    """Largest age, in weight versions, of a token of a continued sample; older samples are regenerated."""

    @classmethod
    def from_config(cls, cfg: DAPOConfig, *, stop_token_ids: Sequence[int],
                    response_validator: Optional[ResponseValidator] = None) -> "RolloutSettings":
        """The settings of ``cfg.rollout`` and the resolved algorithm's overlong shaping
        (:meth:`~megatron_dapo.config.DAPOConfig.resolved_algorithm`), seeded by ``cfg.seed``.

        Args:
            cfg: the run's validated config.
            stop_token_ids: the ids that end a response (:func:`stop_ids_for_model`).
            response_validator: see the field.

        Raises:
            ConfigError: an invalid ``algorithm.*`` switch.
        """
        r, alg = cfg.rollout, cfg.resolved_algorithm()
        return cls(n_samples_per_prompt=r.n_samples_per_prompt, max_response_length=r.max_response_length,
                   temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, stop_token_ids=stop_token_ids,
                   soft_overlong_punishment=alg.soft_overlong_punishment,
                   overlong_buffer_length=alg.overlong_buffer_length,
                   overlong_penalty_factor=alg.overlong_penalty_factor, seed=cfg.seed,
                   deterministic=r.mode == "deterministic", response_validator=response_validator,
                   partial_rollout=r.mode == "partial", partial_max_age=r.partial_max_age)

    def screen(self, outs: Sequence[GenerateOutput]) -> bool:
        """True when the group's responses ``outs`` may enter a batch: :attr:`response_validator` accepts them
        (:meth:`~megatron_dapo.rollout.validate.ResponseValidator.screen_group`), or there is none."""
        return self.response_validator is None or self.response_validator.screen_group(outs)


@dataclass
class PartialRolloutStats:
    """One step's partial-rollout counters (``rollout.mode: partial``); :meth:`metrics` names them.

    Counts are samples (responses) or response tokens, summed over the step's rounds.
    """

    parked: int = 0
    """Samples with a prefix parked for continuation when their group was aborted."""
    continued: int = 0
    """Samples resubmitted with a prefix generated in an earlier step."""
    tokens_reused: int = 0
    """Prefix tokens of those samples (sent as input instead of being generated again)."""
    dropped_stale: int = 0
    """Parked samples reset at the start of the step because they held a token older than
    ``partial_max_age`` weight versions (finished ones included); they are generated again from scratch."""
    tokens_dropped: int = 0
    """Tokens those reset samples held (discarded)."""
    pending: int = 0
    """Groups parked at the end of the step."""

    def record_stale(self, resets: Iterable[StaleReset]) -> None:
        """Add the samples and tokens reset by
        :meth:`~megatron_dapo.algorithm.DynamicSampler.reset_stale_pending` to ``dropped_stale`` /
        ``tokens_dropped``."""
        for r in resets:
            self.dropped_stale += len(r.reset)
            self.tokens_dropped += r.tokens_dropped

    def metrics(self) -> dict[str, float]:
        """``partial_parked``, ``partial_continued``, ``partial_tokens_reused``, ``partial_dropped_stale``,
        ``partial_tokens_dropped`` and ``partial_pending`` as floats (unprefixed; see the fields)."""
        return {f"partial_{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass
class RoundStats:
    """Everything generated in one step (all rounds), before filtering: for the rollout/* scalars."""

    scores: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    token_prob_sum: float = 0.0
    token_count: int = 0
    reward_seconds: float = 0.0
    """Wall-clock seconds during which at least one group was being scored (the union of the scoring
    intervals: at most the rollout's wall time, although scoring overlaps generation)."""
    no_answer: int = 0
    per_source_correct: dict = field(default_factory=dict)
    scoring_in_flight: int = 0
    """Groups being scored right now (kept by :meth:`scoring_started` / :meth:`scoring_finished`)."""
    scoring_since: float = 0.0
    """``time.perf_counter()`` when the current busy interval began (scoring_in_flight went 0 -> 1)."""
    generated_tokens: int = 0
    """Response tokens the engines generated this step (filtered, surplus and aborted work included;
    prefixes continued from an earlier step are not generated again)."""
    trained_tokens: int = 0
    """Response tokens of the step's batch (set by :func:`collect_batch`)."""
    token_age_mean: float = 0.0
    """Mean age of the batch's response tokens, in weight versions (set by :func:`collect_batch`, see
    :func:`token_ages`)."""
    token_age_max: int = 0
    """Largest age of a batch response token, in weight versions (set by :func:`collect_batch`)."""
    offpolicy_prefix_tokens: int = 0
    """Response tokens of the batch that older weights generated than their response's newest token: the
    prefixes of continued partial-rollout samples (set by :func:`collect_batch`;
    :func:`~megatron_dapo.algorithm.train_batch.offpolicy_prefix_mask`)."""
    partial: Optional[PartialRolloutStats] = None
    """The partial-rollout counters (:meth:`metrics` adds their ``partial_*`` names); None when
    ``rollout.mode`` is not ``partial``."""

    def scoring_started(self, now: Optional[float] = None) -> None:
        """A group's scoring begins (``now``: ``time.perf_counter()`` seconds, default the current time)."""
        if self.scoring_in_flight == 0:
            self.scoring_since = time.perf_counter() if now is None else now
        self.scoring_in_flight += 1

    def scoring_finished(self, now: Optional[float] = None) -> None:
        """A group's scoring ended; the busy interval is added to :attr:`reward_seconds` when it was the last.

        Raises:
            RuntimeError: no scoring was in flight.
        """
        if self.scoring_in_flight <= 0:
            raise RuntimeError("RoundStats.scoring_finished without a matching scoring_started")
        self.scoring_in_flight -= 1
        if self.scoring_in_flight == 0:
            self.reward_seconds += (time.perf_counter() if now is None else now) - self.scoring_since

    def add(self, group: Group, scores: list[float], statuses: list[str], source: str) -> None:
        self.scores += scores
        self.rewards += group.rewards
        self.correct += group.correct
        self.lengths += [len(r) for r in group.responses]
        self.truncated += [f == "length" for f in group.finish_reasons]
        self.no_answer += sum(s == "no_answer" for s in statuses)
        c, n = self.per_source_correct.get(source, (0, 0))
        self.per_source_correct[source] = (c + sum(group.correct), n + len(group.correct))
        if group.rollout_logprobs:
            for lp in group.rollout_logprobs:
                self.token_prob_sum += math.fsum(math.exp(x) for x in lp)
                self.token_count += len(lp)

    def metrics(self) -> dict[str, float]:
        """Pre-filter statistics of the step's responses, unprefixed (the trainer scopes them under
        ``rollout/``): ``reward_mean``, ``score_mean``, ``acc``, ``response_length_mean``/``_max`` (tokens),
        ``response_length_clip_ratio``, ``no_answer_frac``, ``num_responses``, ``mean_token_prob`` (when
        the engines returned logprobs), ``acc/<data_source>``, ``generated_tokens`` / ``trained_tokens``
        / ``generated_per_trained_token`` (response tokens), ``token_age_mean`` / ``token_age_max`` (weight
        versions, :func:`token_ages`), ``offpolicy_prefix_tokens`` and, with partial rollout, the ``partial_*`` counters of
        :meth:`PartialRolloutStats.metrics`."""
        n = max(len(self.rewards), 1)
        out = {
            "reward_mean": sum(self.rewards) / n,
            "score_mean": sum(self.scores) / n,
            "acc": sum(self.correct) / n,
            "response_length_mean": sum(self.lengths) / n,
            "response_length_max": float(max(self.lengths, default=0)),
            "response_length_clip_ratio": sum(self.truncated) / n,
            "no_answer_frac": self.no_answer / n,
            "num_responses": float(len(self.rewards)),
        }
        out["generated_tokens"] = float(self.generated_tokens)
        out["trained_tokens"] = float(self.trained_tokens)
        out["generated_per_trained_token"] = (self.generated_tokens / self.trained_tokens
                                              if self.trained_tokens else 0.0)
        out["token_age_mean"] = float(self.token_age_mean)
        out["token_age_max"] = float(self.token_age_max)
        out["offpolicy_prefix_tokens"] = float(self.offpolicy_prefix_tokens)
        if self.partial is not None:
            out.update(self.partial.metrics())
        if self.token_count:
            out["mean_token_prob"] = self.token_prob_sum / self.token_count
        for src, (c, k) in self.per_source_correct.items():
            out[f"acc/{src}"] = c / max(k, 1)
        return out


def shape_rewards(scores: Sequence[float], lengths: Sequence[int], s: RolloutSettings) -> list[float]:
    """Rule reward (+1/-1) plus the soft overlong punishment (DAPO eq. 13) when enabled."""
    if not s.soft_overlong_punishment:
        return [float(x) for x in scores]
    pen = soft_overlong_penalty(torch.tensor(list(lengths)), s.max_response_length, s.overlong_buffer_length,
                                s.overlong_penalty_factor)
    return [float(a) + float(b) for a, b in zip(scores, pen.tolist())]


def _sampling_params(s: RolloutSettings, round_index: int) -> dict:
    """SGLang ``sampling_params`` of one round; the seed is a pure function of (run seed, round)."""
    return {"max_new_tokens": s.max_response_length, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k, "n": s.n_samples_per_prompt, "stop_token_ids": list(s.stop_token_ids),
            "sampling_seed": s.seed * 1_000_003 + round_index * 10_007}


@dataclass
class _Attempt:
    """One group's generation this round: its outputs (prefixes joined), spans and new tokens."""

    idx: int
    row: dict
    ids: list[int]
    outs: list
    spans: list[list[list[int]]]
    new_tokens: int

    @property
    def aborted(self) -> bool:
        return any(o.finish_reason == "abort" for o in self.outs)


def _fresh_spans(outs, version: int) -> list[list[list[int]]]:
    """One ``[0, len, version]`` span per non-empty response generated in one go."""
    return [[[0, len(o.output_ids), version]] if o.output_ids else [] for o in outs]


def _park(att: _Attempt) -> PendingGroup:
    """The aborted attempt as a :class:`PendingGroup` (only what scoring needs of the row: JSON-safe)."""
    lps = [o.output_logprobs for o in att.outs]
    if any(lp is None or len(lp) != len(o.output_ids) for lp, o in zip(lps, att.outs)):
        lps = None
    row = scoring_row(att.row["reward_model"]["ground_truth"], att.row.get("data_source", "math_dapo"))
    return PendingGroup(prompt_index=int(att.idx), prompt_ids=[int(t) for t in att.ids], row=row,
                        responses=[[int(t) for t in o.output_ids] for o in att.outs],
                        rollout_logprobs=None if lps is None else [[float(x) for x in lp] for lp in lps],
                        finish_reasons=[str(o.finish_reason) for o in att.outs],
                        token_versions=[[list(span) for span in sp] for sp in att.spans])


async def _continue(client, pg: PendingGroup, sp: dict, s: RolloutSettings, rid: str, version: int,
                    stats: PartialRolloutStats) -> _Attempt:
    """Continue the unfinished samples of a parked group, one request each (module docstring).

    Sample ``j`` is sent as ``prompt_ids + responses[j]`` with ``max_new_tokens = max_response_length -
    len(responses[j])``, ``n = 1``, seed ``sp["sampling_seed"] + j`` and rid ``f"{rid}-s{j}"`` (so
    ``abort(rid)`` reaches all of them). A prefix already ending in a stop token or at the length limit
    is finished without a request; a sample without a prefix (never generated, or reset as stale) is
    generated from scratch and reuses no token. ``stats.continued`` / ``stats.tokens_reused`` count the
    samples sent with a prefix. Returns the group's outputs with prefixes joined.
    """
    stop = set(s.stop_token_ids)

    async def sample(j: int):
        prefix = list(pg.responses[j])
        lp = None if pg.rollout_logprobs is None else list(pg.rollout_logprobs[j])
        spans = [list(span) for span in pg.token_versions[j]]
        kept = GenerateOutput(output_ids=prefix, output_logprobs=lp, finish_reason=pg.finish_reasons[j],
                              prompt_tokens=len(pg.prompt_ids), weight_version=None, completion_tokens=len(prefix))
        if kept.finish_reason != "abort":
            return kept, spans, 0
        room = s.max_response_length - len(prefix)
        if prefix and prefix[-1] in stop:
            return dataclasses.replace(kept, finish_reason="stop"), spans, 0
        if room <= 0:
            return dataclasses.replace(kept, finish_reason="length"), spans, 0
        if prefix:
            stats.continued += 1
            stats.tokens_reused += len(prefix)
        sp_j = dict(sp, n=1, max_new_tokens=room, sampling_seed=sp["sampling_seed"] + j)
        outs = await client.generate([list(pg.prompt_ids) + prefix], sp_j, return_logprob=True, rid=f"{rid}-s{j}")
        (o,) = outs
        new = list(o.output_ids)
        if new:
            spans.append([len(prefix), len(prefix) + len(new), version])
        joined_lp = None if lp is None or o.output_logprobs is None else lp + list(o.output_logprobs)
        return dataclasses.replace(o, output_ids=prefix + new, output_logprobs=joined_lp,
                                   prompt_tokens=len(pg.prompt_ids), completion_tokens=len(prefix) + len(new)), \
            spans, len(new)

    res = await asyncio.gather(*(sample(j) for j in range(len(pg.responses))))
    return _Attempt(pg.prompt_index, pg.row, list(pg.prompt_ids), [r[0] for r in res], [r[1] for r in res],
                    sum(r[2] for r in res))


async def _fill(client, sampler: DynamicSampler, next_prompts: Callable[[int], list[tuple[int, dict, list[int]]]],
                tokenizer, s: RolloutSettings, stats: RoundStats, round_index: int, version: int = 0) -> None:
    if s.partial_rollout and stats.partial is None:
        raise ValueError("RolloutSettings.partial_rollout is on but RoundStats.partial is None (pass a PartialRolloutStats)")
    want = sampler.num_prompts_to_request()
    resumed = sampler.take_pending(want) if s.partial_rollout else []  # parked groups first (partial rollout)
    prompts = next_prompts(want - len(resumed)) if want > len(resumed) else []
    items = list(resumed) + list(prompts)
    if not items:
        return
    sp = _sampling_params(s, round_index)
    rid_base = uuid.uuid4().hex[:12]
    generated: set[int] = set()  # requests past generation (being screened / scored): never aborted

    async def one(i: int, item):
        """Generate, then score in a worker thread: ``(attempt, results)``, results None when not scored."""
        sp_i = dict(sp, sampling_seed=sp["sampling_seed"] + i * s.n_samples_per_prompt)
        if isinstance(item, PendingGroup):
            att = await _continue(client, item, sp_i, s, f"{rid_base}-{i}", version, stats.partial)
        else:
            idx, row, ids = item
            outs = await client.generate([ids], sp_i, return_logprob=True, rid=f"{rid_base}-{i}")
            att = _Attempt(idx, row, ids, outs, _fresh_spans(outs, version), sum(len(o.output_ids) for o in outs))
        stats.generated_tokens += att.new_tokens
        if att.aborted:
            return att, None
        generated.add(i)
        if not s.screen(att.outs):
            return att, None
        return att, await _score_group(att.outs, att.row, tokenizer, stats)

    def consume(res) -> None:
        att, results = res
        if att.aborted:
            sampler.record_aborted(1, att.new_tokens)
            if s.partial_rollout:
                pg = _park(att)
                sampler.add_pending(pg)
                stats.partial.parked += pg.num_prefix_samples
        elif results is not None:
            group = _build_group(att.idx, att.row, att.ids, att.outs, results, s, stats, att.spans)
            sampler.add_group(group, reused_tokens=group.num_response_tokens - att.new_tokens)

    tasks = {asyncio.ensure_future(one(i, it)): i for i, it in enumerate(items)}
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                consume(t.result())
            if sampler.is_full and pending:
                for t in pending:
                    if tasks[t] not in generated:
                        await client.abort(rid=f"{rid_base}-{tasks[t]}")
                rest = list(pending)
                finished = await asyncio.gather(*rest, return_exceptions=True)
                pending = set()
                for t, res in zip(rest, finished):
                    if not isinstance(res, BaseException):
                        consume(res)  # aborted: counted (parked with partial rollout); generated before: surplus
                    elif tasks[t] in generated:
                        raise res  # a screening / scoring failure is never hidden as an abort
                    else:
                        sampler.record_aborted(1)
    finally:
        for t in pending:
            t.cancel()
        for t in tasks:  # the first failure propagates; mark the others' as seen (no asyncio traceback)
            if t.done() and not t.cancelled():
                t.exception()


async def _score_group(outs, row: dict, tokenizer, stats: RoundStats) -> list[RewardResult]:
    """Decode one group's responses and score them in the scoring thread pool (the event loop stays free)."""
    texts = [tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outs]
    gt = str(row["reward_model"]["ground_truth"])
    src = str(row.get("data_source", "math_dapo"))
    loop = asyncio.get_running_loop()
    stats.scoring_started()
    try:
        return await loop.run_in_executor(get_score_executor(),
                                          functools.partial(score_batch, texts, [gt] * len(texts), src))
    finally:
        stats.scoring_finished()


def _build_group(idx: int, row: dict, ids: list[int], outs, results: list[RewardResult], s: RolloutSettings,
                 stats: RoundStats, spans: Optional[list[list[list[int]]]] = None) -> Group:
    gt = str(row["reward_model"]["ground_truth"])
    src = str(row.get("data_source", "math_dapo"))
    scores = [r.score for r in results]
    lengths = [len(o.output_ids) for o in outs]
    rollout_lp = [list(o.output_logprobs or []) for o in outs]
    if any(len(a) != len(o.output_ids) for a, o in zip(rollout_lp, outs)):
        rollout_lp = None
    group = Group(prompt_index=idx, prompt_ids=list(ids), responses=[list(o.output_ids) for o in outs],
                  rewards=shape_rewards(scores, lengths, s), correct=[bool(r.acc) for r in results],
                  finish_reasons=[o.finish_reason for o in outs], rollout_logprobs=rollout_lp,
                  meta={"ground_truth": gt, "data_source": src}, token_versions=spans)
    stats.add(group, scores, [r.status for r in results], src)
    return group


async def _fill_ordered(client, sampler: DynamicSampler, next_prompts, tokenizer, s: RolloutSettings,
                        stats: RoundStats, round_index: int, version: int = 0) -> None:
    prompts = next_prompts(sampler.num_prompts_to_request())
    if not prompts:
        return
    sp = _sampling_params(s, round_index)
    saved = client.prompts_per_request
    client.prompts_per_request = len(prompts)  # one request: a fixed engine batch composition
    try:
        outs = await client.generate([ids for _, _, ids in prompts], sp, return_logprob=True)
    finally:
        client.prompts_per_request = saved
    stats.generated_tokens += sum(len(o.output_ids) for o in outs)
    g = s.n_samples_per_prompt
    kept = [(idx, row, ids, outs[i * g:(i + 1) * g]) for i, (idx, row, ids) in enumerate(prompts)
            if s.screen(outs[i * g:(i + 1) * g])]
    # all groups are scored concurrently; they reach the sampler in prompt order, as generated
    results = await asyncio.gather(*(_score_group(o, row, tokenizer, stats) for _, row, _, o in kept))
    for (idx, row, ids, o), res in zip(kept, results):
        sampler.add_group(_build_group(idx, row, ids, o, res, s, stats, _fresh_spans(o, version)))


def collect_batch(sync_client, sampler: DynamicSampler, next_prompts, tokenizer,
                  s: RolloutSettings, step: int, weight_version: Optional[int] = None,
                  resume: bool = False) -> tuple[list[Group], RoundStats]:
    """Run rounds until ``sampler`` is full; return the step's batch and the pre-filter statistics.

    ``weight_version`` (default ``step``: the trainer pushes ``str(step)`` after ``step`` updates) is the
    integer version of the engines' weights this step: it tags the generated token spans
    (:attr:`Group.token_versions`) and ages the parked partial-rollout samples: before generating, a parked
    sample with a token more than ``s.partial_max_age`` versions old is reset to be generated again
    (``partial_dropped_stale`` / ``partial_tokens_dropped``), its group kept; a surplus group carried from an
    earlier step with such a token is parked first (``dynamic_sampling/carried_stale``), so the same rule
    applies to it. With ``s.partial_rollout`` off every parked group is dropped.

    ``step`` (seeds the sampling) is also the version of the policy the batch will be trained against (the
    trainer's completed updates when it trains on it): the batch's token ages (``token_age_mean`` /
    ``token_age_max``, :func:`token_ages`) are measured from it.

    ``resume``: go on filling the sampler of an attempt of the same step that an engine failure interrupted (the
    groups it kept stay; the step's start - carried and parked groups - is not repeated). The returned statistics
    cover this call's rounds; the sampler's counters cover the whole step.

    Raises:
        DynamicSamplingExhausted: ``max_num_gen_batches`` rounds did not fill the batch.
        EngineError: the engines failed after retries.
    """
    stats = RoundStats(partial=PartialRolloutStats() if s.partial_rollout else None)
    version = step if weight_version is None else int(weight_version)
    if resume:
        pass  # the interrupted attempt started the step
    elif stats.partial is not None:
        sampler.start_step(version, s.partial_max_age)  # a carried group grown too old is parked, then reset
        stats.partial.record_stale(sampler.reset_stale_pending(version, s.partial_max_age))
    else:
        sampler.start_step()
        sampler.drop_pending()  # groups parked by an earlier run with partial rollout on
    rnd = 0
    while not sampler.is_full:
        fill = _fill_ordered if s.deterministic else _fill
        sync_client.run(fill(sync_client.client, sampler, next_prompts, tokenizer, s, stats, step * 1000 + rnd,
                             version))
        rnd += 1
        sampler.record_round()
    batch = sampler.take_batch()
    stats.trained_tokens = sum(g.num_response_tokens for g in batch)
    stats.token_age_mean, stats.token_age_max = token_ages(batch, step)
    stats.offpolicy_prefix_tokens = offpolicy_prefix_tokens(batch)
    if stats.partial is not None:
        stats.partial.pending = sampler.num_pending
    return batch, stats


def token_ages(groups: Iterable[Group], policy_version: int) -> tuple[float, int]:
    """Mean and largest age of the groups' response tokens: ``policy_version - v`` for each token generated by
    weight version ``v`` (its :attr:`Group.token_versions` span), in weight versions (optimizer updates).

    ``policy_version`` is the version of the policy the batch is trained against (the proximal policy: the
    actor before the step's update). Fresh tokens are 0 old in a synchronous run and 1 in one-step off-policy
    (``rollout/staleness``); a continued prefix or a carried surplus group adds the steps it waited. Groups
    without token versions are skipped; ``(0.0, 0)`` when no token has a known version.
    """
    total = count = oldest = 0
    for g in groups:
        for spans in g.token_versions or ():
            for start, end, v in spans:
                age = int(policy_version) - int(v)
                total += age * (end - start)
                count += end - start
                oldest = max(oldest, age)
    return (total / count if count else 0.0), oldest


def offpolicy_prefix_tokens(groups: Iterable[Group]) -> int:
    """How many response tokens of ``groups`` older weights generated than their response's newest token (the
    0s of :func:`~megatron_dapo.algorithm.train_batch.offpolicy_prefix_mask`); groups without token versions
    count 0."""
    total = 0
    for g in groups:
        for spans, resp in zip(g.token_versions or (), g.responses):
            total += offpolicy_prefix_mask(spans, len(resp)).count(0.0)
    return total


def generated_per_trained_token(step_metrics: Iterable[dict]) -> float:
    """Response tokens the engines generated per response token trained, over several steps.

    ``step_metrics``: one dict per step with ``rollout/generated_tokens`` and ``rollout/trained_tokens``
    (the trainer's step scalars, e.g. the lines of ``<run_dir>/steps.jsonl``). Returns
    ``sum(generated) / sum(trained)`` (dimensionless; filtered, surplus and aborted work count as generated,
    a continued prefix only in the step that generated it). Dividing this figure of a run with
    ``rollout.mode=partial`` by that of the same run without it gives the "generated per trained
    token partial/drop" of ``benchmarks/bench_partial_rollout.py``.

    Raises:
        ValueError: a step lacks either key, or nothing was trained.
    """
    gen = trained = 0.0
    for i, m in enumerate(step_metrics):
        missing = [k for k in ("rollout/generated_tokens", "rollout/trained_tokens") if k not in m]
        if missing:
            raise ValueError(f"step metrics #{i} lack {missing}")
        gen += float(m["rollout/generated_tokens"])
        trained += float(m["rollout/trained_tokens"])
    if trained <= 0:
        raise ValueError("no trained tokens in the given steps")
    return gen / trained


def stop_ids_for(tokenizer, generation_config: Optional[dict] = None) -> list[int]:
    """EOS ids that end a response: the tokenizer's eos plus generation_config's ``eos_token_id`` (an int or
    a list of ints). Returns a sorted list without duplicates."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = (generation_config or {}).get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return sorted(ids)


def stop_ids_for_model(tokenizer, model_dir: str | Path) -> list[int]:
    """The stop-token rule of training and of the ``eval`` command: :func:`stop_ids_for` with the model's
    ``<model_dir>/generation_config.json`` (HF ``GenerationConfig``; absent: the tokenizer's eos only).

    Raises:
        ValueError: ``generation_config.json`` exists but is not valid JSON (``json.JSONDecodeError``).
    """
    path = Path(model_dir) / "generation_config.json"
    return stop_ids_for(tokenizer, json.loads(path.read_text()) if path.is_file() else None)
