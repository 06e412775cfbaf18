"""Tests of megatron_dapo.algorithm.dynamic_sampling (DAPO dynamic sampling bookkeeping)."""
from __future__ import annotations

import json

import pytest

from megatron_dapo.algorithm import DynamicSampler, DynamicSamplingExhausted, Group

G = 4


def make_group(idx: int, n_correct: int, resp_len: int = 5, g: int = G, with_logprobs: bool = False) -> Group:
    """A group of ``g`` responses of ``resp_len`` tokens, the first ``n_correct`` correct."""
    responses = [[idx * 100 + i] * resp_len for i in range(g)]
    return Group(
        prompt_index=idx,
        prompt_ids=[1, 2, idx],
        responses=responses,
        rewards=[1.0 if i < n_correct else -1.0 for i in range(g)],
        correct=[i < n_correct for i in range(g)],
        finish_reasons=["stop"] * g,
        rollout_logprobs=[[-0.5] * resp_len for _ in range(g)] if with_logprobs else None,
        meta={"ground_truth": str(idx)},
    )


def test_group_validation_and_properties():
    grp = make_group(3, 2, resp_len=7, with_logprobs=True)
    assert grp.num_response_tokens == 4 * 7 and grp.num_samples == 4 and grp.num_correct == 2
    assert Group.from_dict(grp.to_dict()) == grp
    with pytest.raises(ValueError, match="rewards has 1 entries"):
        Group(0, [1], [[1], [2]], [1.0], [True, False], ["stop", "stop"])
    with pytest.raises(ValueError, match=r"rollout_logprobs\[1\]"):
        Group(0, [1], [[1], [2, 3]], [1.0, 0.0], [True, False], ["stop", "stop"], [[0.0], [0.0]])
    with pytest.raises(ValueError, match=r"correct\[0\]"):
        Group(0, [1], [[1]], [1.0], [1], ["stop"])


def test_keep_drop_counts_and_rounds():
    s = DynamicSampler(rollout_batch_size=3, n_samples_per_prompt=G, oversample_factor=1.5)
    s.start_step()
    assert s.num_prompts_to_request() == 5  # ceil(1.5 * 3)
    # round 1: 5 groups -> all-correct, all-wrong, mixed, mixed, all-wrong
    kept = [s.add_group(make_group(i, n)) for i, n in enumerate([4, 0, 2, 1, 0])]
    assert kept == [False, False, True, True, False]
    s.record_round()
    assert not s.is_full and s.num_kept == 2
    assert s.num_prompts_to_request() == 2  # ceil(1.5 * 1)
    # round 2: two mixed groups -> one surplus
    assert s.add_group(make_group(5, 3)) and s.add_group(make_group(6, 1))
    s.record_round()
    assert s.is_full and s.num_prompts_to_request() == 0
    batch = s.take_batch()
    assert [g.prompt_index for g in batch] == [2, 3, 5]
    m = s.metrics()
    assert m["prompts_tried"] == 7 and m["kept_groups"] == 4
    assert m["all_correct"] == 1 and m["all_wrong"] == 2
    assert m["num_gen_batches"] == 2 and m["surplus_dropped"] == 1 and m["surplus_carried"] == 0
    assert m["keep_rate"] == pytest.approx(4 / 7)
    # 7 groups * 4 responses * 5 tokens generated for a 3-group batch of 60 tokens
    assert m["waste_ratio"] == pytest.approx(140 / 60)
    assert all(isinstance(v, float) for v in m.values())
    with pytest.raises(RuntimeError, match="already"):
        s.take_batch()


def test_waste_ratio_counts_aborted_tokens_and_oversample_rounding():
    s = DynamicSampler(10, G, oversample_factor=1.1)
    s.start_step()
    assert s.num_prompts_to_request() == 11  # 1.1 * 10 = 11.000000000000002 must not become 12
    for i in range(10):
        s.add_group(make_group(i, 2, resp_len=3))
    s.record_aborted(4, num_tokens=30)
    s.record_round()
    s.take_batch()
    m = s.metrics()
    assert m["aborted_requests"] == 4
    assert m["waste_ratio"] == pytest.approx((120 + 30) / 120)
    with pytest.raises(ValueError, match="n must be"):
        s.record_aborted(-1)


def test_disabled_keeps_everything():
    s = DynamicSampler(3, G, enabled=False, oversample_factor=2.0)
    s.start_step()
    assert s.num_prompts_to_request() == 3  # no over-sampling needed when nothing is filtered
    assert all(s.add_group(make_group(i, n)) for i, n in enumerate([4, 0, 2]))
    assert s.is_full
    s.record_round()
    assert len(s.take_batch()) == 3
    m = s.metrics()
    assert m["kept_groups"] == 3 and m["all_correct"] == 1 and m["all_wrong"] == 1
    assert m["keep_rate"] == 1.0 and m["waste_ratio"] == 1.0


