"""Weight sync (megatron_dapo.sync): bucketing, metrics, WeightSync protocol, CPU transports end to end.

Fast tests use a fake actor (HF tensors of a tiny checkpoint) and either a recording fake client or a
real CPU engine; the two ``slow`` tests launch the Megatron actor under torchrun (TP=2×PP=2 and
PP=2×VPP=2) against two CPU engines (tests/sync_scripts/sync_worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.models import mapping
from megatron_dapo.sync import (WeightSync, WeightSyncError, bucket_bytes_from_mb, iter_buckets, resolve_dtype,
                                rollout_logprob_mismatch)
from megatron_dapo.sync.bucketing import iter_buckets_with_last
from fakes import HFActor, RecordingClient
from helpers import _write_tiny_hf

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sync_scripts" / "sync_worker.py"


# ------------------------------------------------------------------------------------------ bucketing
def _named(sizes, dtype=torch.float32):
    return [(f"t{i}", torch.full((n,), float(i), dtype=dtype)) for i, n in enumerate(sizes)]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=30), cap_elems=st.integers(0, 100))
def test_iter_buckets_invariants(sizes, cap_elems):
    cap = cap_elems * 4
    named = _named(sizes)
    buckets = list(iter_buckets(iter(named), cap))
    flat = [(n, t) for b in buckets for n, t in b]
    assert [n for n, _ in flat] == [n for n, _ in named]  # order and completeness
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(flat, named))
    nbytes = [sum(t.numel() * 4 for _, t in b) for b in buckets]
    if cap == 0:
        assert len(buckets) == 1
        return
    for i, b in enumerate(buckets):
        assert b, "empty bucket"
        assert nbytes[i] <= cap or len(b) == 1  # only a lone oversize tensor may exceed the cap
        if i + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert nbytes[i] + buckets[i + 1][0][1].numel() * 4 > cap


def test_iter_buckets_consumes_lazily_one_tensor_ahead():
    pulled = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield f"w{i}", torch.zeros(256)  # 1 KiB each

    it = iter_buckets_with_last(gen(), 3 * 1024)
    bucket, last = next(it)
    assert [n for n, _ in bucket] == ["w0", "w1", "w2"] and not last
    assert len(pulled) == 4  # the bucket plus the one tensor that did not fit
    rest = list(it)
    assert [len(b) for b, _ in rest] == [3, 3, 1] and [flag for _, flag in rest] == [False, False, True]


def test_iter_buckets_casts_and_compacts_views():
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    named = [("row_view", full[2:4]), ("transposed", full.t()), ("whole", full)]
    (bucket,) = list(iter_buckets(named, 0, dtype=torch.bfloat16))
    for (name, got), (_, src) in zip(bucket, named):
        assert got.dtype == torch.bfloat16 and got.is_contiguous(), name
        assert torch.equal(got.float(), src)
    padded = torch.randn(1000, 8)  # a vocab-padded embedding: the exported rows cover 99.9 % of the storage
    small = torch.randn(100, 8)
    (bucket,) = list(iter_buckets([("embed", padded[:999]), ("norm", small[10:20]), ("k", small[20:30])], 0))
    got = dict(bucket)
    assert got["embed"].data_ptr() == padded.data_ptr(), "a near-complete view should not be copied"
    for name in ("norm", "k"):  # views into a much larger buffer are copied out
        assert got[name].untyped_storage().nbytes() == got[name].numel() * 4, name
    assert torch.equal(got["norm"], small[10:20]) and torch.equal(got["k"], small[20:30])


def test_iter_buckets_rejects_bad_input():
    with pytest.raises(ValueError, match="exported twice"):
        list(iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], 0))
    with pytest.raises(ValueError, match=">= 0"):
        list(iter_buckets([("a", torch.zeros(1))], -1))
    with pytest.raises(ValueError, match="non-floating"):
        list(iter_buckets([("ids", torch.zeros(2, dtype=torch.long))], 0))
    with pytest.raises(TypeError, match="pairs"):
        list(iter_buckets([torch.zeros(1)], 0))


def test_resolve_dtype_and_bucket_size():
    assert resolve_dtype(None, default="bf16") == torch.bfloat16
    assert resolve_dtype(None, default=torch.bfloat16) == torch.bfloat16
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("fp16", default="bf16") == torch.float16  # an explicit dtype wins over the default
    with pytest.raises(ValueError, match="actor.params_dtype='int8' is not one of fp32, bf16, fp16"):
        resolve_dtype(None, default="int8")
    assert resolve_dtype("torch.float16") == torch.float16 and resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ValueError, match="weight_sync.dtype"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="weight_sync.dtype"):
        resolve_dtype(torch.int32)
    assert bucket_bytes_from_mb(512) == 512 << 20 and bucket_bytes_from_mb(0) == 0
    assert bucket_bytes_from_mb(0.5) == 1 << 19
    for bad in (-1, float("inf"), "x"):
        with pytest.raises(ValueError, match="bucket_mb"):
            bucket_bytes_from_mb(bad)


# ------------------------------------------------------------------------------------------ metric
def test_rollout_logprob_mismatch():
    old = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 9.0]])
    roll = torch.tensor([[5.0, -1.5, -1.0], [-0.25, -0.5, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    m = rollout_logprob_mismatch(old, roll, mask)
    assert m["rollout/train_rollout_logprob_abs_diff"] == pytest.approx((0.5 + 1.0 + 0.25 + 0.0) / 4)
    assert m["rollout/train_rollout_logprob_abs_diff_max"] == pytest.approx(1.0)
    zero = rollout_logprob_mismatch(old, roll, torch.zeros_like(mask))
    assert zero == {"rollout/train_rollout_logprob_abs_diff": 0.0, "rollout/train_rollout_logprob_abs_diff_max": 0.0}
    with pytest.raises(ValueError, match="shape mismatch"):
        rollout_logprob_mismatch(old, roll[:, :2], mask)
    bad = roll.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        rollout_logprob_mismatch(old, bad, mask)


# ------------------------------------------------------------------------------------------ fakes


def test_disk_sync_protocol_layout_and_cleanup(tiny_hf, tmp_path):
    actor, client = HFActor(tiny_hf), RecordingClient()
    work = tmp_path / "sync"
    ws = WeightSync(actor, client, transport="disk", bucket_mb=0.01, dtype="bf16", work_dir=work)
    m = ws.sync("step-1")
    kinds = [c[0] for c in client.calls]
    assert kinds == ["abort_all", "flush_cache", "update_weights_from_disk", "flush_cache", "get_weight_version"]
    _, path, version, files = client.calls[2]
    assert version == "step-1" and Path(path) == work / "weights-step-1"
    shards = [f for f in files if f.endswith(".safetensors")]
    n = int(m["weight_sync/num_buckets"])
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors.index.json" in files and "config.json" in files
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(mapping.hf_names(actor.spec))
    assert index["metadata"]["total_size"] == m["weight_sync/bytes"]
    from safetensors.torch import load_file

    loaded = {k: v for f in shards for k, v in load_file(str(Path(path) / f)).items()}
    for name, t in actor.iter_hf_tensors(torch.bfloat16):
        assert torch.equal(loaded[name], t), name
    assert set(m) >= {"weight_sync/seconds", "weight_sync/bytes", "weight_sync/num_buckets", "weight_sync/export_s",
                      "weight_sync/transfer_s"}
    assert m["weight_sync/bytes"] == sum(t.numel() * 2 for _, t in actor.iter_hf_tensors())
    ws.sync("step-2")  # the previous directory is replaced, no temp dirs stay behind
    assert sorted(os.listdir(work)) == ["weights-step-2"]
    ws.close()
    assert os.listdir(work) == []
    with pytest.raises(WeightSyncError, match="after close"):
        ws.sync("step-3")


def test_version_mismatch_names_the_engine(tiny_hf, tmp_path):
    client = RecordingClient()
    client.version_override["http://e1:2"] = "stale"
    ws = WeightSync(HFActor(tiny_hf), client, transport="disk", work_dir=tmp_path)
    with pytest.raises(WeightSyncError, match=r"http://e1:2 reports 'stale'") as info:
        ws.sync("v7")
    assert "http://e0:1" not in str(info.value)
    ws.close()


def test_incomplete_export_is_an_error(tiny_hf, tmp_path):
    actor = HFActor(tiny_hf)
    actor.drop = {"model.layers.1.mlp.up_proj.weight"}
    client = RecordingClient()
    ws = WeightSync(actor, client, transport="disk", work_dir=tmp_path / "w")
    with pytest.raises(WeightSyncError, match="up_proj"):
        ws.sync("v1")
    assert not any(c[0] == "update_weights_from_disk" for c in client.calls)
    assert os.listdir(tmp_path / "w") == []  # the temp directory was removed
    ws.close()


def test_bad_arguments(tiny_hf, tmp_path):
    actor = HFActor(tiny_hf)
    with pytest.raises(ValueError, match="weight_sync.transport"):
        WeightSync(actor, RecordingClient(), transport="nfs", work_dir=tmp_path)
    with pytest.raises(ValueError, match="client"):
        WeightSync(actor, None, work_dir=tmp_path)
    with pytest.raises(ValueError, match="bucket_mb"):
        WeightSync(actor, RecordingClient(), bucket_mb=-5, work_dir=tmp_path)
    from megatron_dapo.sync.transports import ranks_per_engine

    two = RecordingClient()  # engine_world_size counts all engine ranks: num_engines x tp_size
    assert ranks_per_engine(two, 4) == 2 and ranks_per_engine(two, 2) == 1
    with pytest.raises(ValueError, match="multiple of the number of engines"):
        ranks_per_engine(two, 3)
    actor.rank = 3  # non-driver ranks need no client
    WeightSync(actor, None, work_dir=tmp_path).close()


def test_dtype_is_what_the_caller_names(tiny_hf, tmp_path):
    """WeightSync reads nothing from the actor's config: the weights go out in the dtype it is given (the
    trainer gives the actor's params dtype), fp32 when none is given."""
    actor = HFActor(tiny_hf)
    for sub, kw, want in (("a", {}, torch.float32), ("b", {"dtype": "bf16"}, torch.bfloat16),
                          ("c", {"dtype": torch.float32}, torch.float32)):
        ws = WeightSync(actor, RecordingClient(), transport="disk", work_dir=tmp_path / sub, **kw)
        assert ws.dtype == want, (kw, ws.dtype)
        ws.close()


