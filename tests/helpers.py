"""Utilities shared by the test modules (they import these and the fixtures of ``conftest.py``, never each other).

* :func:`repo_env` - the environment of a subprocess that imports this checkout (``PYTHONPATH``, one OpenMP thread);
* :func:`run_train` / :func:`run_cli` - the real CLI (``python -m megatron_dapo.train`` / ``megatron_dapo.cli``) in a
  subprocess, single process or under ``torchrun``;
* :func:`fail_message` - a finished subprocess's exit status and output tails, for an assertion message;
* :func:`read_steps` / :func:`read_scalars` - a run's ``steps.jsonl`` and TensorBoard scalars;
* :func:`hf_logprobs` - transformers fp32 log-probs of a token sequence (the reference the engines and the actor
  are checked against).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Union

import torch

EOS = 2
"""End-of-sequence id of :func:`make_tiny_qwen2`'s model."""

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")
"""The CPU demo config (``examples/tiny-cpu/dapo.yaml``), the base of the end-to-end runs."""


def repo_env(base: dict | None = None) -> dict:
    """``base`` (default ``os.environ``) with this checkout first on ``PYTHONPATH`` and ``OMP_NUM_THREADS=1`` unless
    set: what a subprocess of the project needs to import the code under test."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 600, config: str = CONFIG
              ) -> subprocess.CompletedProcess:
    """``python -m megatron_dapo.train <config> <overrides>`` (``torchrun`` with ``nproc`` > 1) from the repository
    root; output captured as text. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    if nproc == 1:
        cmd = [PY, "-m", "megatron_dapo.train", config] + overrides
    else:
        from megatron_dapo.actor.parallel import free_port

        cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
               "-m", "megatron_dapo.train", config] + overrides
    return subprocess.run(cmd, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m megatron_dapo.cli <args>`` from the repository root (``env`` default :func:`repo_env`)."""
    return subprocess.run([PY, "-m", "megatron_dapo.cli", *args], cwd=REPO_ROOT, env=env or repo_env(),
                          capture_output=True, text=True, timeout=timeout)


def fail_message(proc: subprocess.CompletedProcess, stdout_chars: int = 4000, stderr_chars: int = 6000) -> str:
    """``exit <code>`` and the last characters of the process's stdout and stderr."""
    return (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-stdout_chars:]}\n"
            f"--- stderr ---\n{proc.stderr[-stderr_chars:]}")


def read_steps(run_dir: Path) -> list[dict]:
    """A run's per-step scalars: ``<run_dir>/steps.jsonl``, one JSON object per step, in step order."""
    return [json.loads(x) for x in (Path(run_dir) / "steps.jsonl").read_text().splitlines() if x.strip()]


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under ``tb_dir`` (a run's ``tb/``): ``{tag: [(step, value), ...]}``, all events kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def hf_logprobs(model: Union["torch.nn.Module", Path, str], seq: list[int], start: int,
                temperature: float = 1.0) -> list[float]:
    """transformers fp32 ``log softmax(logits / temperature)[p - 1, seq[p]]`` for ``p`` in ``[start, len(seq))``.

    ``model``: a loaded causal LM (eval mode) or the directory of an HF checkpoint (loaded in fp32 for this call).
    """
    if isinstance(model, (str, Path)):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(lp[p - 1, seq[p]]) for p in range(start, len(seq))]


def _write_tiny_hf(out: Path, *, family: str = "qwen2", tie: bool = True, seed: int = 0) -> Path:
    import transformers


    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    model.save_pretrained(str(out))
    return out


def make_tiny_qwen2(path, seed: int = 0, scale: float = 1.0):
    """Save a tiny random Qwen2 (vocab 128) with safetensors; ``scale`` sharpens its logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM


    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=65536, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def checkpoint_contents(ckpt_dir: Path, scratch: Path) -> dict:
    """Everything a checkpoint directory stores, for a bit-for-bit comparison: the model and optimizer
    tensors of the torch_dist shards (via ``dcp_to_torch_save``), ``common.pt`` (LR scheduler,
    optimizer param groups) and ``trainer_state.json`` (step, data position, sampler state)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"{ckpt_dir.parent.parent.name}-{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))


    def flat(o, prefix):
        if isinstance(o, dict):
            for k, v in o.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                yield from flat(v, f"{prefix}/{i}")
        else:
            yield prefix, o


    items = dict(flat(torch.load(out, weights_only=False), "shards"))
    items.update(flat(torch.load(ckpt_dir / "common.pt", weights_only=False), "common"))
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    # python_random is a record of the global `random` state at save time, which libraries consume
    # differently in a resumed process (nothing in training draws from it; training RNG states are
    # in rng/); it is the only trainer-state field left out
    state.pop("python_random", None)
    items.update(flat(state, "trainer_state"))
    return items


def bit_differences(a: dict, b: dict) -> list[str]:
    """Keys of two :func:`checkpoint_contents` whose values are not bit-identical."""
    import torch


    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


_SHARED_TINY_MODELS: dict[str, Path] = {}


def shared_tiny_model(tmp_path_factory) -> Path:
    """The demo model of :data:`CONFIG` (random init + demo BPE tokenizer, created through the CLI: ``prepare``), made
    once per pytest session (per process) for the modules that only read it: the body of ``conftest.tiny_model``,
    cached by the session's base temporary directory. A test module overrides its ``tiny_model`` fixture with it."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SHARED_TINY_MODELS:
        d = tmp_path_factory.mktemp("model") / "tiny-qwen2"
        proc = run_cli("prepare", CONFIG, f"model.hf_path={d}")
        assert proc.returncode == 0, fail_message(proc)
        assert proc.stdout.strip().splitlines()[-1] == str(d.resolve())
        _SHARED_TINY_MODELS[key] = d
    return _SHARED_TINY_MODELS[key]
