#!/usr/bin/env python
"""Candidate tasks for SmolLM2-135M-Instruct and their per-prompt pass rates (which one can DAPO learn?).

DAPO only learns from groups whose G responses are not all equally rewarded (dynamic sampling drops the
rest, arXiv 2503.14476 Sec. 3.2), so a task is useful when a good share of prompts has 0 < #correct < G.
This script builds the candidate tasks as rows in the DAPO-Math-17k schema and measures that share:

* ``sums_dapo``    — the project's one-digit +/- problems (``megatron_dapo.data.generate_tasks``) wrapped
  in the DAPO-Math-17k instruction (the model must produce an ``Answer:`` line on its own);
* ``sums_oneshot`` — the same problems after a one-shot example that shows the ``Answer: N`` line;
* ``gsm8k_oneshot`` — easy GSM8K test items (at most two solution steps, answer < 100) after a one-shot
  worked example ending in ``Answer: N``.

Usage::

    python examples/smollm2-135m-cpu/tasks.py measure --model outputs/models/smollm2-135m-instruct \
        [--tasks sums_dapo,sums_oneshot,gsm8k_oneshot] [--prompts 16] [--g 8] [--out pass_rates.json]
    python examples/smollm2-135m-cpu/tasks.py write --task sums_oneshot --out-dir outputs/data/smollm2

``measure`` samples G responses per prompt with the project's CPU engine model (HF transformers, fp32,
temperature 1, top-p 1 — the example's rollout settings) and scores them with the trainer's reward
(``megatron_dapo.reward.score_batch``). ``write`` writes ``train.jsonl`` / ``val.jsonl`` (disjoint
problems) for ``data.train_files`` / ``data.val_files``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import os

#: ``../shared/data`` next to the checkout (override with MEGATRON_DAPO_SHARED, as tests/conftest.py does)
GSM8K = Path(os.environ.get("MEGATRON_DAPO_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "gsm8k" \
    / "test.jsonl"
ONESHOT_SUM = ("Reply with one line of the form \"Answer: N\".\n\n"
               "Question: What is 2 + 5?\nAnswer: 7\n\nQuestion: {problem}")
ONESHOT_GSM8K = ("Solve the problem. End with one line of the form \"Answer: N\".\n\n"
                 "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
                 "Tom has 3 + 4 = 7 apples.\nAnswer: 7\n\nQuestion: {problem}")


def _row(source: str, content: str, answer: str, index: int) -> dict:
    return {"data_source": source, "prompt": [{"role": "user", "content": content}], "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": index}}


def _sum_problems() -> list[tuple[str, str]]:
    """All 110 one-digit problems ``(text, answer)`` of the demo task, in a fixed order."""
    out = [(f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(10) if a + b <= 9]
    out += [(f"What is {a} - {b}?", str(a - b)) for a in range(10) for b in range(10) if a >= b]
    return out


def _gsm8k_easy(path: Path = GSM8K) -> list[tuple[str, str]]:
    """GSM8K test items with at most two solution lines before ``####`` and an integer answer below 100."""
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K test set not found: {path} (the shared data directory)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        steps, _, ans = r["answer"].rpartition("####")
        ans = ans.strip().replace(",", "")
        if ans.isdigit() and int(ans) < 100 and len(steps.strip().splitlines()) <= 2 and len(r["question"]) < 220:
            out.append((r["question"].strip(), ans))
    return out


def build(task: str) -> list[dict]:
    """All rows of ``task`` in a fixed order (split by :func:`split`). Raises ValueError for unknown tasks."""
    from megatron_dapo.data.tasks import format_dapo_prompt

    if task == "sums_dapo":
        return [_row("arith_demo", format_dapo_prompt(p), a, i) for i, (p, a) in enumerate(_sum_problems())]
    if task == "sums_oneshot":
        return [_row("arith_oneshot", ONESHOT_SUM.format(problem=p), a, i) for i, (p, a) in enumerate(_sum_problems())]
    if task == "gsm8k_oneshot":
        return [_row("gsm8k", ONESHOT_GSM8K.format(problem=p), a, i) for i, (p, a) in enumerate(_gsm8k_easy())]
    raise ValueError(f"unknown task {task!r}; expected sums_dapo, sums_oneshot or gsm8k_oneshot")


