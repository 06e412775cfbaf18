"""slurm/cpu_smoke.sbatch with REAL SGLang engines (DAPO_ENGINE_BACKEND=sglang) on the local Slurm cluster.

The same 2-node job as tests/test_slurm_e2e.py (TP=2 trainer, one task per node, disk weight sync), but
its engine step runs ``python -m megatron_dapo.engines.launch serve-sglang`` (slurm/engines_on_node.sh,
kind ``sglang-cpu``): SGLang 0.5.x from ``.venv-sglang`` with the CPU flags.  After every sync the engine's
logprobs must equal the actor's (<= 1e-4).  Needs the local cluster (../shared/tools/local-slurm); under
``CI=true`` a missing cluster or engine venv is a failure.
"""
from __future__ import annotations

import pytest

from helpers import read_scalars
from slurm_helpers import SmokeRun, _probe
from tests.engine_fixtures import unavailable

pytestmark = pytest.mark.slow


def test_cpu_smoke_job_with_real_sglang_engines(tmp_path):
    from megatron_dapo.engines.launch_common import default_engine_python

    probe = _probe()
    if isinstance(probe, str):
        unavailable(f"no Slurm cluster: {probe}")
    try:
        default_engine_python("sglang")
    except Exception as exc:
        unavailable(str(exc))
    import sys

    # the job's Python is this one (a checkout without .venv would fall back to python3)
    env = {**probe, "DAPO_ENGINE_BACKEND": "sglang", "DAPO_PYTHON": probe.get("DAPO_PYTHON", sys.executable)}
    run = SmokeRun(tmp_path, tmp_path / "model" / "tiny-qwen2", "sglang",
                   ["trainer.total_steps=2", "rollout.mode=streaming", "weight_sync.check_logprobs=true"])
    r = run.submit(env, wait=True, timeout=900)
    assert r.returncode == 0, f"job {run.job} failed (sbatch rc {r.returncode}: {r.stderr.strip()})\n{run.diagnose()}"
    assert [s["step"] for s in run.steps()] == [1, 2], run.diagnose()
    logs = list(run.log_dir.rglob("sglang-cpu-*.log"))
    assert logs and "fired up" in logs[0].read_text(errors="replace"), run.diagnose()
    batch = run.job_log.read_text(errors="replace")
    assert "engines: sglang" in batch, run.diagnose()
    diffs = read_scalars(run.run_dir / "tb").get("weight_sync/engine_actor_logprob_max_abs_diff", [])
    assert len(diffs) >= 2 and max(v for _, v in diffs) <= 1e-4, diffs
