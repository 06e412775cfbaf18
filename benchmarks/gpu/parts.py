"""The parts of benchmarks/gpu/run_all.sh: one function per GPU-only check, each run in its own process.

    python benchmarks/gpu/parts.py PART --result FILE [--dry-run]

PART is one of :data:`PARTS`. The part writes a JSON object to FILE: ``ok`` (bool), ``error`` (one line
or null), ``seconds`` and its own figures. ``--dry-run`` runs the same code at tiny sizes on the CPU (no
CUDA needed), so the script logic is exercised by CI (tests/test_gpu_script.py); without it a CUDA GPU is
required and the sizes are the H200 ones below.

Parts (sizes for the real run; the dry run shrinks every dimension):

``actor_step``
    bf16 DAPO train step of :class:`~megatron_dapo.actor.megatron_actor.MegatronActor` (TP=PP=1, local
    layer spec, fp32 master weights) on a random Qwen2.5-1.5B-shaped model (28 layers, hidden 1536, 12
    heads / 2 KV groups, FFN 8960, vocab 151,936 tied) at sequence 4096: tokens/s and MFU (PaLM appendix B
    FLOP count, peak 989 TFLOP/s dense bf16, NVIDIA H100/H200 SXM datasheet).
``logprob_memory``
    token log-prob + entropy + backward from ``[T, H]`` bf16 hidden states and the ``[V, H]`` LM head:
    :func:`~megatron_dapo.actor.logprobs.vocab_parallel_logprobs_entropy` (chunked) vs
    :func:`~megatron_dapo.actor.logprobs.naive_logprobs_entropy` on full logits. Peak extra CUDA memory
    (``torch.cuda.max_memory_allocated`` minus the allocation before the call), time, and the largest
    log-prob / entropy / gradient differences.
``offload``
    :meth:`MegatronActor.offload` / :meth:`onload` after a train step: CUDA memory allocated before,
    after offload and after onload (``torch.cuda.memory_allocated``), bytes moved, seconds, every
    offloaded storage bit-exact after onload, and a further train step that runs.
``tensor_ipc``
    ``weight_sync.transport=tensor`` from an fp32 actor (after one train step) into our engine
    (``python -m megatron_dapo.engines.cpu.server --device cuda``, a separate process on the same GPU) with
    CUDA-IPC handles; probe weights bit-exact and the engine's scored log-probs equal to the actor's.
``thd_packing``
    padding-free THD packing (``actor.pack_sequences``) on the local layer spec (no Transformer Engine):
    packed vs padded log-probs of the same batch (fp32), and a packed vs padded bf16 train step's time.
``sp_gather``
    megatron-core's sequence-parallel all-gather / reduce-scatter (``tensor_parallel.mappings``) in two
    processes with TP=2 on ONE GPU. NCCL refuses two ranks on one device, so the group is gloo over CUDA
    tensors; results (and gradients) compared with ``torch.cat`` / sums.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("actor_step", "logprob_memory", "offload", "tensor_ipc", "thd_packing", "sp_gather")

# Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads / 2 KV groups, FFN 8960, vocab 151,936, tied embeddings
QWEN25_15B = dict(layers=28, hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512)


def _cuda():
    import torch

    return torch.cuda.is_available()


def _mib(n: float) -> float:
    return round(n / 2 ** 20, 2)


def _close(actor) -> None:
    from megatron_dapo.actor.parallel import destroy_parallel

    actor.close()
    destroy_parallel()


def _random_batch(vocab: int, prompt_lens, resp_lens, seed: int = 0):
    import torch

    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    resps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in resp_lens]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = torch.full(b.input_ids.shape, -5.0) * b.response_mask
    b.advantages = torch.randn(len(prompts), 1, generator=g).expand(b.input_ids.shape).contiguous() * b.response_mask
    return b, prompts, resps


def _checkpoint(shape: dict, dtype: str, tie: bool = True) -> Path:
    from bench_actor import write_random_qwen2

    tmp = Path(tempfile.mkdtemp(prefix="gpu_part_"))
    write_random_qwen2(tmp, shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"], shape["ffn"],
                       shape["vocab"], dtype=dtype, device="cuda" if _cuda() else "cpu", tie=tie)
    return tmp


# ---------------------------------------------------------------------------------------------- parts
def part_actor_step(dry: bool) -> dict:
    from bench_actor import measure

    if dry:
        return measure(seq=64, steps=1, warmup=1, **TINY)
    return measure(seq=4096, micro_batch=1, steps=3, warmup=2, **QWEN25_15B)


def part_logprob_memory(dry: bool) -> dict:
    import torch

    from megatron_dapo.actor.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy

    cuda = _cuda()
    dev = "cuda" if cuda else "cpu"
    T, H, V, chunk = (64, 32, 512, 16) if dry else (8192, 1536, 151936, 1024)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden0 = torch.randn(T, H, generator=g, device=dev).to(torch.bfloat16)
    weight0 = (torch.randn(V, H, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, V, (T,), generator=g, device=dev)
    out = {"T": T, "H": H, "V": V, "chunk_size": chunk, "dtype": "bf16 inputs, fp32 math"}
    res = {}
    for variant in ("chunked", "naive"):
        hidden = hidden0.clone().requires_grad_(True)
        weight = weight0.clone().requires_grad_(True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if variant == "chunked":
            lp, ent = vocab_parallel_logprobs_entropy(hidden, weight, targets, chunk_size=chunk)
        else:
            lp, ent = naive_logprobs_entropy(hidden.float() @ weight.float().t(), targets)
        (lp.sum() + 0.01 * ent.sum()).backward()
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        res[variant] = (lp.detach().float(), ent.detach().float(), hidden.grad.float(), weight.grad.float())
        out[f"{variant}_seconds"] = round(secs, 4)
        out[f"{variant}_peak_extra_mib"] = _mib(torch.cuda.max_memory_allocated() - base) if cuda else None
        del lp, ent, hidden, weight
    c, n = res["chunked"], res["naive"]
    out["logprob_max_abs_diff"] = float((c[0] - n[0]).abs().max())
    out["entropy_max_abs_diff"] = float((c[1] - n[1]).abs().max())
    out["grad_hidden_rel_diff"] = float((c[2] - n[2]).norm() / n[2].norm())
    out["grad_weight_rel_diff"] = float((c[3] - n[3]).norm() / n[3].norm())
    out["logits_fp32_mib"] = _mib(T * V * 4)
    if cuda:
        out["peak_ratio_chunked_over_naive"] = round(out["chunked_peak_extra_mib"] / out["naive_peak_extra_mib"], 4)
    # fp32 math on both sides: differences are summation order only
    ok = out["logprob_max_abs_diff"] < 1e-3 and out["entropy_max_abs_diff"] < 1e-3 \
        and out["grad_hidden_rel_diff"] < 1e-3 and out["grad_weight_rel_diff"] < 1e-3
    out["_check"] = None if ok else "chunked and naive results differ beyond 1e-3"
    return out


def part_offload(dry: bool) -> dict:
    import torch

    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.actor.offload import collect_actor_storages, _byte_view
    from megatron_dapo.config import ActorConfig

    cuda = _cuda()
    shape = TINY if dry else dict(QWEN25_15B, layers=8)
    seq = 32 if dry else 1024
    ckpt = _checkpoint(shape, "bf16")
    cfg = ActorConfig(params_dtype="bf16", lr=1e-5, lr_warmup_steps=0, max_tokens_per_gpu=seq, logprob_chunk_size=1024)
    actor = MegatronActor(ckpt, cfg, total_train_steps=4)
    b, _, _ = _random_batch(shape["vocab"], [seq // 4] * 2, [seq - seq // 4] * 2)
    actor.train_step(b, LossSettings())  # optimizer state exists from here on
    dev_type = "cuda" if cuda else "cpu"
    entries = collect_actor_storages(actor.chunks, actor.optimizer, dev_type)
    before = [_byte_view(e.storage).cpu().clone() for e in entries]
    out = {"params": actor.spec.num_parameters(), "layers": shape["layers"], "storages": len(entries)}
    if cuda:
        torch.cuda.synchronize()
        out["allocated_before_mib"] = _mib(torch.cuda.memory_allocated())
    m_off = actor.offload(force=True)
    if cuda:
        out["allocated_offloaded_mib"] = _mib(torch.cuda.memory_allocated())
        out["reserved_offloaded_mib"] = _mib(torch.cuda.memory_reserved())
    m_on = actor.onload()
    if cuda:
        out["allocated_onloaded_mib"] = _mib(torch.cuda.memory_allocated())
        out["freed_mib"] = round(out["allocated_before_mib"] - out["allocated_offloaded_mib"], 2)
        out["restored_mib"] = round(out["allocated_onloaded_mib"] - out["allocated_offloaded_mib"], 2)
    out["offload_bytes_mib"] = _mib(m_off["memory/actor_offload_bytes"])
    out["offload_s"] = round(m_off["timing/actor_offload_s"], 4)
    out["onload_s"] = round(m_on["timing/actor_onload_s"], 4)
    for cat in ("ddp_buffers", "params", "master_params", "grads", "optimizer_state"):
        out[f"offload_{cat}_mib"] = _mib(m_off.get(f"memory/actor_offload_{cat}_bytes", 0.0))
    if cuda:
        gbps = m_off["memory/actor_offload_bytes"] / max(m_off["timing/actor_offload_s"], 1e-9) / 1e9
        out["offload_GBps"] = round(gbps, 2)
        out["onload_GBps"] = round(m_on["memory/actor_onload_bytes"] / max(m_on["timing/actor_onload_s"], 1e-9) / 1e9, 2)
    mismatched = [e.name for e, h in zip(entries, before) if not torch.equal(_byte_view(e.storage).cpu(), h)]
    out["bit_exact_storages"] = len(entries) - len(mismatched)
    # second cycle: the pinned host buffers of the first are reused (steady-state copy speed)
    m_off2, m_on2 = actor.offload(force=True), actor.onload()
    out["offload2_s"] = round(m_off2["timing/actor_offload_s"], 4)
    out["onload2_s"] = round(m_on2["timing/actor_onload_s"], 4)
    if cuda:
        out["offload2_GBps"] = round(m_off2["memory/actor_offload_bytes"] / max(out["offload2_s"], 1e-9) / 1e9, 2)
        out["onload2_GBps"] = round(m_on2["memory/actor_onload_bytes"] / max(out["onload2_s"], 1e-9) / 1e9, 2)
    m = actor.train_step(b, LossSettings())
    out["train_step_after_onload"] = bool(m)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} storages differ after onload, e.g. {mismatched[0]}")
    if cuda:
        moved = out["offload_bytes_mib"]
        if out["freed_mib"] < 0.9 * moved:
            problems.append(f"only {out['freed_mib']} MiB freed of {moved} MiB moved")
        if out["restored_mib"] < moved:
            problems.append(f"only {out['restored_mib']} MiB re-allocated of {moved} MiB moved")
        # the allocator rounds block sizes (memory_allocated counts rounded blocks, offload_bytes exact
        # storage sizes): the H200 run of 2026-11-30 saw +20 MiB on 10.5 GiB after onload
        if abs(out["allocated_onloaded_mib"] - out["allocated_before_mib"]) > 0.01 * out["allocated_before_mib"]:
            problems.append("allocated memory after onload differs by more than 1% from before offload")
    out["_check"] = "; ".join(problems) or None
    _close(actor)
    return out


def part_tensor_ipc(dry: bool) -> dict:
    import torch

    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.engines.client import SyncEngineClient
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines
    from megatron_dapo.sync import WeightSync, rollout_logprob_mismatch

    cuda = _cuda()
    shape = TINY if dry else dict(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1536, vocab=32000)
    ckpt = _checkpoint(shape, "fp32")
    work = Path(tempfile.mkdtemp(prefix="gpu_ipc_"))
    cfg = ActorConfig(lr=3e-2, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0, max_tokens_per_gpu=512)
    actor = MegatronActor(ckpt, cfg)
    prompt_lens, resp_lens = (5, 17, 9, 30), (40, 12, 25, 8)
    batch, prompts, resps = _random_batch(shape["vocab"], prompt_lens, resp_lens, seed=1)
    lp0, _ = actor.compute_logprobs(batch)
    batch.old_logprobs = lp0
    actor.train_step(batch, LossSettings())
    lp, _ = actor.compute_logprobs(batch)
    ref = {n: t.detach().float().cpu() for n, t in actor.iter_hf_tensors(torch.float32)}
    probes = ["model.norm.weight", "model.layers.0.mlp.down_proj.weight",
              f"model.layers.{shape['layers'] - 1}.self_attn.q_proj.weight",
              f"model.layers.{shape['layers'] - 1}.self_attn.k_proj.bias"]
    out = {"params": actor.spec.num_parameters(), "engine_device": "cuda" if cuda else "cpu"}
    env = dict(os.environ)
    t0 = time.perf_counter()
    with launch_cpu_engines(str(ckpt), 1, extra_args=["--device", "cuda"] if cuda else [],
                            log_dir=work / "logs", env=env, health_timeout_s=180) as engines, \
            SyncEngineClient(engines.urls, max_retries=0) as client:
        out["engine_start_s"] = round(time.perf_counter() - t0, 2)
        seqs = [p + r for p, r in zip(prompts, resps)]
        before = client.get_weights_by_name(probes[1], truncate_size=1 << 30)[engines.urls[0]]
        changed = not torch.equal(torch.tensor(before, dtype=torch.float64).float(), ref[probes[1]])
        ws = WeightSync(actor, client, transport="tensor", bucket_mb=64, dtype=torch.float32, work_dir=work / "w",
                        timeout_s=120)
        metrics = ws.sync("ipc-1")
        ws.close()
        out.update({"sync_" + k.split("/")[-1]: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        out["weight_version"] = client.get_weight_version()[engines.urls[0]]
        diffs = {}
        for name in probes:
            got = torch.tensor(client.get_weights_by_name(name, truncate_size=1 << 30)[engines.urls[0]],
                               dtype=torch.float64).float()
            diffs[name] = float((got - ref[name]).abs().max())
        out["probe_max_abs_diff"] = max(diffs.values())
        scored = client.score(seqs, [len(p) for p in prompts])
        eng = torch.zeros_like(lp)
        for i, (p, s) in enumerate(zip(prompts, scored)):
            eng[i, len(p):len(p) + len(s)] = torch.tensor(s, dtype=torch.float32)
        mism = rollout_logprob_mismatch(lp.cpu(), eng, batch.response_mask)
        out["logprob_abs_diff_max"] = mism["rollout/train_rollout_logprob_abs_diff_max"]
        out["logprob_abs_diff_mean"] = mism.get("rollout/train_rollout_logprob_abs_diff_mean")
    problems = []
    if not changed:
        problems.append("the train step did not change the probe weight (nothing to push)")
    if out["weight_version"] != "ipc-1":
        problems.append(f"engine weight_version {out['weight_version']!r}")
    if out["probe_max_abs_diff"] != 0.0:
        problems.append(f"engine weights differ from the actor's (max abs {out['probe_max_abs_diff']:.3e})")
    # same fp32 weights, two implementations (megatron local spec vs HF sdpa) on the same device
    if not out["logprob_abs_diff_max"] <= 1e-4:
        problems.append(f"engine logprobs differ from the actor's by {out['logprob_abs_diff_max']:.3e} > 1e-4")
    out["_check"] = "; ".join(problems) or None
    _close(actor)
    return out


def part_thd_packing(dry: bool) -> dict:
    import torch

    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig

    cuda = _cuda()
    shape = TINY if dry else dict(QWEN25_15B, layers=4)
    lens = [(8, 20), (5, 9), (12, 30), (3, 14)] if dry else [(200, 1800), (100, 400), (300, 3700), (50, 950),
                                                                (150, 2350), (80, 620)]
    out = {"layers": shape["layers"], "sequences": len(lens), "tokens": sum(a + b for a, b in lens)}
    results = {}
    for dtype in ("fp32", "bf16"):
        ckpt = _checkpoint(shape, dtype)
        cfg = ActorConfig(params_dtype=dtype, lr=1e-6, lr_warmup_steps=0,
                          max_tokens_per_gpu=max(a + b for a, b in lens) * (2 if dry else 4), pack_sequences=False)
        actor = MegatronActor(ckpt, cfg, total_train_steps=8)
        b, _, _ = _random_batch(shape["vocab"], [a for a, _ in lens], [r for _, r in lens], seed=2)
        for pack in (False, True):
            actor.cfg.pack_sequences = pack
            key = f"{dtype}_{'packed' if pack else 'padded'}"
            lp, ent = actor.compute_logprobs(b)
            results[key] = (lp.float().cpu(), ent.float().cpu())
            if dtype == "bf16":
                actor.train_step(b, LossSettings())  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                actor.train_step(b, LossSettings())
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                out[f"train_step_{'packed' if pack else 'padded'}_s"] = round(dt, 4)
                out[f"tokens_per_s_{'packed' if pack else 'padded'}"] = round(out["tokens"] / dt, 1)
        _close(actor)
    mask = b.response_mask.bool()
    for dtype in ("fp32", "bf16"):
        (lpa, enta), (lpb, entb) = results[f"{dtype}_padded"], results[f"{dtype}_packed"]
        out[f"{dtype}_logprob_max_abs_diff"] = float((lpa - lpb)[mask].abs().max())
        out[f"{dtype}_entropy_max_abs_diff"] = float((enta - entb)[mask].abs().max())
    ok = out["fp32_logprob_max_abs_diff"] <= 1e-4 and out["fp32_entropy_max_abs_diff"] <= 1e-4
    out["_check"] = None if ok else "fp32 packed and padded logprobs differ by more than 1e-4"
    return out


def _sp_worker(rank: int, world: int, port: int, dry: bool) -> None:
    """One rank of the sequence-parallel check (TP=2 on one device, gloo)."""
    import torch
    import torch.distributed as dist

    from megatron_dapo.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    s, b, h = (8, 2, 16) if dry else (4096, 1, 1536)
    g = torch.Generator().manual_seed(100 + rank)
    local = torch.randn(s // world, b, h, generator=g).to(dev).requires_grad_(True)
    full = mappings.gather_from_sequence_parallel_region(local)
    parts = [torch.randn(s // world, b, h, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    want = torch.cat(parts, dim=0)
    gather_ok = full.device.type == dev.type and torch.equal(full.detach().cpu(), want)
    # backward of the gather is a reduce-scatter: d(sum(w * full))/d local = sum over ranks of w's slice
    w = torch.randn(s, b, h, generator=torch.Generator().manual_seed(7)).to(dev)
    (full * w).sum().backward()
    grad_want = (w.cpu() * world)[rank * (s // world):(rank + 1) * (s // world)]
    grad_ok = torch.allclose(local.grad.cpu(), grad_want, rtol=1e-6, atol=1e-6)
    # forward reduce-scatter (the row-parallel output under sequence parallelism)
    y = torch.randn(s, b, h, generator=torch.Generator().manual_seed(200 + rank)).to(dev)
    rs = mappings.reduce_scatter_to_sequence_parallel_region(y)
    total = sum(torch.randn(s, b, h, generator=torch.Generator().manual_seed(200 + r)) for r in range(world))
    rs_ok = torch.allclose(rs.cpu(), total[rank * (s // world):(rank + 1) * (s // world)], rtol=1e-5, atol=1e-5)
    t0 = time.perf_counter()
    n = 3 if dry else 10
    for _ in range(n):
        mappings.gather_from_sequence_parallel_region(local.detach())
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    print("SP_RESULT " + json.dumps({"rank": rank, "device": str(full.device), "gather_ok": gather_ok,
                                     "grad_reduce_scatter_ok": grad_ok, "reduce_scatter_ok": rs_ok,
                                     "gather_ms": round(dt * 1e3, 3), "shape": [s, b, h]}), flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def part_sp_gather(dry: bool) -> dict:
    from megatron_dapo.actor.parallel import free_port

    port = free_port()
    cmd = [sys.executable, __file__, "_sp_worker", "--port", str(port), "--world", "2"] + (["--dry-run"] if dry else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rows = [json.loads(line.split(" ", 1)[1]) for o in outs for line in o.splitlines() if line.startswith("SP_RESULT ")]
    out = {"backend": "gloo", "tp": 2, "ranks_reported": len(rows)}
    if len(rows) != 2:
        tail = " | ".join(o.strip().splitlines()[-1] if o.strip() else "(no output)" for o in outs)
        raise RuntimeError(f"sequence-parallel workers failed (exit codes {[p.returncode for p in procs]}): {tail}")
    out.update({k: rows[0][k] for k in ("device", "shape")})
    out["gather_ms"] = max(r["gather_ms"] for r in rows)
    for k in ("gather_ok", "grad_reduce_scatter_ok", "reduce_scatter_ok"):
        out[k] = all(r[k] for r in rows)
    bad = [k for k in ("gather_ok", "grad_reduce_scatter_ok", "reduce_scatter_ok") if not out[k]]
    out["_check"] = f"wrong results: {', '.join(bad)}" if bad else None
    out["note"] = ("NCCL cannot put two ranks on one GPU; gloo moves the CUDA tensors through host memory, so "
                   "gather_ms measures gloo, not NVLink")
    return out


# ---------------------------------------------------------------------------------------------- driver
def run_part(name: str, dry: bool) -> dict:
    """Run one part; never raises. Returns its figures plus ``ok``, ``error``, ``seconds``."""
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix=f"gpu_{name}_")
    tempfile.tempdir = scratch  # checkpoints, engine logs, sync work dirs: removed below
    try:
        if not dry and not _cuda():
            raise RuntimeError("no CUDA device visible (use --dry-run on a CPU machine)")
        res = globals()[f"part_{name}"](dry)
        res.pop("_actor", None)
        problem = res.pop("_check", None)
        res.update(ok=problem is None, error=problem)
    except BaseException as exc:  # noqa: BLE001 - a part's failure is data, the next part still runs
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        last = tb.strip().splitlines()[-1] if tb.strip() else repr(exc)
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600] or last}
    finally:
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=PARTS + ("_sp_worker",))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--result", default=None, help="write the part's JSON here")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    if a.part == "_sp_worker":
        _sp_worker(a.rank, a.world, a.port, a.dry_run)
        return 0
    res = run_part(a.part, a.dry_run)
    text = json.dumps(res, default=str)
    if a.result:
        Path(a.result).write_text(text)
    print(f"PART_RESULT {a.part} {text}", flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
