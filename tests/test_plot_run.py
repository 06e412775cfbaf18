"""tools/plot_run.py: TensorBoard scalars -> PNG of the DAPO monitored curves."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import matplotlib  # noqa: F401,E402 - a test dependency (setup.py extras "test")

_SPEC = importlib.util.spec_from_file_location("plot_run", Path(__file__).resolve().parents[1] / "tools" / "plot_run.py")
plot_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(plot_run)


@pytest.fixture
def tb_dir(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    d = tmp_path / "tb"
    w = SummaryWriter(log_dir=str(d))
    for step in range(1, 9):
        w.add_scalar("rollout/response_length_mean", 10.0 + 2 * step, step)
        w.add_scalar("rollout/reward_mean", -1.0 + 0.2 * step, step)
        w.add_scalar("actor/entropy", 1.0 / step, step)
        if step % 4 == 0:
            w.add_scalar("val/aime24/avg@32", 0.05 * step, step)
    w.add_scalar("rollout/reward_mean", 0.9, 8)  # re-logged step (resume): last value wins
    w.close()
    return d


def test_read_scalars_and_resolve(tb_dir):
    series = plot_run.read_scalars(tb_dir)
    steps, values = series["rollout/reward_mean"]
    assert steps == list(range(1, 9)) and values[-1] == pytest.approx(0.9)
    assert series["val/aime24/avg@32"][0] == [4, 8]
    found, missing = plot_run.resolve_tags(list(plot_run.DEFAULT_TAGS), sorted(series))
    assert found == ["rollout/response_length_mean", "rollout/reward_mean", "actor/entropy", "val/aime24/avg@32"]
    assert missing == ["rollout/mean_token_prob"]
    assert plot_run.ema([1.0, 1.0, 1.0], 0.6) == pytest.approx([1.0, 1.0, 1.0])


def test_main_writes_png_and_notes_missing_tags(tb_dir, tmp_path, capsys):
    out = tmp_path / "plots" / "run.png"
    assert plot_run.main(["--tb", str(tb_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rollout/mean_token_prob" in printed and "skipped" in printed
    assert "4 panels" in printed
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    with Image.open(out) as im:
        w, h = im.size
    assert w > 500 and h > 300  # 2 x 2 panels

    out2 = tmp_path / "one.png"
    assert plot_run.main(["--tb", str(tb_dir), "--out", str(out2), "--tags", "actor/*", "--smooth", "0.5"]) == 0
    assert out2.stat().st_size > 1000


def test_errors(tb_dir, tmp_path, capsys):
    assert plot_run.main(["--tb", str(tb_dir), "--out", str(tmp_path / "x.png"), "--tags", "nope/a", "nope/*"]) == 2
    err = capsys.readouterr().err
    assert "none of the requested tags" in err and "rollout/reward_mean" in err  # lists what exists
    assert not (tmp_path / "x.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_run.main(["--tb", str(empty), "--out", str(tmp_path / "y.png")]) == 2
    assert "no events.out.tfevents" in capsys.readouterr().err
    assert plot_run.main(["--tb", str(tmp_path / "missing"), "--out", str(tmp_path / "y.png")]) == 2
    assert "not found" in capsys.readouterr().err
    assert plot_run.main(["--tb", str(tb_dir.parent), "--out", str(tmp_path / "y.png")]) == 2
    assert "sub-directories" in capsys.readouterr().err
    with pytest.raises(ValueError, match="smooth"):
        plot_run.plot_run(tb_dir, tmp_path / "z.png", smooth=1.0)
