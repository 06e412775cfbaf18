"""Static checks of slurm/*.sbatch and the examples' submit scripts, `sbatch --test-only` against the
local test cluster (../shared/tools/local-slurm), and a run of slurm/cpu_smoke.sbatch's shell logic
with stand-in trainer/engine programs (the real end-to-end runs are in the lead's tests)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SLURM_START, require

SLURM = REPO_ROOT / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh"), *REPO_ROOT.glob("examples/*/submit.sh")])
GPU_EXAMPLES = {"qwen2.5-32b": 16, "qwen2.5-7b": 1, "qwen2.5-0.5b": 1, "qwen3-30b-a3b": 8}
LOCAL_CONF = Path("/tmp/local-slurm/etc/slurm.conf")


def test_logs_directory_is_in_the_repository():
    """`sbatch slurm/X.sbatch` (#SBATCH --output=logs/...) on a fresh clone: logs/ must exist before the job
    starts, or Slurm writes no output at all. The repository ships it (logs/README.md; the rest is ignored)."""
    r = subprocess.run(["git", "ls-files", "--error-unmatch", "logs/README.md"], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    for path in ("logs/123/engines-step.log", "logs/dapo-123.out"):  # job output stays out of git
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT, timeout=30).returncode == 0, path


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"dapo.sbatch", "dapo_disaggregated.sbatch", "cpu_smoke.sbatch", "common.sh", "engines_on_node.sh"} <= names
    assert len([p for p in SCRIPTS if p.name == "submit.sh"]) == len(GPU_EXAMPLES)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_bash_syntax(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _directives(path: Path) -> list[str]:
    return [line[len("#SBATCH"):].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("name", ["dapo.sbatch", "dapo_disaggregated.sbatch", "cpu_smoke.sbatch"])
def test_requeue_and_signal_directives(name):
    d = " ".join(_directives(SLURM / name))
    assert "--requeue" in d
    assert re.search(r"--signal=B:USR1@\d+", d)
    assert "--open-mode=append" in d  # requeued runs append to the same log
    text = (SLURM / name).read_text()
    assert "dapo_finish" in text and "dapo_run_trainer" in text


def test_colocated_script_structure():
    text = (SLURM / "dapo.sbatch").read_text()
    common = (SLURM / "common.sh").read_text()
    engines = (SLURM / "engines_on_node.sh").read_text()
    assert "--gpus-per-node=8" in " ".join(_directives(SLURM / "dapo.sbatch"))
    assert "srun --overlap" in common and "scontrol requeue" in common and "DAPO_PREEMPT_FILE" in common
    assert "kill -USR1" in (SLURM / "trainer_task.sh").read_text()  # the preemption request reaches the trainer
    assert "--ntasks-per-node=\"$GPUS_PER_NODE\"" in text and "megatron_dapo.train" in text
    assert "sglang.launch_server" in engines and "--enable-memory-saver" in engines
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"):
        assert var in common
    assert "--container-image" in common and "--container-mounts" in common
    dis = (SLURM / "dapo_disaggregated.sbatch").read_text()
    assert "weight_sync.transport=distributed" in dis and "--relative=" in dis


@functools.lru_cache(maxsize=1)
def _probe_cluster():
    """(env, node count) of a reachable cluster with GPU nodes, or a skip reason string. Probed once."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch not installed"
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.exists():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    conf = Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if not conf.exists():
        return f"no Slurm config at {conf}"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0 or not r.stdout.strip():
        return f"no Slurm cluster reachable: {r.stderr.strip()[:200]}"
    if "gpu" not in r.stdout:
        return "cluster has no GPU nodes for --test-only"
    return env, sum(int(line.split()[0]) for line in r.stdout.strip().splitlines())


def _cluster_env():
    probe = _probe_cluster()
    require(not isinstance(probe, str), f"Slurm cluster with GPU nodes ({probe})", SLURM_START)
    env, nodes = probe
    return dict(env), nodes


def _test_only(cmd, env, cwd=REPO_ROOT):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.mark.parametrize("example", sorted(GPU_EXAMPLES))
def test_sbatch_test_only_examples(example):
    env, available = _cluster_env()
    wanted = GPU_EXAMPLES[example]
    submit = str(REPO_ROOT / "examples" / example / "submit.sh")
    r = _test_only(["bash", submit], {**env, "SBATCH_EXTRA": "--test-only", "NODES": str(min(wanted, available))})
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
    if wanted > available:
        # The only objection to the full-size request is the node count of this small test cluster.
        r = _test_only(["bash", submit], {**env, "SBATCH_EXTRA": "--test-only", "NODES": str(wanted)})
        assert r.returncode != 0 and "Requested node configuration is not available" in r.stderr, r.stderr


def test_sbatch_test_only_scripts():
    env, available = _cluster_env()
    nodes = min(2, available)
    for args in (["--nodes=1", str(SLURM / "dapo.sbatch"), "examples/qwen2.5-7b/dapo.yaml"],
                 [f"--nodes={nodes}", str(SLURM / "dapo_disaggregated.sbatch"), "examples/qwen2.5-32b/dapo.yaml"],
                 [str(SLURM / "cpu_smoke.sbatch")]):
        if "cpu_smoke" in args[-1] and available < 2:
            continue
        r = _test_only(["sbatch", "--test-only", *args], env)
        assert r.returncode == 0 and "to start at" in r.stderr, (args, r.stderr)


def test_common_init_parses_config_and_overrides(tmp_path):
    cmd = textwrap.dedent("""
        source slurm/common.sh
        dapo_init examples/qwen2.5-7b/dapo.yaml trainer.total_steps=3 'rollout.engine_urls=[http://a:1]'
        echo "CONFIG=$CONFIG"; printf 'OV=%s\\n' "${OVERRIDES[@]}"; echo "PY=$PY"; echo "LOG=$LOG_DIR"
        echo "TP=$(dapo_cfg rollout.engine_tp_size) STEPS=$(dapo_cfg trainer.total_steps)"
        echo "PORT=$(dapo_engine_base_port)"
    """)
    env = {**os.environ, "DAPO_ROOT": str(REPO_ROOT), "SLURM_JOB_ID": "171", "DAPO_OVERRIDES": "seed=7"}
    env.pop("DAPO_CONFIG", None)
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    assert "CONFIG=examples/qwen2.5-7b/dapo.yaml" in out
    assert out.index("OV=seed=7") < out.index("OV=trainer.total_steps=3")  # arguments come last and win
    assert "OV=rollout.engine_urls=[http://a:1]" in out
    assert "TP=1 STEPS=3" in out and "PORT=30016" in out  # 30000 + 16 * (171 % 170)
    shutil.rmtree(REPO_ROOT / "logs" / "171", ignore_errors=True)
    if (REPO_ROOT / "logs").is_dir() and not any((REPO_ROOT / "logs").iterdir()):
        (REPO_ROOT / "logs").rmdir()
    # no config at all: a clear error
    r = subprocess.run(["bash", "-c", "source slurm/common.sh; dapo_init a=b"], capture_output=True, text=True,
                       env=env, cwd=REPO_ROOT, timeout=60)
    assert r.returncode == 1 and "no config" in r.stderr


# --------------------------------------------------------------------------- shell logic on the cluster

STUB_CLI = """
import sys
from pathlib import Path
assert sys.argv[1] == "prepare", sys.argv
print("preparing (stub)")
print(Path("stub-model").resolve())
"""
STUB_ENGINE = """
import argparse, http.server
ap = argparse.ArgumentParser(); ap.add_argument("--model-path"); ap.add_argument("--host"); ap.add_argument("--port", type=int)
a = ap.parse_args()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((a.host, a.port), H).serve_forever()
"""
STUB_TRAIN = """
import json, os, signal, sys, time, urllib.request
from megatron_dapo.launch.dist_env import resolve_dist_env
env = resolve_dist_env()
urls = [a.split("=", 1)[1].strip("[]").split(",") for a in sys.argv[1:] if a.startswith("rollout.engine_urls=")][0]
ok = all(urllib.request.urlopen(u + "/health", timeout=5).status == 200 for u in urls)
print("STUB-TRAIN", json.dumps(env.to_dict()), "engines_ok=%s" % ok, " ".join(sys.argv[1:]), flush=True)
if os.environ.get("STUB_WAIT_SIGNAL"):
    def on_signal(signum, frame):
        print("STUB-CKPT rank", env.rank, "signal", signum, flush=True)
        sys.exit(3)
    signal.signal(signal.SIGUSR1, on_signal)
    time.sleep(120)
    sys.exit(1)
"""


def _stub_root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(SLURM, root / "slurm")
    # The whole real package (so config.py and the launch tools import what they really import), with the
    # engine server, the CLI and the trainer entry point replaced by stubs.
    pkg = root / "megatron_dapo"
    shutil.copytree(REPO_ROOT / "megatron_dapo", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "engines" / "cpu" / "server.py").write_text(STUB_ENGINE)
    (pkg / "cli.py").write_text(STUB_CLI)
    (pkg / "train.py").write_text(STUB_TRAIN)
    (root / "examples" / "tiny-cpu").mkdir(parents=True)
    (root / "examples" / "tiny-cpu" / "dapo.yaml").write_text("run_name: smoke\nmodel:\n  hf_path: stub-model\n")
    (root / "logs").mkdir()
    return root


def _run_cluster_job(root: Path, env: dict, extra_env: dict, wait: bool, plain_bash: bool = False):
    """Submit ``root``'s slurm/cpu_smoke.sbatch from ``root``: ``sbatch --parsable [--wait] SCRIPT``, or with
    ``plain_bash`` ``bash SCRIPT`` (the script submits itself; the options through SBATCH_EXTRA)."""
    env = {**env, **extra_env, "DAPO_ROOT": str(root), "DAPO_PYTHON": sys.executable}
    opts = ["--parsable"] + (["--wait"] if wait else [])
    script = str(root / "slurm" / "cpu_smoke.sbatch")
    args = ["sbatch", *opts, script]
    if plain_bash:
        args, env["SBATCH_EXTRA"] = ["bash", script], " ".join(opts)
        env.pop("SLURM_JOB_ID", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=240)


def _cluster_for_runs():
    env, available = _cluster_env()
    require(available >= 2, f"a 2-node Slurm cluster (sinfo shows {available})", SLURM_START)
    return env


@pytest.mark.slow
def test_cpu_smoke_script_flow_with_stubs(tmp_path):
    """`bash slurm/cpu_smoke.sbatch` from a checkout without logs/ (a fresh clone after `rm -r logs`, or a copy
    of the scripts): the script creates logs/ and submits itself, and the job's output lands there; the job
    runs engines and a two-rank trainer step with the expected arguments."""
    env = _cluster_for_runs()
    root = _stub_root(tmp_path)
    (root / "logs").rmdir()
    r = _run_cluster_job(root, env, {"DAPO_OVERRIDES": "trainer.total_steps=1"}, wait=True, plain_bash=True)
    job = r.stdout.strip().split(";")[0]
    assert job.isdigit(), r.stdout + r.stderr
    logs = list((root / "logs").glob(f"*-{job}.out"))
    text = logs[0].read_text() if logs else ""
    assert r.returncode == 0, r.stderr + text
    lines = [line for line in text.splitlines() if line.startswith("STUB-TRAIN")]
    assert len(lines) == 2, text
    for line in lines:
        assert '"world_size": 2' in line and '"source": "slurm"' in line and "engines_ok=True" in line
        assert "actor.tensor_model_parallel_size=2" in line and "trainer.total_steps=1" in line
        assert "weight_sync.transport=disk" in line
    assert {re.search(r'"rank": (\d)', line).group(1) for line in lines} == {"0", "1"}
    assert "trainer exited with 0" in text


@pytest.mark.slow
def test_cpu_smoke_clean_stop_signal(tmp_path):
    """SIGUSR2 to the batch shell: the trainer gets SIGUSR1, exits 3 (checkpointed), no requeue."""
    env = _cluster_for_runs()
    root = _stub_root(tmp_path)
    r = _run_cluster_job(root, env, {"STUB_WAIT_SIGNAL": "1"}, wait=False)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = root / "logs" / f"dapo-cpu-smoke-{job}.out"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if log.exists() and log.read_text().count("STUB-TRAIN") == 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("trainer stub never started:\n" + (log.read_text() if log.exists() else "no log"))
        subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=env, check=True, timeout=30)
        deadline = time.time() + 90
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env, timeout=30)
            if not q.stdout.strip():
                break
            time.sleep(0.5)
        text = log.read_text()
        assert text.count("STUB-CKPT") == 2, text
        assert "trainer exited with 3" in text and "stopping without requeue" in text
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)


