"""benchmarks/gpu/run_all.sh --dry-run: every GPU part's logic at tiny sizes on the CPU, so the script a
GPU session runs (benchmarks/RESULTS.md, "GPU script") cannot rot between GPU loans."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~60 s of CPU time; the wall clock grows with the load of a shared machine
def test_gpu_script_dry_run(tmp_path):
    from parts import PARTS

    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run_all.sh"), "--dry-run", "--jobs", "3",
                           "--budget-s", "270", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=290)
    report_file = tmp_path / "gpu_results.json"
    assert report_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["dry_run"] is True
    assert list(report["parts"]) == list(PARTS)
    failed = {n: r.get("error") for n, r in report["parts"].items() if not r["ok"]}
    log = (tmp_path / "parts.log").read_text()
    assert not failed, f"{failed}\n{log[-4000:]}"
    assert proc.returncode == 0, proc.stdout[-2000:]
    p = report["parts"]
    # each part measured what it claims (tiny sizes, CPU)
    assert p["actor_step"]["tokens_per_s"] > 0 and p["actor_step"]["loss_finite"]
    assert p["logprob_memory"]["logprob_max_abs_diff"] < 1e-3
    assert p["offload"]["bit_exact_storages"] == p["offload"]["storages"] > 0
    assert p["tensor_ipc"]["probe_max_abs_diff"] == 0.0 and p["tensor_ipc"]["weight_version"] == "ipc-1"
    assert p["tensor_ipc"]["logprob_abs_diff_max"] <= 1e-4
    assert p["thd_packing"]["fp32_logprob_max_abs_diff"] <= 1e-4
    assert p["sp_gather"]["gather_ok"] and p["sp_gather"]["reduce_scatter_ok"]
    md = (tmp_path / "RESULTS_gpu.md").read_text()
    assert "6/6 parts ok" in md and "| tensor_ipc | yes |" in md
    assert "PART_RESULT" in log and "Traceback" not in log
