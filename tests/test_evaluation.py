"""Evaluation: avg@k / pass@k metrics, evaluate() on a fake and a real CPU engine, eval CLI, AIME rows."""
from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import shared_path
from helpers import read_scalars
from megatron_dapo.evaluation import (
    EvalResult,
    avg_at_k,
    eval_main,
    evaluate,
    evaluate_async,
    log_eval_to_tensorboard,
    mean_pass_at_k,
    metric_prefix,
    pass_at_k,
    pass_k_values,
    per_problem_accuracy,
)
from megatron_dapo.engines.client import GenerateOutput


# ------------------------------------------------------------------------------ pure metrics


def test_pass_at_k_hand_values():
    # n == k: 1 if any sample is correct, else 0
    assert pass_at_k(0, 4, 4) == 0.0
    assert pass_at_k(1, 4, 4) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0
    # c == 0 -> 0 and c == n -> 1 for every k
    for k in range(1, 9):
        assert pass_at_k(0, 8, k) == 0.0
        assert pass_at_k(8, 8, k) == 1.0
    # pass@1 = c / n
    assert pass_at_k(3, 10, 1) == pytest.approx(0.3)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(2, 5, 2) == pytest.approx(0.7)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(3, 10, 5) == pytest.approx(1 - 21 / 252)
    # 1 - C(31,16)/C(32,16) = 1 - 16/32
    assert pass_at_k(1, 32, 16) == pytest.approx(0.5)
    # n - c < k -> exactly 1
    assert pass_at_k(30, 32, 4) == 1.0


