"""Rank / world / rendezvous discovery from torchrun, Slurm and single-process environments."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SLURM_START, require
from megatron_dapo.launch import REQUEUE_EXIT_CODE
from megatron_dapo.launch.dist_env import (
    DistEnvError,
    engine_urls_for_nodes,
    expand_nodelist,
    expand_tasks_per_node,
    main,
    master_port_for_job,
    resolve_dist_env,
)


@pytest.mark.parametrize("expr,expected", [
    ("node1", ["node1"]),
    ("node[1-3,5],gpu07", ["node1", "node2", "node3", "node5", "gpu07"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("x[001-3]", ["x001", "x002", "x003"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a[1-2]-ib", ["a1-ib", "a2-ib"]),
    (" a1 , b[2] ", ["a1", "b2"]),
    ("", []),
])
def test_expand_nodelist(expr, expected):
    assert expand_nodelist(expr) == expected


@pytest.mark.parametrize("bad", ["node[1-3", "node]1[", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]", "n[1]x]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(DistEnvError, match="hostlist"):
        expand_nodelist(bad)


def test_expand_nodelist_matches_scontrol():
    """Cross-check against Slurm's own parser when a cluster is reachable."""
    require(shutil.which("scontrol") is not None, "Slurm's scontrol", SLURM_START)
    env = dict(os.environ)
    if "SLURM_CONF" not in env and os.path.exists("/tmp/local-slurm/etc/slurm.conf"):
        env["SLURM_CONF"] = "/tmp/local-slurm/etc/slurm.conf"
    conf = Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    require(conf.exists(), f"a Slurm config at {conf} (scontrol would retry for 60 s)", SLURM_START)
    for expr in ["node[1-3,5],gpu07", "r[1-2]n[01-02]", "x[001-3],y[1,3]", "gpu[08-11]"]:
        r = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 0, f"scontrol show hostnames {expr}: {r.stderr.strip()}"
        assert r.stdout.split() == expand_nodelist(expr), expr


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("2,1") == [2, 1]
    with pytest.raises(DistEnvError, match="tasks-per-node"):
        expand_tasks_per_node("8(2)")


def test_master_port_deterministic_and_in_range():
    assert master_port_for_job(12345) == master_port_for_job("12345") == 20000 + 2345
    ports = {master_port_for_job(j) for j in range(1, 5000, 7)}
    assert all(20000 <= p < 30000 for p in ports)
    with pytest.raises(DistEnvError, match="SLURM_JOB_ID"):
        master_port_for_job("abc")


def test_engine_urls_for_nodes():
    assert engine_urls_for_nodes(["a", "b"], 30000, 2) == [
        "http://a:30000", "http://a:30001", "http://b:30000", "http://b:30001"]
    assert engine_urls_for_nodes("n[1-2]", 8000) == ["http://n1:8000", "http://n2:8000"]
    assert engine_urls_for_nodes(["h"], 443, scheme="https") == ["https://h:443"]
    for args in [([], 1, 1), (["a"], 70000, 1), (["a"], 1000, 0)]:
        with pytest.raises(DistEnvError):
            engine_urls_for_nodes(*args)


def test_torchrun_env():
    env = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
           "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29555", "TORCHELASTIC_RUN_ID": "x",
           # Slurm variables of the enclosing step are ignored for ranks (torchrun wins).
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"}
    d = resolve_dist_env(env)
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes) == \
        ("torchrun", 11, 16, 3, 8, 1, 2)
    assert (d.master_addr, d.master_port, d.nodelist) == ("n1", 29555, ["n1", "n2"])
    assert d.torch_env()["RANK"] == "11" and d.init_method == "tcp://n1:29555" and d.is_distributed


def test_slurm_step_env():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "12", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NODELIST": "gpu[06-08]", "SLURM_NTASKS": "24"}
    d = resolve_dist_env(env)
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes) == \
        ("slurm", 9, 12, 1, 4, 1, 2)
    assert d.nodelist == ["gpu07", "gpu08"] and d.master_addr == "gpu07"
    assert d.master_port == master_port_for_job(4242)
    # MASTER_ADDR / MASTER_PORT exported by the sbatch script take precedence.
    d2 = resolve_dist_env({**env, "MASTER_ADDR": "gpu06", "MASTER_PORT": "31000"})
    assert (d2.master_addr, d2.master_port) == ("gpu06", 31000)
    # Heterogeneous jobs: every component shares the leader's id.
    d3 = resolve_dist_env({**env, "SLURM_HET_JOB_ID": "4000", "SLURM_JOB_ID": "4001"})
    assert d3.master_port == master_port_for_job(4000)


def test_slurm_fallbacks_without_step_variables():
    env = {"SLURM_JOBID": "7", "SLURM_STEPID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "node[1-2]"}
    d = resolve_dist_env(env)
    assert (d.rank, d.world_size, d.local_world_size, d.master_addr, d.master_port) == (3, 4, 2, "node1", 20007)


def test_batch_script_without_step_is_single_process():
    env = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "node[1-2]"}
    d = resolve_dist_env(env)
    assert d.source == "single" and d.world_size == 1 and not d.is_distributed


def test_single_process_defaults():
    d = resolve_dist_env({})
    assert (d.source, d.rank, d.world_size, d.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert 1 <= d.master_port <= 65535
    assert resolve_dist_env({"MASTER_PORT": "1234"}).master_port == 1234


@pytest.mark.parametrize("env,match", [
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "rank 4"),
    ({"RANK": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "RANK"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "2",
      "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NNODES": "2"}, "SLURM_NODEID"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n[1-"}, "hostlist"),
])
def test_bad_environments_name_the_variable(env, match):
    with pytest.raises(DistEnvError, match=match):
        resolve_dist_env(env)


def test_cli(capsys):
    assert main(["hostnames", "n[1-2]"]) == 0
    assert capsys.readouterr().out.split() == ["n1", "n2"]
    assert main(["engine-urls", "n[1-2]", "--base-port", "30000"]) == 0
    assert capsys.readouterr().out.strip() == "http://n1:30000,http://n2:30000"
    assert main(["master-port", "99"]) == 0
    assert capsys.readouterr().out.strip() == "20099"
    assert main(["hostnames", "n[1-"]) == 2
    assert "hostlist" in capsys.readouterr().err


def test_cli_subprocess_show():
    env = {**os.environ, "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "h1", "SLURM_JOB_ID": "3"}
    env.pop("RANK", None); env.pop("TORCHELASTIC_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "megatron_dapo.launch.dist_env", "show"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"rank": 1' in r.stdout and '"source": "slurm"' in r.stdout


def test_requeue_exit_code():
    assert REQUEUE_EXIT_CODE == 3
