"""Rollout engines that fail mid-run (issue 25): health, rotation, replacement, and whole runs that survive them.

* Unit level: the transport takes a failed engine out of rotation and resends its running request elsewhere;
  :class:`~megatron_dapo.engines.health.EngineHealthMonitor` sees a killed, a stopped and a refusing engine;
  :meth:`EngineProcesses.relaunch` replaces one engine on its URL; :meth:`EngineSet.replace_failed_engines` counts
  replacements and stops with one message past ``rollout.max_engine_restarts``; the CPU engine's fault plan.
* End to end (tiny model, two CPU engines, ``MEGATRON_DAPO_CPU_ENGINE_FAULT``): a disaggregated run with the
  ``distributed`` transport whose engines are killed -9 while generating (step 2, after the update group exists, so
  it is re-formed) and SIGSTOPped while generating (step 3); a colocated run with the ``disk`` transport whose
  engine is killed while released (step 1) and during a weight push (end of step 2). Each finishes all steps,
  trains full batches, passes the logprob check after every push and counts every replacement.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from megatron_dapo.config import ConfigError, DAPOConfig
from megatron_dapo.engines.cpu.faults import FAULT_ENV, FaultPlan
from megatron_dapo.engines.engine_set import EngineSet
from megatron_dapo.engines.health import EngineHealthMonitor, describe_exit
from megatron_dapo.engines.launch_common import EngineProcesses, find_free_ports
from megatron_dapo.engines.transport import EngineError, EngineLostError, EngineTransport
from tests.helpers import CONFIG, PY, REPO_ROOT, fail_message, read_scalars, read_steps, repo_env


# ---------------------------------------------------------------------------------------------- transport rotation


class _Servers:
    """Two aiohttp servers on this machine's loopback, run on a private loop thread: ``hang`` answers POST /echo
    never (it records that the request arrived), ``good`` answers at once with its own name."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.arrived = {"hang": threading.Event(), "good": threading.Event()}
        self.runners = []
        self.urls = {}
        self.release = None  # set on the loop: lets the hanging handler return at close()
        for name in ("hang", "good"):
            self.urls[name] = self._call(self._start(name))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, name: str) -> str:
        async def echo(request: web.Request) -> web.Response:
            self.arrived[name].set()
            if name == "hang":
                if self.release is None:
                    self.release = asyncio.Event()
                await self.release.wait()
            return web.json_response({"server": name})

        app = web.Application()
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        port = find_free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        if self.release is not None:
            self.loop.call_soon_threadsafe(self.release.set)
        for r in self.runners:
            self._call(r.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def servers():
    s = _Servers()
    yield s
    s.close()


def test_a_down_engine_leaves_rotation_and_its_running_request_is_resent(servers):
    hang, good = servers.urls["hang"], servers.urls["good"]

    async def scenario():
        t = EngineTransport([hang, good], max_retries=2, retry_backoff_s=0.01)
        try:
            t.mark_warming(good)  # the first attempt can only go to the hanging engine
            assert t.control_urls == [hang, good]  # warming: still takes control calls
            req = asyncio.ensure_future(t._post_balanced("/echo", {}, ["r1"]))
            await asyncio.get_running_loop().run_in_executor(None, servers.arrived["hang"].wait, 10)
            t.mark_up(good)
            assert t.mark_down(hang, "killed by SIGKILL") == 1  # one running request cancelled here ...
            url, data = await asyncio.wait_for(req, 10)  # ... and answered by the other engine
            assert (url, data) == (good, {"server": "good"})
            assert t.requests_resubmitted == 1
            assert t.control_urls == [good] and t.down_urls == {hang: "killed by SIGKILL"}
            for _ in range(4):  # nothing goes to a down engine any more
                assert (await t._post_balanced("/echo", {}, ["r2"]))[0] == good
            t.mark_down(good, "exited with code 1")
            with pytest.raises(EngineError, match=r"no engine in rotation .*killed by SIGKILL.*exited with code 1"):
                await t._post_balanced("/echo", {}, ["r3"])
            with pytest.raises(ValueError, match="not one of this client's engines"):
                t.mark_up("http://127.0.0.1:1")
        finally:
            await t.close()

    asyncio.run(scenario())


def test_a_caller_cancelling_its_request_is_not_an_engine_failure(servers):
    """An abort from the caller (the dynamic sampler is full) cancels the request; it is not resent."""
    hang = servers.urls["hang"]

    async def scenario():
        t = EngineTransport([hang], max_retries=2, retry_backoff_s=0.01)
        try:
            req = asyncio.ensure_future(t._post_balanced("/echo", {}, ["r1"]))
            await asyncio.get_running_loop().run_in_executor(None, servers.arrived["hang"].wait, 10)
            req.cancel()
            with pytest.raises(asyncio.CancelledError):
                await req
            assert t.requests_resubmitted == 0 and t.down_urls == {}
        finally:
            await t.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- health and relaunch

_HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def one_engine(tmp_path):
    """One engine-like process (answers /health) started the way the launchers start engines."""
    port = find_free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    procs = EngineProcesses.launch([([PY, "-c", _HEALTH_SERVER, str(port)], url, tmp_path / "engine.log")],
                                   health_timeout_s=60)
    yield procs, url
    procs.stop()


def _wait_failed(monitor: EngineHealthMonitor, url: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cause = monitor.check_now().get(url)
        if cause:
            return cause
        time.sleep(0.1)
    raise AssertionError(f"{url} not seen failed within {timeout_s} s")


def test_monitor_sees_a_killed_engine_and_relaunch_replaces_it_on_its_url(one_engine):
    procs, url = one_engine
    downs = []
    monitor = EngineHealthMonitor([url], lambda u, c: downs.append((u, c)), processes=procs, hang_timeout_s=30)
    assert monitor.check_now() == {}
    old_pid = procs.engines[0].proc.pid
    procs.kill(0, signal.SIGKILL)
    assert _wait_failed(monitor, url) == "killed by SIGKILL"
    assert downs == [(url, "killed by SIGKILL")]  # told once, however often checked
    monitor.check_now()
    assert len(downs) == 1

    monitor.pause(url)
    new = procs.relaunch(0, health_timeout_s=60)
    monitor.forget(url)
    assert new.url == url and new.proc.pid != old_pid and new.proc.poll() is None
    assert monitor.check_now() == {}
    log = procs.engines[0].log_path.read_text()
    assert log.count("serving") == 2 and "engine relaunched" in log


def test_monitor_sees_a_stopped_engine_and_relaunch_ends_the_stopped_process(one_engine):
    procs, url = one_engine
    downs = []
    monitor = EngineHealthMonitor([url], lambda u, c: downs.append((u, c)), processes=procs, hang_timeout_s=1.0)
    assert monitor.check_now() == {}
    stopped = procs.engines[0].proc
    os.kill(stopped.pid, signal.SIGSTOP)
    cause = _wait_failed(monitor, url)
    assert "/health has not answered" in cause and "hung or stopped" in cause
    procs.relaunch(0, health_timeout_s=60, grace_s=2)
    assert stopped.poll() is not None  # the stopped process is gone (SIGCONT + SIGTERM, then SIGKILL)
    assert procs.engines[0].proc.poll() is None


def test_monitor_sees_an_engine_that_refuses_connections():
    url = f"http://127.0.0.1:{find_free_ports(1)[0]}"  # nothing listens there
    monitor = EngineHealthMonitor([url], lambda u, c: None, hang_timeout_s=600)
    assert monitor.check_now() == {}  # one refusal is not yet a failure
    assert monitor.check_now() == {url: "its connection was refused twice in a row"}
    assert monitor.process_of(url) is None


def test_describe_exit():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exited with code 3"


# ---------------------------------------------------------------------------------------------- replacement bounds


class _Client:
    def __init__(self) -> None:
        self.calls = []
        self.down_urls = {}
        self.requests_resubmitted = 5

    def mark_warming(self, url):
        self.calls.append(("warming", url))

    def mark_up(self, url):
        self.calls.append(("up", url))


class _Sync:
    resets = 0

    def reset_transport(self):
        self.resets += 1


def _engine_set(client, monitor, max_restarts) -> EngineSet:
    return EngineSet(None, client, _Sync(), colocated=False, health=monitor, max_engine_restarts=max_restarts,
                     relaunch_timeout_s=60)


def test_replacement_is_counted_and_past_the_bound_the_run_stops_naming_engine_and_log(one_engine):
    procs, url = one_engine
    client = _Client()
    monitor = EngineHealthMonitor([url], lambda u, c: None, processes=procs, hang_timeout_s=30)
    engines = _engine_set(client, monitor, max_restarts=1)
    assert engines.replace_failed_engines() == 0 and engines.health_metrics()["rollout/engine_restarts"] == 0

    procs.kill(0, signal.SIGKILL)
    assert engines.replace_failed_engines(after_error=True) == 1
    assert engines.restarts == {url: 1} and client.calls == [("warming", url)] and engines.weight_sync.resets == 1
    engines._put_back_warming()
    assert client.calls[-1] == ("up", url)
    assert engines.health_metrics() == {"rollout/engine_restarts": 1.0, "rollout/engines_alive": 1.0,
                                        "rollout/requests_resubmitted": 0.0}

    procs.kill(0, signal.SIGKILL)
    with pytest.raises(EngineError) as info:
        engines.replace_failed_engines(after_error=True)
    msg = str(info.value)
    assert url in msg and "killed by SIGKILL" in msg and "rollout.max_engine_restarts=1" in msg
    assert str(procs.engines[0].log_path) in msg and "engine relaunched" in msg  # the log and its last lines


def test_an_engine_not_started_by_the_run_is_not_replaced():
    url = f"http://127.0.0.1:{find_free_ports(1)[0]}"
    monitor = EngineHealthMonitor([url], lambda u, c: None, hang_timeout_s=600)
    engines = _engine_set(_Client(), monitor, max_restarts=3)
    assert engines.replace_failed_engines(after_error=True) == 0  # one refusal is not yet a failure
    with pytest.raises(EngineLostError, match=r"not started by this run \(rollout.engine_urls\).*exit code 4"):
        engines.replace_failed_engines(after_error=True)


@pytest.mark.parametrize("key,value", [("rollout.max_engine_restarts", -1), ("rollout.engine_hang_timeout_s", 0),
                                       ("trainer.collective_timeout_min", 0)])
def test_fault_tolerance_settings_are_validated(key, value):
    section, name = key.split(".")
    part = getattr(DAPOConfig(), section)
    part.validate()  # the defaults pass
    setattr(part, name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        part.validate()


def test_fault_plan_parsing(tmp_path):
    assert FaultPlan.from_env({}) == []
    plans = FaultPlan.from_env({FAULT_ENV: json.dumps([
        {"path": "/generate", "after": 3, "action": "kill", "claim": "a"},
        {"path": "/generate", "after": 1, "action": "stop", "claim": "b", "weight_version": 2}])})
    assert plans == [FaultPlan("/generate", 3, "kill", "a"), FaultPlan("/generate", 1, "stop", "b", "2")]
    for bad in ('{"path": "/generate"}', '{"path": "/g", "after": 0, "action": "kill", "claim": "c"}',
                '{"path": "/g", "after": 1, "action": "explode", "claim": "c"}', "not json"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            FaultPlan.from_env({FAULT_ENV: bad})


# ---------------------------------------------------------------------------------------------- whole runs

STEPS = 3


def _fault_run(tmp_path: Path, faults: list[dict], overrides: list[str], steps: int = STEPS,
               num_engines: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    for i, f in enumerate(faults):
        f["claim"] = str(tmp_path / f"fault{i}.claim")
    env = repo_env()
    env[FAULT_ENV] = json.dumps(faults)
    cmd = [PY, "-m", "megatron_dapo.train", CONFIG, f"output_dir={tmp_path}", "run_name=run",
           f"trainer.total_steps={steps}", "trainer.save_interval=0", "trainer.export_hf=false",
           f"rollout.num_engines={num_engines}", "weight_sync.check_logprobs=true"] + overrides
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, tmp_path / "run"


def _check_survived(proc, run_dir: Path, tmp_path: Path, n_faults: int, steps: int = STEPS,
                    num_engines: int = 2) -> list[dict]:
    """Every planned failure happened, and the run finished every step as if none had."""
    assert proc.returncode == 0, fail_message(proc)
    fired = sorted(p.name for p in tmp_path.glob("fault*.claim"))
    assert fired == [f"fault{i}.claim" for i in range(n_faults)], (fired, fail_message(proc))
    n_steps = steps
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == list(range(1, n_steps + 1))
    for s in steps:
        # a full batch: 8 groups x 8 responses = 64 rows = 2 updates of ppo_mini_batch_size 32, every token trained
        assert s["actor/num_updates"] == 2 and s["actor/loss_tokens"] == s["rollout/trained_tokens"] > 0, s
        assert s["weight_sync/engine_actor_logprob_max_abs_diff"] <= 1e-4, s  # replacements' first push included
        assert s["rollout/engines_alive"] == num_engines, s
        assert len(set(s["prompt_indices"])) == len(s["prompt_indices"]) == 8, s  # 8 groups, none twice
    assert sum(s["rollout/engine_restarts"] for s in steps) == n_faults
    tb = read_scalars(run_dir / "tb")
    assert sum(v for _, v in tb["rollout/engine_restarts"]) == n_faults
    assert proc.stderr.count("replaced in") == n_faults, fail_message(proc)
    return steps


@pytest.fixture(scope="module")
def disaggregated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults_disagg")
    faults = [{"path": "/generate", "after": 3, "action": "kill", "weight_version": "1"},
              {"path": "/generate", "after": 3, "action": "stop", "weight_version": "2"}]
    proc, run_dir = _fault_run(tmp, faults, ["rollout.colocated=false", "rollout.mode=streaming",
                                             "weight_sync.transport=distributed", "rollout.engine_hang_timeout_s=5"])
    return proc, run_dir, tmp


def test_engines_killed_and_stopped_while_generating_are_replaced(disaggregated_run):
    proc, run_dir, tmp = disaggregated_run
    steps = _check_survived(proc, run_dir, tmp, n_faults=2)
    assert [s["rollout/engine_restarts"] for s in steps] == [0, 1, 1]  # replaced at the end of steps 2 and 3
    # the failed engines' running requests went to the other engine: none lost, the batches are full
    assert steps[0]["rollout/requests_resubmitted"] == 0
    assert steps[1]["rollout/requests_resubmitted"] > 0 and steps[2]["rollout/requests_resubmitted"] > 0
    assert "failed: killed by SIGKILL" in proc.stderr
    assert "hung or stopped" in proc.stderr and "rollout.engine_hang_timeout_s=5" in proc.stderr
    # the update group spanned the dead engine: it was formed again with the replacement (1 + 2 per re-forming)
    assert proc.stderr.count("weight update group") >= 3 * 2, fail_message(proc)


@pytest.fixture(scope="module")
def colocated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults_coloc")
    faults = [{"path": "/release_memory_occupation", "after": 2, "action": "kill_after_reply"},
              {"path": "/update_weights_from_disk", "after": 1, "action": "kill", "weight_version": "1"}]
    proc, run_dir = _fault_run(tmp, faults, ["rollout.colocated=true", "weight_sync.transport=disk"])
    return proc, run_dir, tmp


def test_engines_killed_while_released_and_during_a_push_are_replaced(colocated_run):
    proc, run_dir, tmp = colocated_run
    steps = _check_survived(proc, run_dir, tmp, n_faults=2)
    # killed while released in step 1 (replaced before step 1's push), killed by step 2's push (replaced, pushed again)
    assert [s["rollout/engine_restarts"] for s in steps] == [1, 1, 0]
    assert "update_weights_from_disk" in proc.stderr  # the failed push was reported before it was repeated
    assert all(s["rollout/requests_resubmitted"] == 0 for s in steps)  # nothing was generating


def test_the_only_engine_killed_while_generating_is_replaced_and_the_step_goes_on(tmp_path):
    """With one engine nothing can take its requests: the step waits for the replacement (pushed the same weights,
    checked) and goes on with the groups it had kept."""
    faults = [{"path": "/generate", "after": 3, "action": "kill", "weight_version": "1"}]
    proc, run_dir = _fault_run(tmp_path, faults, ["rollout.colocated=false", "rollout.mode=streaming"], steps=2,
                               num_engines=1)
    steps = _check_survived(proc, run_dir, tmp_path, n_faults=1, steps=2, num_engines=1)
    assert [s["rollout/engine_restarts"] for s in steps] == [0, 1]
    assert "generation stopped (no engine in rotation" in proc.stderr and "the step goes on" in proc.stderr, \
        fail_message(proc)
