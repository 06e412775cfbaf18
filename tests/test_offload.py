"""Offload / onload of the actor's device tensors (megatron_dapo.actor.offload), proved on CPU.

On CPU ``MegatronActor.offload()`` is a no-op by default; ``offload(force=True)`` runs the real path
(storages freed with ``resize_(0)``, restored from a host copy). With a tiny Megatron actor (Adam; regular
optimizer fp32 and bf16, distributed optimizer fp32 at DP=1 and bf16 at DP=2), after one training step:

* a forced offload frees every collected storage (size 0) and reports exactly their bytes, split into DDP
  buffers, parameters, fp32 master parameters (bf16: full copies, or the DP shards of the distributed
  optimizer) and Adam state; a second offload is a no-op;
* ``train_step`` / ``compute_logprobs`` raise ``RuntimeError`` while offloaded (also after the CPU no-op
  offload, same contract);
* onload gives back every tensor bit-identical (params, master params, Adam moments and steps), and a
  second ``train_step`` equals, bit for bit, the second step of an identical actor never offloaded.

The multi-process part runs this file as a torchrun worker (``__main__`` below); the unit tests at the
top use plain torch modules and ``torch.optim.AdamW`` in-process.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dapo.actor.offload import (ActorOffloader, collect_actor_storages, ensure_onloaded,  # noqa: E402
                                         iter_actor_tensors)


# ---------------------------------------------------------------------------------------------- helpers
def _snapshot(chunks, optimizer) -> dict[str, torch.Tensor]:
    """name → clone of every tensor the actor holds (aliases included)."""
    return {n: t.detach().clone() for n, _, t in iter_actor_tensors(chunks, optimizer)}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _distinct_storage_bytes(chunks, optimizer) -> int:
    seen, total = set(), 0
    for _, _, t in iter_actor_tensors(chunks, optimizer):
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class _FakeBuffer:
    """Stands in for megatron-core's ``_ParamAndGradBuffer``: flat ``param_data`` / ``grad_data``."""

    def __init__(self, module: torch.nn.Module):
        params = list(module.parameters())
        n = sum(p.numel() for p in params)
        self.param_data = torch.zeros(n)
        self.grad_data = torch.zeros(n)
        off = 0
        for p in params:
            k = p.numel()
            self.param_data[off: off + k].copy_(p.data.reshape(-1))
            p.data = self.param_data[off: off + k].view(p.shape)
            p.main_grad = self.grad_data[off: off + k].view(p.shape)
            off += k