def test_exhaustion_message():
    s = DynamicSampler(8, G, max_num_gen_batches=2)
    s.start_step()
    for r in range(2):
        for i in range(8):
            s.add_group(make_group(r * 8 + i, 1 if i == 0 else 0))  # 1 mixed, 7 all-wrong
        if r == 0:
            s.record_round()
        else:
            with pytest.raises(DynamicSamplingExhausted) as exc:
                s.record_round()
    msg = str(exc.value)
    assert isinstance(exc.value, RuntimeError)
    assert "2/16" in msg and "12.5%" in msg  # keep rate kept/tried
    assert "after 2 generation rounds" in msg and "2/8 groups" in msg
    for hint in ("raise max_num_gen_batches", "set it to 0", "lower rollout_batch_size",
                 "raise n_samples_per_prompt", "easier dataset", "stronger model"):
        assert hint in msg
    assert "all-wrong" in msg


def test_unlimited_rounds_never_raise_and_full_at_cap_is_fine():
    s = DynamicSampler(2, G, max_num_gen_batches=0)
    s.start_step()
    for r in range(50):
        s.add_group(make_group(r, 0))
        s.record_round()
    assert s.metrics()["num_gen_batches"] == 50
    s2 = DynamicSampler(1, G, max_num_gen_batches=1)
    s2.start_step()
    s2.add_group(make_group(0, 1))
    s2.record_round()  # full exactly at the cap: no error
    assert len(s2.take_batch()) == 1


def test_take_batch_before_full_raises():
    s = DynamicSampler(2, G)
    s.start_step()
    s.add_group(make_group(0, 1))
    with pytest.raises(RuntimeError, match="1/2"):
        s.take_batch()
    with pytest.raises(ValueError, match="n_samples_per_prompt=4"):
        s.add_group(make_group(1, 1, g=3))


def test_carry_over_surplus():
    s = DynamicSampler(2, G, carry_over_surplus=True)
    s.start_step()
    for i in range(5):
        s.add_group(make_group(i, 2))
    s.record_round()
    assert [g.prompt_index for g in s.take_batch()] == [0, 1]
    assert s.metrics()["surplus_carried"] == 3 and s.metrics()["surplus_dropped"] == 0
    # next step: 3 carried groups are already enough
    s.start_step()
    assert s.metrics()["carried_in"] == 3 and s.metrics()["surplus_carried"] == 0
    assert s.is_full and s.num_prompts_to_request() == 0
    assert [g.prompt_index for g in s.take_batch()] == [2, 3]
    m = s.metrics()
    assert m["surplus_carried"] == 1 and m["prompts_tried"] == 0
    assert m["waste_ratio"] == 0.0  # nothing generated this step
    # third step: 1 carried + 1 fresh
    s.start_step()
    assert s.num_prompts_to_request() == 1
    s.add_group(make_group(9, 3))
    s.record_round()
    assert [g.prompt_index for g in s.take_batch()] == [4, 9]
    assert s.metrics()["waste_ratio"] == pytest.approx(0.5)


def test_state_dict_round_trip_exact_resume():
    def drive(sampler: DynamicSampler, start: int, stop: int) -> None:
        for i in range(start, stop):
            sampler.add_group(make_group(i, i % 5, resp_len=2 + i % 3, with_logprobs=True))

    a = DynamicSampler(3, G, oversample_factor=1.5, max_num_gen_batches=10, carry_over_surplus=True)
    a.start_step()
    drive(a, 0, 8)
    a.record_round()
    a.take_batch()
    a.start_step()
    drive(a, 8, 10)  # mid-step snapshot: carried groups + fresh kept ones
    state = json.loads(json.dumps(a.state_dict()))  # plain, JSON-serialisable

    b = DynamicSampler(3, G, oversample_factor=1.5, max_num_gen_batches=10, carry_over_surplus=True)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    for s in (a, b):
        drive(s, 10, 14)
        s.record_round()
    ba, bb = a.take_batch(), b.take_batch()
    assert ba == bb
    assert a.metrics() == b.metrics()
    assert a.state_dict() == b.state_dict()

    with pytest.raises(ValueError, match="rollout_batch_size=3"):
        DynamicSampler(4, G).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"config": {}})


def test_constructor_validation():
    with pytest.raises(ValueError, match="rollout_batch_size"):
        DynamicSampler(0, 4)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        DynamicSampler(2, 0)
    with pytest.raises(ValueError, match="max_num_gen_batches"):
        DynamicSampler(2, 4, max_num_gen_batches=-1)
    with pytest.raises(ValueError, match="oversample_factor"):
        DynamicSampler(2, 4, oversample_factor=0.0)
