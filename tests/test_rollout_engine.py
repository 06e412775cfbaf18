"""CPU-engine specifics (SGLang native API): batch independence, stop tokens, 400s naming the field, the
memory-release contract, weight-update error paths.  What every engine must do (generation and scoring vs
HF, seeds, abort, the weight-update transports, release / resume) is the parametrised protocol suite,
tests/test_engine_protocol.py, which runs against this engine too."""
from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request

import pytest
import torch

from megatron_dapo.engines.client import EngineClient, EngineError
from megatron_dapo.engines.launch_common import find_free_ports
from megatron_dapo.engines.launch_cpu import launch_cpu_engines
from helpers import EOS, hf_logprobs, make_tiny_qwen2


def post(url: str, path: str, body: dict, timeout: float = 60.0):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    model = make_tiny_qwen2(d, scale=8.0)
    model.eval()
    return d, model


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    d, _ = tiny
    procs = launch_cpu_engines(str(d), 1, seed=123, log_dir=tmp_path_factory.mktemp("logs"), health_timeout_s=120)
    with procs:
        yield procs.urls[0]


async def _gen(url, prompts, sp, **kw):
    async with EngineClient([url], request_timeout_s=120) as c:
        return await c.generate(prompts, sp, **kw)


def test_batch_independence_under_left_padding(engine):
    target = [1, 9, 8, 7, 6, 5]
    sp = {"max_new_tokens": 10, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 99}
    _, alone = post(engine, "/generate", {"input_ids": target, "sampling_params": sp, "return_logprob": True})
    others = [[1, 2], [3] * 13, [4, 4, 4]]
    sps = [{**sp, "sampling_seed": 5}, {**sp, "sampling_seed": 6}, sp, {**sp, "sampling_seed": 8}]
    status, batch = post(engine, "/generate", {"input_ids": [others[0], others[1], target, others[2]],
                                               "sampling_params": sps, "return_logprob": True})
    assert status == 200 and isinstance(batch, list) and len(batch) == 4
    mate = batch[2]
    assert mate["output_ids"] == alone["output_ids"]
    la = [e[0] for e in alone["meta_info"]["output_token_logprobs"]]
    lb = [e[0] for e in mate["meta_info"]["output_token_logprobs"]]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_stop_token_ids_eos_and_greedy(engine):
    greedy = run(_gen(engine, [[1, 20, 30]], {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}))[0]
    assert greedy.finish_reason == "length"
    stop_tok = greedy.output_ids[3]
    first = greedy.output_ids.index(stop_tok)
    out = run(_gen(engine, [[1, 20, 30]], {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True,
                                           "stop_token_ids": [stop_tok]}))[0]
    assert out.finish_reason == "stop" and out.finish_reason_detail["matched"] == stop_tok
    assert out.output_ids == greedy.output_ids[:first + 1]  # stop token included
    # EOS stops unless ignore_eos: force EOS via a sampled stream and check the rule holds
    outs = run(_gen(engine, [[1, 2, 3]] * 6, {"max_new_tokens": 40, "temperature": 1.5, "sampling_seed": 3}))
    assert any(EOS in o.output_ids for o in outs), "no sample hit EOS: the rule below would go unchecked"
    for o in outs:
        if EOS in o.output_ids:
            assert o.output_ids[-1] == EOS and o.output_ids.index(EOS) == len(o.output_ids) - 1
            assert o.finish_reason == "stop"
        else:
            assert o.finish_reason == "length" and len(o.output_ids) == 40


