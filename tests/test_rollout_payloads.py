"""Pure tests: SGLang payload builders and parsers, commands, sampling, update group (vLLM's: test_real_vllm.py)."""
from __future__ import annotations

import threading

import pytest
import torch

from megatron_dapo.engines.client import (
    SGLANG_SAMPLING_FIELDS,
    EngineClient,
    build_generate_payload,
    build_init_weights_update_group_payload,
    build_update_weights_from_distributed_payload,
    parse_generate_response,
    reorder_sample_major_to_prompt_major,
    serialize_named_tensors_for_sglang,
    validate_sampling_params,
)
from megatron_dapo.engines.cpu.requests import (
    RequestError,
    expand_generate_request,
    parse_sampling_params,
    truncated_sample,
)
from megatron_dapo.engines.launch_cpu import build_cpu_engine_command
from megatron_dapo.engines.launch_sglang import build_sglang_command
from megatron_dapo.engines.update_group import create_weight_update_group, dtype_to_str, parse_torch_dtype

# Fields documented for SGLang's GenerateReqInput (docs/basic_usage/sampling_params.md).
GENERATE_REQ_FIELDS = {"text", "input_ids", "input_embeds", "image_data", "audio_data", "sampling_params", "rid",
                       "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
                       "return_text_in_logprobs", "stream", "lora_path", "custom_logit_processor",
                       "return_hidden_states"}

# A /generate answer in SGLang's documented shape (input_ids request, return_logprob=True).
RECORDED_SGLANG = {
    "text": " Paris.",
    "output_ids": [12095, 13, 151645],
    "meta_info": {
        "id": "a1b2c3-0",
        "finish_reason": {"type": "stop", "matched": 151645},
        "prompt_tokens": 7,
        "weight_version": "default",
        "completion_tokens": 3,
        "cached_tokens": 0,
        "e2e_latency": 0.0412,
        "input_token_logprobs": [],
        "output_token_logprobs": [[-0.0123, 12095, None], [-0.52, 13, None], [-0.0007, 151645, None]],
        "input_top_logprobs": [],
        "output_top_logprobs": [None, None, None],
    },
}


def test_build_generate_payload_expands_n_like_sglang():
    p = build_generate_payload([[1, 2], [3], [4, 5, 6]], {"max_new_tokens": 4, "n": 2, "sampling_seed": 7,
                                                          "temperature": 0.6}, rid="r", logprob_start_len=[0, -1, 1])
    assert set(p) <= GENERATE_REQ_FIELDS
    assert p["input_ids"] == [[1, 2], [3], [4, 5, 6]] * 2
    assert [s["sampling_seed"] for s in p["sampling_params"]] == list(range(7, 13))
    assert all("n" not in s and s["max_new_tokens"] == 4 for s in p["sampling_params"])
    assert all(set(s) <= SGLANG_SAMPLING_FIELDS for s in p["sampling_params"])
    assert p["rid"] == [f"r-{k}" for k in range(6)] and p["return_logprob"] is True
    assert p["logprob_start_len"] == [0, -1, 1, 0, -1, 1]
    unseeded = build_generate_payload([[1]], {"n": 3})
    assert all("sampling_seed" not in s for s in unseeded["sampling_params"]) and len(unseeded["rid"]) == 3


@pytest.mark.parametrize("bad, match", [({"max_tokens": 3}, "max_new_tokens"), ({"seed": 1}, "sampling_seed"),
                                        ({"n": 0}, "n must"), ({"bogus": 1}, "bogus")])
def test_sampling_param_names_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_sampling_params(bad)


@pytest.mark.parametrize("ids, match", [([], "non-empty"), ([[]], r"input_ids\[0\]"), ([[1, -2]], r"input_ids\[0\]"),
                                        ([1, 2], r"input_ids\[0\]")])
def test_bad_prompts_rejected(ids, match):
    with pytest.raises(ValueError, match=match):
        build_generate_payload(ids, {})