def test_pass_at_k_matches_binomials_and_is_stable():
    for n in (1, 2, 5, 16, 32):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(c, n, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    # huge n: C(n, k) overflows a float, the product form does not
    assert pass_at_k(1, 5000, 2500) == pytest.approx(0.5)
    assert 0.0 <= pass_at_k(7, 5000, 3000) <= 1.0
    assert pass_at_k(np.int64(2), np.int64(5), np.int64(2)) == pytest.approx(0.7)


@pytest.mark.parametrize("args, match", [((1, 4, 5), "k must be in"), ((1, 4, 0), "k must be in"),
                                         ((5, 4, 1), "num_correct"), ((-1, 4, 1), "num_correct"),
                                         ((0, 0, 1), "n must be"), ((1.5, 4, 1), "num_correct must be an int"),
                                         ((True, 4, 1), "num_correct must be an int")])
def test_pass_at_k_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(*args)


def test_mean_pass_at_k_and_k_values():
    assert mean_pass_at_k([0, 4, 2, 1], 4, 2) == pytest.approx((0 + 1 + 5 / 6 + 0.5) / 4)
    with pytest.raises(ValueError, match="problem 1"):
        mean_pass_at_k([0, 9], 4, 2)
    with pytest.raises(ValueError, match="empty"):
        mean_pass_at_k([], 4, 2)
    assert pass_k_values(32) == [1, 2, 4, 8, 16, 32]
    assert pass_k_values(4) == [1, 2, 4]
    assert pass_k_values(6) == [1, 2, 4, 6]
    assert pass_k_values(1) == [1]
    assert metric_prefix("HuggingFaceH4/MATH-500") == "val/HuggingFaceH4_MATH-500"


def test_avg_at_k_and_per_problem_accuracy():
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert avg_at_k(correct) == pytest.approx(5 / 12)
    assert per_problem_accuracy(correct) == pytest.approx([0.25, 1.0, 0.0])
    assert avg_at_k(torch.tensor(correct)) == pytest.approx(5 / 12)
    assert avg_at_k(np.array([[1, 0], [0, 0]])) == pytest.approx(0.25)
    # avg@k equals the mean of pass@1 over problems
    c = [sum(r) for r in correct]
    assert avg_at_k(correct) == pytest.approx(mean_pass_at_k(c, 4, 1))
    with pytest.raises(ValueError, match="2-D"):
        avg_at_k([True, False])
    with pytest.raises(ValueError, match="2-D"):
        avg_at_k(np.zeros((0, 4), dtype=bool))
    with pytest.raises(ValueError, match="booleans"):
        avg_at_k([[0.5, 1.0]])


# ------------------------------------------------------------------------------ evaluate() with a fake engine


class FakeTokenizer:
    """Prompt "problem <i>" renders to ``i + 1`` copies of token ``i``; token ``100 + v`` decodes to
    ``"Answer: v"``, token 1 to a non-answer, token 2 is the eos."""

    eos_token_id = 2

    def get_vocab(self):
        return {}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        i = int(messages[0]["content"].split()[-1])
        return [i] * (i + 1)

    def decode(self, ids, skip_special_tokens=True):
        parts = []
        for t in ids:
            if t >= 100:
                parts.append(f"Answer: {t - 100}")
            elif t == 1:
                parts.append("thinking")
        return "\n".join(parts)


class FakeClient:
    """``plan[i] = (num_correct, num_truncated)`` for prompt ``i``; records the sampling params."""

    def __init__(self, plan, gts):
        self.plan, self.gts, self.calls, self.closed = plan, gts, [], False

    async def generate(self, input_ids, sampling_params, *, return_logprob=True, rid=None):
        (ids,) = input_ids
        i = ids[0]
        self.calls.append((i, dict(sampling_params), rid, return_logprob))
        n = sampling_params["n"]
        c, trunc = self.plan[i]
        outs = []
        for j in range(n):
            if j < c:
                toks, fr = [1, 1, 100 + int(self.gts[i])], "stop"
            elif j < c + trunc:
                toks, fr = [1] * sampling_params["max_new_tokens"], "length"
            else:
                toks, fr = [1, 100 + int(self.gts[i]) + 1], "stop"
            outs.append(GenerateOutput(output_ids=toks, output_logprobs=None, finish_reason=fr, prompt_tokens=len(ids),
                                       weight_version="0"))
        await asyncio.sleep(0)
        return outs

    async def close(self):
        self.closed = True


def fake_rows(gts, sources):
    return [{"data_source": ds, "prompt": [{"role": "user", "content": f"problem {i}"}],
             "reward_model": {"ground_truth": str(gt), "style": "rule"}, "extra_info": {"index": 100 + i}}
            for i, (gt, ds) in enumerate(zip(gts, sources))]


def test_evaluate_fake_engine_exact_metrics():
    gts = [3, 5, 7, 9, 11]
    plan = {0: (0, 4), 1: (4, 0), 2: (2, 1), 3: (1, 0), 4: (3, 0)}
    rows = fake_rows(gts, ["aime24"] * 4 + ["math"])
    client = FakeClient(plan, gts)
    res = evaluate(client, FakeTokenizer(), rows, n_samples=4, temperature=1.0, top_p=0.7, max_response_length=6,
                   max_prompt_length=None, seed=3, progress=False, return_responses=True)
    assert client.closed
    m = res.metrics
    a = "val/aime24"
    assert m[f"{a}/avg@4"] == pytest.approx(7 / 16)
    assert m[f"{a}/pass@1"] == pytest.approx(7 / 16)
    assert m[f"{a}/pass@2"] == pytest.approx((0 + 1 + 5 / 6 + 0.5) / 4)
    assert m[f"{a}/pass@4"] == pytest.approx(3 / 4)
    assert m[f"{a}/truncated_frac"] == pytest.approx(5 / 16)
    # lengths: correct 3, truncated 6, wrong 2 tokens
    assert m[f"{a}/response_length_mean"] == pytest.approx((7 * 3 + 5 * 6 + 4 * 2) / 16)
    assert m[f"{a}/no_answer_frac"] == pytest.approx(5 / 16)
    assert m[f"{a}/num_prompts"] == 4
    assert m["val/math/avg@4"] == pytest.approx(3 / 4)
    assert m["val/all/avg@4"] == pytest.approx(10 / 20)
    assert m["val/prompts_skipped"] == 0
    # per-problem rows
    assert [p["num_correct"] for p in res.per_problem] == [0, 4, 2, 1, 3]
    assert [p["index"] for p in res.per_problem] == [100, 101, 102, 103, 104]
    assert res.per_problem[2]["sample_answer"] == "7" and res.per_problem[2]["acc"] == 0.5
    assert res.per_problem[0]["sample_answer"] == "" and res.per_problem[0]["num_truncated"] == 4
    assert len(res.responses) == 5 and len(res.responses[1]) == 4 and res.responses[1][0].endswith("Answer: 5")
    # sampling params: SGLang names, one request per prompt, seeds distinct per prompt
    sps = {i: sp for i, sp, _, lp in client.calls}
    assert all(not lp for *_, lp in client.calls)
    assert sps[0]["n"] == 4 and sps[0]["max_new_tokens"] == 6 and sps[0]["top_p"] == 0.7
    assert sps[0]["stop_token_ids"] == [2]
    assert len({sp["sampling_seed"] for sp in sps.values()}) == 5
    # table
    table = res.markdown_table()
    assert len(table.splitlines()) == 2 + 5 and "| 102 | aime24 | 7 | 2 / 4 | 0.500 |" in table
    # seeds do not depend on max_prompts
    client2 = FakeClient(plan, gts)
    evaluate(client2, FakeTokenizer(), rows, n_samples=4, max_response_length=6, max_prompt_length=None, seed=3,
             max_prompts=2, progress=False)
    assert [c[0] for c in client2.calls] == [0, 1]
    assert client2.calls[1][1]["sampling_seed"] == sps[1]["sampling_seed"]


def test_evaluate_skips_long_prompts_and_validates():
    gts = [1, 2, 3, 4]
    rows = fake_rows(gts, ["aime24"] * 4)
    client = FakeClient({i: (1, 0) for i in range(4)}, gts)
    res = evaluate(client, FakeTokenizer(), rows, n_samples=2, max_response_length=4, max_prompt_length=2,
                   progress=False)  # prompt i has i+1 tokens -> rows 2, 3 skipped
    assert res.num_skipped == 2 and res.metrics["val/prompts_skipped"] == 2
    assert [p["row"] for p in res.per_problem] == [0, 1]
    with pytest.raises(ValueError, match="all 3 prompts"):  # prompts of 2..4 tokens
        evaluate(client, FakeTokenizer(), rows[1:], n_samples=2, max_response_length=4, max_prompt_length=1,
                 progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(client, FakeTokenizer(), rows, n_samples=0, max_response_length=4, max_prompt_length=None)
    with pytest.raises(ValueError, match="top_p"):
        evaluate(client, FakeTokenizer(), rows, top_p=0.0, max_response_length=4, max_prompt_length=None)
    with pytest.raises(ValueError, match="rows is empty"):
        evaluate(client, FakeTokenizer(), [], max_response_length=4, max_prompt_length=None)
    bad = fake_rows(gts, ["aime24"] * 4)
    del bad[2]["reward_model"]
    with pytest.raises(ValueError, match="row 2.*reward_model"):
        evaluate(client, FakeTokenizer(), bad, n_samples=2, max_response_length=4, max_prompt_length=None,
                 progress=False)

    async def inside_loop():
        with pytest.raises(RuntimeError, match="evaluate_async"):
            evaluate(client, FakeTokenizer(), rows, n_samples=2, max_response_length=4, max_prompt_length=None)
        return await evaluate_async(client, FakeTokenizer(), rows, n_samples=2, max_response_length=4,
                                    max_prompt_length=None, progress=False)

    assert asyncio.run(inside_loop()).metrics["val/aime24/avg@2"] == pytest.approx(0.5)


def test_log_eval_to_tensorboard_calls():
    class Writer:
        def __init__(self):
            self.scalars, self.texts = [], []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def add_text(self, tag, text, step):
            self.texts.append((tag, text, step))

    res = EvalResult(metrics={"val/x/avg@2": 0.5, "val/x/pass@2": 0.75},
                     per_problem=[{"index": 0, "data_source": "x", "ground_truth": "a|b", "num_correct": 1, "n": 2,
                                   "acc": 0.5, "response_length_mean": 3.0, "sample_answer": "1"}], n_samples=2)
    w = Writer()
    log_eval_to_tensorboard(w, res, 7)
    assert w.scalars == [("val/x/avg@2", 0.5, 7), ("val/x/pass@2", 0.75, 7)]
    assert w.texts[0][0] == "val/per_problem" and w.texts[0][2] == 7 and "a\\|b" in w.texts[0][1]


# ------------------------------------------------------------------------------ AIME rows with the real tokenizer


def test_aime_rows_load_render_and_score_with_qwen_tokenizer():
    from megatron_dapo.data import load_rows, load_tokenizer, render_prompt
    from megatron_dapo.reward import checker_for

    rows = load_rows(shared_path("data", "aime-2024", "aime-2024.parquet"))
    tok = load_tokenizer(shared_path("data", "qwen2.5-tokenizer"))
    assert len(rows) == 30 and {r["data_source"] for r in rows} == {"aime24"}
    lens = []
    for i, r in enumerate(rows):
        assert checker_for(r["data_source"], r["reward_model"]["ground_truth"]) == "dapo"
        ids = render_prompt(tok, r["prompt"], 1024, row_index=i)
        assert ids is not None
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
        assert 'after "Answer:"' in text
        lens.append(len(ids))
    assert 50 < min(lens) and max(lens) < 1024

    # a fake engine answering AIME problem i correctly on sample 0 only (real token ids of the answer)
    class AnswerClient:
        def __init__(self):
            self.by_prompt = {}

        async def generate(self, input_ids, sp, *, return_logprob=True, rid=None):
            gt = self.by_prompt[tuple(input_ids[0])]
            good = tok.encode(f"Let me think.\nAnswer: {gt}") + [tok.convert_tokens_to_ids("<|im_end|>")]
            bad = tok.encode("Answer: 0")
            return [GenerateOutput(output_ids=good if j == 0 else bad, output_logprobs=None,
                                   finish_reason="stop", prompt_tokens=1, weight_version=None) for j in range(sp["n"])]

    client = AnswerClient()
    for i, r in enumerate(rows):
        client.by_prompt[tuple(render_prompt(tok, r["prompt"], None))] = r["reward_model"]["ground_truth"]
    res = evaluate(client, tok, rows, n_samples=4, max_response_length=64, max_prompt_length=1024, progress=False)
    assert res.metrics["val/aime24/avg@4"] == pytest.approx(0.25)
    assert res.metrics["val/aime24/pass@4"] == pytest.approx(1.0)
    assert res.metrics["val/aime24/pass@2"] == pytest.approx(0.5)
    assert res.per_problem[0]["sample_answer"] == rows[0]["reward_model"]["ground_truth"]


# ------------------------------------------------------------------------------ real CPU engine


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from megatron_dapo.data import make_tiny_checkpoint
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    d = tmp_path_factory.mktemp("eval_tiny")
    model_dir = make_tiny_checkpoint(d / "model", family="qwen2")
    procs = launch_cpu_engines(str(model_dir), 1, seed=0, log_dir=d / "logs", health_timeout_s=120)
    with procs:
        yield model_dir, procs.urls


def test_evaluate_real_cpu_engine_end_to_end_and_deterministic(tiny_engine):
    from megatron_dapo.data import generate_tasks, load_tokenizer
    from megatron_dapo.engines.client import SyncEngineClient

    model_dir, urls = tiny_engine
    tok = load_tokenizer(model_dir)
    rows = generate_tasks(8)
    kw = dict(n_samples=4, temperature=1.0, top_p=0.7, max_response_length=16, max_prompt_length=256,
              progress=False, return_responses=True)
    with SyncEngineClient(urls) as client:
        r0 = evaluate(client, tok, rows, seed=0, **kw)
        r0b = evaluate(client, tok, rows, seed=0, **kw)
        r1 = evaluate(client, tok, rows, seed=1, **kw)
    m = r0.metrics
    p = "val/arith_demo"
    expected = {f"{p}/{k}" for k in ("avg@4", "pass@1", "pass@2", "pass@4", "response_length_mean", "truncated_frac",
                                     "aborted_frac", "no_answer_frac", "num_prompts")} | {"val/prompts_skipped"}
    assert set(m) == expected
    for k in ("avg@4", "pass@1", "pass@2", "pass@4", "truncated_frac", "no_answer_frac"):
        assert 0.0 <= m[f"{p}/{k}"] <= 1.0
    assert m[f"{p}/pass@1"] <= m[f"{p}/pass@2"] <= m[f"{p}/pass@4"]
    assert m[f"{p}/avg@4"] == pytest.approx(m[f"{p}/pass@1"])
    assert 1.0 <= m[f"{p}/response_length_mean"] <= 16.0 and m[f"{p}/aborted_frac"] == 0.0
    assert m[f"{p}/num_prompts"] == 8
    assert len(r0.per_problem) == 8
    for i, row in enumerate(r0.per_problem):
        assert row["row"] == i and row["n"] == 4 and 0 <= row["num_correct"] <= 4
        assert row["ground_truth"] == rows[i]["reward_model"]["ground_truth"]
    # determinism under the seed; another seed samples differently
    assert r0.responses == r0b.responses and r0.metrics == r0b.metrics
    assert r0.responses != r1.responses
    assert any(len(set(rs)) > 1 for rs in r0.responses)  # the n copies of a prompt use distinct seeds


def test_eval_main_cli_against_running_engine(tiny_engine, tmp_path, capsys):
    from megatron_dapo.data import generate_tasks, write_rows

    model_dir, urls = tiny_engine
    val = write_rows(generate_tasks(3, seed=5), tmp_path / "val.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_name": "ev", "output_dir": str(tmp_path / "out"),
                                   "model": {"hf_path": str(model_dir)}, "data": {"val_files": [str(val)]}}))
    out = tmp_path / "metrics.json"
    rc = eval_main([str(cfg), "trainer.eval_n_samples=2", "rollout.max_response_length=8", "--engine-url", urls[0],
                    "--out", str(out), "--step", "5", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "| # | data_source |" in printed and "val/arith_demo/avg@2" in printed
    data = json.loads(out.read_text())
    assert data["step"] == 5 and data["n_samples"] == 2 and len(data["per_problem"]) == 3
    assert 0.0 <= data["metrics"]["val/arith_demo/pass@2"] <= 1.0
    tb = tmp_path / "out" / "ev" / "tb"
    scalars = read_scalars(tb)
    assert "val/arith_demo/avg@2" in scalars, sorted(scalars)
    assert scalars["val/arith_demo/avg@2"][0][0] == 5


def test_eval_main_config_errors(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hf_path": str(tmp_path / "nope")}}))
    # with real training data, evaluation needs data.val_files (the demo task falls back to held-out problems)
    assert eval_main([str(cfg), f"data.train_files=[{tmp_path / 'train.jsonl'}]"]) == 2
    assert "data.val_files" in capsys.readouterr().err
    val = tmp_path / "v.jsonl"
    val.write_text("")
    assert eval_main([str(cfg), f"data.val_files=[{val}]"]) == 2
    assert "model.hf_path" in capsys.readouterr().err
    assert eval_main([str(cfg), f"data.val_files=[{val}]", "trainer.eval_top_p=0"]) == 2
    assert "trainer.eval_top_p" in capsys.readouterr().err
    assert eval_main([str(cfg), "data.val_files=[missing.parquet]"]) == 2
    assert "missing.parquet" in capsys.readouterr().err
