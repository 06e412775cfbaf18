"""The real ``sglang-router`` (Rust, CPU) in front of two CPU engines (issue 6).

Generation through the router must equal direct-engine generation for seeded requests, be spread
over both engines, be abortable, survive (or fail clearly on) a dead engine, and the launcher must
fail with the router's log tail.  Finally a 2-step trainer run with ``rollout.use_router=true``.
Tests that need the router skip when ``sglang_router`` is not installed.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO_ROOT, require
from helpers import read_scalars
from megatron_dapo.backend import MissingBackendError
from megatron_dapo.config import ConfigError, load_config
from megatron_dapo.engines.client import EngineClient, EngineError
from megatron_dapo.engines.launch import main as launch_main
from megatron_dapo.engines.launch_common import find_free_ports
from megatron_dapo.engines.launch_cpu import launch_cpu_engines
from megatron_dapo.engines.launch_router import (
    ROUTER_POLICIES, RouterLaunchError, RouterNotInstalledError, build_sglang_router_command, launch_sglang_router,
    router_worker_health, wait_router_routing,
)

try:
    import sglang_router  # noqa: F401  (presence check)

    HAVE_ROUTER = True
except ImportError:
    HAVE_ROUTER = False

ROUTER_HINT = "pip install sglang-router==0.3.2 (extra 'router'; `make venv` installs it)"


@pytest.fixture
def router_installed():
    """The sglang-router package: a missing one skips locally and FAILS under CI=true (conftest.require)."""
    require(HAVE_ROUTER, "the sglang_router package", ROUTER_HINT)


needs_router = pytest.mark.usefixtures("router_installed")
TINY_CFG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")


def _tiny_model(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=65536, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def _server_info(url: str) -> dict:
    with urllib.request.urlopen(url + "/get_server_info", timeout=10) as r:
        return json.loads(r.read())


def _router_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "sglang_router" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("router_model"))


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    """Two CPU engines + a round-robin router; yields ``(engines, router)``."""
    require(HAVE_ROUTER, "the sglang_router package", ROUTER_HINT)
    logs = tmp_path_factory.mktemp("router_logs")
    with launch_cpu_engines(str(model_dir), 2, seed=5, log_dir=logs, health_timeout_s=120) as engines:
        with launch_sglang_router(engines.urls, policy="round_robin", timeout=60,
                                  log_path=logs / "router.log") as router:
            yield engines, router


def _run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


# ------------------------------------------------------------------ pure: command, config, missing package
def test_router_command_uses_the_0_3_cli_flags():
    cmd = build_sglang_router_command(["http://a:1/", "http://b:2"], port=30100, host="0.0.0.0",
                                      policy="round_robin", api_key="k", request_timeout_s=90,
                                      extra_args=["--retry-max-retries", "2"], python="py")
    assert cmd[:3] == ["py", "-m", "sglang_router.launch_router"]
    i = cmd.index("--worker-urls")
    assert cmd[i + 1:i + 3] == ["http://a:1", "http://b:2"]
    for flag, value in [("--host", "0.0.0.0"), ("--port", "30100"), ("--policy", "round_robin"),
                        ("--api-key", "k"), ("--request-timeout-secs", "90")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[-2:] == ["--retry-max-retries", "2"]
    with pytest.raises(ValueError, match="policy 'fastest' unknown"):
        build_sglang_router_command(["http://a:1"], port=1, policy="fastest")
    with pytest.raises(ValueError, match=r"worker_urls\[1\]"):
        build_sglang_router_command(["http://a:1", "a:2"], port=1)
    with pytest.raises(ValueError, match="at least one worker"):
        build_sglang_router_command([], port=1)


def test_router_command_cli_for_the_sbatch_script(capsys):
    rc = launch_main(["router-command", "http://a:1,http://b:2", "--port", "30014", "--prometheus-port", "30015",
                      "--policy", "round_robin", "--api-key", ""])
    argv = capsys.readouterr().out.splitlines()
    assert rc == 0 and argv[1:3] == ["-m", "sglang_router.launch_router"] and "--api-key" not in argv
    assert argv[argv.index("--prometheus-port") + 1] == "30015" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert launch_main(["router-command", "http://a:1", "--port", "1", "--policy", "bogus"]) == 2
    assert "policy 'bogus' unknown" in capsys.readouterr().err


def test_config_router_keys_are_validated():
    cfg = load_config(TINY_CFG, ["rollout.use_router=true", "rollout.num_engines=1"])  # one engine is fine
    assert cfg.rollout.use_router and cfg.rollout.router_policy == "cache_aware"
    with pytest.raises(ConfigError, match=r"^rollout\.router_policy: .*'fastest'"):
        load_config(TINY_CFG, ["rollout.use_router=true", "rollout.router_policy=fastest"])
    with pytest.raises(ConfigError, match=r"^rollout\.router_url: needs rollout\.engine_urls"):
        load_config(TINY_CFG, ["rollout.router_url=http://r:1"])
    with pytest.raises(ConfigError, match=r"^rollout\.router_url: set either"):
        load_config(TINY_CFG, ["rollout.router_url=http://r:1", "rollout.use_router=true",
                               "rollout.engine_urls=[http://e:1]"])
    with pytest.raises(ConfigError, match=r"^rollout\.use_router: .*vllm"):
        load_config(TINY_CFG, ["rollout.use_router=true", "rollout.backend=vllm"])
    assert set(ROUTER_POLICIES) >= {"cache_aware", "round_robin"}


def test_missing_router_package_is_a_clear_missing_backend_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang_router" else real(name, *a))
    with pytest.raises(RouterNotInstalledError, match="pip install sglang-router") as info:
        launch_sglang_router(["http://127.0.0.1:1"])
    assert isinstance(info.value, MissingBackendError) and isinstance(info.value, RouterLaunchError)


# ------------------------------------------------------------------ launch failures
@needs_router
def test_bad_flag_fails_with_log_tail_and_no_orphan(tmp_path):
    with pytest.raises(RouterLaunchError) as info:
        launch_sglang_router(["http://127.0.0.1:9"], extra_args=["--no-such-flag"], timeout=30,
                             log_path=tmp_path / "router.log")
    msg = str(info.value)
    assert "exited with code" in msg and "--no-such-flag" in msg and "last lines of" in msg, msg
    assert "unrecognized arguments" in msg, msg  # argparse's complaint, from the log tail
    assert "not routing after" not in msg, msg  # the router's exit was noticed, not the 30 s start-up timeout
    assert not _router_children()


@needs_router
def test_unreachable_worker_times_out_naming_it_and_router_is_stopped(tmp_path):
    dead = f"http://127.0.0.1:{find_free_ports(1)[0]}"
    with pytest.raises(RouterLaunchError) as info:
        launch_sglang_router([dead], timeout=4, log_path=tmp_path / "router.log")
    msg = str(info.value)
    assert "not routing after 4s" in msg and dead in msg and "last lines of" in msg, msg
    assert not _router_children()


# ------------------------------------------------------------------ generation through the router
def _check_shapes(outs, n_items, max_new):
    assert len(outs) == n_items
    for o in outs:
        assert 1 <= len(o.output_ids) <= max_new
        assert len(o.output_logprobs) == len(o.output_ids)
        assert all(lp <= 0.0 for lp in o.output_logprobs)
        assert o.finish_reason in ("stop", "length")


@needs_router
def test_seeded_generation_through_router_equals_direct_engine(stack):
    engines, router = stack
    prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 3]]
    sp = {"max_new_tokens": 8, "n": 3, "temperature": 0.9, "top_p": 0.95, "sampling_seed": 77,
          "stop_token_ids": [2]}

    async def go():
        async with EngineClient(engines.urls, router_url=router.url, request_timeout_s=60) as c:
            routed = await c.generate(prompts, sp)
            scored = await c.score([[1, 5, 9, 11, 4]], 1)
        async with EngineClient(engines.urls[1:], request_timeout_s=60) as c:
            direct = await c.generate(prompts, sp)
            direct_scored = await c.score([[1, 5, 9, 11, 4]], 1)
        return routed, direct, scored, direct_scored

    routed, direct, scored, direct_scored = _run(go())
    _check_shapes(routed, len(prompts) * 3, 8)
    assert [o.output_ids for o in routed] == [o.output_ids for o in direct]
    assert [o.finish_reason for o in routed] == [o.finish_reason for o in direct]
    for a, b in zip(routed, direct):
        assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-5)
    assert scored[0] == pytest.approx(direct_scored[0], abs=1e-5) and len(scored[0]) == 4
    # prompt-major: the 3 samples of a prompt differ (seed + k), so the grouping is real
    assert len({tuple(o.output_ids) for o in routed[:3]}) > 1


@needs_router
def test_requests_are_spread_over_both_engines(stack):
    engines, router = stack
    before = [_server_info(u)["num_generated_sequences"] for u in engines.urls]

    async def go():
        async with EngineClient(engines.urls, router_url=router.url, request_timeout_s=60) as c:
            return await c.generate([[1, 4], [1, 6]], {"max_new_tokens": 4, "n": 4, "sampling_seed": 3})

    _check_shapes(_run(go()), 8, 4)
    served = [_server_info(u)["num_generated_sequences"] - b for u, b in zip(engines.urls, before)]
    assert sum(served) == 8 and min(served) >= 2, served  # round robin: 4 / 4
    health = router_worker_health(router.url)
    assert health == {u: True for u in engines.urls}
    assert wait_router_routing(router.url, engines.urls, timeout_s=5) == []
    dead = f"http://127.0.0.1:{find_free_ports(1)[0]}"
    assert wait_router_routing(router.url, engines.urls + [dead], timeout_s=0.5, poll_s=0.1) == [dead]


@needs_router
def test_abort_through_router_cancels_in_flight_requests_promptly(stack):
    engines, router = stack
    sp = {"max_new_tokens": 20000, "n": 2, "ignore_eos": True, "sampling_seed": 1}

    async def go(use_rid: bool):
        async with EngineClient(engines.urls, router_url=router.url, request_timeout_s=120) as c:
            task = asyncio.ensure_future(c.generate([[1, 5], [1, 8]], sp, rid="long"))
            deadline = time.monotonic() + 60
            while sum(_server_info(u)["inflight_requests"] for u in engines.urls) < 4:  # 2 prompts x n=2 routed
                assert not task.done() and time.monotonic() < deadline, "the long requests never reached the engines"
                await asyncio.sleep(0.05)
            if use_rid:
                sent = await c.abort(rid="long")
                assert sent == 4 * len(engines.urls)  # each routed item is aborted on every engine
            else:
                await c.abort_all()
            return await task

    for use_rid in (True, False):
        outs = _run(go(use_rid), timeout=120)  # 20,000 tokens per sample: only an abort ends them in time
        assert len(outs) == 4 and all(o.finish_reason == "abort" for o in outs), [o.finish_reason for o in outs]
        assert all(len(o.output_ids) < 20000 for o in outs)
    assert all(_server_info(u)["inflight_requests"] == 0 for u in engines.urls)


@needs_router
def test_dead_engine_behind_router_is_retried_or_fails_clearly(model_dir, tmp_path):
    """Also: engines with an API key - the router passes it on and demands it from its clients."""
    sp = {"max_new_tokens": 4, "n": 2, "sampling_seed": 9}
    with launch_cpu_engines(str(model_dir), 2, seed=5, log_dir=tmp_path, health_timeout_s=120,
                            api_key="sekret") as engines:
        with launch_sglang_router(engines.urls, policy="round_robin", timeout=60, api_key="sekret",
                                  log_path=tmp_path / "router.log") as router:
            async def go(key="sekret"):
                async with EngineClient(engines.urls, router_url=router.url, request_timeout_s=30,
                                        max_retries=2, retry_backoff_s=0.2, api_key=key) as c:
                    return await c.generate([[1, 5], [1, 9], [1, 2]], sp)

            with pytest.raises(EngineError, match="HTTP 401"):
                _run(go(key=None))
            engines.kill(1)

            outs = _run(go(), timeout=90)  # the router retries the dead worker's share on the live one
            _check_shapes(outs, 6, 4)
            engines.kill(0)  # nothing left behind the router: a clear error, never a hang (_run's timeout)
            with pytest.raises(EngineError) as info:
                _run(go(), timeout=120)
            assert router.url in str(info.value) and "/generate" in str(info.value), str(info.value)


# ------------------------------------------------------------------ the trainer with rollout.use_router=true
@needs_router
@pytest.mark.slow
def test_trainer_two_steps_through_router(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    overrides = [f"output_dir={tmp_path}", "run_name=routed", f"model.hf_path={tmp_path / 'tiny-qwen2'}",
                 "trainer.total_steps=2", "trainer.eval_interval=0", "trainer.save_interval=0",
                 "rollout.num_engines=2", "rollout.use_router=true", "rollout.router_policy=round_robin",
                 "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "rollout.max_response_length=12",
                 "algorithm.overlong_buffer_length=4", "algorithm.dynamic_sampling=false",
                 "actor.ppo_mini_batch_size=16"]
    proc = subprocess.run([sys.executable, "-m", "megatron_dapo.train", TINY_CFG] + overrides, cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    tail = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, tail
    assert "sglang-router (round_robin)" in proc.stderr + proc.stdout, tail
    rewards = [v for _, v in read_scalars(tmp_path / "routed" / "tb")["rollout/reward_mean"]]
    assert len(rewards) == 2 and all(-2.0 <= v <= 1.0 for v in rewards), rewards
    log = (tmp_path / "routed" / "engine_logs" / "sglang_router.log").read_text(errors="replace")
    assert "uri=/generate" in re.sub(r"\x1b\[[0-9;]*m", "", log)
    assert not _router_children()
