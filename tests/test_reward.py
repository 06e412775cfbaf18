"""Rule-based math reward: formatting table, dispatch, batching, stats, adversarial inputs."""
from __future__ import annotations

import logging
import os
import time

import psutil
import pytest

from megatron_dapo.reward import (
    RewardResult,
    RewardStats,
    checker_for,
    compute_score,
    find_answer_line,
    find_last_boxed,
    get_pool,
    normalize_integer,
    normalize_number,
    score_batch,
    summarize,
)

OK, NA, PE, TO = "ok", "no_answer", "parse_error", "timeout"
LONG = "Step 1: we expand. " * 40 + "\n"

# (response, ground_truth, strict, expected acc, expected status, expected pred)
DAPO_CASES = [
    ("Answer: 34", "34", True, True, OK, "34"),
    ("Answer: $34$", "34", True, True, OK, "34"),
    ("Answer: $$34$$", "34", True, True, OK, "34"),
    ("Answer: \\(34\\)", "34", True, True, OK, "34"),
    ("Answer: \\boxed{34}", "34", True, True, OK, "34"),
    ("Answer: $\\boxed{34}$", "34", True, True, OK, "34"),
    ("Answer: \\text{34}", "34", True, True, OK, "34"),
    ("**Answer:** 34", "34", True, True, OK, "34"),
    ("**Answer: 34**", "34", True, True, OK, "34"),
    ("Answer: **34**", "34", True, True, OK, "34"),
    ("Answer: 34.", "34", True, True, OK, "34"),
    ("answer: 034", "34", True, True, OK, "34"),
    ("ANSWER: 34", "34", True, True, OK, "34"),
    ("Final Answer: 34", "34", True, True, OK, "34"),
    ("Answer : 34", "34", True, True, OK, "34"),
    ("Answer: 34 degrees", "34", True, True, OK, "34"),
    ("Answer: $34^\\circ$", "34", True, True, OK, "34"),
    ("Answer: $34^{\\circ}$", "34", True, True, OK, "34"),
    ("Answer: 34°", "34", True, True, OK, "34"),
    ("Answer: 34 \\text{ cm}^2", "34", True, True, OK, "34"),
    ("Answer: 1,000", "1000", True, True, OK, "1000"),
    ("Answer: $1{,}000$", "1000", True, True, OK, "1000"),
    ("Answer: 1\\,000", "1000", True, True, OK, "1000"),
    ("Answer: +34", "34", True, True, OK, "34"),
    ("Answer: 34.0", "34", True, True, OK, "34"),
    ("Answer: 34.00", "34", True, True, OK, "34"),
    ("Answer: 34. This is because 12 + 22 = 34.", "34", True, True, OK, "34"),
    ("Answer: 34 is the final answer", "34", True, True, OK, "34"),
    ("Answer: $x = 34$", "34", True, True, OK, "34"),
    ("Answer: The final answer is $\\boxed{34}$.", "34", True, True, OK, "34"),
    ("Answer: 33\nmore thought\nAnswer: 34", "34", True, True, OK, "34"),
    ("Answer: 34\nmore thought\nAnswer: 33", "34", True, False, OK, "33"),
    ("Answer: 34\nWait, let me double-check.\nYes, that holds.", "34", True, True, OK, "34"),
    (LONG + "Answer:\n34", "34", True, True, OK, "34"),
    (LONG + "The answer is 34.", "34", True, False, NA, None),
    (LONG + "Answer:", "34", True, False, NA, None),
    (LONG + "Answer:   \n  ", "34", True, False, NA, None),
    ("Answer: -3", "-3", True, True, OK, "-3"),
    ("Answer: $-3$", "-3", True, True, OK, "-3"),
    ("Answer: \u22123", "-3", True, True, OK, "-3"),
    ("Answer: 3", "-3", True, False, OK, "3"),
    ("Answer: -0", "0", True, True, OK, "0"),
    ("Answer: 3 4", "34", True, False, PE, "3 4"),
    ("Answer: 34 or 35", "34", True, False, PE, "34 or 35"),
    ("Answer: 34^2", "34", True, False, PE, "34^2"),
    ("Answer: 34.5", "34", True, False, PE, "34.5"),
    ("Answer: \\frac{68}{2}", "34", True, False, PE, "\\frac{68}{2}"),
    ("Answer: 35", "34", True, False, OK, "35"),
    ("Answer: 340", "34", True, False, OK, "340"),
    ("Answer: 3\x004", "34", True, False, PE, "3\x004"),
    (LONG + "so the result is $\\boxed{34}$", "34", True, False, NA, None),
    (LONG + "so the result is $\\boxed{34}$", "34", False, True, OK, "34"),
    (LONG + "so \\boxed{33} then \\boxed{34}", "34", False, True, OK, "34"),
    (LONG + "Answer: 33\nso $\\boxed{34}$", "34", False, False, OK, "33"),
    ("Answer: 0025", "25", True, True, OK, "25"),
    ("Answer: 25", "025", True, True, OK, "25"),
]


