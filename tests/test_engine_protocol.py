"""One protocol suite for every rollout engine (our CPU engine, real SGLang, real vLLM when enabled).

Each test runs once per engine kind of ``tests/engine_fixtures.py`` (one server per kind per session).
What an engine lacks is a declared capability, and the test checks that declaration against the engine
(e.g. without ``honours_seed`` the same seed must give different samples; without ``memory_release`` a
released engine still generates).  After every weight update the engine's logprobs must equal those of
a transformers fp32 forward of the pushed weights (<= 1e-4).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from megatron_dapo.engines.client import EngineError, serialize_named_tensors_for_sglang
from megatron_dapo.engines.launch_common import find_free_ports
from megatron_dapo.engines.tensor_ipc import serialize_flattened_bucket, share_bucket
from helpers import hf_logprobs
from tests.engine_fixtures import unavailable, wait_until

TOL = 1e-4
SEQ = [3, 17, 22, 40, 5, 9, 60, 11, 100, 7, 33, 12, 45, 8, 70, 21]
PROMPTS = [[3, 17, 22, 40], [5, 9, 60]]


def perturbed_model(base, seed, scale=0.2):
    """A copy of ``base`` with seeded noise on every parameter (tied embeddings stay tied)."""
    import copy

    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m.eval()


def engine_tensors(model):
    """What an engine loads: every HF parameter except the tied ``lm_head.weight``."""
    return [(n, p.detach().clone().contiguous()) for n, p in model.named_parameters() if n != "lm_head.weight"]


def max_diff(engine, model, seq=SEQ, start=4):
    got = engine.run(lambda c: c.score([seq], start))[0]
    ref = hf_logprobs(model, seq, start)
    assert len(got) == len(ref) and all(x is not None for x in got)
    return max(abs(a - b) for a, b in zip(got, ref))


@pytest.fixture
def restore(engine, protocol_hf, tmp_path):
    """Put the protocol model's weights back after a test that changed them (disk update) and check them."""
    yield
    if engine.has("disk_update"):
        engine.restore_protocol_weights(tmp_path)
        assert max_diff(engine, protocol_hf) <= TOL


# ------------------------------------------------------------------------------------ generation
def test_generate_samples_and_logprobs_match_hf(engine, protocol_hf):
    outs = engine.run(lambda c: c.generate(PROMPTS, {"max_new_tokens": 6, "n": 3, "temperature": 0.8,
                                                     "ignore_eos": True}, rid=f"gen-{uuid.uuid4().hex[:6]}"))
    assert len(outs) == 6  # prompt-major: outs[i * n + j]
    for k, o in enumerate(outs):
        prompt = PROMPTS[k // 3]
        assert o.finish_reason == "length" and len(o.output_ids) == 6 and len(o.output_logprobs) == 6
        assert o.prompt_tokens == len(prompt)
        ref = hf_logprobs(protocol_hf, prompt + o.output_ids, len(prompt), temperature=0.8)
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, ref)) <= TOL


def test_score_matches_hf_from_any_start(engine, protocol_hf):
    for start in (1, 4, 9):
        assert max_diff(engine, protocol_hf, start=start) <= TOL
    first = engine.run(lambda c: c.score([SEQ[:5]], 0))[0]
    assert first[0] is None and len(first) == 5


def test_seed_capability_is_what_the_engine_does(engine):
    sp = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 1234}

    def sample():
        return [o.output_ids for o in engine.run(lambda c: c.generate([PROMPTS[0]] * 3, sp))]

    a, b = sample(), sample()
    if engine.has("honours_seed"):
        assert a == b, "declared honours_seed, but the same seed gave different samples"
        sp["sampling_seed"] = 4321
        assert sample() != a, "another seed gave the same samples"
        assert len({tuple(x) for x in a}) > 1, "the 3 items of one request share a seed"
    else:  # e.g. SGLang on CPU ignores sampling_seed (rollout.mode=deterministic warns for it)
        assert a != b, "declared without honours_seed, but 36 seeded tokens repeated exactly"