def test_tensor_transport_refuses_engines_on_other_hosts(tiny_hf, tmp_path):
    """Memory handles only open on the sender's node: a remote engine URL is a clear error, not a hang."""
    from megatron_dapo.sync.transports import url_is_on_this_host

    assert url_is_on_this_host("http://127.0.0.1:30000") and url_is_on_this_host("http://localhost:1")
    assert not url_is_on_this_host("http://192.0.2.1:30000")  # TEST-NET-1: never a local address
    assert not url_is_on_this_host("http://no-such-host.invalid:1")
    client = RecordingClient()
    client.control_urls = ["http://127.0.0.1:30000", "http://192.0.2.1:30000"]
    ws = WeightSync(HFActor(tiny_hf), client, transport="tensor", work_dir=tmp_path)
    with pytest.raises(WeightSyncError, match="192.0.2.1.*transport=distributed"):
        ws.sync("v1")
    ws.close()


# ------------------------------------------------------------------------------------------ real engine
def _engine_weights(client, names):
    out = {}
    for name in names:
        res = client.get_weights_by_name(name, truncate_size=1 << 30)
        out[name] = {u: torch.tensor(v, dtype=torch.float64).float() for u, v in res.items()}
    return out


def test_cpu_engine_transports_single_process(tmp_path):
    """Fake actor → a real CPU engine over gloo, disk and shared-memory tensor handles; bit-exact weights;
    failure then recovery."""
    from megatron_dapo.engines.client import SyncEngineClient
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    ckpt = _write_tiny_hf(tmp_path / "ckpt", family="qwen3", tie=False)
    actor = HFActor(ckpt)
    names = mapping.hf_names(actor.spec)
    with launch_cpu_engines(str(ckpt), 1, log_dir=tmp_path / "logs") as engines, \
            SyncEngineClient(engines.urls, max_retries=0) as client:
        for i, (transport, bucket_mb) in enumerate([("distributed", 0.004), ("disk", 0), ("distributed", 0),
                                                    ("tensor", 0.004), ("tensor", 0)]):
            actor.scale = 1.0 + 0.25 * (i + 1)
            ws = WeightSync(actor, client, transport=transport, bucket_mb=bucket_mb, dtype=torch.float32,
                            work_dir=tmp_path / "w", timeout_s=60)
            m = ws.sync(f"v{i}")
            assert client.get_weight_version() == {engines.urls[0]: f"v{i}"}
            got = _engine_weights(client, names)
            for name, t in actor.iter_hf_tensors(torch.float32):
                assert torch.equal(got[name][engines.urls[0]], t), (transport, name)
            assert m["weight_sync/num_buckets"] >= (2 if bucket_mb else 1)
            if transport == "distributed" and i == 0:
                # a tensor the engine cannot load -> error naming the engine; the group is rebuilt afterwards
                real = actor.tensors["model.norm.weight"]
                actor.tensors["model.norm.weight"] = torch.ones(real.numel() + 1)
                with pytest.raises(WeightSyncError, match=engines.urls[0].split("//")[1]):
                    ws.sync("broken")
                actor.tensors["model.norm.weight"] = real
                ws.sync("recovered")
                assert client.get_weight_version() == {engines.urls[0]: "recovered"}
            ws.close()
        assert os.listdir(tmp_path / "w") == []