def test_bad_requests_are_400_with_field_names(engine):
    s, body = post(engine, "/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 0}})
    assert s == 400 and "top_p" in body["error"]["message"]
    s, body = post(engine, "/generate", {"input_ids": [[1, 2], [999]]})
    assert s == 400 and "input_ids[1]" in body["error"]["message"]

    async def go():
        async with EngineClient([engine], max_retries=0) as c:
            await c.generate([[1, 2]], {"max_new_tokens": 2, "top_k": 0})

    with pytest.raises(EngineError, match="HTTP 400.*top_k"):
        run(go())
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(_gen(engine, [[1, 2]], {"max_tokens": 2}))


def test_memory_release_resume_contract(engine):
    async def go():
        async with EngineClient([engine]) as c:
            await c.release_memory_occupation(["weights", "kv_cache"])
            with pytest.raises(EngineError, match="HTTP 400.*resume_memory_occupation"):
                await c.generate([[1, 2]], {"max_new_tokens": 2})
            assert not (await c.health_generate())[engine]
            assert (await c.health())[engine]
            await c.resume_memory_occupation(["weights"])
            with pytest.raises(EngineError, match="kv_cache"):
                await c.generate([[1, 2]], {"max_new_tokens": 2})
            await c.resume_memory_occupation(["kv_cache"])
            outs = await c.generate([[1, 2]], {"max_new_tokens": 2})
            assert len(outs[0].output_ids) >= 1
            with pytest.raises(EngineError, match="tags"):
                await c.release_memory_occupation(["gpu"])
            # tensor handles: garbage and a pickle of a forbidden global are refused with the reason
            with pytest.raises(EngineError, match="not base64"):
                await c.update_weights_from_tensor(["x"])
            import base64
            import pickle

            evil = base64.b64encode(pickle.dumps(os.system)).decode()
            with pytest.raises(EngineError, match="refused"):
                await c.update_weights_from_tensor([evil])
            info = (await c.get_model_info())[engine]
            assert info["is_generation"] is True and "weight_version" in info
            await c.flush_cache()

    run(go())


def _perturbed_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_update_weights_from_disk_changes_outputs_and_version(engine, tiny, tmp_path):
    from safetensors.torch import save_file

    d, model = tiny
    new_state = _perturbed_state(model, 1)
    ckpt = tmp_path / "step1"
    ckpt.mkdir()
    save_file(new_state, str(ckpt / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"model.norm.weight": torch.ones(7)}, str(bad / "model.safetensors"))
    seq = [1, 4, 6, 8, 10, 12]

    async def go():
        async with EngineClient([engine]) as c:
            before = (await c.score([seq], 1))[0]
            with pytest.raises(EngineError, match="shape mismatch"):
                await c.update_weights_from_disk(str(bad), weight_version="bad")
            assert (await c.get_weight_version())[engine] != "bad"
            await c.update_weights_from_disk(str(ckpt), weight_version="step-1")
            after = (await c.score([seq], 1))[0]
            outs = await c.generate([[1, 2]], {"max_new_tokens": 2})
            version = (await c.get_weight_version())[engine]
            await c.update_weights_from_disk(str(d))  # restore; no version given -> counter
            restored = (await c.get_weight_version())[engine]
            return before, after, outs, version, restored

    before, after, outs, version, restored = run(go())
    ref_model = type(model)(model.config)
    ref_model.load_state_dict(new_state, strict=False)
    ref_model.tie_weights()
    ref_model.eval()
    ref = hf_logprobs(ref_model, seq, 1)
    assert max(abs(a - b) for a, b in zip(after, ref)) < 1e-5
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-3
    assert version == "step-1" and outs[0].weight_version == "step-1"
    assert restored not in ("step-1", "default")


def test_update_weights_from_distributed_gloo_bit_identical(engine, tiny):
    d, model = tiny
    names = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(3)
    sd = model.state_dict()
    new = {n: (sd[n] + torch.randn(sd[n].shape, generator=g)).contiguous() for n in names}
    new["model.norm.weight"] = new["model.norm.weight"].to(torch.bfloat16)  # dtype travels too
    port = find_free_ports(1)[0]

    async def go():
        async with EngineClient([engine], control_timeout_s=60) as c:
            group = await c.connect_weight_update_group("127.0.0.1", port, backend="gloo",
                                                        group_name="wu_test", timeout_s=30)
            try:
                await c.push_weights_distributed(group, list(new.items()), group_name="wu_test",
                                                 weight_version="dist-1")
                got = {n: (await c.get_weights_by_name(n, truncate_size=10_000))[engine] for n in names}
                version = (await c.get_weight_version())[engine]
                # unknown names are drained from the broadcast, then reported
                with pytest.raises(EngineError, match="unknown parameter"):
                    await c.push_weights_distributed(group, [("nope.weight", torch.zeros(3))],
                                                     group_name="wu_test")
            finally:
                group.destroy()
                await c.destroy_weights_update_group("wu_test")
                await c.update_weights_from_disk(str(d))  # restore the original weights
            return got, version

    got, version = run(go())
    for n in names:
        expect = new[n].to(torch.float32)
        assert torch.equal(torch.tensor(got[n], dtype=torch.float32), expect), n
    assert version == "dist-1"