# ------------------------------------------------------------------------------------ abort
LONG = 2000  # new tokens per sample: the protocol model's context is 2048
SAMPLES_PER_TRY = (4, 16, 64)  # a fast engine may finish a request before it is seen in flight: go bigger


def _abort_in_flight(engine, prompts, abort, what):
    """Start a long request (``n`` samples of :data:`LONG` tokens per prompt), wait until the engine reports
    all of its prompts' work in flight, call ``abort(client, rid)`` and return ``(abort's result, outputs,
    n)``. When the request ends before it is aborted (a fast engine, a slow ``/metrics``: nothing comes back
    aborted) the same is tried with more samples; after the last try the test fails."""
    for n in SAMPLES_PER_TRY:
        rid = f"abort-{uuid.uuid4().hex[:6]}"
        # an earlier test's requests (or a lagging /metrics gauge) must not count as this request in flight
        wait_until(lambda: engine.inflight() == 0, 60, "the engine to be idle before the abort")

        async def go(c):
            task = asyncio.ensure_future(c.generate(prompts, {"max_new_tokens": LONG, "ignore_eos": True,
                                                              "temperature": 1.0, "n": n}, rid=rid))
            loop = asyncio.get_running_loop()
            # event-driven: the engine reports the requests as running before we abort them
            await loop.run_in_executor(None, lambda: wait_until(
                lambda: engine.inflight() >= len(prompts) or task.done(), 120, what))
            if task.done():
                return None, await task
            sent = await abort(c, rid)
            outs = await asyncio.wait_for(task, timeout=120)
            if not any(o.finish_reason == "abort" for o in outs):
                return None, outs  # it finished between the engine's report and the abort: go bigger
            return sent, outs

        sent, outs = engine.run(go)
        if sent is not None:
            wait_until(lambda: engine.inflight() == 0, 60, "the engine to drain after the abort")
            return sent, outs, n
        wait_until(lambda: engine.inflight() == 0, 60, "the engine to drain")
    pytest.fail(f"{len(prompts)} prompt(s) x {SAMPLES_PER_TRY[-1]} samples x {LONG} tokens finished before the "
                f"engine reported them in flight")


IDLE_CORES_MAX = 0.3


def test_idle_engine_does_not_hold_a_core(engine):
    """An engine with nothing to do must not spin: the suite (and a trainer sharing the node) runs beside it. SGLang's
    scheduler busy-polls without ``--sleep-on-idle`` (measured 1.01 cores on the 2-core CI machine, which halved the
    speed of every later test); vLLM and our CPU engine block (measured 0.05 and 0.002 cores)."""
    import time

    import psutil

    wait_until(lambda: engine.inflight() == 0, 60, "the engine to drain")
    root = psutil.Process(engine.procs.engines[0].proc.pid)

    def cpu_s():
        total = 0.0
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    time.sleep(1.0)  # let the last request's follow-up work settle
    c0, t0 = cpu_s(), time.monotonic()
    time.sleep(4.0)
    cores = (cpu_s() - c0) / (time.monotonic() - t0)
    assert cores < IDLE_CORES_MAX, f"idle {engine.kind.name} engine used {cores:.2f} cores"


def test_health_monitor_sees_a_stopped_engine_server_and_its_recovery(engine):
    """The health monitor's liveness probe (issue 25) answers on every engine kind without loading it (SGLang's
    ``/health`` would generate a token through the scheduler: its probe is ``/model_info``), and a stopped server
    process (SIGSTOP of the HTTP server only; its children keep running) is seen as hung within the timeout."""
    import os
    import signal
    import time

    from megatron_dapo.engines.engine_set import BACKENDS
    from megatron_dapo.engines.health import EngineHealthMonitor, probe_health

    path = BACKENDS[engine.kind.name].liveness_path
    assert probe_health(engine.url, None, path=path) == "ok"
    downs = []
    monitor = EngineHealthMonitor([engine.url], lambda u, c: downs.append(c), processes=engine.procs,
                                  hang_timeout_s=2.0, probe_path=path)
    assert monitor.check_now() == {}
    wait_until(lambda: engine.inflight() == 0, 60, "the engine to be idle (the probe sends no request)")
    pid = engine.procs.engines[0].proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: monitor.check_now(), 30, "the stopped engine to be seen as hung")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(downs) == 1 and "hung or stopped" in downs[0], downs
    deadline = time.monotonic() + 60
    while probe_health(engine.url, None, path=path) != "ok":  # the session's engine serves the next tests
        assert time.monotonic() < deadline, engine.diagnosis()
        time.sleep(0.2)


