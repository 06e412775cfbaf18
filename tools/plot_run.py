#!/usr/bin/env python
"""Plot the training curves the DAPO paper monitors from a run's TensorBoard events into one PNG.

    python tools/plot_run.py --tb outputs/<run_name>/tb --out run.png [--tags TAG_OR_GLOB ...] [--smooth 0.6]

Default curves (DAPO, arXiv 2503.14476, Sec. 3.5 / Fig. 7: response length, reward score,
generation entropy, mean token probability, and the AIME avg@32 accuracy)::

    rollout/response_length_mean  rollout/reward_mean  actor/entropy  rollout/mean_token_prob  val/*/avg@*

Tags may be shell-style globs (``fnmatch``); a glob expands to every matching scalar tag.  Requested
tags absent from the events are skipped with a printed note; when none is present the tool fails with
the list of available tags.  Scalars are read with TensorBoard's
``tensorboard.backend.event_processing.event_accumulator.EventAccumulator`` (every event file in the
directory, in order; if a step was logged more than once, e.g. after a resume, the last value wins).
Drawing uses matplotlib (``pip install matplotlib``; the Agg backend, no display needed).
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_TAGS = (
    "rollout/response_length_mean",
    "rollout/reward_mean",
    "actor/entropy",
    "rollout/mean_token_prob",
    "val/*/avg@*",
)


def read_scalars(tb_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of a TensorBoard event directory (or a single event file).

    Returns:
        ``{tag: (steps, values)}`` with steps ascending and one value per step (the last one logged).

    Raises:
        FileNotFoundError: ``tb_dir`` does not exist or holds no ``events.out.tfevents.*`` file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    p = Path(tb_dir)
    if not p.exists():
        raise FileNotFoundError(f"TensorBoard path not found: {p}")
    if p.is_dir() and not any(p.glob("events.out.tfevents.*")):
        nested = sorted({str(f.parent) for f in p.rglob("events.out.tfevents.*")})
        hint = f" (event files found in sub-directories: {', '.join(nested)})" if nested else ""
        raise FileNotFoundError(f"no events.out.tfevents.* file in {p}{hint}")
    acc = EventAccumulator(str(p), size_guidance={"scalars": 0})  # 0 = keep every scalar event
    acc.Reload()
    out: dict[str, tuple[list[int], list[float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        last: dict[int, float] = {}
        for ev in acc.Scalars(tag):
            last[int(ev.step)] = float(ev.value)
        steps = sorted(last)
        out[tag] = (steps, [last[s] for s in steps])
    return out


def resolve_tags(requested: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand globs against ``available``; returns ``(found tags in request order, missing requests)``."""
    found: list[str] = []
    missing: list[str] = []
    for req in requested:
        if any(ch in req for ch in "*?["):
            hits = sorted(t for t in available if fnmatch.fnmatchcase(t, req))
        else:
            hits = [req] if req in available else []
        if not hits:
            missing.append(req)
        for h in hits:
            if h not in found:
                found.append(h)
    return found, missing


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average (debiased), ``weight`` in [0, 1)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(acc / norm if norm > 0 else v)
    return out


def plot_run(tb_dir: str | Path, out: str | Path, tags: Sequence[str] = DEFAULT_TAGS, *, smooth: float = 0.0,
             title: str | None = None, ncols: int = 2) -> list[str]:
    """Write a PNG with one panel (value vs. step) per found tag.

    Args:
        tb_dir: TensorBoard log directory (``<output_dir>/<run_name>/tb``) or event file.
        out: output PNG path (parent directories are created).
        tags: tag names or globs (see the module docstring).
        smooth: EMA weight in ``[0, 1)``; ``> 0`` draws the smoothed curve over the faded raw one
            (``val/*`` curves are always drawn raw).
        title: figure title (default: the run directory's name).
        ncols: panels per row.

    Returns:
        the plotted tags.

    Raises:
        ValueError: no requested tag is present (lists what is), or a bad ``smooth`` / ``ncols``.
        FileNotFoundError: see :func:`read_scalars`.
        ImportError: matplotlib is not installed.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {smooth}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    series = read_scalars(tb_dir)
    found, missing = resolve_tags(list(tags), sorted(series))
    for m in missing:
        print(f"note: tag {m!r} not in {tb_dir}; skipped")
    if not found:
        avail = ", ".join(sorted(series)) or "none"
        raise ValueError(f"none of the requested tags ({', '.join(tags)}) is in {tb_dir}; "
                         f"available scalar tags: {avail}")
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("tools/plot_run.py needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(ncols, len(found))
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, found):
        steps, values = series[tag]
        if smooth > 0 and not tag.startswith("val/"):  # sparse validation curves stay raw
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1.0)
            ax.plot(steps, ema(values, smooth), color="tab:blue", linewidth=1.6)
        else:
            ax.plot(steps, values, color="tab:blue", linewidth=1.4, marker="o" if len(steps) < 30 else None,
                    markersize=3)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(found):]:
        ax.set_visible(False)
    where = Path(tb_dir).resolve()
    if where.is_file() or where.name == "tb":  # <output_dir>/<run_name>/tb -> the run name
        where = where.parent
    fig.suptitle(title or where.name, fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return found


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 on success, 2 on an input error (message on stderr)."""
    ap = argparse.ArgumentParser(description="Plot DAPO training curves from TensorBoard events to a PNG.")
    ap.add_argument("--tb", required=True, help="TensorBoard directory (e.g. outputs/<run_name>/tb)")
    ap.add_argument("--out", required=True, help="output PNG file")
    ap.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS),
                    help="scalar tags or globs (default: %(default)s)")
    ap.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1) (default 0: raw)")
    ap.add_argument("--title", default=None, help="figure title")
    args = ap.parse_args(argv)
    try:
        found = plot_run(args.tb, args.out, args.tags, smooth=args.smooth, title=args.title)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"plot_run: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(found)} panels: {', '.join(found)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