def test_parse_recorded_sglang_response():
    (o,) = parse_generate_response(RECORDED_SGLANG, engine_url="http://x")
    assert o.output_ids == [12095, 13, 151645] and o.finish_reason == "stop"
    assert o.finish_reason_detail["matched"] == 151645 and o.prompt_tokens == 7
    assert o.output_logprobs == [-0.0123, -0.52, -0.0007] and o.weight_version == "default"
    assert o.text == " Paris." and o.rid == "a1b2c3-0" and o.input_logprobs == [] and o.engine_url == "http://x"
    # list form, no output_ids (older servers), string finish reason, length / abort
    item = {"meta_info": {"finish_reason": "length", "prompt_tokens": 2,
                          "output_token_logprobs": [[-1.0, 5, None]]}}
    abort = {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "x"},
                                             "output_token_logprobs": []}}
    outs = parse_generate_response([item, abort])
    assert outs[0].output_ids == [5] and outs[0].finish_reason == "length" and outs[1].finish_reason == "abort"


@pytest.mark.parametrize("meta, match", [
    ({"finish_reason": None, "output_token_logprobs": []}, "missing"),
    ({"finish_reason": {"type": "eos"}, "output_token_logprobs": []}, "eos"),
    ({"finish_reason": "stop", "output_token_logprobs": [[-1.0, 4, None]]}, "differ"),
])
def test_parse_rejects_malformed(meta, match):
    with pytest.raises(ValueError, match=match):
        parse_generate_response({"output_ids": [3], "meta_info": meta})


def test_reorder_sample_major_to_prompt_major():
    flat = [f"p{k % 3}s{k // 3}" for k in range(6)]
    assert reorder_sample_major_to_prompt_major(flat, 3, 2) == ["p0s0", "p0s1", "p1s0", "p1s1", "p2s0", "p2s1"]
    with pytest.raises(ValueError, match="expected 3 prompts"):
        reorder_sample_major_to_prompt_major(flat[:5], 3, 2)


def test_weight_sync_payloads():
    body = build_update_weights_from_distributed_payload(["a", "b"], [torch.bfloat16, "float32"], [(2, 3), [4]],
                                                         weight_version="7")
    assert body["dtypes"] == ["bfloat16", "float32"] and body["shapes"] == [[2, 3], [4]]
    assert body["group_name"] == "weight_update_group" and body["weight_version"] == "7" and body["flush_cache"]
    with pytest.raises(ValueError, match="lengths differ"):
        build_update_weights_from_distributed_payload(["a"], [], [])
    init = build_init_weights_update_group_payload("10.0.0.1", 29500, 1, 3)
    assert init == {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 3,
                    "group_name": "weight_update_group", "backend": "nccl"}
    assert parse_torch_dtype("torch.bfloat16") is torch.bfloat16 and dtype_to_str(torch.float16) == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_torch_dtype("float99")
    # SGLang's MultiprocessingSerializer format without sglang: one base64 ForkingPickler entry per TP rank
    entries = serialize_named_tensors_for_sglang([("w", torch.arange(3.0))], tp_size=2)
    assert len(entries) == 2 and entries[0] == entries[1]
    from megatron_dapo.engines.tensor_ipc import deserialize_named_tensors

    (name, t), = deserialize_named_tensors(entries[0])
    assert name == "w" and torch.equal(t, torch.arange(3.0))
    with pytest.raises(ValueError, match="tp_size"):
        serialize_named_tensors_for_sglang([("w", torch.zeros(1))], tp_size=0)
    with pytest.raises(TypeError, match=r"named_tensors\[0\]"):
        serialize_named_tensors_for_sglang([("w", [1.0])])


def test_least_outstanding_pick():
    c = EngineClient(["http://a:1", "http://b:2", "http://c:3"])
    c.outstanding.update({"http://a:1": 3, "http://b:2": 1, "http://c:3": 2})
    assert c._pick(set()) == "http://b:2"
    assert c._pick({"http://b:2"}) == "http://c:3"
    r = EngineClient(["http://a:1"], router_url="http://router:9")
    assert r._pick(set()) == "http://router:9" and r.control_urls == ["http://a:1"]
    with pytest.raises(ValueError, match="at least one"):
        EngineClient([])