def test_abort_returns_the_in_flight_request(engine):
    assert engine.has("abort")

    async def abort(c, rid):
        return await c.abort(rid)

    sent, outs, n = _abort_in_flight(engine, [PROMPTS[1]], abort, "the engine to report the request in flight")
    assert sent >= 1 and len(outs) == n
    assert all(o.finish_reason == "abort" for o in outs), [o.finish_reason for o in outs]
    for o in outs:
        assert len(o.output_ids) < LONG and len(o.output_logprobs) == len(o.output_ids)


def test_abort_all_returns_every_in_flight_request(engine):
    async def abort(c, rid):
        return await c.abort_all()

    _, outs, n = _abort_in_flight(engine, [PROMPTS[0], PROMPTS[1]], abort, "both requests in flight")
    assert len(outs) == 2 * n
    assert all(o.finish_reason == "abort" for o in outs), [o.finish_reason for o in outs]


def test_aborted_prefix_continues_with_aligned_logprobs(engine, protocol_hf):
    """What partial rollout relies on (``rollout.generation._continue``): an aborted sample's tokens come back
    with one logprob each, equal to the model's at those positions; sending prompt + prefix as the next
    request's input yields only NEW tokens, whose logprobs are again the model's given the whole prefix, so
    the joined response's logprobs line up token by token."""
    prompt = PROMPTS[1]
    for delay_s in (0.0, 0.5, 2.0):
        # an engine reports a request in flight before it has made tokens (measured on a loaded CI machine: one
        # token per sample at the abort); a prefix of >= 2 tokens is needed, so abort a little later next time
        async def abort(c, rid, delay_s=delay_s):
            await asyncio.sleep(delay_s)
            return await c.abort(rid)

        _, outs, _ = _abort_in_flight(engine, [prompt], abort, "the engine to report the request in flight")
        o = max((x for x in outs if x.finish_reason == "abort"), key=lambda x: len(x.output_ids))
        if len(o.output_ids) >= 2:
            break
    assert o.finish_reason == "abort" and len(o.output_ids) >= 2, [len(x.output_ids) for x in outs]
    prefix, prefix_lp = list(o.output_ids[:24]), list(o.output_logprobs[:24])
    ref = hf_logprobs(protocol_hf, prompt + prefix, len(prompt))
    assert max(abs(a - b) for a, b in zip(prefix_lp, ref)) <= TOL
    new = 8
    (cont,) = engine.run(lambda c: c.generate([prompt + prefix], {"max_new_tokens": new, "ignore_eos": True,
                                                                  "temperature": 1.0}, return_logprob=True))
    assert len(cont.output_ids) == new and len(cont.output_logprobs) == new  # the prefix is not echoed
    joined = prompt + prefix + list(cont.output_ids)
    ref = hf_logprobs(protocol_hf, joined, len(prompt) + len(prefix))
    assert max(abs(a - b) for a, b in zip(cont.output_logprobs, ref)) <= TOL


# ------------------------------------------------------------------------------------ weight updates
def _push_disk(engine, model, tmp_path, version):
    model.save_pretrained(str(tmp_path / "w"), safe_serialization=True)
    return engine.run(lambda c: c.update_weights_from_disk(str(tmp_path / "w"), weight_version=version))