@pytest.mark.parametrize("response,gt,strict,acc,status,pred", DAPO_CASES)
def test_dapo_formatting_table(response, gt, strict, acc, status, pred):
    r = compute_score(response, gt, data_source="math_dapo", strict=strict)
    assert isinstance(r, RewardResult)
    assert (r.acc, r.status, r.pred) == (acc, status, pred), r
    assert r.score == (1.0 if acc else -1.0)


@pytest.mark.parametrize("response,gt,strict", [(r, g, s) for r, g, s, a, *_ in DAPO_CASES if a])
def test_dapo_accepted_answers_reject_a_wrong_reference(response, gt, strict):
    """Every formatting the table accepts is really compared: a different reference fails it."""
    wrong = str(int(gt) + 1)
    r = compute_score(response, wrong, data_source="math_dapo", strict=strict)
    assert (r.acc, r.score) == (False, -1.0), r


@pytest.mark.parametrize("source", ["math_dapo", "aime24", "AIME2025", "my_custom_set"])
def test_integer_sources_use_dapo_rule(source):
    assert checker_for(source, "34") == "dapo"
    assert compute_score("Answer: $34$", "34", data_source=source).acc
    # no symbolic evaluation on this path
    r = compute_score("Answer: $\\frac{68}{2}$", "34", data_source=source)
    assert not r.acc and r.status == PE


def test_dispatch():
    assert checker_for("math500", "34") == "math_verify"
    assert checker_for("HuggingFaceH4/MATH-500", "\\frac12") == "math_verify"
    assert checker_for("math", "2") == "math_verify"
    assert checker_for("gsm8k", "#### 18") == "gsm8k"
    assert checker_for("openai/gsm8k", "18") == "gsm8k"
    assert checker_for("unknown", "\\frac{1}{2}") == "math_verify"
    assert checker_for("math_dapo", "\\sqrt{2}") == "math_verify"


def test_normalizers():
    assert normalize_integer("$\\boxed{1,234,567}$") == "1234567"
    assert normalize_integer("-0042") == "-42"
    assert normalize_integer("2.5") is None
    assert normalize_integer("") is None
    assert normalize_number("18.50") == "18.5"
    assert normalize_number("-2.0") == "-2"
    assert normalize_number("\\$18") == "18"
    assert find_answer_line("no marker") is None
    assert find_answer_line("Answer: 1\nAnswer:  2 \n") == "2"
    assert find_last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert find_last_boxed("\\boxed 7 done") == "7"
    assert find_last_boxed("\\boxed{unclosed") is None


def test_gsm8k_path():
    gt = "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert compute_score("so\n#### 18", gt, data_source="gsm8k").acc
    assert compute_score("Answer: $18.00", gt, data_source="gsm8k").acc
    assert compute_score("Answer: 18 dollars", gt, data_source="openai/gsm8k").acc
    assert not compute_score("Answer: 18.5", gt, data_source="gsm8k").acc
    assert compute_score("\\boxed{18}", gt, data_source="gsm8k").status == NA
    assert compute_score("\\boxed{18}", gt, data_source="gsm8k", strict=False).acc
    assert compute_score("Answer: 1,600", "#### 1,600", data_source="gsm8k").acc
    with pytest.raises(ValueError, match="GSM8K"):
        compute_score("Answer: 1", "no number here", data_source="gsm8k")


MV_CASES = [
    ("Answer: $\\frac{14}{3}$", "\\frac{14}{3}", True),
    ("Answer: $\\dfrac{28}{6}$", "\\frac{14}{3}", True),
    ("Answer: 14/3", "\\frac{14}{3}", True),
    ("Answer: $\\frac{14}{5}$", "\\frac{14}{3}", False),
    ("Answer: $3\\sqrt{13}$", "3\\sqrt{13}", True),
    ("Answer: $\\sqrt{117}$", "3\\sqrt{13}", True),
    ("Answer: $(-2, 1)$", "(-2,1)", True),
    ("Answer: $(1, -2)$", "(-2,1)", False),
    ("Answer: $[0, 1)$", "[0,1)", True),
    ("Answer: $\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
     True),
    ("so the answer is $\\boxed{\\frac{\\pi}{2}}$", "\\frac{\\pi}{2}", True),
    ("Answer: 42", "42", True),
    ("Answer: $\\frac{84}{2}$", "42", True),
    ("Answer: 41", "42", False),
]


