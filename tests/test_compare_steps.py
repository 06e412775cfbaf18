"""tools/compare_steps.py: two runs' steps.jsonl compared value by value, wall-clock keys ignored."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("compare_steps",
                                               Path(__file__).resolve().parents[1] / "tools" / "compare_steps.py")
compare_steps = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_steps)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"step": 1, "prompt_indices": [3, 1], "actor/pg_loss": 0.125, "rollout/acc": float("nan"),
       "timing/step_s": 2.5, "actor/push_s": 0.3, "weight_sync/seconds": 0.1}


def test_equal_runs_ignore_wall_clock(tmp_path, capsys):
    other = dict(ROW, **{"timing/step_s": 9.0, "actor/push_s": 1.0, "weight_sync/seconds": 0.7})  # only wall-clock keys differ
    a, b = _write(tmp_path / "a.jsonl", [ROW]), _write(tmp_path / "b.jsonl", [other])
    assert compare_steps.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # step, prompt_indices, pg_loss and acc (NaN == NaN) compared; the two wall-clock keys skipped
    assert out.strip() == "compare_steps: 1 steps, 4 values compared, 0 differences"


def test_differences_are_named(tmp_path, capsys):
    changed = dict(ROW, **{"actor/pg_loss": 0.126, "prompt_indices": [3, 2], "new/key": 1.0})
    a = _write(tmp_path / "a.jsonl", [ROW, ROW])
    b = _write(tmp_path / "b.jsonl", [changed])
    assert compare_steps.main([str(a), str(b)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:-1] == ["number of steps: 2 != 1", "step 1: actor/pg_loss: 0.125 != 0.126",
                          "step 1: new/key only in after", "step 1: prompt_indices: [3, 1] != [3, 2]"]
    assert lines[-1] == "compare_steps: 1 steps, 4 values compared, 4 differences"


def test_rtol_and_extra_ignore(tmp_path):
    a = _write(tmp_path / "a.jsonl", [ROW])
    b = _write(tmp_path / "b.jsonl", [dict(ROW, **{"actor/pg_loss": 0.125 * (1 + 1e-9), "rollout/acc": 0.5})])
    assert compare_steps.main([str(a), str(b), "--rtol", "1e-6", "--ignore", "rollout/*"]) == 0
    assert compare_steps.main([str(a), str(b), "--ignore", "rollout/*"]) == 1


def test_unreadable_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    assert compare_steps.main([str(bad), str(bad)]) == 2
    assert "bad.jsonl:2: not a JSON line" in capsys.readouterr().err
    assert compare_steps.main([str(tmp_path / "missing.jsonl"), str(bad)]) == 2
