"""The default rollout path (``rollout.mode: streaming``), the one every cluster example uses.

One request per prompt, all in flight at once; groups are scored as they complete and handed to the
dynamic sampler; once it is full the requests still running are aborted, their partial tokens
counted. A fake engine controls the completion order with events (no sleeps): each prompt's request
finishes only when the test releases it, and the ones never released end only through ``abort``.
"""
from __future__ import annotations

import asyncio

import pytest

from megatron_dapo.algorithm import DynamicSampler
from megatron_dapo.rollout.generation import RolloutSettings, RoundStats, _fill
from megatron_dapo.engines.payloads import GenerateOutput

G = 4
CORRECT, WRONG = 7, 8  # token ids the fake tokenizer decodes as a right / wrong answer


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "Answer: 42" if ids and ids[-1] == CORRECT else "Answer: 41"


def _out(ids, reason, rid):
    return GenerateOutput(output_ids=list(ids), output_logprobs=[-0.5] * len(ids), finish_reason=reason,
                          prompt_tokens=3, weight_version=None, text="", rid=rid,
                          completion_tokens=len(ids), finish_reason_detail={}, input_logprobs=None,
                          engine_url="fake")


class FakeEngine:
    """``generate`` of prompt ``p`` (its first token id) waits until the test releases ``p``, then
    returns G samples whose correctness is ``plan[p]``; ``abort(rid)`` ends a waiting request with
    ``finish_reason="abort"`` and ``partial[p]`` tokens per sample (what SGLang returns)."""

    def __init__(self, plan: dict[int, list[bool]], partial: dict[int, int]):
        self.plan, self.partial = plan, partial
        self.released: dict[int, asyncio.Event] = {}
        self.aborted: dict[str, asyncio.Event] = {}
        self.in_flight: dict[int, str] = {}
        self.rids: dict[int, str] = {}
        self.started = asyncio.Event()
        self.abort_calls: list[str] = []
        self.completed_order: list[int] = []

    def _ev(self, table, key):
        return table.setdefault(key, asyncio.Event())

    async def generate(self, input_ids, sp, *, return_logprob=False, rid=None):
        assert len(input_ids) == 1 and sp["n"] == G  # one request per prompt, G samples
        p = input_ids[0][0]
        self.in_flight[p] = rid
        self.rids[p] = rid
        if len(self.in_flight) == len(self.plan):
            self.started.set()
        rel, ab = self._ev(self.released, p), self._ev(self.aborted, rid)
        done, _ = await asyncio.wait([asyncio.ensure_future(rel.wait()), asyncio.ensure_future(ab.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        del self.in_flight[p]
        if ab.is_set():
            return [_out([5] * self.partial[p], "abort", rid) for _ in range(G)]
        self.completed_order.append(p)
        return [_out([5, 5, CORRECT if ok else WRONG], "stop", rid) for ok in self.plan[p]]

    async def abort(self, rid=None):
        self.abort_calls.append(rid)
        self._ev(self.aborted, rid).set()
        return 1


def _prompts(n):
    rows = [{"reward_model": {"ground_truth": "42"}, "data_source": "math_dapo"} for _ in range(n)]
    return [(100 + p, rows[p], [p, 1, 2]) for p in range(n)]


async def _drive(engine, sampler, order):
    """Run one round of the default path, releasing prompts in ``order`` one at a time (each only
    after the previous one has been consumed), all requests being in flight first."""
    s = RolloutSettings(n_samples_per_prompt=G, max_response_length=16, soft_overlong_punishment=False)
    stats = RoundStats()
    queue = _prompts(len(engine.plan))
    fill = asyncio.ensure_future(_fill(engine, sampler, lambda k: queue[:k], Tok(), s, stats, 0))
    await asyncio.wait_for(engine.started.wait(), 60)
    for k, p in enumerate(order):
        if fill.done():
            break
        engine._ev(engine.released, p).set()
        while not fill.done() and sampler.metrics()["prompts_tried"] < k + 1:  # consumed: next one
            await asyncio.sleep(0)
    await asyncio.wait_for(fill, 60)
    return stats


def test_default_path_aborts_when_the_sampler_is_full():
    mixed, right, wrong = [True, False, True, False], [True] * G, [False] * G
    plan = {0: mixed, 1: right, 2: mixed, 3: wrong, 4: mixed, 5: mixed, 6: mixed, 7: mixed}
    partial = {p: p + 1 for p in plan}
    sampler = DynamicSampler(3, G, oversample_factor=8 / 3)
    sampler.start_step()
    assert sampler.num_prompts_to_request() == 8
    engine = FakeEngine(plan, partial)
    # completes: 3 (all wrong, filtered), 1 (all right, filtered), 5, 0, 6 (mixed: kept -> full)
    stats = asyncio.run(_drive(engine, sampler, [3, 1, 5, 0, 6, 2, 4, 7]))
    assert engine.completed_order == [3, 1, 5, 0, 6]
    # the three never released were aborted by rid, and answered with their partial tokens
    aborted = {2, 4, 7}
    assert sorted(engine.abort_calls) == sorted(engine.rids[p] for p in aborted)
    assert len(set(engine.rids.values())) == len(plan)  # one request id per prompt
    assert not engine.in_flight
    m = sampler.metrics()
    assert (m["prompts_tried"], m["kept_groups"], m["all_correct"], m["all_wrong"], m["aborted_requests"]) == (
        5, 3, 1, 1, 3)
    batch = sampler.take_batch()
    assert [g.prompt_index for g in batch] == [105, 100, 106]  # exactly the sampler's kept groups, in order
    m = sampler.metrics()
    kept_tokens = 3 * G * 3
    aborted_tokens = sum(partial[p] * G for p in aborted)
    assert m["batch_response_tokens"] == kept_tokens
    assert m["generated_response_tokens"] == 5 * G * 3 + aborted_tokens  # aborted tokens counted
    assert m["waste_ratio"] == pytest.approx((5 * G * 3 + aborted_tokens) / kept_tokens)
    assert len(stats.rewards) == 5 * G  # pre-filter stats cover every completed group, no aborted one


def test_default_path_without_aborts_when_every_group_is_needed():
    mixed = [True, False, False, False]
    plan = {p: mixed for p in range(3)}
    sampler = DynamicSampler(3, G, oversample_factor=1.0)
    sampler.start_step()
    engine = FakeEngine(plan, {p: 1 for p in plan})
    asyncio.run(_drive(engine, sampler, [2, 0, 1]))
    assert engine.abort_calls == [] and sampler.metrics()["aborted_requests"] == 0
    assert [g.prompt_index for g in sampler.take_batch()] == [102, 100, 101]  # completion order