def _push_distributed(engine, model, tmp_path, version):
    group_name = f"proto_{uuid.uuid4().hex[:8]}"
    port = find_free_ports(1)[0]

    async def go(c):
        group = await c.connect_weight_update_group("127.0.0.1", port, backend="gloo", group_name=group_name,
                                                    timeout_s=120)
        try:
            return await c.push_weights_distributed(group, engine_tensors(model), group_name=group_name,
                                                    weight_version=version)
        finally:
            group.destroy()
            await c.destroy_weights_update_group(group_name)

    return engine.run(go, control_timeout_s=180)


def _push_tensor(engine, model, tmp_path, version):
    bucket = share_bucket(engine_tensors(model))
    payload = serialize_named_tensors_for_sglang(bucket)
    return engine.run(lambda c: c.update_weights_from_tensor(payload, weight_version=version))


def _push_flattened(engine, model, tmp_path, version):
    payload = [serialize_flattened_bucket(engine_tensors(model))]
    return engine.run(lambda c: c.update_weights_from_tensor(payload, load_format="flattened_bucket",
                                                             weight_version=version))


PUSHES = {"disk_update": _push_disk, "distributed_update": _push_distributed, "tensor_update": _push_tensor,
          "flattened_bucket": _push_flattened}


@pytest.mark.parametrize("how", list(PUSHES))
def test_weight_update_then_logprobs_equal_pushed_weights(engine, protocol_hf, tmp_path, how, restore):
    new = perturbed_model(protocol_hf, seed=list(PUSHES).index(how) + 11)
    version = f"{how}-{uuid.uuid4().hex[:4]}"
    if not engine.has(how):
        with pytest.raises((EngineError, NotImplementedError, AttributeError)):
            PUSHES[how](engine, new, tmp_path, version)
        return
    before = max_diff(engine, new)
    assert before > 1e-2, "the perturbation is too small to prove anything"
    PUSHES[how](engine, new, tmp_path, version)
    assert max_diff(engine, new) <= TOL
    assert engine.run(lambda c: c.get_weight_version())[engine.url] == version


def test_weight_update_bracket_is_what_the_engine_needs(engine, protocol_hf, tmp_path, restore):
    """SGLang >= 0.5.23 answers 400 to an unbracketed tensor update (bug 1); the client detects it."""
    need = engine.run(lambda c: c.weight_update_bracket())[engine.url]
    assert need == engine.has("weight_update_bracket")
    if not engine.has("tensor_update"):
        return
    new = perturbed_model(protocol_hf, seed=77)
    payload = serialize_named_tensors_for_sglang(share_bucket(engine_tensors(new)))

    async def raw(c):  # the unbracketed request the client used to send
        return await c._control("POST", "/update_weights_from_tensor",
                                {"serialized_named_tensors": payload, "load_format": None, "flush_cache": True})

    if need:
        with pytest.raises(EngineError, match="begin_weight_update"):
            engine.run(raw)
        _push_tensor(engine, new, tmp_path, "bracketed")
    else:
        engine.run(raw)
    assert max_diff(engine, new) <= TOL


def test_tied_lm_head_is_not_sent_through_weight_sync(engine, protocol_hf, tmp_path, restore):
    """Bug 4: WeightSync drops lm_head.weight of a tied model (SGLang has no such parameter)."""
    from megatron_dapo.sync import WeightSync

    new = perturbed_model(protocol_hf, seed=5)

    class TiedActor:  # exports lm_head.weight too, like a converter that materialises the tied output layer
        rank = dp_rank = 0
        spec = None  # no name check; tie_word_embeddings from hf_path's config.json
        hf_path = engine.model_dir

        def iter_hf_tensors(self, dtype=None):
            for n, p in new.named_parameters():
                yield n, p.detach().to(dtype or torch.float32)
            yield "lm_head.weight", new.get_output_embeddings().weight.detach().clone()

    transport = "tensor" if engine.has("tensor_update") else "disk"
    with engine.sync_client() as client:
        ws = WeightSync(TiedActor(), client, transport=transport, dtype="fp32", work_dir=tmp_path / "ws",
                        engine_world_size=1)
        assert ws.tied_embeddings
        ws.sync("tied-1")
        ws.close()
    assert max_diff(engine, new) <= TOL


