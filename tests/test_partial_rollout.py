"""Partial rollout (``rollout.mode: partial``): aborted samples are parked and continued the next step.

A fake engine scripts each prompt: a ``"done"`` prompt answers at once; a ``"hold"`` prompt waits for
``abort(rid)`` and then answers with the per-sample outputs of its script (finished samples and aborted
prefixes, what SGLang / vLLM / the CPU engine return on abort). Continuation requests (``n = 1``, input =
prompt + prefix) answer from a per-(prompt, sample) script. No sleeps: completion order is the event loop's.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from megatron_dapo.algorithm import DynamicSampler, Group, PendingGroup
from megatron_dapo.algorithm.dynamic_sampling import StaleReset, reset_stale_samples
from megatron_dapo.rollout.generation import PartialRolloutStats, RolloutSettings, RoundStats, collect_batch
from megatron_dapo.engines.payloads import GenerateOutput

G = 2
CORRECT, WRONG = 7, 8  # token ids the fake tokenizer decodes as a right / wrong answer
MAX_LEN = 16


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "Answer: 42" if ids and ids[-1] == CORRECT else "Answer: 41"


def _out(ids, reason, lps=None, rid=None):
    lps = [-0.5] * len(ids) if lps is None else lps
    return GenerateOutput(output_ids=list(ids), output_logprobs=list(lps), finish_reason=reason, prompt_tokens=3,
                          weight_version=None, rid=rid, completion_tokens=len(ids), engine_url="fake")


class FakeEngine:
    """``script[p]`` of prompt ``p`` (its first token id): ``("done", [outs])`` or ``("hold", [outs on abort])``;
    ``cont[(p, j)]``: ``("done" | "hold", out)`` for a continuation of sample ``j``. Every call is recorded."""

    def __init__(self, script, cont=None):
        self.script, self.cont = script, cont or {}
        self.calls: list[dict] = []
        self.abort_calls: list[str] = []
        self._aborted: dict[str, asyncio.Event] = {}

    def _event(self, rid):
        return self._aborted.setdefault(rid, asyncio.Event())

    async def generate(self, input_ids, sp, *, return_logprob=False, rid=None):
        assert len(input_ids) == 1
        p = input_ids[0][0]
        self.calls.append({"input_ids": list(input_ids[0]), "sp": dict(sp), "rid": rid})
        if sp["n"] == G:
            mode, outs = self.script[p]
        else:
            assert sp["n"] == 1
            mode, out = self.cont[(p, int(rid.rsplit("-s", 1)[1]))]
            outs = [out]
        await asyncio.sleep(0)
        if mode == "hold":
            await asyncio.wait_for(self._event(rid).wait(), 30)
        return [dataclasses_replace(o, rid=rid) for o in outs]

    async def abort(self, rid=None):
        self.abort_calls.append(rid)
        for key in [r["rid"] for r in self.calls if r["rid"] == rid or r["rid"].startswith(f"{rid}-")]:
            self._event(key).set()
        return 1


def dataclasses_replace(o, **kw):
    import dataclasses

    return dataclasses.replace(o, **kw)


class SyncClient:
    """What ``collect_batch`` needs of :class:`~megatron_dapo.engines.client.SyncEngineClient`."""

    def __init__(self, engine):
        self.client = engine

    def run(self, coro):
        return asyncio.run(coro)


def _row():
    return {"reward_model": {"ground_truth": "42"}, "data_source": "math_dapo"}


class Prompts:
    """Dataset stand-in: prompt ``k`` has index ``100 + k`` and ids ``[k, 1, 2]``; records each request size."""

    def __init__(self, first: int = 0):
        self.next, self.asked = first, []

    def __call__(self, n):
        self.asked.append(n)
        out = [(100 + k, _row(), [k, 1, 2]) for k in range(self.next, self.next + n)]
        self.next += n
        return out


MIXED = ("done", [_out([5, CORRECT], "stop"), _out([5, WRONG], "stop")])
ALL_WRONG = ("done", [_out([5, WRONG], "stop"), _out([5, WRONG], "stop")])
# aborted while sample 0 had finished (correct) and sample 1 had generated 3 tokens
HELD = ("hold", [_out([5, CORRECT], "stop", [-0.01, -0.02]), _out([5, 5, 5], "abort", [-0.1, -0.2, -0.3])])


def _settings(partial=True, max_age=1):
    return RolloutSettings(n_samples_per_prompt=G, max_response_length=MAX_LEN, soft_overlong_punishment=False,
                           stop_token_ids=[9], partial_rollout=partial, partial_max_age=max_age)


def _sampler():
    return DynamicSampler(1, G, oversample_factor=2.0)


def _step0(engine_script, partial=True):
    """Step 0: prompt 0 (mixed) fills the sampler, prompt 1 is held and aborted."""
    sampler, prompts = _sampler(), Prompts()
    engine = FakeEngine(engine_script)
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(partial), step=0)
    return sampler, prompts, engine, batch, stats


def test_aborted_sample_is_continued_next_step_with_prefix_logprobs_and_versions():
    sampler, prompts, engine, batch, stats = _step0({0: MIXED, 1: HELD})
    assert [g.prompt_index for g in batch] == [100] and batch[0].token_versions == [[[0, 2, 0]], [[0, 2, 0]]]
    assert len(engine.abort_calls) == 1 and sampler.num_pending == 1
    m = stats.metrics()
    assert (m["partial_parked"], m["partial_pending"], m["partial_continued"]) == (1.0, 1.0, 0.0)
    assert m["generated_tokens"] == 4 + 5 and m["trained_tokens"] == 4  # the held group's 5 tokens were generated
    pending = sampler.state_dict()["pending"][0]
    assert pending["responses"] == [[5, CORRECT], [5, 5, 5]] and pending["finish_reasons"] == ["stop", "abort"]
    assert pending["token_versions"] == [[[0, 2, 0]], [[0, 3, 0]]]

    # step 1 (weights version 1): the parked group comes first, then one new prompt (held -> parked again)
    engine2 = FakeEngine({2: HELD}, cont={(1, 1): ("done", _out([6, WRONG], "stop", [-0.4, -0.5]))})
    batch, stats = collect_batch(SyncClient(engine2), sampler, prompts, Tok(), _settings(), step=1)
    assert prompts.asked == [2, 1]  # want 2: one parked group + one new prompt
    cont = [c for c in engine2.calls if c["sp"]["n"] == 1]
    assert len(cont) == 1  # only the unfinished sample is resubmitted
    assert cont[0]["input_ids"] == [1, 1, 2, 5, 5, 5]  # prompt + prefix
    assert cont[0]["sp"]["max_new_tokens"] == MAX_LEN - 3
    assert cont[0]["rid"].endswith("-s1")
    (g,) = batch
    assert g.prompt_index == 101 and g.prompt_ids == [1, 1, 2]
    assert g.responses == [[5, CORRECT], [5, 5, 5, 6, WRONG]]
    assert g.rollout_logprobs == [[-0.01, -0.02], [-0.1, -0.2, -0.3, -0.4, -0.5]]
    assert g.finish_reasons == ["stop", "stop"] and g.correct == [True, False]
    assert g.token_versions == [[[0, 2, 0]], [[0, 3, 0], [3, 5, 1]]]
    m = stats.metrics()
    assert (m["partial_continued"], m["partial_tokens_reused"], m["partial_dropped_stale"]) == (1.0, 3.0, 0.0)
    assert (m["partial_parked"], m["partial_pending"]) == (1.0, 1.0)  # prompt 2 was held and parked
    assert m["generated_tokens"] == 2 + 5 and m["trained_tokens"] == 7  # 5 of the 7 trained tokens were reused
    assert m["offpolicy_prefix_tokens"] == 3  # the continued sample's prefix came from version 0, the rest from 1
    d = sampler.metrics()
    assert d["generated_response_tokens"] == 7 and d["batch_response_tokens"] == 7  # reused tokens not recounted


def test_a_continuation_aborted_again_grows_another_span():
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: HELD})
    # step 1: the continuation is held (aborted again with 2 more tokens); a new prompt fills the sampler
    engine = FakeEngine({2: MIXED}, cont={(1, 1): ("hold", _out([6, 6], "abort", [-0.4, -0.5]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=2), step=1)
    assert [g.prompt_index for g in batch] == [102]
    assert stats.metrics()["generated_tokens"] == 4 + 2
    (p,) = sampler.state_dict()["pending"]
    assert p["responses"][1] == [5, 5, 5, 6, 6] and p["token_versions"][1] == [[0, 3, 0], [3, 5, 1]]
    assert p["rollout_logprobs"][1] == [-0.1, -0.2, -0.3, -0.4, -0.5]
    # step 2 with partial_max_age=2: continued once more (oldest token is 2 versions old)
    engine = FakeEngine({3: HELD}, cont={(1, 1): ("done", _out([WRONG], "stop", [-0.6]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=2), step=2)
    (cont,) = [c for c in engine.calls if c["sp"]["n"] == 1]
    assert cont["input_ids"] == [1, 1, 2, 5, 5, 5, 6, 6] and cont["sp"]["max_new_tokens"] == MAX_LEN - 5
    assert batch[0].token_versions[1] == [[0, 3, 0], [3, 5, 1], [5, 6, 2]]
    assert stats.metrics()["offpolicy_prefix_tokens"] == 5  # versions 0 and 1 under the final token's 2
    assert batch[0].responses[1] == [5, 5, 5, 6, 6, WRONG]


def test_an_all_stale_group_is_regenerated_from_scratch_not_dropped():
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: HELD})
    # step 2 (version 2) with partial_max_age=1: both samples of the parked group hold version-0 tokens
    engine = FakeEngine({2: ALL_WRONG}, cont={(1, 0): ("done", _out([6, CORRECT], "stop", [-0.4, -0.5])),
                                              (1, 1): ("done", _out([WRONG], "stop", [-0.6]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=1), step=2)
    m = stats.metrics()
    # the finished sample (2 tokens) and the prefix (3 tokens) were reset; nothing was sent with a prefix
    assert (m["partial_dropped_stale"], m["partial_tokens_dropped"]) == (2.0, 5.0)
    assert (m["partial_continued"], m["partial_tokens_reused"]) == (0.0, 0.0)
    cont = sorted((c["rid"][-3:], c["input_ids"], c["sp"]["max_new_tokens"]) for c in engine.calls if c["sp"]["n"] == 1)
    assert cont == [("-s0", [1, 1, 2], MAX_LEN), ("-s1", [1, 1, 2], MAX_LEN)]  # the prompt alone, full budget
    assert prompts.asked == [2, 1]  # the group kept its place: one parked group + one new prompt
    (g,) = batch
    assert g.prompt_index == 101 and g.responses == [[6, CORRECT], [WRONG]] and g.correct == [True, False]
    assert g.rollout_logprobs == [[-0.4, -0.5], [-0.6]] and g.token_versions == [[[0, 2, 2]], [[0, 1, 2]]]
    assert m["generated_tokens"] == 3 + 4 and sampler.metrics()["generated_response_tokens"] == 7  # reused 0
    assert sampler.num_pending == 0


HELD_EMPTY = ("hold", [_out([], "abort", []), _out([5, 5, 5], "abort", [-0.1, -0.2, -0.3])])


def test_a_group_aborted_twice_keeps_its_prompt_and_fresh_samples():
    # step 0: prompt 1 is aborted before sample 0 produced a token; sample 1 has a 3-token prefix (version 0)
    sampler, prompts, _, _, stats = _step0({0: MIXED, 1: HELD_EMPTY})
    assert stats.partial.parked == 1
    # step 1 (version 1): sample 0 finishes, sample 1's continuation is aborted again (a second span)
    engine = FakeEngine({2: MIXED}, cont={(1, 0): ("done", _out([6, CORRECT], "stop", [-0.4, -0.5])),
                                          (1, 1): ("hold", _out([6, 6], "abort", [-0.6, -0.7]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=1), step=1)
    assert [g.prompt_index for g in batch] == [102]
    (p,) = sampler.state_dict()["pending"]
    assert p["token_versions"] == [[[0, 2, 1]], [[0, 3, 0], [3, 5, 1]]]
    # step 2 (version 2): sample 1 holds a version-0 token -> reset; sample 0 (version 1) is kept
    engine = FakeEngine({3: ALL_WRONG}, cont={(1, 1): ("done", _out([WRONG], "stop", [-0.8]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=1), step=2)
    m = stats.metrics()
    assert (m["partial_dropped_stale"], m["partial_tokens_dropped"]) == (1.0, 5.0)
    assert (m["partial_continued"], m["partial_tokens_reused"]) == (0.0, 0.0)
    (cont,) = [c for c in engine.calls if c["sp"]["n"] == 1]  # only the reset sample is generated
    assert cont["rid"].endswith("-s1") and cont["input_ids"] == [1, 1, 2] and cont["sp"]["max_new_tokens"] == MAX_LEN
    (g,) = batch
    assert g.prompt_index == 101 and g.responses == [[6, CORRECT], [WRONG]] and g.correct == [True, False]
    assert g.rollout_logprobs == [[-0.4, -0.5], [-0.8]] and g.token_versions == [[[0, 2, 1]], [[0, 1, 2]]]
    # the kept sample's 2 tokens were generated in step 1: only the new token and prompt 3's count now
    assert m["generated_tokens"] == 1 + 4 and sampler.metrics()["generated_response_tokens"] == 5
    # an explicit weight_version overrides the step (e.g. one-step off-policy): version 1 is young enough
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: HELD})
    engine = FakeEngine({2: ALL_WRONG}, cont={(1, 1): ("done", _out([WRONG], "stop"))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(max_age=1), step=2,
                                 weight_version=1)
    assert stats.metrics()["partial_continued"] == 1.0 and batch[0].token_versions[1][-1] == [3, 4, 1]


def test_prefix_at_the_length_limit_or_ending_in_stop_finishes_without_a_request():
    # sample 0 was aborted at the length limit (correct), sample 1 right after its stop token 9 (wrong)
    full = ("hold", [_out([5] * (MAX_LEN - 1) + [CORRECT], "abort"), _out([5, 9], "abort")])
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: full})
    engine = FakeEngine({2: HELD})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(), step=1)
    assert all(c["sp"]["n"] == G for c in engine.calls)  # no continuation request was needed
    (g,) = batch
    assert g.prompt_index == 101 and g.finish_reasons == ["length", "stop"] and g.correct == [True, False]
    assert g.token_versions == [[[0, MAX_LEN, 0]], [[0, 2, 0]]]
    assert stats.metrics()["partial_continued"] == 0.0


def test_state_dict_round_trip_restores_the_parked_groups():
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: HELD})
    state = json.loads(json.dumps(sampler.state_dict()))  # what trainer_state.json holds
    restored = _sampler()
    restored.load_state_dict(state)
    assert restored.num_pending == 1 and restored.state_dict() == sampler.state_dict()
    # the restored sampler continues exactly as the original would
    runs = []
    for s in (sampler, restored):
        engine = FakeEngine({2: ALL_WRONG}, cont={(1, 1): ("done", _out([6, WRONG], "stop", [-0.4, -0.5]))})
        batch, _ = collect_batch(SyncClient(engine), s, Prompts(2), Tok(), _settings(), step=1)
        runs.append(([g.to_dict() for g in batch], [(c["input_ids"], c["sp"]["max_new_tokens"]) for c in engine.calls]))
    assert runs[0] == runs[1]
    # an older checkpoint without parked groups still loads
    del state["pending"]
    old = _sampler()
    old.load_state_dict(state)
    assert old.num_pending == 0


def test_partial_rollout_off_changes_nothing():
    sampler, prompts, engine, batch, stats = _step0({0: MIXED, 1: HELD}, partial=False)
    assert sampler.num_pending == 0 and "pending" in sampler.state_dict() and sampler.state_dict()["pending"] == []
    m = stats.metrics()
    assert stats.partial is None and not [k for k in m if k.startswith("partial_")]
    assert m["generated_tokens"] == 9 and m["trained_tokens"] == 4
    d = sampler.metrics()
    assert (d["aborted_requests"], d["generated_response_tokens"]) == (1.0, 9.0)  # aborted tokens counted as before
    engine = FakeEngine({2: MIXED, 3: ALL_WRONG})
    collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(partial=False), step=1)
    assert prompts.asked == [2, 2] and all(c["sp"]["n"] == G for c in engine.calls)
    # groups parked by an earlier run with partial rollout are dropped (counted) when it is turned off
    sampler, prompts, _, _, _ = _step0({0: MIXED, 1: HELD})
    _, stats = collect_batch(SyncClient(FakeEngine({2: MIXED, 3: ALL_WRONG})), sampler, prompts, Tok(),
                             _settings(partial=False), step=1)
    assert sampler.num_pending == 0 and stats.partial is None  # dropped, not continued nor reported


def test_pending_group_and_token_versions_validation():
    with pytest.raises(ValueError, match=r"token_versions\[1\] span \[1, 2, 0\] does not continue at token 0"):
        Group(0, [1], [[1], [2, 3]], [1.0, 0.0], [True, False], ["stop", "stop"],
              token_versions=[[[0, 1, 0]], [[1, 2, 0]]])
    with pytest.raises(ValueError, match=r"token_versions\[0\] covers 1 tokens of a 2-token response"):
        Group(0, [1], [[1, 2]], [1.0], [True], ["stop"], token_versions=[[[0, 1, 0]]])
    pg = PendingGroup(5, [1, 2], _row(), [[3], []], None, ["stop", "abort"], [[[0, 1, 4]], []])
    assert (pg.unfinished, pg.oldest_version, pg.num_prefix_samples) == ([1], 4, 0)
    assert PendingGroup.from_dict(json.loads(json.dumps(pg.to_dict()))) == pg
    with pytest.raises(ValueError, match="finish_reasons has 1 entries"):
        PendingGroup(5, [1], _row(), [[3], []], None, ["stop"], [[[0, 1, 4]], []])
    sampler = _sampler()
    with pytest.raises(ValueError, match="expected n_samples_per_prompt=2"):
        sampler.add_pending(PendingGroup(5, [1], _row(), [[3]], None, ["abort"], [[[0, 1, 4]]]))
    with pytest.raises(TypeError, match="PendingGroup"):
        sampler.add_pending(pg.to_dict())


def test_config_validates_partial_rollout_keys():
    from megatron_dapo.config import ConfigError, DAPOConfig, load_config

    cfg = DAPOConfig()
    assert cfg.rollout.mode == "streaming" and cfg.rollout.partial_max_age == 1
    cfg.model.make_tiny, cfg.model.hf_path = True, "unused"
    # partial rollout and deterministic rounds are one key's values: the pair cannot be asked for; the old
    # booleans are refused in one line naming rollout.mode
    for key, value in (("partial_rollout", "partial"), ("deterministic", "deterministic")):
        with pytest.raises(ConfigError, match=rf"^rollout\.{key} was removed: set rollout\.mode \({value} for true,"):
            load_config(None, [f"rollout.{key}=true"], validate=False)
    with pytest.raises(ConfigError, match="rollout.mode: must be one of streaming, deterministic, partial"):
        load_config(None, ["rollout.mode=both"], validate=False)
    cfg.rollout.mode = "both"
    with pytest.raises(ConfigError, match="rollout.mode: must be streaming, deterministic or partial"):
        cfg.validate(target="cluster")
    cfg.rollout.mode = "partial"
    cfg.validate(target="cluster")
    cfg.rollout.partial_max_age = 0
    with pytest.raises(ConfigError, match="rollout.partial_max_age: must be an int >= 1"):
        cfg.validate(target="cluster")


def test_generated_per_trained_token_sums_over_steps():
    from megatron_dapo.rollout.generation import generated_per_trained_token

    steps = [{"rollout/generated_tokens": 30.0, "rollout/trained_tokens": 10.0},
             {"rollout/generated_tokens": 10.0, "rollout/trained_tokens": 10.0}]
    assert generated_per_trained_token(steps) == pytest.approx(2.0)  # 40 / 20, not the mean of 3 and 1
    with pytest.raises(ValueError, match=r"step metrics #0 lack \['rollout/trained_tokens'\]"):
        generated_per_trained_token([{"rollout/generated_tokens": 1.0}])
    with pytest.raises(ValueError, match="no trained tokens"):
        generated_per_trained_token([])


# ------------------------------------------------------------------------- stale samples, hand-built groups
def _pg(responses, finish, spans, logprobs=True):
    lps = [[-0.1 * (t + 1) for t in range(len(r))] for r in responses] if logprobs else None
    return PendingGroup(7, [1, 2], _row(), [list(r) for r in responses], lps, list(finish), spans)


def test_reset_stale_samples_keeps_fresh_samples_of_a_group_aborted_twice():
    # sample 0 finished in version 1; sample 1 parked at version 0 and again at 1; sample 2 finished at version 0;
    # sample 3 had not produced a token
    pg = _pg([[3, 4], [5, 5, 5, 6, 6], [7, 7, 7, 7], []], ["stop", "abort", "length", "abort"],
             [[[0, 2, 1]], [[0, 3, 0], [3, 5, 1]], [[0, 4, 0]], []])
    before = pg.to_dict()
    r = reset_stale_samples(pg, version=2, max_age=1)
    assert isinstance(r, StaleReset) and r.reset == (1, 2) and r.tokens_dropped == 9
    assert pg.to_dict() == before  # pure: the input is unchanged
    g = r.group
    assert (g.prompt_index, g.prompt_ids, g.row) == (7, [1, 2], _row())
    assert g.responses == [[3, 4], [], [], []] and g.finish_reasons == ["stop", "abort", "abort", "abort"]
    assert g.rollout_logprobs == [pg.rollout_logprobs[0], [], [], []]
    assert g.token_versions == [[[0, 2, 1]], [], [], []] and g.unfinished == [1, 2, 3]
    assert (g.num_response_tokens, g.num_prefix_samples, g.oldest_version) == (2, 0, 1)
    # the reset group survives a checkpoint as it is
    assert PendingGroup.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_reset_stale_samples_all_stale_group_comes_back_as_g_empty_samples():
    pg = _pg([[3, 4], [5, 5, 5]], ["stop", "abort"], [[[0, 2, 0]], [[0, 3, 0]]], logprobs=False)
    r = reset_stale_samples(pg, version=5, max_age=2)
    assert r.reset == (0, 1) and r.tokens_dropped == 5
    assert r.group.responses == [[], []] and r.group.finish_reasons == ["abort", "abort"]
    assert r.group.rollout_logprobs is None and r.group.token_versions == [[], []]
    assert r.group.unfinished == [0, 1] and r.group.oldest_version is None


def test_reset_stale_samples_max_age_semantics():
    spans = [[[0, 1, 3]], [[0, 1, 2], [1, 2, 4]], [[0, 1, 5]], []]
    pg = _pg([[1], [2, 3], [4], []], ["stop", "abort", "abort", "abort"], spans)
    assert pg.sample_oldest_versions == [3, 2, 5, None]
    # age = version - span version; a sample is reset when its oldest token's age exceeds max_age
    assert reset_stale_samples(pg, 4, 2).reset == ()  # ages 1, 2 (the bound itself is kept), 0 (a newer one)
    assert reset_stale_samples(pg, 5, 2).reset == (1,)  # age 3 > 2
    assert reset_stale_samples(pg, 5, 0).reset == (0, 1)  # max_age 0: only the current version is kept
    assert reset_stale_samples(pg, 0, 0).reset == ()  # tokens newer than the engines' are never stale
    r = reset_stale_samples(pg, 4, 2)
    assert r.group is pg and r.tokens_dropped == 0  # nothing stale: the same group comes back
    with pytest.raises(ValueError, match="max_age must be an int >= 0"):
        reset_stale_samples(pg, 4, -1)
    with pytest.raises(ValueError, match="max_age must be an int >= 0"):
        reset_stale_samples(pg, 4, True)
    with pytest.raises(ValueError, match="version must be an int"):
        reset_stale_samples(pg, 4.0, 1)
    with pytest.raises(TypeError, match="expects a PendingGroup"):
        reset_stale_samples(pg.to_dict(), 4, 1)


def test_sampler_resets_stale_pending_in_place_and_drops_all_when_off():
    sampler = _sampler()
    old = _pg([[3], [5, 5]], ["stop", "abort"], [[[0, 1, 0]], [[0, 2, 1]]])
    young = _pg([[3], [5]], ["abort", "abort"], [[[0, 1, 1]], [[0, 1, 1]]])
    sampler.add_pending(old)
    sampler.add_pending(young)
    (r,) = sampler.reset_stale_pending(version=2, max_age=1)
    assert r.reset == (0,) and r.tokens_dropped == 1
    assert sampler.num_pending == 2  # no group is lost; the order is kept
    first, second = sampler.take_pending(2)
    assert first == r.group and first.responses == [[], [5, 5]] and second == young
    sampler.add_pending(old)
    sampler.add_pending(young)
    assert sampler.drop_pending() == [old, young] and sampler.num_pending == 0


def test_older_checkpoint_pending_group_loads_and_ages():
    # a parked group as trainer_state.json held it before per-sample staleness (same keys)
    state = {"prompt_index": 3, "prompt_ids": [1, 2], "row": _row(), "responses": [[4, 5], [6]],
             "rollout_logprobs": [[-0.1, -0.2], [-0.3]], "finish_reasons": ["stop", "abort"],
             "token_versions": [[[0, 2, 0]], [[0, 1, 1]]]}
    sampler = _sampler()
    sampler.load_state_dict({"config": {"rollout_batch_size": 1, "n_samples_per_prompt": G}, "counts": {},
                             "taken": False, "kept": [], "carry": [], "pending": [state]})
    (r,) = sampler.reset_stale_pending(2, 1)
    assert r.reset == (0,) and sampler.state_dict()["pending"][0]["responses"] == [[], [6]]


def test_partial_rollout_stats_metric_names_and_round_stats_holder():
    p = PartialRolloutStats(parked=1, continued=2, tokens_reused=3, dropped_stale=4, tokens_dropped=5, pending=6)
    assert p.metrics() == {"partial_parked": 1.0, "partial_continued": 2.0, "partial_tokens_reused": 3.0,
                           "partial_dropped_stale": 4.0, "partial_tokens_dropped": 5.0, "partial_pending": 6.0}
    p.record_stale([StaleReset(_pg([[1], []], ["abort", "abort"], [[[0, 1, 0]], []]), (0, 1), 7)])
    assert (p.dropped_stale, p.tokens_dropped) == (6, 12)
    on, off = RoundStats(partial=p).metrics(), RoundStats().metrics()
    assert {k: v for k, v in on.items() if k.startswith("partial_")} == p.metrics()
    assert set(on) - set(off) == set(p.metrics()) and {k: on[k] for k in off} == off


def test_fill_refuses_partial_rollout_without_its_counters():
    import asyncio as aio

    from megatron_dapo.rollout.generation import _fill

    with pytest.raises(ValueError, match="RoundStats.partial is None"):
        aio.run(_fill(FakeEngine({}), _sampler(), Prompts(), Tok(), _settings(), RoundStats(), 0))


def _carrying_sampler(oversample: float = 3.0):
    return DynamicSampler(1, G, oversample_factor=oversample, carry_over_surplus=True)


def test_surplus_groups_are_carried_and_a_carried_group_grown_stale_is_parked_and_regenerated():
    # step 0 (version 0): three mixed groups finish (in the event loop's order), one fills the batch, two are
    # surplus and carried
    sampler, prompts = _carrying_sampler(), Prompts()
    engine = FakeEngine({0: MIXED, 1: MIXED, 2: MIXED})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(), step=0)
    carried = [g["prompt_index"] for g in sampler.state_dict()["carry"]]
    assert len(batch) == 1 and sorted(carried + [batch[0].prompt_index]) == [100, 101, 102]
    assert sampler.metrics()["surplus_carried"] == 2
    assert (stats.metrics()["token_age_mean"], stats.metrics()["token_age_max"]) == (0.0, 0.0)
    # step 1 (version 1): the first carried group fills the batch at once, nothing is generated; its tokens are 1 old
    engine = FakeEngine({})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(), step=1)
    assert [g.prompt_index for g in batch] == carried[:1] and engine.calls == [] and prompts.asked == [3]
    m, d = stats.metrics(), sampler.metrics()
    assert (m["token_age_mean"], m["token_age_max"], m["generated_tokens"]) == (1.0, 1.0, 0.0)
    assert (d["carried_in"], d["carried_stale"], d["surplus_carried"]) == (2.0, 0.0, 1.0)
    # step 2 (version 2, partial_max_age=1): the last carried group holds version-0 tokens, 2 versions old. It is
    # parked, both samples are reset and generated again from the prompt; the group keeps its place first in line
    k = carried[1] - 100
    engine = FakeEngine({3: ALL_WRONG, 4: ALL_WRONG}, cont={(k, 0): ("done", _out([6, CORRECT], "stop", [-0.4, -0.5])),
                                                            (k, 1): ("done", _out([WRONG], "stop", [-0.6]))})
    batch, stats = collect_batch(SyncClient(engine), sampler, prompts, Tok(), _settings(), step=2)
    m, d = stats.metrics(), sampler.metrics()
    assert (d["carried_in"], d["carried_stale"]) == (0.0, 1.0)
    assert (m["partial_dropped_stale"], m["partial_tokens_dropped"], m["partial_tokens_reused"]) == (2.0, 4.0, 0.0)
    assert prompts.asked == [3, 2]  # want 3: the parked group + two new prompts
    cont = sorted((c["rid"][-3:], c["input_ids"], c["sp"]["max_new_tokens"]) for c in engine.calls if c["sp"]["n"] == 1)
    assert cont == [("-s0", [k, 1, 2], MAX_LEN), ("-s1", [k, 1, 2], MAX_LEN)]
    (g,) = batch
    assert g.prompt_index == carried[1] and g.responses == [[6, CORRECT], [WRONG]] and g.correct == [True, False]
    assert g.token_versions == [[[0, 2, 2]], [[0, 1, 2]]] and g.meta["ground_truth"] == "42"
    assert (m["token_age_mean"], m["token_age_max"]) == (0.0, 0.0)


def test_without_partial_rollout_carried_groups_have_no_age_bound():
    sampler, prompts = _carrying_sampler(), Prompts()
    collect_batch(SyncClient(FakeEngine({0: MIXED, 1: MIXED, 2: MIXED})), sampler, prompts, Tok(),
                  _settings(partial=False), step=0)
    carried = [g["prompt_index"] for g in sampler.state_dict()["carry"]]
    for step, index in ((1, carried[0]), (2, carried[1])):
        batch, stats = collect_batch(SyncClient(FakeEngine({})), sampler, prompts, Tok(), _settings(partial=False),
                                     step=step)
        assert [g.prompt_index for g in batch] == [index] and stats.metrics()["token_age_max"] == float(step)
    assert sampler.metrics()["carried_stale"] == 0.0 and sampler.num_pending == 0


def test_one_step_off_ages_count_from_the_trained_policy():
    # the engines hold version 0 while the batch will be trained at step 1: fresh tokens are 1 old
    sampler, prompts = _carrying_sampler(), Prompts()
    batch, stats = collect_batch(SyncClient(FakeEngine({0: MIXED, 1: MIXED, 2: MIXED})), sampler, prompts, Tok(),
                                 _settings(), step=1, weight_version=0)
    assert batch[0].token_versions == [[[0, 2, 0]], [[0, 2, 0]]] and stats.metrics()["token_age_max"] == 1.0
    # next batch: engines at version 1, trained at step 2; a carried group (version 0) is 1 version old for the
    # engines (kept, partial_max_age=1) and 2 for the trained policy
    batch, stats = collect_batch(SyncClient(FakeEngine({})), sampler, prompts, Tok(), _settings(), step=2,
                                 weight_version=1)
    assert len(batch) == 1 and stats.metrics()["token_age_max"] == 2.0


def test_token_ages_are_token_weighted():
    from megatron_dapo.rollout.generation import token_ages

    a = Group(0, [1], [[1, 2, 3, 4, 5], [6]], [1.0, 0.0], [True, False], ["stop", "stop"],
              token_versions=[[[0, 3, 0], [3, 5, 1]], [[0, 1, 2]]])
    b = Group(1, [1], [[1]], [1.0], [True], ["stop"])  # unknown versions: skipped
    assert token_ages([a, b], 2) == (pytest.approx((3 * 2 + 2 * 1 + 1 * 0) / 6), 2)
    assert token_ages([b], 2) == (0.0, 0) and token_ages([], 5) == (0.0, 0)


def test_pending_group_from_group_and_start_step_validation():
    g = Group(7, [1, 2], [[3, 4], [5]], [1.0, -1.0], [True, False], ["stop", "length"],
              rollout_logprobs=[[-0.1, -0.2], [-0.3]],
              meta={"ground_truth": "42", "data_source": "gsm8k"}, token_versions=[[[0, 2, 3]], [[0, 1, 3]]])
    pg = PendingGroup.from_group(g)
    assert pg == PendingGroup(7, [1, 2], {"reward_model": {"ground_truth": "42"}, "data_source": "gsm8k"},
                              [[3, 4], [5]], [[-0.1, -0.2], [-0.3]], ["stop", "length"], [[[0, 2, 3]], [[0, 1, 3]]])
    assert pg.unfinished == [] and pg.responses is not g.responses
    with pytest.raises(ValueError, match=r"Group\(prompt_index=7\): meta has no 'ground_truth'"):
        PendingGroup.from_group(Group(7, [1], [[3]], [1.0], [True], ["stop"], token_versions=[[[0, 1, 0]]]))
    with pytest.raises(ValueError, match="token_versions is None"):
        PendingGroup.from_group(Group(7, [1], [[3]], [1.0], [True], ["stop"], meta={"ground_truth": "1"}))
    s = _carrying_sampler()
    with pytest.raises(ValueError, match="give both version and max_age"):
        s.start_step(3)
    with pytest.raises(ValueError, match="max_age must be an int >= 0"):
        s.start_step(3, -1)
    with pytest.raises(ValueError, match="version must be an int"):
        s.start_step("3", 1)


def test_config_carry_over_surplus_follows_partial_rollout_unless_set():
    from megatron_dapo.config import load_config

    assert load_config(None, [], validate=False).carries_surplus() is False
    assert load_config(None, ["rollout.mode=deterministic"], validate=False).carries_surplus() is False
    assert load_config(None, ["rollout.mode=partial"], validate=False).carries_surplus() is True
    explicit_off = ["rollout.mode=partial", "algorithm.carry_over_surplus=false"]
    assert load_config(None, explicit_off, validate=False).carries_surplus() is False
    assert load_config(None, ["algorithm.carry_over_surplus=true"], validate=False).carries_surplus() is True
