"""Streaming scoring: a group is scored in a worker thread while the event loop keeps generating the others.

A fake engine and a fake scorer (``generation.score_batch`` replaced) make each step wait on an event set
by another step, so the tests check the order of events, never durations: if scoring ran on the event
loop, the scorer of group A would block the loop, group B's request could not finish while A is scored,
and the scorer's wait would run out (reported, not hung).
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from megatron_dapo.algorithm import DynamicSampler
from megatron_dapo.reward import RewardResult
from megatron_dapo.rollout import generation
from megatron_dapo.rollout.generation import RolloutSettings, RoundStats, _fill, _fill_ordered
from megatron_dapo.engines.payloads import GenerateOutput

G = 2
WAIT_S = 20.0  # only reached when the behaviour under test is broken
MIXED = [RewardResult(1.0, True, "1", "ok"), RewardResult(-1.0, False, "2", "ok")]  # a kept group (0 < correct < G)


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "Answer: 1"


def _out(n_tokens, reason="stop", rid=None):
    return GenerateOutput(output_ids=[5] * n_tokens, output_logprobs=[-0.5] * n_tokens, finish_reason=reason,
                          prompt_tokens=3, weight_version=None, text="", rid=rid, completion_tokens=n_tokens,
                          finish_reason_detail={}, input_logprobs=None, engine_url="fake")


def _prompts(names):
    """Prompt ``k`` has first token id ``k`` and ground truth ``names[k]`` (how engine and scorer tell them apart)."""
    return [(100 + k, {"reward_model": {"ground_truth": name}, "data_source": "math_dapo"}, [k, 1, 2])
            for k, name in enumerate(names)]


class Log:
    """Events from the event loop and the scoring threads, in the order they happened."""

    def __init__(self):
        self.events: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def before(self, a: str, b: str) -> bool:
        return self.events.index(a) < self.events.index(b)


class FakeEngine:
    """``generate`` of prompt ``k`` waits for ``gates[name]`` (an asyncio.Event; None: no wait) or, for names in
    ``until_abort``, for ``abort(rid)``; then answers G samples of 3 tokens (``finish_reason="abort"`` with 1
    token each when aborted)."""

    def __init__(self, names, log, gates=None, until_abort=()):
        self.names, self.log, self.gates, self.until_abort = names, log, gates or {}, set(until_abort)
        self.aborted: dict[str, asyncio.Event] = {}
        self.abort_calls: list[str] = []
        self.rids: dict[str, str] = {}
        self.abort_seen = threading.Event()

    async def generate(self, input_ids, sp, *, return_logprob=False, rid=None):
        name = self.names[input_ids[0][0]]
        self.rids[name] = rid
        await asyncio.sleep(0)
        if name in self.until_abort:
            await self.aborted.setdefault(rid, asyncio.Event()).wait()
            self.log(f"gen {name} aborted")
            return [_out(1, "abort", rid) for _ in range(G)]
        gate = self.gates.get(name)
        if gate is not None:
            await asyncio.wait_for(gate.wait(), WAIT_S)
        self.log(f"gen {name} done")
        return [_out(3, "stop", rid) for _ in range(G)]

    async def abort(self, rid=None):
        self.abort_calls.append(rid)
        self.aborted.setdefault(rid, asyncio.Event()).set()
        self.abort_seen.set()
        return 1


class FakeScorer:
    """Replaces ``generation.score_batch`` (runs in the scoring threads). Before returning, group ``name``
    waits for ``waits[name]`` (a threading.Event); ``on_start[name]`` is called when its scoring begins."""

    def __init__(self, log, waits=None, on_start=None):
        self.log, self.waits, self.on_start = log, waits or {}, on_start or {}
        self.timed_out: list[str] = []
        self.threads: set[str] = set()

    def __call__(self, texts, ground_truths, data_source):
        name = ground_truths[0]
        self.threads.add(threading.current_thread().name)
        self.log(f"score {name} start")
        if name in self.on_start:
            self.on_start[name]()
        ev = self.waits.get(name)
        if ev is not None and not ev.wait(WAIT_S):
            self.timed_out.append(name)
        self.log(f"score {name} end")
        return list(MIXED)


def _settings(deterministic=False):
    return RolloutSettings(n_samples_per_prompt=G, max_response_length=16, soft_overlong_punishment=False,
                           deterministic=deterministic)


def test_group_b_generates_while_group_a_is_scored(monkeypatch):
    log = Log()
    names = ["A", "B"]
    b_generated = threading.Event()

    async def run():
        loop = asyncio.get_running_loop()
        a_scoring = asyncio.Event()  # B's request finishes only once A's scoring has begun

        def engine_log(event):
            log(event)
            if event == "gen B done":
                b_generated.set()

        engine = FakeEngine(names, engine_log, gates={"B": a_scoring})
        scorer = FakeScorer(log, waits={"A": b_generated},  # A's scoring ends only once B has generated
                            on_start={"A": lambda: loop.call_soon_threadsafe(a_scoring.set)})
        monkeypatch.setattr(generation, "score_batch", scorer)
        sampler = DynamicSampler(2, G)
        sampler.start_step()
        stats = RoundStats()
        queue = _prompts(names)
        await _fill(engine, sampler, lambda k: queue[:k], Tok(), _settings(), stats, 0)
        return scorer, sampler, stats

    scorer, sampler, stats = asyncio.run(run())
    assert scorer.timed_out == [], log.events
    # A is generated, its scoring starts, B finishes generating meanwhile, then A's scoring ends
    assert log.before("gen A done", "score A start"), log.events
    assert log.before("score A start", "gen B done") and log.before("gen B done", "score A end"), log.events
    assert log.before("gen B done", "score B start"), log.events
    assert all(t.startswith("reward-score") for t in scorer.threads)  # the scoring thread pool, not the loop
    batch = sampler.take_batch()
    assert sorted(g.prompt_index for g in batch) == [100, 101]
    assert all(g.correct == [True, False] for g in batch)
    assert stats.rewards == [1.0, -1.0] * 2 and stats.scoring_in_flight == 0
    assert stats.reward_seconds > 0.0


def test_deterministic_path_keeps_prompt_order_when_scoring_finishes_in_reverse(monkeypatch):
    log = Log()
    names = ["P0", "P1", "P2"]
    # P0's scoring waits for P1's end, P1's for P2's end: they run concurrently and complete in reverse order
    p1_end, p2_end = threading.Event(), threading.Event()

    class Client(FakeEngine):
        prompts_per_request = 1

        async def generate(self, input_ids, sp, *, return_logprob=False, rid=None):
            assert len(input_ids) == len(names) and self.prompts_per_request == len(names)  # one ordered request
            self.log("gen all done")
            return [_out(3 + k, "stop") for k in range(len(names)) for _ in range(G)]

    scorer = FakeScorer(log, waits={"P0": p1_end, "P1": p2_end})
    orig = scorer.__call__

    def scored(texts, gts, src):
        res = orig(texts, gts, src)
        {"P1": p1_end, "P2": p2_end}.get(gts[0], threading.Event()).set()
        return res

    monkeypatch.setattr(generation, "score_batch", scored)
    sampler = DynamicSampler(3, G)
    sampler.start_step()
    stats = RoundStats()
    queue = _prompts(names)
    client = Client(names, log)
    asyncio.run(_fill_ordered(client, sampler, lambda k: queue[:k], Tok(), _settings(True), stats, 0))
    assert scorer.timed_out == [], log.events
    assert log.before("score P2 end", "score P1 end") and log.before("score P1 end", "score P0 end"), log.events
    # groups reach the sampler and the statistics in prompt order, as before scoring was concurrent
    assert [g.prompt_index for g in sampler.take_batch()] == [100, 101, 102]
    assert stats.lengths == [3, 3, 4, 4, 5, 5]
    assert client.prompts_per_request == 1


def test_a_group_being_scored_when_the_sampler_fills_is_kept_not_aborted(monkeypatch):
    log = Log()
    names = ["A", "B", "C"]

    async def run():
        a_scoring = asyncio.Event()
        # A generates first and is still being scored when B fills the sampler; C is generating and gets aborted
        engine = FakeEngine(names, log, gates={"B": a_scoring}, until_abort={"C"})
        loop = asyncio.get_running_loop()
        scorer = FakeScorer(log, waits={"A": engine.abort_seen},
                            on_start={"A": lambda: loop.call_soon_threadsafe(a_scoring.set)})
        monkeypatch.setattr(generation, "score_batch", scorer)
        sampler = DynamicSampler(1, G, oversample_factor=3.0)
        sampler.start_step()
        assert sampler.num_prompts_to_request() == 3
        queue = _prompts(names)
        await _fill(engine, sampler, lambda k: queue[:k], Tok(), _settings(), RoundStats(), 0)
        return engine, scorer, sampler

    engine, scorer, sampler = asyncio.run(run())
    assert scorer.timed_out == [], log.events
    assert engine.abort_calls == [engine.rids["C"]]  # only the request still generating
    assert log.before("score A start", "gen B done") and log.before("score B end", "score A end"), log.events
    assert "gen C aborted" in log.events and "gen C done" not in log.events
    m = sampler.metrics()
    assert (m["prompts_tried"], m["kept_groups"], m["aborted_requests"]) == (2, 2, 1)
    assert [g.prompt_index for g in sampler.take_batch()] == [101]  # B filled the batch; A is surplus


def test_a_scoring_failure_after_the_sampler_fills_is_raised_not_counted_as_aborted(monkeypatch):
    log = Log()
    names = ["A", "B"]

    async def run():
        a_scoring = asyncio.Event()
        engine = FakeEngine(names, log, gates={"B": a_scoring})
        loop = asyncio.get_running_loop()
        sampler = DynamicSampler(1, G, oversample_factor=2.0)
        sampler.start_step()

        def score(texts, gts, src):
            if gts[0] == "A":  # fails only once B has filled the sampler (the abort path awaits it)
                loop.call_soon_threadsafe(a_scoring.set)
                deadline = time.monotonic() + WAIT_S
                while not sampler.is_full and time.monotonic() < deadline:
                    time.sleep(0.001)
                log(f"A fails, sampler full: {sampler.is_full}")
                raise RuntimeError("math-verify workers cannot start")
            return list(MIXED)

        monkeypatch.setattr(generation, "score_batch", score)
        queue = _prompts(names)
        await _fill(engine, sampler, lambda k: queue[:k], Tok(), _settings(), RoundStats(), 0)

    with pytest.raises(RuntimeError, match="math-verify workers cannot start"):
        asyncio.run(run())
    assert log.events[-1] == "A fails, sampler full: True", log.events


def test_reward_seconds_is_the_union_of_scoring_intervals():
    stats = RoundStats()
    # A scored over [0, 3], B over [1, 4] (overlapping), C over [10, 12]: busy 4 + 2 seconds, not 3 + 3 + 2
    stats.scoring_started(now=0.0)
    stats.scoring_started(now=1.0)
    stats.scoring_finished(now=3.0)
    stats.scoring_finished(now=4.0)
    stats.scoring_started(now=10.0)
    stats.scoring_finished(now=12.0)
    assert stats.reward_seconds == 6.0 and stats.scoring_in_flight == 0
    with pytest.raises(RuntimeError, match="without a matching scoring_started"):
        stats.scoring_finished()