# ------------------------------------------------------------------------------------------ torchrun
LAYOUTS = {
    # name: (nproc, env, checkpoint kwargs)
    "tp2_pp2": (4, {"TP": "2", "PP": "2"}, dict(family="qwen2", tie_word_embeddings=True)),
    "pp2_vpp2": (2, {"PP": "2", "VPP": "2", "EQUAL_LENGTHS": "1", "MAXTOK": "16"},
                 dict(family="qwen3", tie_word_embeddings=False)),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_actor_to_cpu_engines(layout, tmp_path):
    """After a train step, every CPU transport × bucket size (0.05 MB, 1 MB, unbounded; and bf16) leaves two
    CPU engines with weights bit-equal to ``iter_hf_tensors`` and logprobs within 1e-5 of the actor's."""
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint
    from megatron_dapo.engines.launch_common import find_free_ports
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    nproc, env_extra, ckpt_kw = LAYOUTS[layout]
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", num_layers=4, hidden_size=128, intermediate_size=256,
                                vocab_size=2000, **ckpt_kw)
    with launch_cpu_engines(str(ckpt), 2, log_dir=tmp_path / "logs") as engines:
        env = dict(os.environ, CKPT=str(ckpt), ENGINE_URLS=",".join(engines.urls), WORK_DIR=str(tmp_path / "w"),
                   TRANSPORTS="distributed,disk,tensor", BUCKETS_MB="0.05,1,0", WORKER_TIMEOUT_S="240", **env_extra)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        port = find_free_ports(1)[0]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                               f"--master_port={port}", str(WORKER)], env=env, cwd=str(REPO),
                              capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SYNC_WORKER_OK" in proc.stdout, out[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["case"] for r in results] == [f"{t}-{b}-float32" for t in ("distributed", "disk", "tensor")
                                            for b in ("0.05", "1.0", "0.0")] + ["distributed-0.25-bfloat16"]
    for r in results:
        if "float32" in r["case"]:
            assert r["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-5, r
    by_case = {r["case"]: r for r in results}
    assert by_case["distributed-0.05-float32"]["weight_sync/num_buckets"] > by_case["distributed-1.0-float32"][
        "weight_sync/num_buckets"] > by_case["distributed-0.0-float32"]["weight_sync/num_buckets"] == 1