# --------------------------------------------------------------------------- dapo_finish by exit status

FINISH = 'source slurm/common.sh; dapo_init "$CFG" "output_dir=$OUT"; TRAINER_RC=$RC; dapo_finish'


def _finish(tmp_path: Path, rc: int, restart: int, last_step: int, ckpt_step: int = 0, **env) -> tuple:
    """One run's end: ``dapo_finish`` after a trainer exit status ``rc``, in restart ``restart`` of job 4242,
    with ``steps.jsonl`` at ``last_step`` and a complete checkpoint of ``ckpt_step`` (0: none). ``scontrol`` is
    a stand-in that records its arguments. Returns (exit status, output, the recorded scontrol calls)."""
    run = tmp_path / "out" / "crashy"
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    (run / "checkpoints").mkdir(parents=True)
    (run / "steps.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, last_step + 1)))
    if ckpt_step:
        ck = run / "checkpoints" / f"iter_{ckpt_step:07d}"
        ck.mkdir()
        (ck / "metadata.json").write_text("{}")
        (ck / "trainer_state.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    cfg = tmp_path / "crashy.yaml"
    cfg.write_text("run_name: crashy\nresume: auto\n")
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DAPO_ROOT": str(REPO_ROOT),
            "DAPO_PYTHON": sys.executable, "DAPO_LOG_DIR": str(tmp_path / "logs"), "SLURM_JOB_ID": "4242",
            "SLURM_RESTART_COUNT": str(restart), "CFG": str(cfg), "OUT": str(tmp_path / "out"), "RC": str(rc), **env}
    for k in ("DAPO_CONFIG", "DAPO_OVERRIDES", "DAPO_MAX_CRASH_RESTARTS"):
        if k not in env:
            full.pop(k, None)
    before = calls.read_text().splitlines() if calls.exists() else []
    r = subprocess.run(["bash", "-c", FINISH], capture_output=True, text=True, env=full, cwd=REPO_ROOT, timeout=120)
    after = calls.read_text().splitlines() if calls.exists() else []
    return r.returncode, r.stdout + r.stderr, after[len(before):]


def test_finish_requeues_crashes_and_stops_a_crash_loop(tmp_path):
    """Exit 0: done. Exit 2: no requeue. Exit 3: the preemption requeue. Any other exit: requeue (crash restart
    n/N, naming the checkpoint the next run resumes from, which says so at its start) until the same step fails
    twice in a row (a crash loop: one line, no requeue)."""
    rc, out, calls = _finish(tmp_path, 0, restart=0, last_step=4, ckpt_step=4)
    assert (rc, calls) == (0, []), out
    rc, out, calls = _finish(tmp_path, 2, restart=0, last_step=0)
    assert (rc, calls) == (2, []), out
    assert "trainer stopped with exit 2" in out and "not requeueing" in out
    rc, out, calls = _finish(tmp_path, 3, restart=0, last_step=1, ckpt_step=1)
    assert (rc, calls) == (0, ["requeue 4242"]) and "after preemption; requeueing" in out, out

    ckpt1 = tmp_path / "out" / "crashy" / "checkpoints" / "iter_0000001"
    rc, out, calls = _finish(tmp_path, 137, restart=1, last_step=2, ckpt_step=1)  # killed during step 3
    assert (rc, calls) == (0, ["requeue 4242"]), out
    assert f"trainer crashed (exit 137 after step 2); crash restart 1/3: requeueing job 4242; it resumes from {ckpt1}" \
        in out, out
    # the next run (restart 2) names the crash and the checkpoint at its start; it crashes after step 5
    rc, out, calls = _finish(tmp_path, 1, restart=2, last_step=5, ckpt_step=4)
    assert f"restarted after a trainer crash (exit 137 after step 2; crash restart 1/3); resuming from {ckpt1}" in out
    assert (rc, calls) == (0, ["requeue 4242"]) and "crash restart 2/3" in out and "iter_0000004" in out, out
    # restart 3 fails again after step 5: a crash loop
    rc, out, calls = _finish(tmp_path, 1, restart=3, last_step=5, ckpt_step=4)
    assert (rc, calls) == (1, []), out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "crash loop: the trainer failed twice in a row after step 5 (exit 1)" in errors[0], out
    assert (tmp_path / "logs" / "4242" / "crash_restarts").read_text().splitlines() == [
        f"1 137 2 1 {ckpt1}", f"2 1 5 2 {ckpt1.parent / 'iter_0000004'}"]


def test_finish_stops_after_max_crash_restarts(tmp_path):
    """DAPO_MAX_CRASH_RESTARTS bounds the crash requeues of one job, even while each crash gets further."""
    rc, out, calls = _finish(tmp_path, 134, restart=0, last_step=1, DAPO_MAX_CRASH_RESTARTS="1")
    assert (rc, calls) == (0, ["requeue 4242"]) and "crash restart 1/1" in out, out
    assert "it resumes from no checkpoint (step 0)" in out
    rc, out, calls = _finish(tmp_path, 134, restart=1, last_step=3, DAPO_MAX_CRASH_RESTARTS="1")
    assert (rc, calls) == (134, []), out
    assert "already restarted 1 time(s) after crashes (DAPO_MAX_CRASH_RESTARTS=1); not requeueing" in out
    rc, out, calls = _finish(tmp_path / "never", 1, restart=0, last_step=1, DAPO_MAX_CRASH_RESTARTS="0")
    assert (rc, calls) == (1, []), out


ORPHAN_MAKER = """
import os, signal, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("HELPER", helper.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a rank killed mid-step: its helper lives on with our stdout
"""


def test_trainer_task_ends_the_helpers_a_killed_rank_leaves(tmp_path):
    """A killed trainer rank's helper processes (reparented to init, holding the task's stdout) would keep the
    srun step open; slurm/trainer_task.sh kills them once the trainer has exited, and passes on its status."""
    env = {**os.environ, "DAPO_PREEMPT_FILE": str(tmp_path / "preempt"), "DAPO_PREEMPT_POLL_S": "0.1"}
    t0 = time.monotonic()
    # communicate() returns only once every holder of the stdout pipe is gone
    r = subprocess.run(["bash", str(SLURM / "trainer_task.sh"), sys.executable, "-c", ORPHAN_MAKER],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 137, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    helper = int(r.stdout.split("HELPER")[1].split()[0])
    deadline = time.time() + 10
    while Path(f"/proc/{helper}").exists() and "zombie" not in Path(f"/proc/{helper}/status").read_text():
        assert time.time() < deadline, f"helper {helper} still alive"
        time.sleep(0.1)
