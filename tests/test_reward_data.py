"""The reward function against every reference answer of the shared datasets (../shared/data)."""
from __future__ import annotations

import json
import warnings

import pyarrow.parquet as pq
import pytest
from conftest import shared_path

from megatron_dapo.reward import (
    compute_score,
    gsm8k_reference,
    normalize_integer,
    score_batch,
)

PREFIX = "Let me work through this carefully.\nSo the final value follows.\n\n"


def _ground_truths(path) -> list[str]:
    table = pq.read_table(path, columns=["reward_model"])
    return [row["ground_truth"] for row in table.column("reward_model").to_pylist()]


def _plus_one(gt: str) -> str:
    """gt + 1 as a decimal string (the dataset's answers are short integers)."""
    return str(int(gt) + 1)


@pytest.mark.parametrize("parts,source", [
    (("data", "dapo-math-17k", "dapo_math_17k.parquet"), "math_dapo"),
    (("data", "aime-2024", "aime-2024.parquet"), "aime24"),
])
def test_integer_ground_truths_score_both_ways(parts, source):
    gts = _ground_truths(shared_path(*parts))
    expected_rows = {"math_dapo": 17917, "aime24": 30}[source]
    assert len(gts) == expected_rows
    not_int = [(i, g) for i, g in enumerate(gts) if normalize_integer(g) is None]
    assert not not_int, f"ground truths that do not parse as integers: {not_int[:20]}"
    right = score_batch([PREFIX + f"Answer: {g}" for g in gts], gts, source)
    wrong = score_batch([PREFIX + f"Answer: {_plus_one(g)}" for g in gts], gts, source)
    bad_right = [(i, g, r) for i, (g, r) in enumerate(zip(gts, right)) if r.score != 1.0]
    bad_wrong = [(i, g, r) for i, (g, r) in enumerate(zip(gts, wrong)) if r.score != -1.0]
    assert not bad_right, f"correct answers scored -1: {bad_right[:10]}"
    assert not bad_wrong, f"wrong answers scored +1: {bad_wrong[:10]}"
    assert all(r.status == "ok" and r.acc for r in right)
    assert all(r.status == "ok" and not r.acc for r in wrong)


def test_aime_data_source_dispatch_matches_dataset_field():
    table = pq.read_table(shared_path("data", "aime-2024", "aime-2024.parquet"),
                          columns=["data_source", "reward_model"])
    sources = table.column("data_source").to_pylist()
    gts = [r["ground_truth"] for r in table.column("reward_model").to_pylist()]
    assert set(sources) == {"aime24"}
    for gt, ds in zip(gts, sources):
        assert compute_score(f"**Answer:** ${gt}$", gt, data_source=ds).acc
        assert not compute_score(f"Answer: {gt}0", gt, data_source=ds).acc


def test_math500_reference_answers_verify():
    path = shared_path("data", "math500", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 500
    answers = [r["answer"] for r in rows]
    responses = [PREFIX + f"Answer: {a}" for a in answers]
    results = score_batch(responses, answers, "math500", num_workers=2, timeout_s=5.0)
    failures = [(i, a, r.status, r.pred) for i, (a, r) in enumerate(zip(answers, results))
                if r.score != 1.0]
    if failures:
        msg = "MATH-500 reference answers not verified: " + "; ".join(map(repr, failures))
        print(msg)
        warnings.warn(msg, stacklevel=1)
    assert len(failures) <= 5, f"{len(failures)} of 500 failed (>1%): {failures}"
    # the same answers in \boxed{} without an Answer: line, and a wrong answer for a sample
    boxed = score_batch([PREFIX + f"so $\\boxed{{{a}}}$" for a in answers[:50]], answers[:50],
                        "HuggingFaceH4/MATH-500", num_workers=2, timeout_s=5.0)
    assert sum(r.acc for r in boxed) >= 49
    wrong = score_batch([PREFIX + "Answer: $\\frac{9973}{7919}$"] * 20, answers[:20], "math500",
                        num_workers=2, timeout_s=5.0)
    assert not any(r.acc for r in wrong)


def test_gsm8k_references_all_parse():
    path = shared_path("data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    unparsed = [(i, r["answer"][-60:]) for i, r in enumerate(rows)
                if "####" not in r["answer"] or gsm8k_reference(r["answer"]) is None]
    assert not unparsed, f"GSM8K references that do not parse: {unparsed[:20]}"
    refs = [r["answer"] for r in rows]
    numbers = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    right = score_batch([f"Reasoning...\nAnswer: {n}" for n in numbers], refs, "openai/gsm8k")
    assert all(r.acc for r in right), [(i, n) for i, (n, r) in enumerate(zip(numbers, right))
                                       if not r.acc][:10]
    native = score_batch([f"Reasoning...\n#### {n}" for n in numbers], refs, "gsm8k")
    assert all(r.acc for r in native)
    wrong = score_batch([f"Answer: {gsm8k_reference(x)}1" for x in refs], refs, "gsm8k")
    assert not any(r.acc for r in wrong)
