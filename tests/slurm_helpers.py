"""The Slurm side of the tests that submit real jobs (tests/test_slurm_e2e.py, test_slurm_sglang.py,
test_launch_nemo.py): probing the cluster, submitting ``slurm/cpu_smoke.sbatch`` (:class:`SmokeRun`), polling
``scontrol`` / ``sacct``, and the log tails a failing test prints."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO_ROOT, SLURM_START, require


SCRIPT = REPO_ROOT / "slurm" / "cpu_smoke.sbatch"


CONFIG = "examples/tiny-cpu/dapo.yaml"


LOCAL_CONF = Path("/tmp/local-slurm/etc/slurm.conf")


@functools.lru_cache(maxsize=1)
def _probe() -> "dict | str":
    """The environment for Slurm commands, or why there is no usable cluster (probed once)."""
    for tool in ("sbatch", "sinfo", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.exists():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    if not Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf")).exists():
        return "no Slurm configuration (start ../shared/tools/local-slurm/start_local_slurm.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()[:200]}"
    usable = {line.split()[0] for line in r.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1] in ("idle", "mixed", "allocated", "completing")}
    if len(usable) < 2:
        return f"needs a Slurm cluster with 2 usable nodes, sinfo says: {r.stdout.strip()[:200]!r}"
    return env


def slurm_env() -> dict:
    """Environment for Slurm commands; skips (locally) or fails (CI=true) the calling test when no 2-node
    cluster answers."""
    probe = _probe()
    require(not isinstance(probe, str), f"2-node Slurm cluster ({probe})", SLURM_START)
    return dict(probe)


def _run(cmd: list[str], env: dict, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)


def job_fields(env: dict, job: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); {} once the
    controller has forgotten the job (MinJobAge after the end)."""
    r = _run(["scontrol", "show", "job", "-o", job], env)
    if r.returncode != 0 or not r.stdout.strip():
        return {}
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


_SACCT_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def sacct_history(env: dict, job: str, timeout: float = 60.0) -> list[tuple[str, str]]:
    """[(state, exit code)] of every run of ``job``, oldest first (``sacct -D``: requeued runs are
    kept as duplicates). Polls until accounting has recorded the job's final state (slurmdbd lags the
    controller); job accounting is required (local-slurm starts slurmdbd)."""
    deadline = time.time() + timeout
    while True:
        r = _run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State,ExitCode"], env)
        require(r.returncode == 0, f"Slurm job accounting (sacct: {r.stderr.strip()[:200]})",
                "start local Slurm with accounting (SLURM_LOCAL_ACCOUNTING=1, the default): " + SLURM_START)
        hist = [tuple(line.split("|")[:2]) for line in r.stdout.splitlines() if line.strip()]
        if (hist and hist[-1][0].split()[0] in _SACCT_FINAL) or time.time() > deadline:
            return hist
        time.sleep(1.0)


def wait_job_done(env: dict, job: str, timeout: float) -> dict[str, str]:
    """Poll until ``job`` has left the queue; returns its last :func:`job_fields`. Cancels it and
    raises TimeoutError after ``timeout`` seconds."""
    deadline = time.time() + timeout
    last: dict[str, str] = {}
    while time.time() < deadline:
        f = job_fields(env, job)
        if f:
            last = f
        if not f or f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                          "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return last
        time.sleep(0.5)
    _run(["scancel", job], env)
    raise TimeoutError(f"job {job} still {last.get('JobState')} after {timeout:.0f} s (cancelled)")


def _requeue_hold_s(env: dict) -> int:
    """Seconds Slurm holds a requeued job: ``cred_expire`` from AuthInfo (default 120) + 1."""
    r = _run(["scontrol", "show", "config"], env)
    m = re.search(r"cred_expire=(\d+)", r.stdout)
    return (int(m.group(1)) if m else 120) + 1


def release_after_hold(env: dict, job: str, timeout: float) -> None:
    """Wait until a requeued ``job``'s EligibleTime has passed, then ``scontrol update StartTime=now``
    so the scheduler considers it at once (it would otherwise wait for its next periodic pass)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = job_fields(env, job)
        if f.get("JobState") != "PENDING":
            return
        try:
            eligible = time.mktime(time.strptime(f.get("EligibleTime", ""), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            eligible = time.time()
        if time.time() >= eligible + 1:
            _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env)
            return
        time.sleep(min(2.0, max(0.2, eligible + 1 - time.time())))


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"<{path} does not exist>"
    text = path.read_text(errors="replace").splitlines()
    return f"--- {path} (last {min(lines, len(text))} of {len(text)} lines)\n" + "\n".join(text[-lines:])


def diagnose(job_log: Path, log_dir: Optional[Path] = None, lines: int = 60) -> str:
    """Tail of the batch log and of every engine log under ``log_dir`` (for failure messages)."""
    parts = [_tail(job_log, lines)]
    if log_dir is not None and log_dir.is_dir():
        for p in sorted(log_dir.rglob("*.log")):
            parts.append(_tail(p, 15))
    return "\n".join(parts)


class SmokeRun:
    """One submission of slurm/cpu_smoke.sbatch with its files under ``root``."""

    def __init__(self, root: Path, model_dir: Path, run_name: str, overrides: list[str]):
        self.root = root
        self.run_name = run_name
        self.overrides = [f"run_name={run_name}", f"output_dir={root / 'out'}", f"model.hf_path={model_dir}",
                          *overrides]
        self.job: Optional[str] = None

    @property
    def run_dir(self) -> Path:
        return self.root / "out" / self.run_name

    @property
    def job_log(self) -> Path:
        return self.root / f"slurm-{self.job}.out"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs" / str(self.job)

    def submit(self, env: dict, wait: bool, timeout: float = 300) -> subprocess.CompletedProcess:
        """``sbatch --parsable [--wait] --output=ROOT/slurm-%j.out slurm/cpu_smoke.sbatch CONFIG OVERRIDES``
        from the repository root, with DAPO_LOG_DIR=ROOT/logs."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), f"--output={self.root}/slurm-%j.out",
               "--time=00:20:00", str(SCRIPT), CONFIG, *self.overrides]
        r = _run(cmd, {**env, "DAPO_LOG_DIR": str(self.root / "logs")}, timeout=timeout, cwd=REPO_ROOT)
        first = (r.stdout.strip().splitlines() or [""])[0]
        self.job = first.split(";")[0] or None
        if self.job is None:
            pytest.fail(f"sbatch printed no job id (rc {r.returncode}): {r.stderr.strip()}")
        return r

    def diagnose(self) -> str:
        return diagnose(self.job_log, self.log_dir)

    def steps(self) -> list[dict]:
        p = self.run_dir / "steps.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def cancel(self, env: dict) -> None:
        if self.job:
            _run(["scancel", self.job], env)