@pytest.mark.parametrize("response,gt,acc", MV_CASES)
def test_math_verify_path(response, gt, acc):
    r = compute_score(response, gt, data_source="math500", timeout_s=5.0)
    assert r.acc is acc, r
    assert r.status == OK


def test_math_verify_no_answer_and_type_errors():
    assert compute_score("I am not sure.", "\\frac12", data_source="math500").status == NA
    with pytest.raises(TypeError, match="response"):
        compute_score(None, "34")  # type: ignore[arg-type]
    assert compute_score("Answer: 34", 34).acc  # int ground truth accepted


def test_score_batch_order_bad_rows_and_summary(caplog):
    responses = ["Answer: 34", None, "Answer: $\\frac{1}{2}$", "nothing", "Answer: 18",
                 "Answer: $\\frac{2}{4}$", "Answer: x"]
    gts = ["34", "34", "\\frac12", "34", "#### 18", "\\frac{1}{2}", "34"]
    sources = ["math_dapo", "math_dapo", "math500", "aime24", "gsm8k", "math500", "math_dapo"]
    with caplog.at_level(logging.WARNING):
        res = score_batch(responses, gts, sources, num_workers=2, timeout_s=5.0)
    assert [r.acc for r in res] == [True, False, True, False, True, True, False]
    assert [r.status for r in res] == [OK, PE, OK, NA, OK, OK, PE]
    assert "row 1" in caplog.text
    s = summarize(res, sources)
    assert s["reward/no_answer_frac"] == pytest.approx(1 / 7)
    assert s["reward/parse_errors"] == 2.0 and s["reward/timeouts"] == 0.0
    assert s["reward/acc/math_dapo"] == pytest.approx(1 / 3)
    assert s["reward/acc/math500"] == 1.0 and s["reward/acc/gsm8k"] == 1.0
    stats = RewardStats()
    stats.update(res, sources)
    stats.update(res[:1], "math_dapo")
    assert stats.as_dict()["reward/count"] == 8.0
    assert stats.as_dict()["reward/acc/math_dapo"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="len"):
        score_batch(["a"], ["1", "2"], "math_dapo")
    assert score_batch([], [], []) == []


# ----------------------------------------------------------------------------------------------
# Adversarial inputs: bounded time, nothing executed, no stray files or processes
# ----------------------------------------------------------------------------------------------
MB = 1 << 20
LIMIT = 1.0


@pytest.fixture(scope="module")
def warm_pool():
    pool = get_pool(2)
    pool.warmup()
    return pool


