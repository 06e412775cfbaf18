"""Bad input, systematically: every config key and every dataset-row field given bad values.

Config: each leaf key of :class:`DAPOConfig` gets a wrong type, a negative number, an unknown enum
value and (for path keys) a missing file, on top of the tiny demo config. Every case must end in the
CLI's ``exit 2`` with one line naming the key (a :class:`ConfigError` whose message starts with the
key), or be a value the key legitimately accepts (listed below with the reason) -- never another
exception (a traceback), never a hang. The CLI runs in-process; a few cases also run as a subprocess.

Rows: each field of a verl-schema row missing, of the wrong type, a non-integer answer and a huge
prompt: a :class:`RowValidationError` naming the row and the field, or a counted skip (too long).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import typing
from contextlib import contextmanager

import pytest

from conftest import REPO_ROOT
from megatron_dapo import cli
from megatron_dapo.config import ConfigError, DAPOConfig, load_config
from megatron_dapo.data.dataset import RowValidationError, validate_row

CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return typing.get_origin(tp) or tp


LEAVES = dict(_leaves(DAPOConfig))
PATH_KEYS = {"model.hf_path", "data.train_files", "data.val_files", "resume", "rollout.engine_python"}

# Values a key legitimately accepts although they look bad, and why.
ACCEPTED = {
    # names and directories: any text without '/' is a legal run name, any text a legal output path
    ("run_name", "enum"), ("run_name", "wrong_type"),
    ("output_dir", "enum"), ("output_dir", "missing_file"), ("output_dir", "wrong_type"),
    # the demo config has model.make_tiny=true: a missing hf_path is created on first use
    ("model.hf_path", "enum"), ("model.hf_path", "missing_file"), ("model.hf_path", "wrong_type"),
    ("rollout.host", "enum"),                       # a syntactically valid host name
    ("rollout.api_key", "enum"), ("rollout.api_key", "wrong_type"),  # any string is a key
    # negative numbers with a meaning
    ("seed", "negative"),                           # any integer seeds the RNGs
    ("rollout.top_k", "negative"),                  # -1 = disabled (SGLang convention)
    ("algorithm.entropy_coeff", "negative"),        # < 0 penalises entropy (verl allows it)
}


def _names(line: str, key: str) -> bool:
    """The line names ``key`` (``section.leaf``, or ``section.leaf[i]`` for list items)."""
    return line.startswith(key)


def _cases():
    for key, tp in LEAVES.items():
        base = _base_type(tp)
        if base in (int, float):
            yield key, "wrong_type", "abc"
            yield key, "negative", "-3"
            yield key, "nan", "nan"
        elif base is bool:
            yield key, "wrong_type", "maybe"
        elif base is list:
            yield key, "wrong_type", "{a: 1}"
        elif base in (str, typing.Literal):  # Literal: rollout.backend, weight_sync.transport
            yield key, "wrong_type", "[1, 2]"
            yield key, "enum", "no-such-value-xyz"
        if key in PATH_KEYS:
            yield key, "missing_file", "[/nonexistent/x.parquet]" if base is list else "/nonexistent/dir"


CASES = list(_cases())


@contextmanager
def _deadline(seconds):
    def boom(*_):
        raise TimeoutError(f"hung for {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fuzz_covers_every_key():
    assert {k for k, _, _ in CASES} == set(LEAVES)


@pytest.mark.parametrize("key,kind,value", CASES, ids=[f"{k}:{kind}" for k, kind, _ in CASES])
def test_config_fuzz(key, kind, value, capsys, tmp_path):
    override = f"{key}={value}"
    extra = [f"output_dir={tmp_path}"] if key != "output_dir" else []
    with _deadline(30):
        try:
            load_config(CONFIG, extra + [override])
        except ConfigError as e:
            first = str(e).splitlines()[0]
            assert _names(first, key), first
            # the CLI turns it into exit 2 and one line on stderr (in-process)
            with pytest.raises(SystemExit) as ex:
                cli.main(["train", CONFIG, *extra, override])
            assert ex.value.code == 2
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert len(err) == 1 and _names(err[0].split("config error: ", 1)[-1], key), err
            return
    assert (key, kind) in ACCEPTED, f"{override} was accepted by validate()"


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("rollout.temperature=abc", "rollout.temperature"),
    ("actor.lr=-3", "actor.lr"),
    ("rollout.backend=no-such-value-xyz", "rollout.backend"),
    ("data.train_files=[/nonexistent/x.parquet]", "data.train_files[0]"),
])
def test_config_fuzz_subprocess(override, key, tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_dapo.cli", "train", CONFIG, override,
                        f"output_dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and key in err[0], (r.returncode, r.stderr[-2000:])


# ------------------------------------------------------------------------------------------ rows
def _row():
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "What is 1+1?"}],
            "ability": "MATH", "reward_model": {"ground_truth": "2", "style": "rule"},
            "extra_info": {"index": 0}}


def _set(row, path, value):
    node = row
    for p in path[:-1]:
        node = node[p]
    if value is _MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_MISSING = object()
FIELDS = {
    "data_source": ("data_source",),
    "prompt": ("prompt",),
    "prompt[0]": ("prompt", 0),
    "prompt[0].role": ("prompt", 0, "role"),
    "prompt[0].content": ("prompt", 0, "content"),
    "reward_model": ("reward_model",),
    "reward_model.ground_truth": ("reward_model", "ground_truth"),
}
WRONG = [None, 3, 2.5, math.nan, True, [], ["x"], {}, {"a": 1}, "", b"bytes"]
ROW_CASES = [(f, "missing", _MISSING) for f in FIELDS if not f.startswith("prompt[0]") or f != "prompt[0]"]
ROW_CASES += [(f, f"wrong:{v!r}", v) for f in FIELDS for v in WRONG]


def _valid_for(field, value):
    """Values of the wrong-type table a field legitimately accepts."""
    if field in ("data_source", "prompt[0].content") and value == "":
        return True  # an empty data source / message text is still a string
    if field == "prompt" and value == ["x"]:
        return False
    return False


@pytest.mark.parametrize("field,kind,value", ROW_CASES, ids=[f"{f}:{k}" for f, k, _ in ROW_CASES])
def test_row_fuzz(field, kind, value):
    row = _row()
    if field == "prompt[0]" and value is _MISSING:
        row["prompt"] = []
    else:
        _set(row, FIELDS[field], value)
    try:
        validate_row(row, source="rows.jsonl", row_number=7)
    except RowValidationError as e:
        msg = str(e)
        assert "row 7" in msg and len(msg.splitlines()) == 1, msg
        named = e.field.split("[")[0].split(".")[0]
        assert named == field.split("[")[0].split(".")[0], (field, msg)
        return
    assert _valid_for(field, value), f"row with {field} = {value!r} was accepted"


@pytest.mark.parametrize("gt", ["3.5", "\\frac{1}{2}", "x^2", "1,000", "  7 "])
def test_row_non_integer_answers_are_scored_not_crashed(gt):
    from megatron_dapo.reward import compute_score

    row = _row()
    row["reward_model"]["ground_truth"] = gt
    validate_row(row)
    r = compute_score("Answer: 41", gt, data_source="math_dapo", timeout_s=30.0)
    assert r.score in (1.0, -1.0) and r.status in ("ok", "no_answer", "parse_error")


def test_row_huge_prompt_is_a_counted_skip(qwen_tokenizer_dir):
    from megatron_dapo.data.dataset import PromptSkipStats, render_batch
    from megatron_dapo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(qwen_tokenizer_dir))
    big = _row()
    big["prompt"][0]["content"] = "word " * 200_000
    rows = [(0, _row()), (1, validate_row(big)), (2, _row())]
    stats = PromptSkipStats()
    with _deadline(120):
        kept, skipped = render_batch(tok, rows, 256, skip_stats=stats)
    assert [k[0] for k in kept] == [0, 2] and [s.row_index for s in skipped] == [1] and stats.total == 1
