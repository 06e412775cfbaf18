#!/usr/bin/env python
"""Compare two runs' ``steps.jsonl`` value by value, ignoring wall-clock figures.

    python tools/compare_steps.py outputs/before/steps.jsonl outputs/after/steps.jsonl [--rtol 0] [--ignore GLOB ...]

Every line of ``steps.jsonl`` is one trainer step (``{"step", "prompt_indices", <every scalar>}``, written by
:meth:`megatron_dapo.trainer.Trainer._log`). Two runs of a deterministic config (``rollout.mode: deterministic``,
the tiny CPU demo) must agree on every value except the wall-clock ones: keys under ``timing/``, keys ending
in ``_s`` and ``*/seconds`` (``weight_sync/seconds``) are ignored by default, and ``--ignore`` adds shell-style globs (``fnmatch``). Values compare
exactly unless ``--rtol`` is given (``|a - b| <= rtol * max(|a|, |b|)``); NaN equals NaN.

Prints one line per difference (step, key, both values), a key present in one run only, or a different number
of steps, then a summary line ``compare_steps: N steps, K values compared, D differences``. Exit status 0 when
there is no difference, 1 otherwise, 2 for an unreadable file.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

#: Wall-clock figures: they differ between any two runs.
DEFAULT_IGNORE = ("timing/*", "*_s", "*/seconds")


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-empty line.

    Raises:
        OSError: the file cannot be read; ValueError: a line is not JSON (the message names the line).
    """
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    return rows


def _equal(a: Any, b: Any, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def compare(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], ignore: Sequence[str] = DEFAULT_IGNORE,
            rtol: float = 0.0) -> tuple[list[str], int]:
    """The differences between two step lists (aligned by position), and how many values were compared.

    Args:
        before, after: rows as :func:`read_steps` returns them.
        ignore: shell-style globs of keys to skip.
        rtol: relative tolerance for floats (0: exact).

    Returns:
        ``(differences, compared)``: one human-readable line per difference; the number of (step, key) values
        compared.
    """
    diffs: list[str] = []
    compared = 0
    if len(before) != len(after):
        diffs.append(f"number of steps: {len(before)} != {len(after)}")
    for a, b in zip(before, after):
        step = a.get("step", "?")
        for key in sorted(set(a) | set(b)):
            if any(fnmatch.fnmatchcase(key, g) for g in ignore):
                continue
            if key not in a or key not in b:
                diffs.append(f"step {step}: {key} only in {'after' if key not in a else 'before'}")
                continue
            compared += 1
            if not _equal(a[key], b[key], rtol):
                diffs.append(f"step {step}: {key}: {a[key]!r} != {b[key]!r}")
    return diffs, compared


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for floats (default: exact)")
    p.add_argument("--ignore", nargs="*", default=[], help="more key globs to ignore (timing/*, *_s and */seconds always are)")
    args = p.parse_args(argv)
    try:
        before, after = read_steps(args.before), read_steps(args.after)
    except (OSError, ValueError) as e:
        print(f"compare_steps: {e}", file=sys.stderr)
        return 2
    diffs, compared = compare(before, after, ignore=(*DEFAULT_IGNORE, *args.ignore), rtol=args.rtol)
    for d in diffs:
        print(d)
    print(f"compare_steps: {min(len(before), len(after))} steps, {compared} values compared, {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
