"""Weight-sync benchmark on CPU: a Qwen2.5-0.5B-shaped random model, Megatron actor at TP=2.

Run: ``.venv/bin/python benchmarks/bench_weight_sync.py [--layers 24] [--ckpt-dir DIR]``

The launcher writes a random HF checkpoint with the Qwen2.5-0.5B config
(``../shared/data/model-configs/Qwen2.5-0.5B/config.json``; ``--layers`` cuts the depth), starts one
CPU engine on it and runs itself under ``torchrun --nproc_per_node 2`` (worker mode). Rank 0 prints, all
measured in this one run:

* the gloo all-gather bandwidth (the bound of any TP=2 export on CPU) and the actor's own
  ``iter_hf_tensors`` throughput without bucketing;
* export + bucketing throughput (``iter_buckets(actor.iter_hf_tensors(dtype))``: TP all-gather over
  gloo, HF split, cast, bucket packing) in GB/s per bucket size and dtype, its ratio to a plain
  ``Tensor.copy_`` of the same number of bytes in the same process (goal: >= 0.5) and to the raw export;
* bucketing alone (fp32 -> bf16 cast + packing of in-memory tensors) vs memcpy;
* end-to-end seconds of ``WeightSync.sync`` for each CPU transport (``distributed`` over gloo,
  ``disk``, ``tensor`` through shared-memory handles), first call (includes creating the update group)
  and steady state.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO.parent / "shared" / "data" / "model-configs" / "Qwen2.5-0.5B" / "config.json"
GB = 1e9


def make_checkpoint(out: Path, layers: int) -> Path:
    """Random-weight Qwen2ForCausalLM with the 0.5B config (cached: reused when config matches)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads(CONFIG.read_text())
    cfg["num_hidden_layers"] = layers
    cfg["max_window_layers"] = layers
    stamp = out / "bench_stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == cfg:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    conf = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version",
                                                                     "torch_dtype")})
    conf.architectures = ["Qwen2ForCausalLM"]
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(conf).to(torch.float32)
    model.save_pretrained(str(out))
    del model
    stamp.write_text(json.dumps(cfg))
    return out


