"""The ``moe`` engine capability (tests/engine_fixtures.py): which engine kinds serve Qwen3-MoE on CPU and take MoE
weight pushes, checked on every enabled kind, so a declared gap is shown to be real instead of skipped.

Each kind is started on the tiny Qwen3-MoE of ``dist_scripts/moe_common.make_engine_moe`` (4 experts, top-2,
every layer MoE as in the published checkpoints, head size 32, demo tokenizer) by :func:`moe_engines.probe`:
prompt log-probs against transformers' fp32 ones at start, after a push of the unchanged checkpoint, and after a
push of scaled per-expert HF tensors over every transport its backend speaks (:class:`megatron_dapo.sync.WeightSync`).
A kind declaring ``moe`` must pass all of it within ``weight_sync.check_logprobs``' bound (1e-4); a kind that does
not must really fail some of it (the measured reasons: benchmarks/RESULTS.md, "MoE on real engines (CPU)"). A real
engine start takes 1.5-4 minutes on 2 cores, hence ``slow``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import ENGINE_KINDS, enabled_kinds, unavailable  # noqa: E402

BOUND = 1e-4
"""``weight_sync.check_logprobs``' tolerance: the engine/actor log-prob difference a push must stay under."""


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    from dist_scripts.moe_common import make_engine_moe
    from engine_fixtures import make_protocol_model

    root = tmp_path_factory.mktemp("engine_moe")
    return make_engine_moe(root / "moe", make_protocol_model(root / "tokenizer_model"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", enabled_kinds())
def test_moe_capability_matches_the_engine(kind, moe_model, tmp_path):
    from megatron_dapo.backend import MissingBackendError
    from megatron_dapo.engines.engine_set import BACKENDS
    from moe_engines import probe

    k = ENGINE_KINDS[kind]
    try:
        res = probe(kind, moe_model, tmp_path)
    except (MissingBackendError, ImportError) as exc:
        unavailable(f"engine kind {kind!r} cannot start: {type(exc).__name__}: {exc} - run {k.needs}")
    transports = list(BACKENDS[kind].weight_transports)
    served = (res["started"] and res["error"] is None and res["initial_max_abs_logprob_diff"] <= BOUND
              and [p["transport"] for p in res["pushes"]] == transports[:1] + transports
              and all(p["max_abs_logprob_diff"] <= BOUND for p in res["pushes"]))
    if "moe" in k.capabilities:
        assert served, res
    else:
        assert not served, f"{kind} serves Qwen3-MoE and takes MoE pushes: declare 'moe' for it. {res}"