# ------------------------------------------------------------------------------------ release / resume
def test_release_resume_cycle(engine, protocol_hf):
    async def go(c):
        await c.release_memory_occupation(["weights", "kv_cache"])
        try:
            if engine.has("memory_release"):
                with pytest.raises(EngineError):
                    await c.generate([PROMPTS[0]], {"max_new_tokens": 2})
            else:  # a no-op (SGLang without --enable-memory-saver, which needs CUDA)
                outs = await c.generate([PROMPTS[0]], {"max_new_tokens": 2})
                assert len(outs[0].output_ids) >= 1
        finally:
            await c.resume_memory_occupation(["weights", "kv_cache"])
        return await c.generate([PROMPTS[0]], {"max_new_tokens": 3, "ignore_eos": True})

    outs = engine.run(go)
    assert len(outs[0].output_ids) == 3
    assert max_diff(engine, protocol_hf) <= TOL


def test_release_right_after_an_abort_waits_for_the_engine_to_go_idle(engine, protocol_hf):
    """What a colocated step does when the dynamic sampler fills: abort the requests in flight, then release
    the engine's memory at once. SGLang asserts an idle scheduler in release (a failed assertion kills the
    server) while it is still retiring the aborted requests; the client waits for ``/v1/loads`` to show an
    idle engine first. The engine must answer the release and keep serving."""
    async def abort_then_release(c, rid):
        sent = await c.abort(rid)
        await c.release_memory_occupation(["weights", "kv_cache"])
        return sent

    sent, outs, _ = _abort_in_flight(engine, [PROMPTS[0], PROMPTS[1]], abort_then_release,
                                     "both requests in flight")
    assert sent >= 1 and all(o.finish_reason == "abort" for o in outs)

    async def resume_and_generate(c):
        await c.resume_memory_occupation(["weights", "kv_cache"])
        return await c.generate([PROMPTS[0]], {"max_new_tokens": 3, "ignore_eos": True})

    assert len(engine.run(resume_and_generate)[0].output_ids) == 3
    assert max_diff(engine, protocol_hf) <= TOL


# ------------------------------------------------------------------------------------ payloads vs SGLang
VALIDATE_SCRIPT = r'''
import base64, json, sys
import torch
from pydantic import TypeAdapter
from sglang.srt.managers import io_struct
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata
cases = json.load(sys.stdin)
out = []
for case in cases:
    try:
        obj = TypeAdapter(getattr(io_struct, case["cls"])).validate_python(case["payload"])
        res = {"ok": True}
        if case.get("tensors") == "list":
            named = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[0])
            res["tensors"] = [[n, str(t.dtype).replace("torch.", ""), list(t.shape), float(t.double().sum())] for n, t in named]
        elif case.get("tensors") == "bucket":
            d = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[0])
            meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                            end_idx=m.end_idx, numel=m.numel) for m in d["metadata"]]
            named = FlattenedTensorBucket(flattened_tensor=d["flattened_tensor"], metadata=meta).reconstruct_tensors()
            res["tensors"] = [[n, str(t.dtype).replace("torch.", ""), list(t.shape), float(t.double().sum())] for n, t in named]
    except Exception as exc:
        res = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)[:300]}
    out.append(res)
print("RESULT " + json.dumps(out))
'''


