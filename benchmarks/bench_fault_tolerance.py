"""What one engine crash costs a run: the same short run with and without a ``kill -9`` of one rollout engine.

Both runs train the CPU demo (``examples/tiny-cpu/dapo.yaml``: tiny random Qwen2, arithmetic task) with two
disaggregated engines, streaming rollout, the ``distributed`` weight transport and the logprob check after every
push. In the second run, once step ``--kill-at - 1`` is in ``steps.jsonl``, this script kills engine 0 from outside
(SIGKILL to its process group and every descendant, as an OOM killer or a node fault would), so it dies during step
``--kill-at``. The run goes on with the other engine; the killed one is relaunched at the step boundary, brought to
the current weights and checked (``rollout/engine_restarts``).

Reported: the steps each run completed, the groups lost (``rollout_batch_size`` x steps minus the groups trained,
from ``steps.jsonl``'s ``prompt_indices``; a group trained twice in one step would also show there), the time of the
replacement (from the trainer's log line) and the wall-clock ratio of the two runs.

    python benchmarks/bench_fault_tolerance.py [--steps 10] [--kill-at 3] [--backend cpu]

``--backend sglang`` / ``vllm`` runs the same with real engines (``make engines``; minutes per engine start on
CPU). The last line printed is ``bench_fault_tolerance: steps completed X/X, groups lost 0, replacement R.R s, run time
with kill / without = Q.QQ`` (goal: groups lost 0, Q <= 1.5).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dapo.engines.launch_common import descendant_pids  # noqa: E402

CONFIG = REPO / "examples" / "tiny-cpu" / "dapo.yaml"
BATCH = 8  # rollout_batch_size of the demo config


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _engine_pids(trainer_pid: int, port: int) -> list[int]:
    """The engine process listening on ``port`` (a descendant of the trainer) and its own descendants."""
    for pid in descendant_pids(trainer_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and argv.index(b"--port") + 1 < len(argv) and argv[argv.index(b"--port") + 1] == \
                str(port).encode():
            return [pid] + descendant_pids(pid)
    return []


def run(out: Path, args, kill: bool) -> dict:
    """One run; with ``kill`` engine 0 is killed once step ``args.kill_at - 1`` is logged."""
    cmd = [sys.executable, "-m", "megatron_dapo.train", str(CONFIG), f"output_dir={out}", "run_name=run",
           f"trainer.total_steps={args.steps}", "trainer.save_interval=0", "trainer.export_hf=false",
           "rollout.num_engines=2", "rollout.colocated=false", "rollout.mode=streaming",
           f"rollout.backend={args.backend}", "weight_sync.transport=distributed" if args.backend != "vllm" else
           "weight_sync.transport=disk", "weight_sync.check_logprobs=true", "resume=none"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log_path = out / "trainer.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed = None
        while proc.poll() is None:
            time.sleep(0.5)
            if kill and killed is None and len(_steps(out / "run")) >= args.kill_at - 1:
                m = re.search(r"rollout engines: http://[^:]+:(\d+)", log_path.read_text())
                pids = _engine_pids(proc.pid, int(m.group(1))) if m else []
                if pids:
                    os.killpg(pids[0], signal.SIGKILL)
                    for p in pids:
                        try:
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    killed = time.perf_counter() - t0
                    print(f"  killed engine 0 (pid {pids[0]}, port {m.group(1)}) at {killed:.1f} s", flush=True)
    wall = time.perf_counter() - t0
    text = log_path.read_text()
    steps = _steps(out / "run")
    trained = [i for s in steps for i in s.get("prompt_indices", [])]
    lost = BATCH * len(steps) - sum(len(set(s.get("prompt_indices", []))) for s in steps)
    replaced = [float(x) for x in re.findall(r"replaced in ([0-9.]+) s", text)]
    res = {"rc": proc.returncode, "steps": len(steps), "wall_s": wall, "groups_lost": lost,
           "groups_trained": len(trained), "replacement_s": replaced,
           "engine_restarts": sum(s.get("rollout/engine_restarts", 0) for s in steps),
           "resubmitted": sum(s.get("rollout/requests_resubmitted", 0) for s in steps),
           "max_logprob_diff": max((s.get("weight_sync/engine_actor_logprob_max_abs_diff", 0) for s in steps),
                                   default=float("nan"))}
    if proc.returncode != 0:
        print(text[-3000:], file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=3, help="the step during which engine 0 is killed")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "sglang", "vllm"])
    args = ap.parse_args()
    if not 2 <= args.kill_at <= args.steps:
        ap.error("--kill-at must be in [2, --steps]")
    with tempfile.TemporaryDirectory(prefix="bench_ft_") as tmp:
        results = {}
        for name, kill in (("without", False), ("with", True)):
            out = Path(tmp) / name
            out.mkdir()
            print(f"run {name} kill ...", flush=True)
            results[name] = r = run(out, args, kill)
            print(f"  {json.dumps(r)}", flush=True)
    base, hit = results["without"], results["with"]
    repl = max(hit["replacement_s"], default=float("nan"))
    print(f"bench_fault_tolerance: steps completed {hit['steps']}/{args.steps}, groups lost {hit['groups_lost']}, "
          f"replacement {repl:.1f} s, run time with kill / without = {hit['wall_s'] / base['wall_s']:.2f}")


if __name__ == "__main__":
    main()
