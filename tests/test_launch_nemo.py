"""megatron_dapo.launch.nemo: the launch plan, its sbatch rendering, and the nemo-run dry run."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from megatron_dapo.launch.nemo import LaunchError, build_launch_plan, main, render_dry_run

CFG = "examples/qwen2.5-7b/dapo.yaml"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_plan_colocated():
    p = build_launch_plan(CFG, ["trainer.total_steps=3"], nodes=2, gpus_per_node=8, partition="gpu")
    cmd = p.sbatch_command()
    assert cmd[0] == "sbatch" and cmd[-3:] == ["slurm/dapo.sbatch", CFG, "trainer.total_steps=3"]
    for opt in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@900",
                "--partition=gpu"):
        assert opt in cmd
    assert p.env["DAPO_ROOT"] == str(REPO_ROOT)
    text = render_dry_run(p)
    assert "DAPO_GPUS_PER_NODE=8" in text and "slurm/dapo.sbatch" in text


def test_plan_modes_and_errors():
    d = build_launch_plan(CFG, [], nodes=4, mode="disaggregated", rollout_nodes=1)
    assert d.script == "slurm/dapo_disaggregated.sbatch" and d.env["DAPO_ROLLOUT_NODES"] == "1"
    c = build_launch_plan(CFG, [], nodes=2, mode="cpu-smoke", container_image="img:1", container_mounts=["/a:/a"])
    assert c.gpus_per_node == 0 and not any(o.startswith("--gpus") for o in c.sbatch_options)
    assert c.env["DAPO_CONTAINER_IMAGE"] == "img:1" and c.env["DAPO_CONTAINER_MOUNTS"] == "/a:/a"
    for kwargs, match in [(dict(mode="x"), "--mode"), (dict(nodes=0), "--nodes"),
                          (dict(nodes=1, mode="disaggregated"), "disaggregated"),
                          (dict(nodes=3, mode="disaggregated", rollout_nodes=3), "--rollout-nodes")]:
        with pytest.raises(LaunchError, match=match):
            build_launch_plan(CFG, [], **kwargs)
    with pytest.raises(LaunchError, match="config file not found"):
        build_launch_plan("missing.yaml")
    with pytest.raises(LaunchError, match="key=value"):
        build_launch_plan(CFG, ["not-an-override"])
    with pytest.raises(LaunchError, match="backend"):
        render_dry_run(d, backend="k8s")


def test_cli_dry_run(capsys):
    assert main([CFG, "seed=1", "--nodes", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sbatch" in out and "--nodes=2" in out and "seed=1" in out
    assert main(["missing.yaml", "--dry-run"]) == 2


@functools.lru_cache(maxsize=1)
def _probe():
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch not installed"
    env = dict(os.environ)
    conf = Path("/tmp/local-slurm/etc/slurm.conf")
    if "SLURM_CONF" not in env and conf.exists():
        env["SLURM_CONF"] = str(conf)
    if not Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf")).exists():
        return "no Slurm config"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0 or "gpu" not in r.stdout:
        return "no Slurm cluster with GPU nodes reachable"
    return env


def _slurm_env():
    probe = _probe()
    if isinstance(probe, str):
        pytest.skip(probe)
    return dict(probe)


def test_plan_sbatch_test_only():
    env = _slurm_env()
    p = build_launch_plan(CFG, ["trainer.total_steps=1"], nodes=1)
    cmd = p.sbatch_command()
    r = subprocess.run([cmd[0], "--test-only", *cmd[1:]], cwd=p.repo, env={**env, **p.env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


def test_nemo_run_dry_run_is_equivalent(tmp_path):
    pytest.importorskip("nemo_run")
    # Separate process: nemo-run's local tunnel (invoke) reads stdin, which pytest captures.
    r = subprocess.run([sys.executable, "-m", "megatron_dapo.launch.nemo", CFG,
                        "trainer.total_steps=3", "--nodes", "2", "--time", "02:00:00", "--backend", "nemo",
                        "--dry-run"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env={**os.environ, "NEMORUN_HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    script = r.stdout[r.stdout.index("#!/bin/bash"):]
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8" and directives["time"] == "02:00:00"
    assert directives["signal"] == "B:USR1@900" and "requeue" in directives
    assert directives["job-name"] == "dapo"
    # the job body is the same batch script with the same arguments
    assert f"exec bash {REPO_ROOT}/slurm/dapo.sbatch {CFG} trainer.total_steps=3" in script
    assert f"export DAPO_ROOT={REPO_ROOT}" in script
    # and Slurm accepts the generated script
    try:
        env = _slurm_env()
    except pytest.skip.Exception:
        return
    path = tmp_path / "nemo_sbatch.sh"
    path.write_text(script)
    r = subprocess.run(["sbatch", "--test-only", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
