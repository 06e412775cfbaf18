"""Tests for megatron_dapo.data: demo tasks, row loading/validation, PromptDataset, render_prompt,
the demo tokenizer and its random-policy accuracy."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from conftest import shared_path
from megatron_dapo.data.dataset import (PromptDataset, PromptSkipStats, PromptTooLong, RowValidationError,
                                        load_rows, render_batch, render_prompt, validate_row)
from megatron_dapo.data.tasks import (DAPO_INSTRUCTION_PREFIX, DAPO_INSTRUCTION_SUFFIX, format_dapo_prompt,
                                      generate_tasks, write_rows)
from megatron_dapo.data.tokenizer import (CHATML_TEMPLATE, last_answer_integer, load_tokenizer,
                                          stop_token_ids, train_demo_tokenizer, uniform_policy_accuracy)


# ----------------------------------------------------------------------------------------- tasks
def test_generated_rows_schema():
    rows = generate_tasks(200, seed=3)
    assert len(rows) == 200
    for i, row in enumerate(rows):
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == "arith_demo"
        assert row["ability"] == "MATH"
        assert row["reward_model"]["style"] == "rule"
        assert row["extra_info"] == {"index": i}
        (msg,) = row["prompt"]
        assert msg["role"] == "user"
        content = msg["content"]
        assert content.startswith(DAPO_INSTRUCTION_PREFIX + "\n\nWhat is ")
        assert content.endswith("?\n\n" + DAPO_INSTRUCTION_SUFFIX)
        problem = content.split("\n\n")[1]
        _, _, a, op, b = problem.rstrip("?").split(" ")
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert row["reward_model"]["ground_truth"] == str(expected)
        assert 0 <= expected <= 9
        validate_row(row)


def test_generate_tasks_deterministic_and_balanced():
    assert generate_tasks(50, seed=7) == generate_tasks(50, seed=7)
    assert generate_tasks(50, seed=7) != generate_tasks(50, seed=8)
    counts = Counter(r["reward_model"]["ground_truth"] for r in generate_tasks(5000, seed=0))
    assert set(counts) == {str(d) for d in range(10)}
    assert all(350 < c < 650 for c in counts.values()), counts  # uniform answers: 500 expected each
    with pytest.raises(ValueError, match="num_rows"):
        generate_tasks(-1)


def test_instruction_matches_real_dapo_rows():
    path = shared_path("data", "dapo-math-17k", "dapo_math_17k.parquet")
    rows = load_rows(path, limit=50)
    for row in rows:
        content = row["prompt"][0]["content"]
        problem = content[len(DAPO_INSTRUCTION_PREFIX) + 2:-(len(DAPO_INSTRUCTION_SUFFIX) + 2)]
        assert format_dapo_prompt(problem) == content


def test_write_rows_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match="unsupported suffix"):
        write_rows(generate_tasks(2), tmp_path / "x.csv")


# ------------------------------------------------------------------------------------ load_rows
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_and_load_roundtrip(tmp_path, suffix):
    rows = generate_tasks(17, seed=1)
    path = write_rows(rows, tmp_path / f"demo{suffix}")
    assert load_rows(path) == rows
    assert load_rows([str(path), path], limit=5) == rows[:5] + rows[:5]


def test_load_real_dapo_math_both_layouts():
    p17k = shared_path("data", "dapo-math-17k", "dapo_math_17k.parquet")
    p16 = shared_path("data", "dapo-math-17k", "dapo_math_original_rows16.parquet")
    rows = load_rows(p17k, limit=100)
    assert len(rows) == 100
    assert all(r["data_source"] == "math_dapo" for r in rows)
    assert all(r["reward_model"]["ground_truth"].lstrip("-").isdigit() for r in rows)
    assert isinstance(rows[0]["extra_info"]["index"], int)
    rows16 = load_rows([p16])
    assert len(rows16) == 16
    assert isinstance(rows16[0]["extra_info"]["index"], str)  # UUID layout
    both = load_rows([p16, p17k], limit=3)
    assert [r["data_source"] for r in both][:3] == [rows16[0]["data_source"]] * 3


_BAD_CASES = [
    (lambda r: r.pop("data_source"), "data_source"),
    (lambda r: r.update(data_source=3), "data_source"),
    (lambda r: r.update(prompt=[]), "prompt"),
    (lambda r: r.update(prompt="What is 1 + 1?"), "prompt"),
    (lambda r: r["prompt"][0].pop("content"), "prompt[0].content"),
    (lambda r: r["prompt"][0].update(role=""), "prompt[0].role"),
    (lambda r: r.pop("reward_model"), "reward_model"),
    (lambda r: r["reward_model"].pop("ground_truth"), "reward_model.ground_truth"),
    (lambda r: r["reward_model"].update(ground_truth=7), "reward_model.ground_truth"),
    (lambda r: r["reward_model"].update(ground_truth=" "), "reward_model.ground_truth"),
    (lambda r: r.update(reward_model="7"), "reward_model"),
]


@pytest.mark.parametrize("mutate,field", _BAD_CASES)
def test_bad_row_error_names_file_row_and_field(tmp_path, mutate, field):
    rows = generate_tasks(5, seed=0)
    bad = copy.deepcopy(rows)
    mutate(bad[3])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(RowValidationError) as ei:
        load_rows(path)
    msg = str(ei.value)
    assert "bad.jsonl" in msg and "row 3" in msg and f"'{field}'" in msg
    assert ei.value.row_number == 3 and ei.value.field == field


def test_bad_parquet_row_and_bad_json_and_missing_file(tmp_path):
    rows = generate_tasks(4, seed=0)
    rows[2]["reward_model"]["ground_truth"] = None
    p = write_rows(rows, tmp_path / "bad.parquet")
    with pytest.raises(RowValidationError, match=r"bad\.parquet: row 2 .*reward_model\.ground_truth"):
        load_rows(p)
    j = tmp_path / "broken.jsonl"
    j.write_text(json.dumps(generate_tasks(1)[0]) + "\n{not json\n")
    with pytest.raises(RowValidationError, match=r"broken\.jsonl: row 1 .*line 2"):
        load_rows(j)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_rows(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="suffix"):
        load_rows(tmp_path / "x.csv")


# ------------------------------------------------------------------------------- PromptDataset
def _indices(batch):
    return [i for i, _ in batch]


def test_dataset_epochs_are_permutations_and_deterministic():
    rows = generate_tasks(10, seed=0)
    ds = PromptDataset(rows, seed=5)
    epoch0 = _indices(ds.next_batch(10))
    epoch1 = _indices(ds.next_batch(10))
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1)
    assert epoch0 != epoch1  # a fresh permutation per epoch
    assert ds.state_dict()["epoch"] == 2
    again = PromptDataset(rows, seed=5)
    assert _indices(again.next_batch(20)) == epoch0 + epoch1
    assert _indices(PromptDataset(rows, seed=6).next_batch(10)) != epoch0
    assert _indices(PromptDataset(rows, seed=5, shuffle=False).next_batch(13)) == list(range(10)) + [0, 1, 2]
    batch = PromptDataset(rows, seed=5).next_batch(3)
    assert all(row is rows[i] for i, row in batch)


def test_dataset_exact_resume_across_epoch_boundary():
    rows = generate_tasks(7, seed=0)
    ref = PromptDataset(rows, seed=11)
    reference = [_indices(b) for b in ref.batches(3, num_batches=8)]

    ds = PromptDataset(rows, seed=11)
    first = [_indices(ds.next_batch(3)) for _ in range(2)]  # position 6 of epoch 0
    state = json.loads(json.dumps(ds.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 0 and state["position"] == 6
    resumed = PromptDataset(rows, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    rest = [_indices(resumed.next_batch(3)) for _ in range(6)]  # crosses epochs 0→1→2
    assert first + rest == reference
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 3


def test_dataset_errors():
    with pytest.raises(ValueError, match="no rows"):
        PromptDataset([], seed=0)
    ds = PromptDataset(generate_tasks(4), seed=0)
    with pytest.raises(ValueError, match="positive"):
        ds.next_batch(0)
    with pytest.raises(ValueError, match="5 rows"):
        ds.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "num_rows": 5})
    with pytest.raises(ValueError, match="position"):
        ds.load_state_dict({"epoch": 0, "position": 4, "seed": 0})
    with pytest.raises(KeyError, match="seed"):
        ds.load_state_dict({"epoch": 0, "position": 0})


# ------------------------------------------------------------------------------- render_prompt
@pytest.fixture(scope="module")
def qwen_tok():
    return load_tokenizer(shared_path("data", "qwen2.5-tokenizer"))


def test_render_prompt_matches_apply_chat_template_qwen(qwen_tok):
    rows = load_rows(shared_path("data", "dapo-math-17k", "dapo_math_17k.parquet"), limit=5) + generate_tasks(3)
    for row in rows:
        ids = render_prompt(qwen_tok, row["prompt"], max_prompt_length=4096)
        assert isinstance(ids, list) and all(type(t) is int for t in ids)
        # independent of apply_chat_template (which render_prompt wraps): Qwen2.5's ChatML layout
        # written out, with its default system message when the row has none
        parts = [] if row["prompt"][0]["role"] == "system" else [
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["prompt"]]
        expected = "".join(parts) + "<|im_start|>assistant\n"
        assert qwen_tok.decode(ids) == expected
        assert ids == qwen_tok.encode(expected, add_special_tokens=False)
        assert ids[-3:] == qwen_tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_render_prompt_too_long_is_counted_skip(qwen_tok):
    rows = generate_tasks(4)
    n = len(render_prompt(qwen_tok, rows[0]["prompt"], None))
    stats = PromptSkipStats()
    assert render_prompt(qwen_tok, rows[0]["prompt"], n) is not None
    assert render_prompt(qwen_tok, rows[0]["prompt"], n - 1, row_index=0, skip_stats=stats) is None
    assert stats.total == 1 and stats.recent[0] == PromptTooLong(n, n - 1, 0)
    assert f"{n} tokens > max_prompt_length={n - 1}" in stats.recent[0].reason
    long_row = copy.deepcopy(rows[1])
    long_row["prompt"][0]["content"] += " and more" * 50
    batch = [(0, rows[0]), (1, long_row), (2, rows[2])]
    kept, skipped = render_batch(qwen_tok, batch, n + 2, skip_stats=stats)
    assert [k[0] for k in kept] == [0, 2] and [s.row_index for s in skipped] == [1]
    assert stats.total == 2
    with pytest.raises(ValueError, match="max_prompt_length"):
        render_prompt(qwen_tok, rows[0]["prompt"], 0)


# ------------------------------------------------------------------------------ demo tokenizer
@pytest.fixture(scope="module")
def demo_rows():
    return generate_tasks(2000, seed=0)


@pytest.fixture(scope="module")
def demo_tok_dir(demo_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tok")
    train_demo_tokenizer(demo_rows, out)
    return out


@pytest.fixture(scope="module")
def demo_tok(demo_tok_dir):
    return load_tokenizer(demo_tok_dir)


def test_demo_tokenizer_files_specials_and_template(demo_tok, demo_tok_dir):
    d = demo_tok_dir
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == CHATML_TEMPLATE
    assert 120 <= len(demo_tok) <= 300
    vocab = demo_tok.get_vocab()
    assert demo_tok.pad_token == "<|endoftext|>" and demo_tok.eos_token == "<|im_end|>"
    assert stop_token_ids(demo_tok) == sorted([vocab["<|endoftext|>"], vocab["<|im_end|>"]])
    msgs = [{"role": "system", "content": "What is 1 + 2?"}, {"role": "user", "content": "What is 3 + 4?"}]
    text = demo_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nWhat is 1 + 2?<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = render_prompt(demo_tok, msgs, 512)
    assert ids[0] == vocab["<|im_start|>"] and demo_tok.decode(ids) == text
    # Answer lines became single tokens (merges spanning the space).
    for d_ in range(10):
        assert demo_tok.encode(f"Answer: {d_}\n", add_special_tokens=False) == [vocab[f"Answer:\u0120{d_}\u010a"]]


def test_demo_tokenizer_round_trip(demo_tok, demo_rows):
    for row in demo_rows[:300]:
        for text in (row["prompt"][0]["content"], f"Answer: {row['reward_model']['ground_truth']}\n"):
            ids = demo_tok.encode(text, add_special_tokens=False)
            assert demo_tok.decode(ids) == text
        ids = render_prompt(demo_tok, row["prompt"], 512)
        assert len(ids) < 150  # the boilerplate instruction compresses well
        assert demo_tok.decode(ids) == demo_tok.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                    tokenize=False)


def test_demo_tokenizer_uniform_policy_accuracy(demo_tok, demo_rows):
    """A uniform sampler over the demo vocabulary (≈ a tiny random model at temperature 1) already
    answers a few percent correctly within 32 tokens: measured ≈ 6 % (lenient and exact-line)."""
    acc = uniform_policy_accuracy(demo_tok, demo_rows, num_samples=4000, max_response_tokens=32, seed=0)
    print(f"uniform-policy accuracy: {acc}")
    assert 0.03 <= acc["lenient"] <= 0.30
    assert 0.03 <= acc["exact_line"] <= 0.30
    assert acc["has_answer"] > 0.5
    # The same sampler over Qwen2.5's 151k vocabulary would essentially never answer.


def test_train_demo_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no training"):
        train_demo_tokenizer([], tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_demo_tokenizer(generate_tasks(20), tmp_path, vocab_size=20)
    with pytest.raises(ValueError, match="item 1"):
        train_demo_tokenizer(["abc", 3], tmp_path)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer_config\.json.*found: config\.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("text,expected", [
    ("blah\nAnswer: 7", "7"),
    ("Answer: 3\nmore\nanswer:12 apples", "12"),
    ("ANSWER :  -4", "-4"),
    ("Answer: $x$", None),
    ("no answer line", None),
    ("Answer: 5\nAnswer:", None),
    ("Answer: +8", "8"),
])
def test_last_answer_integer(text, expected):
    assert last_answer_integer(text) == expected
