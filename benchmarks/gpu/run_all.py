"""Run every part of benchmarks/gpu/parts.py, each in its own process with its own time cap.

    python benchmarks/gpu/run_all.py --out DIR [--dry-run] [--parts a,b] [--budget-s 520]

Writes ``DIR/gpu_results.json`` (machine, versions, and per part: ``ok``, ``error``, ``seconds`` and its
figures), ``DIR/RESULTS_gpu.md`` (the section for benchmarks/RESULTS.md) and ``DIR/parts.log`` (every
part's output). A part that fails, crashes or runs past its cap is recorded as ``ok: false`` with one line
of error, and the next part still runs. Exit code 0 when every part is ok, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from parts import PARTS  # noqa: E402

#: seconds each part may run on the H200 (the dry run uses DRY_CAP_S for every part)
CAPS_S = {"actor_step": 200, "logprob_memory": 60, "offload": 100, "tensor_ipc": 120, "thd_packing": 100,
          "sp_gather": 60}
DRY_CAP_S = 150


def _machine() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = str(exc)
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception as exc:  # noqa: BLE001
        info["megatron_core_error"] = str(exc)
    return info


def run_one(name: str, dry: bool, cap: float, out: Path) -> dict:
    """Run part ``name`` in its own process session (killed with everything it started after ``cap`` s);
    its output goes to ``out/.NAME.log``. Returns the part's result dict (``ok: false`` on any failure)."""
    result = out / f".{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "parts.py"), name, "--result", str(result)] + (["--dry-run"] if dry else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(out / f".{name}.log", "w")
    log.write(f"\n===== {name} (cap {cap:.0f} s) =====\n")
    log.flush()
    t0 = time.perf_counter()
    with log:
        return _wait(name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True), cap, result, t0)


def _wait(name: str, proc, cap: float, result: Path, t0: float) -> dict:
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started (engines, workers)
        proc.wait()
        return {"ok": False, "error": f"timed out after {cap:.0f} s", "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished part
        except ProcessLookupError:
            pass
    if result.exists():
        res = json.loads(result.read_text())
        result.unlink()
        return res
    return {"ok": False, "error": f"part process exited with code {proc.returncode} without a result (see parts.log)",
            "seconds": round(time.perf_counter() - t0, 2)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"## GPU script (benchmarks/gpu/run_all.sh{' --dry-run' if report['dry_run'] else ''}) - "
             f"{report['date']}",
             "",
             f"Machine: {m.get('gpu', 'no GPU (CPU dry run)')}"
             f"{' (' + str(m['gpu_mem_gib']) + ' GiB)' if 'gpu_mem_gib' in m else ''}, torch {m.get('torch')} "
             f"(CUDA {m.get('cuda')}), Python {m.get('python')}, megatron-core {m.get('megatron_core')}; "
             f"total {report['total_s']:.0f} s; {sum(p['ok'] for p in report['parts'].values())}/"
             f"{len(report['parts'])} parts ok.",
             "",
             "| part | ok | s | figures |",
             "| --- | --- | --- | --- |"]
    for name, res in report["parts"].items():
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in res.items() if k not in ("ok", "error", "seconds", "note"))
        if res.get("error"):
            figs = f"**error**: {res['error']}" + (f"; {figs}" if figs else "")
        lines.append(f"| {name} | {'yes' if res['ok'] else 'NO'} | {res.get('seconds', 0):.0f} | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list, default all")
    ap.add_argument("--jobs", type=int, default=1,
                    help="parts run at once (default 1; >1 only for the dry run: GPU figures need the device alone)")
    ap.add_argument("--budget-s", type=float, default=520.0,
                    help="wall-clock budget of the whole run; each part's cap is cut to what is left")
    a = ap.parse_args(argv)
    names = [p for p in a.parts.split(",") if p]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    if a.jobs > 1 and not a.dry_run:
        ap.error("--jobs > 1 is for --dry-run only (parts on one GPU would disturb each other's figures)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "dry_run": a.dry_run, "machine": _machine(), "parts": {}}
    def one(name: str) -> dict:
        left = a.budget_s - (time.perf_counter() - t0)
        cap = min(DRY_CAP_S if a.dry_run else CAPS_S[name], left)
        if cap < 10:
            res = {"ok": False, "error": f"not run: only {left:.0f} s of the budget left", "seconds": 0.0}
        else:
            res = run_one(name, a.dry_run, cap, out)
        print(f"[gpu] {name:15s} {'ok' if res['ok'] else 'FAILED'} {res.get('seconds', 0):7.1f} s"
              f"{'  ' + res['error'] if res.get('error') else ''}", flush=True)
        return res

    if a.jobs > 1:  # the dry run in CI: parts are independent processes, overlap their start-up
        with ThreadPoolExecutor(a.jobs) as pool:
            results = dict(zip(names, pool.map(one, names)))
    else:  # the GPU run: one part at a time (timings and memory figures must not share the device)
        results = {}
        for name in names:
            results[name] = one(name)
            report["parts"] = results
            report["total_s"] = round(time.perf_counter() - t0, 1)
            (out / "gpu_results.json").write_text(json.dumps(report, indent=1, default=str))
    report["parts"] = {n: results[n] for n in names}
    report["total_s"] = round(time.perf_counter() - t0, 1)
    with open(out / "parts.log", "a") as log:
        for name in names:
            part_log = out / f".{name}.log"
            if part_log.exists():
                log.write(part_log.read_text())
                part_log.unlink()
    (out / "gpu_results.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (out / "RESULTS_gpu.md").write_text(md)
    print(md, flush=True)
    return 0 if all(p["ok"] for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