def memcpy_gbps(nbytes: int, chunk: int = 256 << 20, repeats: int = 3) -> float:
    """Best-of-``repeats`` GB/s of copying ``nbytes`` (in ``chunk``-sized ``copy_`` calls)."""
    n = min(nbytes, chunk) // 4
    src, dst = torch.randn(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats):
        left = nbytes
        t0 = time.perf_counter()
        while left > 0:
            k = min(n, max(1, left // 4))
            dst[:k].copy_(src[:k])
            left -= k * 4
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def worker() -> None:
    import torch.distributed as dist

    from megatron_dapo.actor.megatron_actor import MegatronActor
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.engines.client import SyncEngineClient
    from megatron_dapo.sync import WeightSync, iter_buckets
    from megatron_dapo.sync.bucketing import bucket_bytes_from_mb

    ckpt, url, work = os.environ["BENCH_CKPT"], os.environ["BENCH_URL"], os.environ["BENCH_WORK"]
    t0 = time.perf_counter()
    actor = MegatronActor(ckpt, ActorConfig(tensor_model_parallel_size=2, lr=1e-6))
    rank = dist.get_rank()
    res: dict = {"actor_build_s": time.perf_counter() - t0, "export": [], "sync": [], "raw": []}

    # the bound: gloo all-gather of the largest TP-sharded tensor (the padded embedding), same run
    shard = torch.randn(actor.padded_vocab // 2, actor.spec.hidden_size)
    parts = [torch.empty_like(shard) for _ in range(2)]
    for _ in range(2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(parts, shard)
        dt = time.perf_counter() - t0
    res["allgather_gbps"] = 2 * shard.numel() * 4 / dt / GB
    del shard, parts

    def drain(it) -> tuple[float, int, int, int]:
        dist.barrier()
        t0 = time.perf_counter()
        nbytes = nb = largest = 0
        for item in it:
            pairs = item if isinstance(item, list) else [item]
            b = sum(t.numel() * t.element_size() for _, t in pairs)
            nbytes, nb, largest = nbytes + b, nb + 1, max(largest, b)
            del item, pairs
        return time.perf_counter() - t0, nbytes, nb, largest

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        dt, nbytes, _, _ = drain(actor.iter_hf_tensors(dtype))  # the actor alone, no bucketing
        res["raw"].append({"dtype": name, "seconds": dt, "bytes": nbytes, "gbps": nbytes / dt / GB})
        for mb in (64, 256, 512, 0):
            dt, nbytes, nb, largest = drain(iter_buckets(actor.iter_hf_tensors(dtype), bucket_bytes_from_mb(mb),
                                                         dtype=dtype))
            mc = memcpy_gbps(nbytes) if rank == 0 else 0.0
            res["export"].append({"dtype": name, "bucket_mb": mb, "bytes": nbytes, "buckets": nb,
                                  "largest_bucket_mb": largest / 2**20, "seconds": dt, "gbps": nbytes / dt / GB,
                                  "memcpy_gbps": mc, "ratio": nbytes / dt / GB / mc if mc else 0.0})
    # bucketing alone (cast fp32 -> bf16 + packing) on tensors already in memory, vs memcpy of the output bytes
    if rank == 0:
        held = [(n, t.clone()) for n, t in actor.iter_hf_tensors(torch.float32)]
    else:
        for _ in actor.iter_hf_tensors(torch.float32):
            pass
    if rank == 0:
        t0 = time.perf_counter()
        out = 0
        for bucket in iter_buckets(iter(held), bucket_bytes_from_mb(512), dtype=torch.bfloat16):
            out += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        dt = time.perf_counter() - t0
        mc = memcpy_gbps(out)
        res["pack_only"] = {"bytes": out, "seconds": dt, "gbps": out / dt / GB, "memcpy_gbps": mc,
                            "ratio": out / dt / GB / mc}
        del held
    client = SyncEngineClient([url], control_timeout_s=1200) if rank == 0 else None
    for transport in ("distributed", "disk", "tensor"):
        ws = WeightSync(actor, client, transport=transport, bucket_mb=512, dtype=torch.float32, work_dir=work,
                        timeout_s=1200)
        for i in range(2):
            m = ws.sync(f"{transport}-{i}")
            res["sync"].append({"transport": transport, "call": i, **m})
        ws.close()
    if rank == 0:
        client.close()
        print("BENCH " + json.dumps(res), flush=True)
    actor.close()


def report(res: dict, layers: int) -> None:
    print(f"Qwen2.5-0.5B-shaped random model, {layers} layers, actor TP=2 (2 torchrun procs), "
          f"actor build {res['actor_build_s']:.1f}s")
    print(f"gloo all-gather of the padded embedding (TP=2): {res['allgather_gbps']:.2f} GB/s")
    for r in res["raw"]:
        print(f"actor.iter_hf_tensors({r['dtype']}) alone: {r['seconds']:.2f}s, {r['bytes'] / GB:.3f} GB, "
              f"{r['gbps']:.2f} GB/s")
    print("export + bucketing (rank 0's clock; all ranks iterate):")
    print(f"  {'dtype':9s} {'bucket':>7s} {'GB':>6s} {'buckets':>7s} {'max MB':>7s} {'s':>6s} {'GB/s':>6s} "
          f"{'memcpy':>7s} {'ratio':>6s} {'vs raw':>6s}")
    raw = {r["dtype"]: r for r in res["raw"]}
    for e in res["export"]:
        b = "inf" if e["bucket_mb"] == 0 else f"{e['bucket_mb']}MB"
        print(f"  {e['dtype']:9s} {b:>7s} {e['bytes'] / GB:6.3f} {e['buckets']:7d} {e['largest_bucket_mb']:7.1f} "
              f"{e['seconds']:6.2f} {e['gbps']:6.2f} {e['memcpy_gbps']:7.2f} {e['ratio']:6.3f} "
              f"{e['gbps'] / raw[e['dtype']]['gbps']:6.2f}")
    p = res["pack_only"]
    print(f"bucketing alone (in-memory fp32 -> bf16, 512 MB buckets): {p['gbps']:.2f} GB/s out, memcpy "
          f"{p['memcpy_gbps']:.2f} GB/s, ratio {p['ratio']:.2f}")
    print("end-to-end WeightSync.sync (fp32, bucket 512 MB, 1 CPU engine):")
    for s in res["sync"]:
        print(f"  {s['transport']:11s} call {s['call']}: {s['weight_sync/seconds']:6.2f}s  (export "
              f"{s['weight_sync/export_s']:.2f}s, transfer {s['weight_sync/transfer_s']:.2f}s, "
              f"{s['weight_sync/bytes'] / GB:.3f} GB, {int(s['weight_sync/num_buckets'])} buckets, "
              f"{s['weight_sync/bytes'] / s['weight_sync/seconds'] / GB:.2f} GB/s)")


def main() -> None:
    if "LOCAL_RANK" in os.environ:
        worker()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="transformer layers (Qwen2.5-0.5B has 24)")
    ap.add_argument("--ckpt-dir", default=None, help="where the random checkpoint is written (cached)")
    args = ap.parse_args()
    if not CONFIG.is_file():
        sys.exit(f"model config not found: {CONFIG}")
    from megatron_dapo.engines.launch_common import find_free_ports
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    ckpt_dir = Path(args.ckpt_dir or Path(tempfile.gettempdir()) / f"bench_weight_sync_qwen05b_{args.layers}l")
    t0 = time.perf_counter()
    ckpt = make_checkpoint(ckpt_dir, args.layers)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp, \
            launch_cpu_engines(str(ckpt), 1, log_dir=f"{tmp}/logs", health_timeout_s=600) as engines:
        env = dict(os.environ, BENCH_CKPT=str(ckpt), BENCH_URL=engines.urls[0], BENCH_WORK=f"{tmp}/work")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={find_free_ports(1)[0]}", __file__], env=env, cwd=str(REPO),
                              capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"benchmark workers failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    report(json.loads(line[len("BENCH "):]), args.layers)


if __name__ == "__main__":
    main()
