"""Tests for tiny random-initialised HF checkpoints (megatron_dapo.data.tiny_checkpoint + the CLI tool)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, shared_path
from megatron_dapo.data.dataset import render_prompt
from megatron_dapo.data.tasks import generate_tasks
from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint
from megatron_dapo.data.tokenizer import last_answer_integer, load_tokenizer

import transformers  # noqa: E402 - a hard dependency (setup.py)


@pytest.fixture(scope="module")
def demo_rows():
    return generate_tasks(500, seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo_rows):
    out = {}
    for fam in ("qwen2", "llama", "qwen3"):
        out[fam] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{fam}"), family=fam,
                                        demo_rows=demo_rows, seed=0)
    return out


@pytest.mark.parametrize("family,cls_name", [("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM"),
                                             ("qwen3", "Qwen3ForCausalLM")])
def test_family_loads_and_runs_forward(checkpoints, family, cls_name):
    d = checkpoints[family]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (d / name).is_file(), name
    tok = load_tokenizer(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(model).__name__ == cls_name
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (64, 2, 4, 2, 128, 512)
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings and cfg.initializer_range == 0.02
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    params = dict(model.named_parameters())
    has_qkv_bias = "model.layers.0.self_attn.q_proj.bias" in params
    has_qk_norm = "model.layers.0.self_attn.q_norm.weight" in params
    assert has_qkv_bias == (family == "qwen2")
    assert has_qk_norm == (family == "qwen3")
    raw = json.loads((d / "config.json").read_text())
    if family == "llama":
        assert cfg.rope_parameters["rope_type"] == "llama3"
        assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == 500000.0
    else:
        assert raw["rope_theta"] == 1e6

    ids = render_prompt(tok, generate_tasks(1)[0]["prompt"], 512)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    probs = torch.softmax(logits[0, -1], -1)
    assert probs.max() < 5.0 / len(tok)  # near-uniform output of a random-initialised model
    gen = json.loads((d / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted({tok.eos_token_id, tok.pad_token_id})


def test_seed_determinism(tmp_path, demo_rows):
    from safetensors.torch import load_file

    a = make_tiny_checkpoint(tmp_path / "a", family="qwen2", demo_rows=demo_rows[:200], seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", family="qwen2", demo_rows=demo_rows[:200], seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", family="qwen2", demo_rows=demo_rows[:200], seed=4)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_qwen_tokenizer_checkpoint(tmp_path):
    tok_dir = shared_path("data", "qwen2.5-tokenizer")
    d = make_tiny_checkpoint(tmp_path / "q", family="qwen2", tokenizer_dir=tok_dir, hidden_size=32,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, num_layers=1)
    tok = load_tokenizer(d)
    cfg = transformers.AutoConfig.from_pretrained(d)
    assert cfg.vocab_size == len(tok) == 151665
    assert cfg.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    ids = render_prompt(tok, [{"role": "user", "content": "What is 3 + 4?"}], 512)
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 151665)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_checkpoint(tmp_path, family="gpt2")
    with pytest.raises(ValueError, match="num_attention_heads"):
        make_tiny_checkpoint(tmp_path, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        make_tiny_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        make_tiny_checkpoint(tmp_path, tokenizer_dir=tmp_path / "none")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_checkpoint(tmp_path, demo_rows=generate_tasks(100), vocab_size=10)


def test_random_model_gets_some_answers_right(checkpoints, demo_rows):
    """Sampling from the random-initialised qwen2 model (temperature 1, 32 new tokens) already scores a
    few percent — the starting point for the CPU DAPO demo.  Measured ≈ 5–6 %."""
    d = checkpoints["qwen2"]
    tok = load_tokenizer(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    torch.manual_seed(0)
    correct = total = 0
    for row in demo_rows[:32]:
        ids = torch.tensor([render_prompt(tok, row["prompt"], 512)])
        out = model.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=32,
                             num_return_sequences=16)
        for seq in out[:, ids.shape[1]:]:
            text = tok.decode(seq.tolist(), skip_special_tokens=True)
            correct += last_answer_integer(text) == row["reward_model"]["ground_truth"]
            total += 1
    acc = correct / total
    print(f"random qwen2 model accuracy: {acc:.3f} over {total} samples")
    assert 0.02 <= acc <= 0.20


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_checkpoint.py"), "--out", str(out),
                           "--family", "qwen3", "--hidden-size", "32", "--num-attention-heads", "2",
                           "--num-key-value-heads", "1", "--intermediate-size", "64", "--seed", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["hidden_size"] == 32
    assert (out / "tokenizer.json").is_file()
