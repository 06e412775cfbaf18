"""``tensor`` weight sync across nodes (megatron_dapo.sync.weight_sync): engine -> node assignment, the
sender / relay plan, and a torchrun run that simulates two nodes on this host (4 ranks, 2 CPU engines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dapo.sync import WeightSyncError
from megatron_dapo.sync.nodes import (ENGINE_NODES_ENV, NODE_ID_ENV, NodePlan, assign_engines_to_nodes,
                                      local_node_id, parse_engine_nodes)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sync_scripts" / "multinode_worker.py"
URLS = ["http://10.0.0.1:30000", "http://10.0.0.2:30000", "http://10.0.0.2:30001"]


# ------------------------------------------------------------------------------------------ assignment
def test_assignment_by_locality_claims():
    got = assign_engines_to_nodes(URLS, ["n1", "n2"], claims={"n1": [URLS[0]], "n2": URLS[1:]})
    assert got == {URLS[0]: "n1", URLS[1]: "n2", URLS[2]: "n2"}


def test_unclaimed_engine_is_named():
    with pytest.raises(WeightSyncError, match=r"engine 2 \(http://10.0.0.2:30001\) is claimed by no node") as info:
        assign_engines_to_nodes(URLS, ["n1", "n2"], claims={"n1": [URLS[0]], "n2": [URLS[1]]})
    assert "engine 0" not in str(info.value) and "transport=distributed" in str(info.value)


def test_doubly_claimed_engine_is_named():
    # e.g. 127.0.0.1 URLs on a multi-node job: every node finds them local
    with pytest.raises(WeightSyncError, match=r"engine 0 \(http://10.0.0.1:30000\) is claimed by several nodes "
                                              r"\(n1, n2\).*" + ENGINE_NODES_ENV):
        assign_engines_to_nodes(URLS, ["n1", "n2"], claims={"n1": URLS, "n2": URLS[:1]})


def test_explicit_mapping_wins_and_unknown_node_is_an_error():
    got = assign_engines_to_nodes(URLS, ["a", "b"], engine_nodes=["b", "a", "a"], claims={"a": URLS})
    assert got == {URLS[0]: "b", URLS[1]: "a", URLS[2]: "a"}
    with pytest.raises(WeightSyncError, match=r"engine 1 \(http://10.0.0.2:30000\) is mapped to node 'z'"):
        assign_engines_to_nodes(URLS, ["a", "b"], engine_nodes=["a", "z", "b"])
    with pytest.raises(ValueError, match="3 engine URL"):
        assign_engines_to_nodes(URLS, ["a"], engine_nodes=["a"])


def test_parse_engine_nodes_env():
    assert parse_engine_nodes(None, 2) is None and parse_engine_nodes("  ", 2) is None
    assert parse_engine_nodes(" a, b ", 2) == ["a", "b"]
    with pytest.raises(WeightSyncError, match=f"{ENGINE_NODES_ENV}.*2 node.*3 engine"):
        parse_engine_nodes("a,b", 3)
    with pytest.raises(WeightSyncError, match="entry 1"):
        parse_engine_nodes("a,,b", 3)


def test_local_node_id_override(monkeypatch):
    import socket

    monkeypatch.delenv(NODE_ID_ENV, raising=False)
    assert local_node_id() == socket.gethostname()
    monkeypatch.setenv(NODE_ID_ENV, "node-7")
    assert local_node_id() == "node-7"


# ------------------------------------------------------------------------------------------ plan
def test_plan_senders_and_relay_receivers():
    # 8 ranks on 2 nodes; TP=2 x DP=4 (dp_rank 0 = ranks 0, 1): node b's lowest rank (4) needs the relay
    nodes = ["a"] * 4 + ["b"] * 4
    full = [r < 2 for r in range(8)]
    plan = NodePlan(URLS[:2], nodes, full, {URLS[0]: "a", URLS[1]: "b"})
    assert plan.senders == {0: [URLS[0]], 4: [URLS[1]]} and plan.receivers == [4] and not plan.single
    assert "node 'b' (rank 4, via relay)" in plan.describe()
    # PP=2 across the nodes: rank 4 is data-parallel rank 0 of stage 1 and buckets its own stream
    plan = NodePlan(URLS[:2], nodes, [r in (0, 4) for r in range(8)], {URLS[0]: "a", URLS[1]: "b"})
    assert plan.receivers == [] and set(plan.senders) == {0, 4}
    # every engine on rank 0's node: the single-node protocol, no relay
    plan = NodePlan(URLS[:2], nodes, full, {URLS[0]: "a", URLS[1]: "a"})
    assert plan.single and plan.senders == {0: URLS[:2]} and plan.receivers == []
    # rank 0's node without engines: rank 0 only relays, node b sends
    plan = NodePlan(URLS[:1], nodes, full, {URLS[0]: "b"})
    assert not plan.single and plan.senders == {4: URLS[:1]} and plan.receivers == [4]


# ------------------------------------------------------------------------------------------ torchrun
LAYOUTS = {
    # TP=2 -> DP=2: ranks 2, 3 are data-parallel rank 1, so node b's sender (rank 2) is fed over the relay
    "tp2_relay": {"TP": "2", "PP": "1", "EXPECT_RELAY": "1"},
    # PP=2 -> stage 1 = ranks 2, 3: rank 2 is data-parallel rank 0 of its stage and buckets its own stream
    "pp2_own_stream": {"TP": "1", "PP": "2", "EXPECT_RELAY": "0"},
}


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    tmp = tmp_path_factory.mktemp("multinode")
    ckpt = make_tiny_checkpoint(tmp / "ckpt", num_layers=2, hidden_size=64, intermediate_size=128,
                                vocab_size=512, family="qwen2", tie_word_embeddings=True)
    with launch_cpu_engines(str(ckpt), 2, log_dir=tmp / "logs") as engines:
        yield ckpt, engines.urls, tmp


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_simulated_nodes_feed_their_own_engines(layout, two_engines):
    """4 ranks as nodes a (ranks 0-1) and b (ranks 2-3), engine 0 on a, engine 1 on b: after a train step
    both engines hold weights bit-equal to ``iter_hf_tensors`` and score within 1e-5 of the actor; engine 1
    was fed by node b's sender; a node-b failure and an unmapped engine fail every rank alike."""
    from megatron_dapo.engines.launch_common import find_free_ports

    ckpt, urls, tmp = two_engines
    env = dict(os.environ, CKPT=str(ckpt), ENGINE_URLS=",".join(urls), NODE_OF_RANK="a,a,b,b",
               BUCKETS_MB="0.05,0", WORKER_TIMEOUT_S="170", TMPDIR=str(tmp), **LAYOUTS[layout])
    env[ENGINE_NODES_ENV] = "a,b"
    env.pop(NODE_ID_ENV, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    port = find_free_ports(1)[0]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
                           f"--master_port={port}", str(WORKER)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=190)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "MULTINODE_WORKER_OK" in proc.stdout, out[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["case"] for r in results] == ["tensor-0.05", "tensor-0.0"]
    assert results[0]["weight_sync/num_buckets"] > results[1]["weight_sync/num_buckets"] == 1
    for r in results:
        assert r["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-5, r
        by_node = {s["node"]: s for s in r["senders"]}
        assert by_node["b"]["engines"] == [urls[1]] and by_node["b"]["rank"] == 2
        assert by_node["b"]["relay"] == (LAYOUTS[layout]["EXPECT_RELAY"] == "1")
        assert by_node["b"]["num_buckets"] == r["weight_sync/num_buckets"]
        assert r["weight_sync/node_bytes/b"] == r["weight_sync/bytes"] > 0