def test_payloads_validate_against_sglang_request_classes(tmp_path):
    """Every JSON body the client builds parses as SGLang's own request class, and SGLang's
    ``MultiprocessingSerializer`` / ``FlattenedTensorBucket`` read our tensor handles (one subprocess)."""
    from megatron_dapo.engines.launch_common import default_engine_python
    from megatron_dapo.engines.payloads import (build_generate_payload, build_init_weights_update_group_payload,
                                                build_update_weights_from_distributed_payload)
    try:
        python = default_engine_python("sglang")
    except Exception as exc:
        unavailable(f"{exc}")
    named = [("model.norm.weight", torch.arange(8, dtype=torch.float32)),
             ("model.layers.0.mlp.up_proj.weight", torch.ones(4, 6, dtype=torch.bfloat16) * 0.5),
             ("model.embed_tokens.weight", torch.randn(5, 8))]
    bucket = share_bucket(named)
    list_payload = serialize_named_tensors_for_sglang(bucket)
    flat_payload = [serialize_flattened_bucket(named)]
    gen = build_generate_payload(PROMPTS, {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                           "n": 2, "stop_token_ids": [2], "ignore_eos": False,
                                           "sampling_seed": 3}, rid="r", logprob_start_len=[1, 0])
    cases = [
        {"cls": "GenerateReqInput", "payload": gen},
        {"cls": "GenerateReqInput", "payload": build_generate_payload([SEQ], {"max_new_tokens": 0},
                                                                      logprob_start_len=3)},
        {"cls": "InitWeightsUpdateGroupReqInput",
         "payload": build_init_weights_update_group_payload("127.0.0.1", 29500, 1, 2, "g", "gloo")},
        {"cls": "UpdateWeightsFromDistributedReqInput",
         "payload": build_update_weights_from_distributed_payload([n for n, _ in named], [t.dtype for _, t in named],
                                                                  [list(t.shape) for _, t in named],
                                                                  group_name="g", weight_version="v")},
        {"cls": "UpdateWeightsFromTensorReqInput", "tensors": "list",
         "payload": {"serialized_named_tensors": list_payload, "load_format": None, "flush_cache": True,
                     "weight_version": "v"}},
        {"cls": "UpdateWeightsFromTensorReqInput", "tensors": "bucket",
         "payload": {"serialized_named_tensors": flat_payload, "load_format": "flattened_bucket",
                     "flush_cache": False}},
        {"cls": "UpdateWeightFromDiskReqInput",
         "payload": {"model_path": str(tmp_path), "abort_all_requests": False, "weight_version": "v"}},
        {"cls": "ReleaseMemoryOccupationReqInput", "payload": {"tags": ["weights", "kv_cache"]}},
        {"cls": "ResumeMemoryOccupationReqInput", "payload": {"tags": None}},
        {"cls": "DestroyWeightsUpdateGroupReqInput", "payload": {"group_name": "g"}},
        {"cls": "BeginWeightUpdateReqInput", "payload": {}},
        {"cls": "EndWeightUpdateReqInput", "payload": {}},
        {"cls": "AbortReq", "payload": {"rid": "r-0"}},
        {"cls": "AbortReq", "payload": {"abort_all": True}},
        {"cls": "GetWeightsByNameReqInput", "payload": {"name": "model.norm.weight", "truncate_size": 10}},
    ]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-c", VALIDATE_SCRIPT], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"validator failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(lines[-1][len("RESULT "):])
    bad = [(c["cls"], r["error"]) for c, r in zip(cases, results) if not r["ok"]]
    assert not bad, bad
    expect = [[n, str(t.dtype).replace("torch.", ""), list(t.shape), float(t.double().sum())] for n, t in named]
    for c, r in zip(cases, results):
        if "tensors" in c:
            assert r["tensors"] == expect, c["tensors"]


@pytest.mark.parametrize("selection,ci,refused", [("cpu", "true", True), ("cpu", "", False),
                                                  ("vllm,cpu,sglang", "true", False)])
def test_ci_refuses_an_engine_selection_that_leaves_out_a_kind(selection, ci, refused):
    """Under ``CI=true`` the suite runs every engine kind: ``MEGATRON_DAPO_TEST_ENGINES`` naming fewer fails the session
    at collection instead of passing without the real engines (issue 22)."""
    import os
    import sys

    env = {**os.environ, "CI": ci, "MEGATRON_DAPO_TEST_ENGINES": selection}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           str(Path(__file__))], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    assert (proc.returncode != 0) == refused, out[-3000:]
    assert ("leaves out ['sglang', 'vllm']" in out) == refused, out[-3000:]
