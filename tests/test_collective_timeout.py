"""``trainer.collective_timeout_min`` reaches the process groups, and a hung collective then fails (issue 25).

* the trainer hands ``collective_timeout_min x 60`` seconds through :class:`MegatronActor` to
  :func:`~megatron_dapo.actor.parallel.init_parallel` (in-process, ``init_parallel`` replaced by a recorder);
* two real gloo ranks built by ``init_parallel(timeout_s=3)``: the default group, megatron-core's groups and
  a group made with :func:`~megatron_dapo.sync.collective.collective_timeout` all carry the 3 s timeout, and an
  ``all_reduce`` that the other rank never joins raises after about 3 s instead of hanging.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from helpers import CONFIG, repo_env


class _Stop(Exception):
    pass


def test_trainer_passes_collective_timeout_to_init_parallel(tiny_hf, monkeypatch):
    from contextlib import ExitStack

    from megatron_dapo.actor import megatron_actor
    from megatron_dapo.config import load_config
    from megatron_dapo.trainer import Trainer

    seen = {}

    def recorder(**kwargs):
        seen.update(kwargs)
        raise _Stop  # nothing past the process groups is under test

    monkeypatch.setattr(megatron_actor, "init_parallel", recorder)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(CONFIG, ["trainer.collective_timeout_min=0.75", "actor.tensor_model_parallel_size=1"])
    trainer.hf_path = tiny_hf
    trainer._stack = ExitStack()
    with pytest.raises(_Stop):
        trainer._build_actor()
    assert seen["timeout_s"] == pytest.approx(45.0), seen
    assert seen["tp"] == 1


WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from megatron_dapo.actor.parallel import init_parallel
from megatron_dapo.sync.collective import collective_timeout
from megatron.core import parallel_state as ps

init_parallel(timeout_s=3.0)
cpu = torch.device("cpu")
def t(g):
    return g._get_backend(cpu).options._timeout.total_seconds()
groups = {"world": dist.group.WORLD, "tp": ps.get_tensor_model_parallel_group(),
          "dp": ps.get_data_parallel_group(), "dp_gloo": ps.get_data_parallel_group_gloo(),
          "new_group": dist.new_group([0, 1], timeout=collective_timeout())}
out = {name: t(g) for name, g in groups.items()}
dist.barrier()
if dist.get_rank() == 1:
    time.sleep(120)  # alive, but never joins the collective below: a hung peer
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
    out["error"] = None
except RuntimeError as e:
    out["error"] = str(e).splitlines()[0][:300]
out["waited_s"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)  # not destroy_process_group: the other rank is still inside its sleep
"""


@pytest.mark.slow
def test_hung_collective_fails_within_the_timeout(tmp_path):
    env = {**repo_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    from megatron_dapo.actor.parallel import free_port

    env["MASTER_PORT"] = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"rank 0 printed no result (exit {procs[0].returncode}):\n{out[-4000:]}"
    res = json.loads(lines[0][len("RESULT "):])
    for name in ("world", "tp", "dp", "dp_gloo", "new_group"):
        assert res[name] == pytest.approx(3.0), (name, res)
    assert res["error"] is not None, res  # the collective failed instead of waiting for the sleeping rank
    assert 2.5 <= res["waited_s"] <= 60, res
