"""Small commands the sbatch scripts call so that shell and Python read the config the same way.

``python -m megatron_dapo.launch.slurm_tools cfg-get CONFIG KEY [OVERRIDE ...]``
    Print one dotted config key (``model.hf_path``, ``rollout.engine_tp_size``) after YAML loading
    and ``key=value`` overrides, without validation (files named in the config may not exist yet).
    Booleans print as ``true``/``false``, ``None`` as an empty line, lists as comma-joined items.

``python -m megatron_dapo.launch.slurm_tools wait-health [--timeout S] [--pid PID] URL [URL ...]``
    Poll ``URL/health`` until every engine answers HTTP 200 (SGLang's readiness probe). Exit 0 when
    all are ready; 1 on timeout or when process ``PID`` (the engines' ``srun``) has exited, naming the
    URLs that never became ready.

``python -m megatron_dapo.launch.slurm_tools progress CONFIG [OVERRIDE ...]``
    Where the run of CONFIG stands, for the crash-restart logic of ``slurm/common.sh`` (``dapo_finish``):
    three lines, (1) the last step in ``<run_dir>/steps.jsonl`` (0 when there is none), (2) the checkpoint a
    restart resumes from (``resume=auto``: the newest complete one under ``<run_dir>/checkpoints``; an
    explicit ``resume`` path: that path; empty when there is none or ``resume=none``), (3) ``resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from megatron_dapo.config import load_config


def cfg_get(config: str, key: str, overrides: list[str]) -> Any:
    """Value of dotted ``key`` in ``config`` + ``overrides``. Raises KeyError naming a missing key,
    :class:`megatron_dapo.config.ConfigError` for a bad config or override."""
    node: Any = load_config(config, overrides, validate=False)
    for part in key.split("."):
        if not hasattr(node, part):
            raise KeyError(f"config key {key!r}: no field {part!r}")
        node = getattr(node, part)
    return node


def format_value(value: Any) -> str:
    """Shell-friendly text of a config value (see module doc)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def last_logged_step(steps_log: Path) -> int:
    """The ``step`` of the last parseable line of a ``steps.jsonl`` (0 when there is none or no file)."""
    if not steps_log.exists():
        return 0
    for line in reversed(steps_log.read_text(errors="replace").splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not a step
            continue
    return 0


def progress(config: str, overrides: list[str]) -> tuple[int, Optional[Path], str]:
    """``(last logged step, checkpoint a restart resumes from or None, resume setting)`` of the run of
    ``config`` + ``overrides`` (see the module doc)."""
    # heavy: torch, needed only here (the other commands stay fast)
    from megatron_dapo.actor.checkpoint import latest_checkpoint

    cfg = load_config(config, overrides, validate=False)
    step = last_logged_step(cfg.run_dir / "steps.jsonl")
    if cfg.resume == "none":
        return step, None, cfg.resume
    ckpt = latest_checkpoint(cfg.ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume)
    return step, ckpt, cfg.resume


def _healthy(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive(pid: Optional[int]) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_health(urls: list[str], timeout_s: float = 600.0, interval_s: float = 2.0,
                pid: Optional[int] = None) -> list[str]:
    """Wait until every ``url`` answers ``GET /health`` with 200. Returns the URLs still not ready
    (empty list = success) after ``timeout_s`` seconds or once process ``pid`` is gone."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [u for u in pending if not _healthy(u, timeout=min(10.0, max(interval_s, 1.0)))]
        if not pending or time.monotonic() >= deadline or not _alive(pid):
            break
        time.sleep(interval_s)
    return pending


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_dapo.launch.slurm_tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cfg-get", help="print one config key")
    p.add_argument("config")
    p.add_argument("key")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("wait-health", help="wait for engines' /health")
    p.add_argument("urls", nargs="+")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--pid", type=int, default=None)
    p = sub.add_parser("progress", help="last logged step, checkpoint to resume from, resume setting")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "progress":
        try:
            step, ckpt, resume = progress(args.config, args.overrides)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{step}\n{ckpt or ''}\n{resume}")
        return 0
    if args.cmd == "cfg-get":
        try:
            print(format_value(cfg_get(args.config, args.key, args.overrides)))
        except (KeyError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    urls = [u for item in args.urls for u in item.split(",") if u]
    t0 = time.monotonic()
    left = wait_health(urls, args.timeout, args.interval, args.pid)
    if left:
        why = "engine process exited" if not _alive(args.pid) else f"timeout after {args.timeout:g} s"
        print(f"error: engines not ready ({why}): {' '.join(left)}", file=sys.stderr)
        return 1
    print(f"{len(urls)} engine(s) healthy after {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
