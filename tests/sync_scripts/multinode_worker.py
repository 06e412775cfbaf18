"""torchrun worker for tests/test_weight_sync_multinode.py: ``tensor`` weight sync with simulated nodes.

Four processes on one host pretend to be two nodes: ``NODE_OF_RANK`` (e.g. ``a,a,b,b``) sets each rank's
``MEGATRON_DAPO_NODE_ID``; ``MEGATRON_DAPO_ENGINE_NODES`` (e.g. ``a,b``) puts engine 0 on node a and engine 1
on node b. Only rank 0 holds an engine client (the trainer's layout); every node's sender builds its own.

Environment: TP, PP, CKPT (HF dir of actor and engines), ENGINE_URLS (comma-separated), NODE_OF_RANK,
EXPECT_RELAY (1 = node b's sender has data-parallel rank != 0 and must be fed over the relay group),
BUCKETS_MB (comma list). Rank 0 prints ``RESULT {json}`` per sync and ``MULTINODE_WORKER_OK`` at the end;
a failed check raises (non-zero exit).
"""
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_dapo.engines.client import SyncEngineClient  # noqa: E402
from megatron_dapo.sync import WeightSync, WeightSyncError  # noqa: E402
from megatron_dapo.sync.nodes import NODE_ID_ENV  # noqa: E402
from sync_worker import (  # noqa: E402  (same actor + batch)
    assert_engine_tensors_equal, engine_logprob_mismatch, train_one_step_from_env,
)


class FailingClient:
    """A node sender's engine client whose weight update always fails (error propagation check)."""

    def __init__(self, urls):
        self.control_urls = list(urls)

    def get_server_info(self, urls=None):
        return {u: {"tp_size": 1} for u in (urls or self.control_urls)}

    def update_weights_from_tensor(self, *args, **kwargs):
        raise RuntimeError(f"simulated engine failure at {self.control_urls[0]}")

    def close(self):
        return None


def main():
    t_start = time.time()
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT_S", 150)), exit=True)
    rank = int(os.environ["RANK"])
    nodes = os.environ["NODE_OF_RANK"].split(",")
    os.environ[NODE_ID_ENV] = nodes[rank]
    actor, prompts, resps, batch, ref, lp = train_one_step_from_env()
    assert dist.get_rank() == rank

    urls = os.environ["ENGINE_URLS"].split(",")
    client = SyncEngineClient(urls) if rank == 0 else None
    seqs = [p + r for p, r in zip(prompts, resps)]
    expect_relay = os.environ.get("EXPECT_RELAY") == "1"
    work = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mn-{os.getpid()}")
    for bucket_mb in [float(x) for x in os.environ.get("BUCKETS_MB", "0.05,0").split(",")]:
        version = f"tensor-{bucket_mb}"
        if rank == 0:
            client.update_weights_from_disk(os.environ["CKPT"], "reset")
        ws = WeightSync(actor, client, transport="tensor", bucket_mb=bucket_mb, dtype=torch.float32,
                        work_dir=work, timeout_s=60)
        metrics = ws.sync(version)
        senders = {s["node"]: s for s in ws.last_senders}
        # the plan is identical on every rank: node a's rank 0 feeds engine 0, node b's lowest rank engine 1
        assert sorted(senders) == ["a", "b"], ws.last_senders
        assert senders["a"]["rank"] == 0 and senders["a"]["engines"] == [urls[0]], senders
        assert senders["b"]["rank"] == nodes.index("b") and senders["b"]["engines"] == [urls[1]], senders
        assert senders["b"]["relay"] == expect_relay and not senders["a"]["relay"], senders
        for node in ("a", "b"):  # each node posted the whole payload to its own engine
            assert senders[node]["bytes"] == metrics["weight_sync/bytes"] > 0, (node, senders, metrics)
            assert metrics[f"weight_sync/node_bytes/{node}"] == metrics["weight_sync/bytes"], metrics
        assert metrics["weight_sync/num_sender_nodes"] == 2.0
        if rank == 0:
            assert client.get_weight_version() == {u: version for u in urls}
            assert_engine_tensors_equal(client, ref, version)
            mism = engine_logprob_mismatch(client, prompts, seqs, lp, batch.response_mask)
            assert mism["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-5, mism
            print("RESULT " + json.dumps({"case": version, **metrics, **mism,
                                          "senders": ws.last_senders}), flush=True)
        ws.close()
        dist.barrier()

    # a failure on node b's sender reaches every rank as the same error naming node b (and nothing hangs)
    def failing_factory(engine_urls, api_key):
        return FailingClient(engine_urls) if nodes[rank] == "b" else SyncEngineClient(engine_urls, api_key=api_key)

    ws = WeightSync(actor, client, transport="tensor", bucket_mb=0.05, dtype=torch.float32, work_dir=work,
                    timeout_s=60, client_factory=failing_factory)
    try:
        ws.sync("doomed")
        raise AssertionError("a failing node b sender did not fail the sync")
    except WeightSyncError as exc:
        msg = str(exc)
    assert "node 'b'" in msg and "simulated engine failure" in msg and urls[1] in msg, msg
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, msg)
    assert len(set(box)) == 1, box
    ws.close()

    # an engine mapped to a node that runs no trainer rank: the same clear error on every rank
    ws = WeightSync(actor, client, transport="tensor", dtype=torch.float32, work_dir=work, timeout_s=60,
                    engine_nodes=["a", "c"])
    try:
        ws.sync("unmapped")
        raise AssertionError("an engine on an unknown node did not fail the sync")
    except WeightSyncError as exc:
        assert "node 'c'" in str(exc) and urls[1] in str(exc), exc
    ws.close()
    dist.barrier()
    if rank == 0:
        client.close()
        print(f"MULTINODE_WORKER_OK {time.time() - t_start:.1f}s", flush=True)
    actor.close()


if __name__ == "__main__":
    main()