class _FakeDDP(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.buffers = [_FakeBuffer(module)]  # shadows nn.Module.buffers, as megatron-core's DDP does

    def forward(self, x):
        return self.module(x)


def _tiny(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net.register_buffer("scale", torch.full((3,), 0.5))
    ddp = _FakeDDP(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    return ddp, opt


def _step(ddp, opt, x):
    opt.zero_grad()
    (ddp(x) * ddp.module.scale).pow(2).sum().backward()
    opt.step()


# ---------------------------------------------------------------------------------------------- unit tests
def test_collect_dedupes_views_of_shared_storage():
    ddp, opt = _tiny(0)
    _step(ddp, opt, torch.randn(4, 6))
    entries = collect_actor_storages([ddp], opt, "cpu")
    ptrs = [e.storage.data_ptr() for e in entries]
    assert len(ptrs) == len(set(ptrs))
    names = {e.name for e in entries}
    # the parameters are views of param_data: moved once, with the buffer
    assert "chunk0.buffers[0].param_data" in names and not any(n.startswith("chunk0.param:") for n in names)
    n = sum(p.numel() for p in ddp.parameters())
    by_cat = {c: sum(e.nbytes for e in entries if e.category == c) for c in {e.category for e in entries}}
    assert by_cat["ddp_buffers"] == 2 * 4 * n
    assert by_cat["module_buffers"] == 3 * 4
    # exp_avg + exp_avg_sq (fp32) and one fp32 step counter per parameter tensor
    assert by_cat["optimizer_state"] == 2 * 4 * n + 4 * len(list(ddp.parameters()))
    # .grad tensors of the parameters (not views of grad_data here) are collected too
    assert by_cat["grads"] == 4 * n
    assert sum(by_cat.values()) == _distinct_storage_bytes([ddp], opt)
    assert collect_actor_storages([ddp], opt, "cuda") == []


def test_forced_offload_frees_and_onload_restores_bit_exact():
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    ddp, opt = _tiny(0)
    ref_ddp, ref_opt = _tiny(0)
    _step(ddp, opt, x1)
    _step(ref_ddp, ref_opt, x1)
    before = _snapshot([ddp], opt)
    expected = _distinct_storage_bytes([ddp], opt)
    off = ActorOffloader([ddp], opt)
    m = off.offload(force=True)
    assert off.offloaded and m["memory/actor_offload_bytes"] == expected > 0
    assert m["memory/actor_offload_tensors"] == len(off.entries)
    assert all(e.storage.nbytes() == 0 for e in off.entries)
    assert all(t.untyped_storage().nbytes() == 0 for _, _, t in iter_actor_tensors([ddp], opt))
    assert off.offload(force=True)["memory/actor_offload_bytes"] == 0.0  # twice: no-op
    assert off.metrics["memory/actor_offload_bytes"] == expected  # the no-op did not overwrite the figures
    back = off.onload()
    assert back["memory/actor_onload_bytes"] == expected and not off.offloaded
    after = _snapshot([ddp], opt)
    assert before.keys() == after.keys()
    assert [k for k in before if not _bit_equal(before[k], after[k])] == []
    # the parameters are still views of param_data after the round trip
    p0 = next(ddp.parameters())
    assert p0.untyped_storage().data_ptr() == ddp.buffers[0].param_data.untyped_storage().data_ptr()
    assert off.onload()["memory/actor_onload_bytes"] == 0.0  # twice: no-op
    _step(ddp, opt, x2)
    _step(ref_ddp, ref_opt, x2)
    got, ref = _snapshot([ddp], opt), _snapshot([ref_ddp], ref_opt)
    assert [k for k in ref if not _bit_equal(got[k], ref[k])] == []
    # the compared step happened: it moved the parameters
    assert [k for k in got if k in after and not _bit_equal(got[k], after[k])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU only: the no-op contract is the CPU behaviour")
def test_offload_without_force_on_cpu_moves_nothing():
    ddp, opt = _tiny(1)
    _step(ddp, opt, torch.randn(2, 6))
    sizes = [e.nbytes for e in collect_actor_storages([ddp], opt, "cpu")]
    off = ActorOffloader([ddp], opt)
    assert off.onload()["memory/actor_onload_bytes"] == 0.0  # onload without offload: no-op
    m = off.offload()
    assert off.offloaded and m["memory/actor_offload_bytes"] == 0.0 and off.entries == []
    assert [e.nbytes for e in collect_actor_storages([ddp], opt, "cpu")] == sizes
    assert off.onload()["memory/actor_onload_bytes"] == 0.0 and not off.offloaded


def test_unresizable_storage_refused_before_anything_is_freed():
    import numpy as np

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.data = torch.from_numpy(np.zeros((2, 2), dtype=np.float32))
    off = ActorOffloader([net], None)
    with pytest.raises(RuntimeError, match=r"chunk0\.param:weight.*not resizable"):
        off.offload(force=True)
    assert not off.offloaded and net.bias.untyped_storage().nbytes() == 8


def test_onload_refuses_a_storage_reallocated_while_offloaded():
    net = torch.nn.Linear(3, 2)
    off = ActorOffloader([net], None)
    off.offload(force=True)
    net.bias.untyped_storage().resize_(8)
    with pytest.raises(RuntimeError, match=r"chunk0\.param:bias.*re-allocated"):
        off.onload()


def test_failed_onload_names_the_tensor_and_can_be_resumed(monkeypatch):
    ddp, opt = _tiny(2)
    _step(ddp, opt, torch.randn(3, 6))
    before = _snapshot([ddp], opt)
    off = ActorOffloader([ddp], opt)
    off.offload(force=True)
    real_resize, calls = torch.UntypedStorage.resize_, []

    def flaky_resize(self, n):
        calls.append(n)
        if len(calls) == 3:  # the third re-allocation fails, as a device OOM would
            raise RuntimeError("out of memory (simulated)")
        return real_resize(self, n)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", flaky_resize)
    third = off.entries[2].name
    with pytest.raises(RuntimeError, match=f"cannot onload {re.escape(third)}.*simulated"):
        off.onload()
    assert off.offloaded
    off.onload()  # resumes with the storages not restored yet
    assert not off.offloaded
    after = _snapshot([ddp], opt)
    assert [k for k in before if not _bit_equal(before[k], after[k])] == []


def test_ensure_onloaded_message():
    class Actor:
        offloaded = True

    with pytest.raises(RuntimeError, match=r"Actor\.train_step\(\) called while the actor is offloaded.*onload"):
        ensure_onloaded(Actor(), "train_step")
    Actor.offloaded = False
    ensure_onloaded(Actor(), "train_step")


# ---------------------------------------------------------------------------------------------- Megatron actor
CASES_DP1 = [{"distopt": 0, "dtype": "fp32"}, {"distopt": 0, "dtype": "bf16"}, {"distopt": 1, "dtype": "fp32"}]
CASES_DP2 = [{"distopt": 1, "dtype": "bf16"}]  # sharded fp32 masters and Adam moments


@pytest.fixture(scope="module")
def actor_results(tmp_path_factory):
    from dist_scripts.common import torchrun

    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("offload")
    hf = root / "qwen2"
    make_tiny_checkpoint(hf, family="qwen2", num_layers=2, vocab_size=300, tie_word_embeddings=True, seed=0)
    res = {}
    for nproc, cases in ((1, CASES_DP1), (2, CASES_DP2)):
        out = root / f"dp{nproc}"
        torchrun(f"{Path(__file__).resolve()}", nproc, {"HF": str(hf), "OUT": str(out), "CASES": json.dumps(cases)})
        for r in range(nproc):
            for key, val in torch.load(f"{out}.rank{r}.pt", weights_only=False).items():
                res[(nproc, r) + key] = val
    return res


def _cases():
    return [(1, c) for c in CASES_DP1] + [(2, c) for c in CASES_DP2]


def _ids():
    return [f"dp{n}-{'distopt' if c['distopt'] else 'regular'}-{c['dtype']}" for n, c in _cases()]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,case", _cases(), ids=_ids())
def test_actor_offload_contract(actor_results, nproc, case):
    for rank in range(nproc):
        r = actor_results[(nproc, rank, case["distopt"], case["dtype"])]
        # CPU default: no-op that still enforces the contract
        assert r["noop_bytes"] == 0.0 and r["noop_sizes_unchanged"]
        assert "onload() first" in r["noop_train_error"] and "onload() first" in r["noop_logprobs_error"]
        # forced: every collected storage freed; bytes = the distinct storages' sizes
        assert r["n_storages"] > 0 and r["nonzero_after_offload"] == []
        assert r["offload_bytes"] == r["expected_bytes"] > 0
        cats = r["offload_categories"]
        assert cats["optimizer_state"] >= 2 * 4 * r["n_master_elems"] > 0  # fp32 exp_avg + exp_avg_sq
        if case["dtype"] == "bf16":
            assert cats["master_params"] == 4 * r["n_fp32_from_bf16_elems"] > 0  # fp32 copies of the bf16 params
        else:
            assert cats["master_params"] == 0  # fp32: the optimizer updates the params (or param_data shards)
        assert cats["ddp_buffers"] > 0 and sum(cats.values()) == r["offload_bytes"]
        assert r["second_offload_bytes"] == 0.0
        assert "train_step() called while the actor is offloaded" in r["train_error"]
        assert "compute_logprobs() called while the actor is offloaded" in r["logprobs_error"]
        # onload: everything bit-identical, including the fp32 masters and Adam moments
        assert r["onload_bytes"] == r["offload_bytes"] and r["second_onload_bytes"] == 0.0
        assert r["mismatch_after_onload"] == []
        assert r["n_adam_tensors"] > 0 and r["n_master_tensors"] > 0
        # the next step equals that of an actor never offloaded
        assert r["metrics2"] == r["ref_metrics2"]
        assert r["logprobs_before_step2"] == r["ref_logprobs_before_step2"]
        assert r["mismatch_after_step2"] == [] and r["n_compared_step2"] > 0
        assert r["params_changed_by_step2"]


# ---------------------------------------------------------------------------------------------- worker
def _make_batch():
    from dist_scripts.ckpt_worker import make_batch  # the checkpoint tests' fixed batch

    return make_batch()


def _build(case):
    from megatron_dapo.actor.megatron_actor import MegatronActor
    from megatron_dapo.config import ActorConfig

    cfg = ActorConfig(lr=1e-2, lr_warmup_steps=0, max_tokens_per_gpu=64, weight_decay=0.01,
                      params_dtype=case["dtype"], use_distributed_optimizer=bool(case["distopt"]))
    return MegatronActor(os.environ["HF"], cfg, total_train_steps=10, seed=1234)


def _error(fn) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return "no error"


def _worker_case(case) -> dict:
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.actor.offload import leaf_optimizers

    b, ls = _make_batch(), LossSettings()
    r: dict = {}
    actor = _build(case)
    actor.train_step(b, ls)
    chunks, opt = actor.chunks, actor.optimizer
    entries = collect_actor_storages(chunks, opt, "cpu")
    sizes = [e.nbytes for e in entries]
    before = _snapshot(chunks, opt)
    r["n_adam_tensors"] = sum(1 for n in before if n.endswith(".exp_avg") or n.endswith(".exp_avg_sq"))
    masters = [p for leaf in leaf_optimizers(opt) for g in leaf.optimizer.param_groups for p in g["params"]]
    r["n_master_tensors"], r["n_master_elems"] = len(masters), sum(p.numel() for p in masters)
    r["n_fp32_from_bf16_elems"] = sum(p.numel() for leaf in leaf_optimizers(opt)
                                      for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups")
                                      for g in getattr(leaf, attr, []) for p in g if p is not None)

    r["noop_bytes"] = actor.offload()["memory/actor_offload_bytes"]
    r["noop_sizes_unchanged"] = [e.storage.nbytes() for e in entries] == sizes
    r["noop_train_error"] = _error(lambda: actor.train_step(b, ls))
    r["noop_logprobs_error"] = _error(lambda: actor.compute_logprobs(b))
    actor.onload()

    r["expected_bytes"] = float(_distinct_storage_bytes(chunks, opt))
    r["n_storages"] = len(entries)
    m = actor.offload(force=True)
    r["offload_bytes"] = m["memory/actor_offload_bytes"]
    r["offload_categories"] = {k[len("memory/actor_offload_"):-len("_bytes")]: v for k, v in m.items()
                               if k.endswith("_bytes") and k != "memory/actor_offload_bytes"}
    r["nonzero_after_offload"] = [n for n, _, t in iter_actor_tensors(chunks, opt) if t.untyped_storage().nbytes()]
    r["second_offload_bytes"] = actor.offload(force=True)["memory/actor_offload_bytes"]
    r["train_error"] = _error(lambda: actor.train_step(b, ls))
    r["logprobs_error"] = _error(lambda: actor.compute_logprobs(b))
    r["onload_bytes"] = actor.onload()["memory/actor_onload_bytes"]
    r["second_onload_bytes"] = actor.onload().get("memory/actor_onload_bytes", 0.0)
    after = _snapshot(chunks, opt)
    r["mismatch_after_onload"] = sorted(set(before) ^ set(after)) + [k for k in before if k in after
                                                                      and not _bit_equal(before[k], after[k])]
    r["logprobs_before_step2"] = actor.compute_logprobs(b)[0].tolist()
    r["metrics2"] = actor.train_step(b, ls)
    got = _snapshot(chunks, opt)
    r["params_changed_by_step2"] = any(not _bit_equal(before[k], got[k]) for k in before if ".param:" in k)
    actor.close()

    ref = _build(case)
    ref.train_step(b, ls)
    r["ref_logprobs_before_step2"] = ref.compute_logprobs(b)[0].tolist()
    r["ref_metrics2"] = ref.train_step(b, ls)
    want = _snapshot(ref.chunks, ref.optimizer)
    ref.close()
    r["mismatch_after_step2"] = sorted(set(want) ^ set(got)) + [k for k in want if k in got
                                                                and not _bit_equal(want[k], got[k])]
    r["n_compared_step2"] = len(want)
    return r


def _worker_main():
    import torch.distributed as dist

    results = {}
    for case in json.loads(os.environ["CASES"]):
        results[(case["distopt"], case["dtype"])] = _worker_case(case)
    torch.save(results, f"{os.environ['OUT']}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main()