def _adversarial_inputs(marker: str) -> list[tuple[str, str]]:
    big = "9" * 10**6
    code = f"__import__('os').system('touch {marker}')"
    return [
        ("million_digits", "Answer: " + big),
        ("million_digits_boxed", "\\boxed{" + big + "}"),
        ("million_digits_commas", "Answer: " + "1," + "000," * 250_000 + "000"),
        ("nested_braces", "Answer: " + "{" * (MB // 2) + "}" * (MB // 2)),
        ("nested_boxed", "\\boxed{" * (MB // 8) + "1" + "}" * (MB // 8)),
        ("open_braces", "Answer: \\boxed{" + "{" * (MB - 20)),
        ("brace_pairs", "Answer: \\boxed{" + "{}" * (MB // 2 - 10) + "}"),
        ("answer_word_flood", "answer " * (MB // 7)),
        ("answer_colonless", "answer" + " " * 8 + "x" + "answer*_*" * (MB // 9)),
        ("answer_marker_flood", "Answer: 1\n" * (MB // 10)),
        ("spaces_after_marker", "Answer:" + " " * (MB - 10) + "34"),
        ("dollar_flood", "Answer: " + "$" * (MB - 10)),
        ("equals_flood", "Answer: " + "x=" * (MB // 2 - 5)),
        ("text_flood", "Answer: " + "\\text{" * (MB // 6)),
        ("caret_flood", "Answer: 3" + "a^" * (MB // 2 - 5)),
        ("decimal_bait", "Answer: 1." + "0" * (MB - 20) + "1"),
        ("nul_flood", "\x00" * MB),
        ("controls", "Answer: 3" + "".join(chr(c) for c in range(32)) * (MB // 32 - 1)),
        ("lone_surrogates", "\ud800" * (MB // 3 - 8) + "Answer: 34\udfff"),
        ("code_answer", "Answer: " + code),
        ("code_boxed", "\\boxed{" + code + "}"),
        ("code_latex", "Answer: $\\text{" + code.replace("__", "") + "}$"),
        ("code_eval", f"Answer: eval(\"open('{marker}', 'w')\")"),
        ("plain_1mb", "x" * MB),
        ("power_tower", "Answer: $10^{10^{10^{10}}}$"),
    ]


def _children() -> dict[int, str]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = p.name()
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("source", ["math_dapo", "math500", "gsm8k"])
def test_adversarial_inputs(source, warm_pool, tmp_path):
    marker = str(tmp_path / "pwned")
    pwned_before = os.path.exists("/tmp/pwned")
    files_before = sorted(os.listdir(tmp_path))
    procs_before = _children()
    gt = {"math_dapo": "34", "math500": "\\frac{1}{2}", "gsm8k": "#### 34"}[source]
    worst = 0.0
    for name, text in _adversarial_inputs(marker):
        assert len(text.encode("utf-8", "surrogatepass")) <= MB + 64, name
        for strict in (True, False):
            t0 = time.perf_counter()
            r = compute_score(text, gt, data_source=source, strict=strict, timeout_s=LIMIT)
            dt = time.perf_counter() - t0
            worst = max(worst, dt)
            assert dt < 10 * LIMIT, f"{name} ({source}, strict={strict}) took {dt:.2f}s"
            assert r.status in (OK, NA, PE, TO)
            assert r.score in (1.0, -1.0)
            if name == "lone_surrogates" and source != "math500":
                assert r.acc, r
            elif name not in ("answer_marker_flood",):
                assert not r.acc or name == "spaces_after_marker", (name, r)
    # batch form: one call, order kept, nothing fails
    inputs = _adversarial_inputs(marker)
    t0 = time.perf_counter()
    res = score_batch([t for _, t in inputs], [gt] * len(inputs), source, num_workers=2,
                      timeout_s=LIMIT)
    assert time.perf_counter() - t0 < 10 * LIMIT * len(inputs)
    assert len(res) == len(inputs)
    assert not os.path.exists(marker)
    if not pwned_before:
        assert not os.path.exists("/tmp/pwned")
    assert sorted(os.listdir(tmp_path)) == files_before
    new = {pid: n for pid, n in _children().items() if pid not in procs_before}
    workers = set(warm_pool.worker_pids())
    assert all(pid in workers for pid in new), f"unexpected processes: {new}"
    assert not any(n in ("sh", "bash", "dash", "touch") for n in _children().values())
    print(f"{source}: worst adversarial latency {worst:.3f}s")


def test_million_digit_integers_compare_exactly():
    big = "7" * 10**6
    assert compute_score("Answer: " + big, big).acc
    assert not compute_score("Answer: " + big + "8", big).acc
    assert compute_score("Answer: 0" + big, big).acc
    assert compute_score("Answer: " + big, "+" + big).acc
    assert compute_score("#### " + big, big, data_source="gsm8k").acc


def test_math_verify_timeout_kills_and_replaces_worker(warm_pool):
    """A never-ending item times out and its worker is killed; the pool then keeps working.

    Event-driven: the hanging item (9^9^9^9 never finishes) is the only one under the short
    limit, so it must time out however loaded the machine is; the killed worker is awaited by pid
    and the follow-up items get a generous limit.
    """
    pool = get_pool()
    before_timeouts = pool.stats.timeouts
    pids_before = set(pool.worker_pids())
    res = score_batch(["Answer: $9^{9^{9^{9}}}$"], ["\\frac{1}{3}"], "math500", num_workers=2,
                      timeout_s=LIMIT)
    assert [(r.status, r.score) for r in res] == [(TO, -1.0)]
    assert pool.stats.timeouts == before_timeouts + 1
    assert summarize(res, "math500")["reward/timeouts"] == 1.0
    killed = pids_before - set(pool.worker_pids())
    assert len(killed) == 1, (pids_before, pool.worker_pids())
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)],
                                    timeout=60)
    assert not alive, f"timed-out worker still running: {alive}"
    # the pool keeps working after a kill (a replacement worker is started on demand)
    res = score_batch(["Answer: $\\frac{1}{2}$", "Answer: $0.5$", "Answer: $\\sqrt{4}$"],
                      ["\\frac{2}{4}", "\\frac12", "2"], "math500", num_workers=2, timeout_s=60.0)
    assert [(r.status, r.score) for r in res] == [(OK, 1.0)] * 3
    alive = [psutil.pid_exists(p) for p in pool.worker_pids()]
    assert alive and all(alive) and not (set(pool.worker_pids()) & killed)


_UNGUARDED = """
import json, sys
from megatron_dapo.reward import compute_score, score_batch
# deliberately no `if __name__ == "__main__":` guard
out = [compute_score(r, gt, data_source="math500", timeout_s=60.0).status
       for r, gt in [("The answer is \\\\boxed{\\\\frac{1}{2}}", "\\\\frac{2}{4}"),
                     ("Answer: $\\\\sqrt{4}$", "2"), ("Answer: $x^2$", "x^{2}")]]
acc = [compute_score(r, gt, data_source="math500", timeout_s=60.0).acc
       for r, gt in [("The answer is \\\\boxed{\\\\frac{1}{2}}", "\\\\frac{2}{4}"),
                     ("Answer: $\\\\sqrt{4}$", "2"), ("Answer: $x^2$", "x^{2}"),
                     ("Answer: $\\\\frac{1}{3}$", "\\\\frac{1}{2}")]]
batch = [r.acc for r in score_batch(["\\\\boxed{\\\\pi}"] * 3, ["\\\\pi"] * 3, "math500",
                                    num_workers=2, timeout_s=60.0)]
print("RESULT " + json.dumps({"status": out, "acc": acc, "batch": batch}))
"""


def _run_unguarded(tmp_path, env_extra=None):
    import subprocess
    import sys

    script = tmp_path / "plain_script.py"
    script.write_text(_UNGUARDED)
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_verifier_from_unguarded_script(tmp_path):
    """compute_score works from a plain script (no __main__ guard): workers never re-run it."""
    import json

    r = _run_unguarded(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, r.stdout  # printed once: the workers did not execute the script
    got = json.loads(lines[0][len("RESULT "):])
    assert got == {"status": [OK, OK, OK], "acc": [True, True, True, False],
                   "batch": [True, True, True]}, got


@pytest.mark.slow
def test_verifier_worker_that_cannot_start_is_loud(tmp_path):
    """A worker that cannot start stops scoring with MathVerifyWorkerError, never a silent -1."""
    # 1 MB of address space: the worker cannot import math-verify and reports a start-up error.
    r = _run_unguarded(tmp_path, {"MEGATRON_DAPO_REWARD_WORKER_MEM_GB": "0.001"})
    assert r.returncode != 0
    assert "RESULT" not in r.stdout
    assert "MathVerifyWorkerError" in r.stderr and "cannot start" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("value,expected", [
    ("34 cm", "34"), ("34cm", "34"), ("34\\%", "34"), ("34 \\text{ cm}^2", "34"),
    ("34, which is the answer", "34"), ("34 (in degrees)", "34"),
    ("34 + x", None), ("34/x", None), ("34\\pi", None), ("34x", None), ("3i", None),
    ("34 (mod 1000)", None), ("34^{2}", None), ("3a^a^a", None),
])
def test_trailing_text_rules(value, expected):
    assert normalize_integer(value) == expected


def test_regex_bait_in_tail_is_linear():
    for text in ("Answer: 3^" + " " * MB, "Answer: 3 " + "\\text{" * (MB // 6),
                 "Answer: 3 " + "^{" * (MB // 2), "Answer: 3 " + "a" * MB + "1"):
        t0 = time.perf_counter()
        r = compute_score(text, "3")
        assert time.perf_counter() - t0 < 10 * LIMIT
        assert r.score in (1.0, -1.0)


def test_scoring_resources_end_with_the_run():
    """A run's ExitStack owns the scoring threads and the math-verify workers: both stop when it closes."""
    from contextlib import ExitStack

    from megatron_dapo.reward import (executor, get_score_executor, math_verify_pool, scoring_resources,
                                      shutdown_score_executor)

    with ExitStack() as stack:
        stack.enter_context(scoring_resources())
        threads = get_score_executor()
        pool = get_pool()
        assert threads.submit(lambda: 7).result() == 7
        assert executor._EXECUTOR is threads and math_verify_pool._POOL is pool
    assert executor._EXECUTOR is None and math_verify_pool._POOL is None
    with pytest.raises(RuntimeError):
        threads.submit(lambda: 7)
    assert get_score_executor() is not threads  # a later run gets fresh threads
    shutdown_score_executor()
