"""EngineClient against two CPU engines: API key, balancing, fail-over, launch failures."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from megatron_dapo.engines.client import EngineClient, EngineError, SyncEngineClient
from megatron_dapo.engines.launch_common import EngineLaunchError, EngineProcesses
from megatron_dapo.engines.launch_cpu import launch_cpu_engines

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_tiny_qwen2  # noqa: E402

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2_c")
    make_tiny_qwen2(d, seed=1, scale=4.0)
    procs = launch_cpu_engines(str(d), 2, api_key=KEY, seed=0, log_dir=tmp_path_factory.mktemp("logs"),
                               health_timeout_s=120)
    with procs:
        yield procs


def _status(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_api_key_required(engines):
    url = engines.urls[0]
    assert _status(url + "/get_model_info") == 401
    assert _status(url + "/get_model_info", {"Authorization": "Bearer wrong"}) == 401
    assert _status(url + "/get_model_info", {"Authorization": f"Bearer {KEY}"}) == 200
    assert _status(url + "/health") == 200  # health probes are exempt, as in SGLang

    async def go():
        async with EngineClient(engines.urls, max_retries=0) as c:
            await c.generate([[1, 2]], {"max_new_tokens": 2})

    with pytest.raises(EngineError, match="401"):
        asyncio.run(go())


def test_balancing_and_sync_wrapper(engines):
    with SyncEngineClient(engines.urls, api_key=KEY) as c:
        outs = c.generate([[1, 2, 3]] * 8, {"max_new_tokens": 20, "ignore_eos": True, "n": 2})
        versions = c.get_weight_version()
    assert len(outs) == 16 and all(len(o.output_ids) == 20 for o in outs)
    assert {o.engine_url for o in outs} == set(engines.urls)  # both engines got work
    assert set(versions) == set(engines.urls)


def test_killed_engine_mid_rollout_is_retried_then_clear_error(engines):
    async def go():
        async with EngineClient(engines.urls, api_key=KEY, max_retries=3, retry_backoff_s=0.05) as c:
            task = asyncio.ensure_future(c.generate([[1, 5, 6]] * 6, {"max_new_tokens": 600, "ignore_eos": True}))
            # event-driven: kill engine 0 once it reports requests in flight (generous upper bound)
            deadline = time.monotonic() + 120
            while (await c.get_server_info([engines.urls[0]]))[engines.urls[0]].get("inflight_requests", 0) < 1:
                assert time.monotonic() < deadline and not task.done(), "engine 0 never reported work in flight"
                await asyncio.sleep(0.05)
            assert c.outstanding[engines.urls[0]] > 0
            engines.kill(0)
            outs = await asyncio.wait_for(task, timeout=120)
            return outs

    outs = asyncio.run(go())
    assert len(outs) == 6 and all(o.finish_reason == "length" and len(o.output_ids) == 600 for o in outs)
    assert {o.engine_url for o in outs} == {engines.urls[1]}

    engines.kill(1)

    async def dead():
        async with EngineClient(engines.urls, api_key=KEY, max_retries=2, retry_backoff_s=0.05) as c:
            t0 = time.monotonic()
            with pytest.raises(EngineError) as ei:
                await c.generate([[1, 2]], {"max_new_tokens": 2})
            assert time.monotonic() - t0 < 10
            return str(ei.value), await c.health()

    msg, health = asyncio.run(dead())
    assert "3 attempt" in msg and engines.urls[0] in msg and engines.urls[1] in msg and "last error" in msg
    assert health == {u: False for u in engines.urls}


def test_engine_exiting_at_startup_reports_log_tail(tmp_path):
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    with pytest.raises(EngineLaunchError) as ei:
        launch_cpu_engines(str(not_a_model), 1, log_dir=tmp_path / "logs", health_timeout_s=60)
    msg = str(ei.value)
    assert "exited with code" in msg and "last lines" in msg and "config" in msg.lower()


def test_engine_never_healthy_times_out_with_log_tail_and_is_killed(tmp_path):
    group = EngineProcesses()
    ep = group.start([sys.executable, "-u", "-c", "import time; print('still booting...', flush=True); "
                      "time.sleep(120)"], "http://127.0.0.1:9", tmp_path / "hang.log")
    with pytest.raises(EngineLaunchError, match="(?s)not healthy after.*still booting"):
        group.wait_healthy(timeout_s=2.0, poll_s=0.1)
    assert ep.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(ep.proc.pid, 0)
    group.stop()  # idempotent


def test_context_manager_stops_children_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with EngineProcesses() as group:
            ep = group.start([sys.executable, "-c", "import time; time.sleep(120)"], "http://127.0.0.1:9",
                             tmp_path / "s.log")
            raise RuntimeError("boom")
    assert ep.proc.poll() == -signal.SIGTERM