def test_sglang_and_cpu_commands():
    cmd = build_sglang_command("/m", port=30010, tp_size=2, mem_fraction_static=0.6, colocated=True, api_key="k",
                               base_gpu_id=2, extra_args=["--random-seed", "3"], python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for frag in ("--model-path /m", "--port 30010", "--tp-size 2", "--mem-fraction-static 0.6",
                 "--enable-memory-saver", "--api-key k", "--base-gpu-id 2", "--random-seed 3"):
        assert frag in joined
    assert "--enable-memory-saver" not in build_sglang_command("/m", port=1)
    with pytest.raises(ValueError, match="mem_fraction_static"):
        build_sglang_command("/m", port=1, mem_fraction_static=1.5)
    cpu = build_cpu_engine_command("/m", port=5, api_key="k", seed=4, python="py")
    assert cpu[:3] == ["py", "-m", "megatron_dapo.engines.cpu.server"] and "--seed" in cpu and "k" in cpu


def test_truncated_sample_topk_topp_and_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 4)
    lp = torch.log_softmax(logits, -1)
    u = torch.tensor([0.0, 0.5, 0.99, 0.999])
    assert truncated_sample(lp, torch.full((4,), 1), torch.ones(4), u).tolist() == [0, 0, 0, 0]
    assert truncated_sample(lp, torch.full((4,), 99), torch.full((4,), 1e-6), u).tolist() == [0, 0, 0, 0]
    n = 40000
    g = torch.Generator().manual_seed(0)
    big = lp[:1].expand(n, 4).contiguous()
    toks = truncated_sample(big, torch.full((n,), 2), torch.ones(n), torch.rand(n, generator=g))
    p = torch.softmax(logits[0, :2], -1)
    freq = torch.bincount(toks, minlength=4).float() / n
    assert freq[2:].sum() == 0 and abs(freq[0] - p[0]) < 0.01
    # top_p = 0.8 keeps tokens whose preceding mass < 0.8: {0, 1} here (p0 ~ 0.61)
    toks = truncated_sample(big, torch.full((n,), 99), torch.full((n,), 0.8), torch.rand(n, generator=g))
    assert set(toks.tolist()) == {0, 1}


def test_engine_request_expansion_and_validation():
    seeds = iter(range(100, 200))
    seqs, is_batch = expand_generate_request(
        {"input_ids": [[1, 2], [3]], "sampling_params": {"n": 2, "sampling_seed": 5, "max_new_tokens": 3},
         "rid": "x"}, lambda: next(seeds), 10)
    assert is_batch and [s.input_ids for s in seqs] == [[1, 2], [3], [1, 2], [3]]
    assert [s.seed for s in seqs] == [5, 5, 6, 6] and [s.rid for s in seqs] == ["x-0", "x-1", "x-2", "x-3"]
    seqs, is_batch = expand_generate_request({"input_ids": [4, 5]}, lambda: next(seeds), 10)
    assert not is_batch and seqs[0].params.max_new_tokens == 128 and seqs[0].seed == 100
    for body, match in [({"input_ids": [[1]], "rid": ["a", "b"]}, "rid has 2"),
                        ({"input_ids": [[1, 2]], "logprob_start_len": 2}, "logprob_start_len"),
                        ({"text": "hi"}, "text input"),
                        ({"input_ids": [[1]], "sampling_params": [{}, {}]}, "2 entries")]:
        with pytest.raises(RequestError, match=match):
            expand_generate_request(body, lambda: 0, 10)
    with pytest.raises(RequestError, match="stop strings"):
        parse_sampling_params({"stop": ["\n"]})
    with pytest.raises(RequestError, match="repetition_penalty"):
        parse_sampling_params({"repetition_penalty": 1.2})
    assert parse_sampling_params({"temperature": 0}).greedy


def test_update_group_gloo_in_process_and_errors():
    from megatron_dapo.engines.launch_common import find_free_ports

    port = find_free_ports(1)[0]
    groups = {}

    def join(rank):
        groups[rank] = create_weight_update_group("127.0.0.1", port, rank, 2, timeout_s=30, group_name="t")

    th = threading.Thread(target=join, args=(1,))
    th.start()
    join(0)
    th.join(30)
    src = torch.randn(3, 5).to(torch.bfloat16)
    dst = torch.empty(3, 5, dtype=torch.bfloat16)
    th = threading.Thread(target=groups[1].broadcast, args=(dst,))
    th.start()
    groups[0].broadcast(src.clone())
    th.join(30)
    assert torch.equal(src, dst)
    for g in groups.values():
        g.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        groups[0].broadcast(src)
    with pytest.raises(ValueError, match="backend"):
        create_weight_update_group("127.0.0.1", port, 0, 2, backend="mpi")
    with pytest.raises(ValueError, match="rank"):
        create_weight_update_group("127.0.0.1", port, 2, 2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nccl"):
            create_weight_update_group("127.0.0.1", port, 0, 2, backend="nccl")
