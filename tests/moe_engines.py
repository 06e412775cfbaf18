"""Serve the tiny Qwen3-MoE on one rollout-engine kind and push MoE weights to it: the check behind the ``moe``
engine capability (tests/engine_fixtures.py), run by ``benchmarks/probe_moe_engines.py``.

:func:`probe` starts the kind (cpu / sglang / vllm: ``engine_fixtures.ENGINE_KINDS[kind].start``, the protocol
suite's launchers and flags) on :func:`~dist_scripts.moe_common.make_engine_moe`'s model, compares its prompt
log-probs with transformers' fp32 ones, then pushes the unchanged checkpoint once over the backend's first weight
transport, and over each transport it speaks (:data:`megatron_dapo.engines.engine_set.BACKENDS`) the checkpoint's
per-expert HF tensors scaled by a new factor, through :class:`megatron_dapo.sync.WeightSync` (stand-in actor
``fakes.HFActor``), comparing again after each push against transformers on the same weights.
"""
from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

SEQS = [[3 + (i * 11 + j * 7) % 140 for j in range(10 + 3 * i)] for i in range(4)]
START = 2


def _error_lines(log_dir: str, n: int = 6) -> list[str]:
    """The last ``n`` lines naming an error in the engine logs under ``log_dir``."""
    out: list[str] = []
    for f in sorted(Path(log_dir).glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()
        out += [ln.strip() for ln in lines if "Error" in ln or "error" in ln or "not supported" in ln.lower()]
    return out[-n:]


def _reference(model: Path, scale: float, scratch: Path,
               expert_scale: float | None = None) -> list[list[float]]:
    """transformers' fp32 prompt log-probs of :data:`SEQS` from ``START`` on, weights multiplied by ``scale``
    (routed expert tensors ``.mlp.experts.`` by ``expert_scale`` when given: the model an engine would run had it
    kept its old experts)."""
    import torch
    from safetensors.torch import load_file, save_file
    from helpers import hf_logprobs

    e_scale = scale if expert_scale is None else expert_scale
    d = scratch / f"ref-{scale}-{e_scale}"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v * (e_scale if ".mlp.experts." in k else scale)
               for k, v in load_file(str(model / "model.safetensors")).items()}, str(d / "model.safetensors"))
    shutil.copy(model / "config.json", d / "config.json")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    return [hf_logprobs(m, s, START) for s in SEQS]


def _max_diff(got: list[list[float | None]], want: list[list[float]]) -> float:
    """Largest ``|engine - transformers|`` over every scored position; ``inf`` where the engine answered ``None``."""
    return max(float("inf") if a is None else abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))


def probe(kind: str, model: Path, scratch: Path) -> dict:
    """Start engine ``kind`` on ``model``, push scaled weights over every transport it speaks, compare log-probs.

    Returns ``{"kind", "started", "start_s", "error", "initial_max_abs_logprob_diff", "initial_none_positions",
    "pushes": [{"transport", "scale", "max_abs_logprob_diff", "diff_if_experts_kept_old_weights", "seconds"}]}``
    (the second diff: against transformers with every tensor pushed but the routed experts at their previous
    values; ``error``: the exception of a failed start or push and the engine log's
    last error lines). The engine is stopped before it returns.

    Raises:
        MissingBackendError, ImportError: the kind cannot be started here at all (its venv is missing).
    """
    import torch
    from fakes import HFActor
    from megatron_dapo.engines.engine_set import BACKENDS
    from megatron_dapo.sync import WeightSync

    log_dir = str(scratch / f"logs-{kind}")
    res: dict = {"kind": kind, "started": False, "start_s": None, "error": None, "pushes": []}
    t0 = time.perf_counter()
    from engine_fixtures import ENGINE_KINDS
    from megatron_dapo.backend import MissingBackendError

    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
    try:
        procs = ENGINE_KINDS[kind].start(Path(model), Path(log_dir))
    except (MissingBackendError, ImportError):
        raise  # no such engine here (no venv): not a finding about MoE
    except Exception as exc:
        res["start_s"] = round(time.perf_counter() - t0, 1)
        res["error"] = {"exception": f"{type(exc).__name__}: {str(exc)[-1500:]}", "log": _error_lines(log_dir)}
        return res
    res["started"], res["start_s"] = True, round(time.perf_counter() - t0, 1)
    backend = BACKENDS[kind]
    client = backend.client(procs.urls, router_url=None, api_key=None, request_timeout_s=600.0, max_retries=0)
    actor = HFActor(model)
    try:
        got = client.score(SEQS, [START] * len(SEQS))
        res["initial_none_positions"] = sum(a is None for g in got for a in g)
        want = _reference(model, 1.0, scratch)
        res["initial_max_abs_logprob_diff"] = _max_diff(got, want)
        # first the unchanged checkpoint (scale 1: does a push alone change what the engine computes?), then
        # each transport with new values
        plan = [(backend.weight_transports[0], 1.0)] + [(t, 1.0 + 0.05 * (i + 1))
                                                        for i, t in enumerate(backend.weight_transports)]
        for i, (transport, scale) in enumerate(plan):
            old_scale = actor.scale
            actor.scale = scale
            t1 = time.perf_counter()
            ws = WeightSync(actor, client, transport=transport, bucket_mb=0.02, dtype=torch.float32,
                            work_dir=scratch / f"w-{kind}", timeout_s=300)
            try:
                ws.sync(f"{transport}-{i}")
                got = client.score(SEQS, [START] * len(SEQS))
            finally:
                ws.close()
            diff = _max_diff(got, _reference(model, actor.scale, scratch))
            stale = _max_diff(got, _reference(model, actor.scale, scratch, expert_scale=old_scale))
            res["pushes"].append({"transport": transport, "scale": scale, "max_abs_logprob_diff": diff,
                                  "diff_if_experts_kept_old_weights": stale,
                                  "seconds": round(time.perf_counter() - t1, 2)})
    except Exception as exc:
        res["error"] = {"exception": f"{type(exc).__name__}: {str(exc)[-1500:]}", "log": _error_lines(log_dir),
                        "traceback": traceback.format_exc()[-1500:]}
    finally:
        client.close()
        procs.stop()
    return res
