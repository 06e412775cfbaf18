"""HF ↔ Megatron conversion tools (tools/convert_*.py, megatron_dapo.models.convert).

* HF → Megatron → HF is bit-exact (``torch.equal`` on every safetensors tensor, same names and dtypes)
  for Qwen2.5 (tied embeddings, QKV bias), Llama 3 (RoPE scaling) and Qwen3 (QK-norm) tiny models;
* ``--verify``-style comparison: Megatron logits / log-probs equal transformers' (fp32, ≤ 1e-5);
* a checkpoint written at TP=2 by the CLI under torchrun exports (at TP=1, sharded files + index) bit-exact;
* errors: missing files, unsupported architecture, tensor shape mismatch (names the tensor and both shapes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import FAMILIES, REPO, SCRIPTS, make_models, torchrun  # noqa: E402

TOOLS = REPO / "tools"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("convert_models"))


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("convert_work")
    tp2 = work / "mc_tp2"
    torchrun(f"{TOOLS / 'convert_hf_to_megatron.py'} --hf {models['qwen2']} --out {tp2} --tp 2", 2, {})
    env = dict(os.environ, MODELS=",".join(f"{f}={models[f]}" for f in FAMILIES), WORK=str(work),
               OUT=str(work / "res.pt"), TP2_CKPT=str(tp2), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "convert_worker.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = torch.load(work / "res.pt", weights_only=False)
    res["tp2_dir"] = tp2
    return res


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_exact(results, family):
    r = results[family]
    assert r["same_keys"], r["missing"]
    assert r["bit_exact"]
    assert r["n_tensors"] >= 39
    for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert f in r["files"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_logits_match_transformers(results, family):
    v = results[family]["verify"]
    assert v["max_abs_logits"] <= 1e-5
    assert v["max_abs_logprobs"] <= 1e-5


@pytest.mark.slow
def test_tp2_cli_checkpoint_exports_bit_exact(results):
    r = results["tp2"]
    assert r["same_keys"] and r["bit_exact"]
    assert "model.safetensors.index.json" in r["files"]
    assert sum(f.endswith(".safetensors") for f in r["files"]) > 1
    info = json.loads((results["tp2_dir"] / "convert_info.json").read_text())
    assert (info["tp"], info["pp"], info["family"]) == (2, 1, "qwen2")
    assert (results["tp2_dir"] / "config.json").is_file() and (results["tp2_dir"] / "metadata.json").is_file()


@pytest.mark.slow
def test_shape_mismatch_names_tensor(results):
    msg = results["shape_error"]
    assert msg is not None
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "(32, 64)" in msg and "(30, 64)" in msg


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / tool), *args], capture_output=True, text=True, timeout=120,
                          cwd="/")


def test_cli_missing_files(tmp_path):
    p = _cli("convert_hf_to_megatron.py", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "config.json not found" in p.stderr
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    p = _cli("convert_hf_to_megatron.py", "--hf", str(tmp_path / "cfg"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "no *.safetensors" in p.stderr
    p = _cli("convert_hf_to_megatron.py", "--hf", str(tmp_path / "cfg"), "--out", str(tmp_path / "o"), "--tp", "2")
    assert p.returncode == 2
    p = _cli("convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "directory not found" in p.stderr
    p = _cli("convert_megatron_to_hf.py", "--ckpt", str(tmp_path / "cfg"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "metadata.json" in p.stderr


def test_unsupported_architecture(tmp_path):
    from megatron_dapo.models import convert
    from megatron_dapo.models.hf_config import UnsupportedModelError

    d = tmp_path / "mistral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                               "hidden_size": 64, "num_attention_heads": 4,
                                               "num_hidden_layers": 2, "intermediate_size": 128,
                                               "vocab_size": 300}))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        convert.hf_to_megatron(d, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        convert.megatron_to_hf(tmp_path / "out_missing", tmp_path / "x")
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.megatron_to_hf(tmp_path / "ck", tmp_path / "x")
