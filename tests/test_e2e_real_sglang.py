"""End to end with REAL SGLang (0.5.x, CPU): the trainer runs >= 3 steps for each weight-sync transport.

Three runs cover the three transports and both colocation modes; after every sync the engine's logprobs
of a fixed sequence must equal the actor's (``weight_sync/engine_actor_logprob_max_abs_diff`` <= 1e-4,
fp32).  The runs use the session's SGLang server of ``tests/engine_fixtures.py`` (one start-up for the
whole suite, started by the same ``launch_sglang_servers`` the trainer calls for ``rollout.backend=sglang``)
through ``rollout.engine_urls``; each run's weights are replaced by the protocol model's afterwards.  The default
non-deterministic rollout runs throughout (concurrent requests, abort once the
dynamic sampler is full): aborted requests must come back and be counted.  The last test kills the
engine mid-rollout: an engine of ``rollout.engine_urls`` cannot be replaced by the run, so the step stops with
one clear line and exit code 4 (a restartable failure), and the server's scheduler and detokenizer processes go
with it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helpers import fail_message, read_scalars, repo_env
from megatron_dapo.engines.launch_common import descendant_pids
from megatron_dapo.errors import EXIT_RESTARTABLE
from tests.engine_fixtures import wait_until

CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")
TOL = 1e-4


def _overrides(tmp: Path, model: Path, transport: str, colocated: bool, steps: int = 3) -> list[str]:
    return [f"output_dir={tmp}", "run_name=sgl", f"model.hf_path={model}", f"trainer.total_steps={steps}",
            "rollout.backend=sglang", "rollout.mode=streaming", f"rollout.colocated={str(colocated).lower()}",
            f"weight_sync.transport={transport}", "weight_sync.check_logprobs=true", "trainer.save_interval=0",
            "trainer.eval_interval=0", "resume=none"]


def _train(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_dapo.cli", "train", CONFIG] + args
    return subprocess.run(cmd, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=timeout)


def _check_run(tmp: Path, steps: int = 3) -> dict:
    """TensorBoard scalars of the run under ``tmp``, after asserting a logprob check <= TOL after each of ``steps``
    syncs and a loss at every step."""
    s = read_scalars(tmp / "sgl" / "tb")
    diffs = s.get("weight_sync/engine_actor_logprob_max_abs_diff", [])
    assert len(diffs) >= steps, f"expected a logprob check after each of {steps} syncs, got {diffs}"
    assert max(v for _, v in diffs) <= TOL, diffs
    assert [st for st, _ in s["actor/pg_loss"]] == list(range(1, steps + 1))
    return s


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def sglang(engine_pool):
    """The session's real SGLang server (one start-up shared with the protocol suite)."""
    return engine_pool("sglang")


TRANSPORTS = [("disk", True), ("distributed", False), ("tensor", True)]


@pytest.fixture(scope="module")
def transport_run(sglang, tmp_path_factory):
    """``transport_run(transport, colocated)``: the 3-step run on the shared server with that weight-sync transport,
    done once per module (the first test that asks runs it) and checked by :func:`_check_run`; returns its
    TensorBoard scalars. A run changes the server's weights: the protocol model's are put back after it."""
    from megatron_dapo.engines.client import SyncEngineClient

    done: dict = {}

    def run(transport: str, colocated: bool) -> dict:
        if (transport, colocated) in done:
            return done[transport, colocated]
        tmp = tmp_path_factory.mktemp(f"sgl_{transport}")
        args = _overrides(tmp, sglang.model_dir, transport, colocated) + [f"rollout.engine_urls=[{sglang.url}]"]
        if transport == "distributed":
            # one kept group of 16 from 8 prompts x 16 samples (~12k tokens) on a server whose KV cache holds 4,096
            # tokens on CPU: later requests wait while the first ones are generated and scored, so requests are
            # still in flight when the sampler fills (streaming scoring keeps groups that finished generating)
            args += ["rollout.rollout_batch_size=1", "rollout.n_samples_per_prompt=16",
                     "algorithm.oversample_factor=8.0", "rollout.max_response_length=64",
                     "algorithm.overlong_buffer_length=16", "actor.ppo_mini_batch_size=16"]
        try:
            proc = _train(args)
            assert proc.returncode == 0, fail_message(proc) + "\n" + sglang.diagnosis()
            done[transport, colocated] = _check_run(tmp)
        finally:
            with SyncEngineClient([sglang.url]) as c:
                c.update_weights_from_disk(str(sglang.model_dir), weight_version="restored")
        return done[transport, colocated]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("transport,colocated", TRANSPORTS)
def test_transports_against_the_shared_server(transport_run, transport, colocated):
    """Three steps with this transport: after every sync the engine's logprobs equal the actor's (``_check_run``)."""
    transport_run(transport, colocated)


@pytest.mark.slow
def test_aborted_requests_were_counted(transport_run):
    """Across the three runs (9 steps, concurrent requests, abort when the dynamic sampler is full) some
    requests were aborted by the trainer, came back from SGLang and were counted. Run alone, this test makes the
    three runs itself; after the test above it reuses them."""
    aborted = [sum(v for _, v in transport_run(t, c).get("dynamic_sampling/aborted_requests", []))
               for t, c in TRANSPORTS]
    assert sum(aborted) >= 1, aborted


@pytest.mark.slow
@pytest.mark.kills_engine
def test_engine_killed_mid_rollout_stops_the_step_with_one_line(tmp_path, sglang):
    """The only engine dies while requests are in flight. It was given by ``rollout.engine_urls`` (not started by
    this run), so the run cannot replace it: the step stops with one clear line naming it and exit code 4
    (``errors.EXIT_RESTARTABLE``: the Slurm scripts requeue the job, which restarts its engines), no
    traceback."""
    args = _overrides(tmp_path, sglang.model_dir, "disk", False, steps=50) + [f"rollout.engine_urls=[{sglang.url}]",
                                                                              "rollout.max_retries=1"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_dapo.cli", "train", CONFIG] + args, cwd=REPO_ROOT,
                            env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or sglang.inflight() >= 1, 300,
                   "the trainer's first rollout requests on SGLang", poll_s=0.1)
        assert proc.poll() is None, fail_message(subprocess.CompletedProcess(proc.args, proc.returncode, *proc.communicate()))
        family = descendant_pids(sglang.procs.engines[0].proc.pid)
        assert len(family) >= 2, f"expected SGLang's scheduler and detokenizer under the server, found {family}"
        sglang.procs.kill(0)
        wait_until(lambda: not any(_alive(p) for p in family), 30, "SGLang's child processes to be gone")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_RESTARTABLE, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    stops = [line for line in err.splitlines() if line.startswith("megatron-dapo:")]
    assert len(stops) == 1 and "Traceback" not in err, err[-4000:]
    assert "EngineLostError" in stops[0] and sglang.url in stops[0] and "rollout.engine_urls" in stops[0], stops[0]