def split(rows: list[dict], n_val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and hold out ``n_val`` rows: ``(train, val)``, disjoint problems."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[n_val:], rows[:n_val]


def measure(model_dir: str, rows: list[dict], g: int, max_new_tokens: int, seed: int = 0,
            batch_size: int = 64) -> dict:
    """Sample ``g`` responses per row with the CPU engine model and score them with the trainer's reward.

    Returns ``{"per_prompt_correct": [int], "mixed_share", "all_wrong_share", "all_right_share", "mean_acc",
    "answer_line_share", "tokens_per_s", "seconds", "examples"}``.
    """
    import torch

    from megatron_dapo.data.dataset import render_prompt
    from megatron_dapo.data.tokenizer import load_tokenizer
    from megatron_dapo.reward import score_batch
    from megatron_dapo.reward.extract import find_answer_line
    from megatron_dapo.engines.cpu.model import CPUEngine
    from megatron_dapo.engines.cpu.requests import SamplingConfig, SeqRequest
    from megatron_dapo.rollout.generation import stop_ids_for

    tok = load_tokenizer(model_dir)
    gen_cfg = json.loads((Path(model_dir) / "generation_config.json").read_text())
    stops = tuple(stop_ids_for(tok, gen_cfg))
    eng = CPUEngine(model_dir, seed=seed, max_batch_size=batch_size)
    prompts = [render_prompt(tok, r["prompt"], 512) for r in rows]
    seqs = [(i, k) for i in range(len(rows)) for k in range(g)]
    texts: list[str] = [""] * len(seqs)
    t0, n_tok = time.time(), 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        reqs = [SeqRequest(rid=f"{i}-{k}", input_ids=prompts[i], return_logprob=False, logprob_start_len=-1,
                           seed=seed * 100003 + i * 101 + k,
                           params=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                                 stop_token_ids=stops))
                for i, k in chunk]
        with eng.model_lock:   # the engine's batch step (prefill + decode, per-sequence generators)
            eng._run_batch(reqs)
        for j, r in enumerate(reqs):
            texts[s + j] = tok.decode(r.output_ids, skip_special_tokens=True)
            n_tok += len(r.output_ids)
        print(f"  {min(s + batch_size, len(seqs))}/{len(seqs)} sequences, {time.time() - t0:.0f} s", file=sys.stderr)
    res = score_batch(texts, [rows[i]["reward_model"]["ground_truth"] for i, _ in seqs],
                      [rows[i]["data_source"] for i, _ in seqs])
    correct = [0] * len(rows)
    for (i, _), r in zip(seqs, res):
        correct[i] += int(r.acc)
    eng.stop()
    n = len(rows)
    secs = time.time() - t0
    return {"per_prompt_correct": correct, "g": g, "prompts": n,
            "mixed_share": sum(0 < c < g for c in correct) / n,
            "all_wrong_share": sum(c == 0 for c in correct) / n,
            "all_right_share": sum(c == g for c in correct) / n,
            "mean_acc": sum(correct) / (n * g),
            "answer_line_share": sum(find_answer_line(t) is not None for t in texts) / len(texts),
            "tokens_per_s": n_tok / secs, "seconds": secs,
            "examples": [texts[k * g] for k in range(min(3, n))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--tasks", default="sums_dapo,sums_oneshot,gsm8k_oneshot")
    m.add_argument("--prompts", type=int, default=16)
    m.add_argument("--g", type=int, default=8)
    m.add_argument("--max-new-tokens", default="sums_dapo=48,sums_oneshot=16,gsm8k_oneshot=64")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--out")
    w = sub.add_parser("write")
    w.add_argument("--task", required=True)
    w.add_argument("--out-dir", required=True)
    w.add_argument("--n-val", type=int, default=32)
    a = p.parse_args(argv)
    if a.cmd == "write":
        train, val = split(build(a.task), a.n_val)
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train), ("val", val)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(out / "train.jsonl")
        return 0
    import torch

    torch.set_num_threads(a.threads)
    max_new = dict(kv.split("=") for kv in a.max_new_tokens.split(","))
    report = {}
    for task in a.tasks.split(","):
        _, val = split(build(task), a.prompts)
        print(f"{task}: {len(val)} prompts x G={a.g}", file=sys.stderr)
        r = measure(a.model, val, a.g, int(max_new.get(task, 32)))
        r["max_new_tokens"] = int(max_new.get(task, 32))
        report[task] = r
        print(json.dumps({task: {k: v for k, v in r.items() if k != "examples"}}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
