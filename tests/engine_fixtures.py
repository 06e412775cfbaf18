"""Session-scoped rollout-engine servers for the one protocol suite (pytest plugin, see tests/conftest.py).

Every engine kind in :data:`ENGINE_KINDS` is started ONCE per pytest session, from the same tiny fp32
model (:func:`protocol_model`), and shared by every test that asks for the ``engine`` fixture (which is
parametrised over :func:`enabled_kinds`).  A kind declares what it can do in ``capabilities``
(:data:`CAPABILITIES`); a test that needs a capability branches on the declaration and checks the other
side too (an engine without ``honours_seed`` must really give different samples), so the table cannot
drift from the engines.

Kinds: ``cpu`` (the project's CPU engine), ``sglang`` (real SGLang 0.5.x from ``.venv-sglang``, ~2 min
start-up on CPU) and ``vllm`` (real vLLM; written against ``launch_vllm_servers`` /
``VLLMClient`` of :mod:`megatron_dapo.engines.launch_vllm` / :mod:`megatron_dapo.engines.vllm_client` and
in :data:`DEFAULT_KINDS`).  ``MEGATRON_DAPO_TEST_ENGINES`` (comma-separated) selects kinds; default
:data:`DEFAULT_KINDS`.  Under ``CI=true`` an engine that cannot start (missing venv) FAILS its tests with
what to run; elsewhere they are skipped with the same message.
"""
from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import in_ci, unavailable  # noqa: F401  (re-exported: test files import it from here)

CAPABILITIES = {
    "honours_seed": "same sampling_seed -> same sample",
    "memory_release": "release_memory_occupation really releases (generation refused until resumed)",
    "disk_update": "update_weights_from_disk (SGLang /update_weights_from_disk, vLLM /collective_rpc reload_weights)",
    "distributed_update": "/init_weights_update_group + /update_weights_from_distributed over gloo",
    "tensor_update": "/update_weights_from_tensor with CPU shared-memory handles",
    "flattened_bucket": "/update_weights_from_tensor with load_format='flattened_bucket'",
    "weight_update_bracket": "tensor/distributed updates only between begin/end_weight_update",
    "abort": "abort(rid) returns the in-flight request with finish_reason abort (SGLang /abort_request, "
             "vLLM /abort_requests)",
    "moe": "serves Qwen3-MoE on CPU with log-probs within 1e-4 of transformers', at start and after a push of the "
           "per-expert HF tensors over every weight transport of its backend (measured per kind by "
           "benchmarks/probe_moe_engines.py; our CPU engine also in tests/test_moe_sync.py)",
}
"""Every capability name an engine kind may declare (and what it means)."""

DEFAULT_KINDS = ("cpu", "sglang", "vllm")
"""Kinds run when ``MEGATRON_DAPO_TEST_ENGINES`` is unset."""

MODEL_KW = dict(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                max_position_embeddings=2048, initializer_range=0.3, seed=0)
"""The protocol model: tiny random Qwen2, fp32, tied embeddings, head size 32 (what vLLM's CPU attention
accepts), demo tokenizer (~150 tokens); ``initializer_range`` large enough that logprobs are far from uniform."""


def inflight_cpu(url: str) -> int:
    """Requests in flight on a CPU engine (``/get_server_info`` ``inflight_requests``)."""
    return int(_get_json(url + "/get_server_info").get("inflight_requests", 0))


def inflight_sglang(url: str) -> int:
    """Running + waiting requests on an SGLang server (``GET /v1/loads``, SGLang 0.5.x)."""
    loads = _get_json(url + "/v1/loads").get("loads", [])
    return sum(int(x.get("num_running_reqs", 0)) + int(x.get("num_waiting_reqs", 0)) for x in loads)


def inflight_vllm(url: str) -> int:
    """Running + waiting requests on a vLLM server (Prometheus ``/metrics``)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _start_cpu(model_dir: Path, log_dir: Path):
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    return launch_cpu_engines(str(model_dir), 1, seed=123, log_dir=log_dir, health_timeout_s=180)


def _start_sglang(model_dir: Path, log_dir: Path):
    from megatron_dapo.engines.launch_sglang import launch_sglang_servers

    return launch_sglang_servers(str(model_dir), num_engines=1, base_port=None, device="cpu", dtype="float32",
                                 log_dir=log_dir, health_timeout_s=600)


def _start_vllm(model_dir: Path, log_dir: Path):
    from megatron_dapo.engines.launch_vllm import launch_vllm_servers  # the vLLM helper's launcher

    return launch_vllm_servers(str(model_dir), num_engines=1, log_dir=log_dir)


def _sglang_client(urls, **kw):
    from megatron_dapo.engines.client import EngineClient

    return EngineClient(urls, **kw)


def _vllm_client(urls, **kw):
    """vLLM's client; no ``model``: the servers of ``launch_vllm_servers`` serve one model (``policy``)."""
    from megatron_dapo.engines.vllm_client import VLLMClient

    return VLLMClient(urls, **kw)


@dataclass(frozen=True)
class EngineKind:
    """One engine implementation under test.

    Attributes:
        name: kind id (``cpu``, ``sglang``, ``vllm``).
        start: ``(model_dir, log_dir) -> EngineProcesses`` (waits for health).
        make_client: ``(urls, **kw) -> async client`` speaking the project's engine-client interface.
        inflight: ``url -> number of requests the engine is working on`` (event-driven abort tests).
        capabilities: subset of :data:`CAPABILITIES` keys.
        needs: how to make it startable (in the failure / skip message).
    """

    name: str
    start: Callable
    make_client: Callable
    inflight: Callable[[str], int]
    capabilities: frozenset = field(default_factory=frozenset)
    needs: str = ""


ENGINE_KINDS: dict[str, EngineKind] = {
    "cpu": EngineKind("cpu", _start_cpu, _sglang_client, inflight_cpu, frozenset(
        {"honours_seed", "memory_release", "disk_update", "distributed_update", "tensor_update", "flattened_bucket",
         "abort", "moe"})),
    # SGLang 0.5.23 serves Qwen3-MoE with every layer MoE (it ignores mlp_only_layers: benchmarks/RESULTS.md)
    "sglang": EngineKind("sglang", _start_sglang, _sglang_client, inflight_sglang, frozenset(
        {"disk_update", "distributed_update", "tensor_update", "flattened_bucket", "weight_update_bracket",
         "abort", "moe"}), needs="`make engines` (builds .venv-sglang)"),
    # vLLM 0.32 on CPU: no memory_release (/sleep is a no-op there), no SGLang tensor / distributed routes
    # (its native weight transfer is CUDA-only); VLLMClient.capabilities names the same set (tests/test_real_vllm.py).
    # No moe: it serves Qwen3-MoE, but after /collective_rpc reload_weights (even of the unchanged checkpoint) its
    # log-probs are off by ~0.4 (benchmarks/RESULTS.md, "MoE on real engines (CPU)")
    "vllm": EngineKind("vllm", _start_vllm, _vllm_client, inflight_vllm, frozenset(
        {"honours_seed", "disk_update", "abort"}), needs="`make engines` (builds .venv-vllm)"),
}
"""The registry: one line per engine kind."""


def enabled_kinds() -> list[str]:
    """Kinds selected by ``MEGATRON_DAPO_TEST_ENGINES`` (default :data:`DEFAULT_KINDS`), in registry order.

    Raises:
        pytest.UsageError: an unknown kind, or under ``CI=true`` a selection that leaves out a kind of
            :data:`DEFAULT_KINDS` (CI runs every engine: a narrowed run would pass without the real engines).
    """
    raw = os.environ.get("MEGATRON_DAPO_TEST_ENGINES")
    want = [k.strip() for k in raw.split(",") if k.strip()] if raw else list(DEFAULT_KINDS)
    unknown = [k for k in want if k not in ENGINE_KINDS]
    if unknown:
        raise pytest.UsageError(f"MEGATRON_DAPO_TEST_ENGINES names unknown engine kind(s) {unknown}; "
                                f"known: {sorted(ENGINE_KINDS)}")
    missing = [k for k in DEFAULT_KINDS if k not in want]
    if missing and in_ci():
        raise pytest.UsageError(f"CI=true runs every engine kind, but MEGATRON_DAPO_TEST_ENGINES={raw!r} leaves out "
                                f"{missing}: unset it (or run without CI=true)")
    return [k for k in ENGINE_KINDS if k in want]


@dataclass
class RunningEngine:
    """A started engine of one kind, shared by the whole session."""

    kind: EngineKind
    url: str
    procs: Any
    model_dir: Path

    def diagnosis(self, lines: int = 40) -> str:
        """Whether the engine process is still running and the last ``lines`` of its log (for a failing test's
        message: a run that lost its engine says whether the engine exited and why)."""
        e = self.procs.engines[0]
        rc = e.proc.poll()
        try:
            tail = "\n".join(Path(e.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            tail = f"(log unreadable: {exc})"
        state = "running" if rc is None else f"exited with {rc}"
        return f"--- {self.kind.name} engine {self.url}: {state}; {e.log_path} (last {lines} lines) ---\n{tail}"

    def has(self, capability: str) -> bool:
        """Whether the kind declares ``capability`` (a key of :data:`CAPABILITIES`)."""
        assert capability in CAPABILITIES, capability
        return capability in self.kind.capabilities

    def client(self, **kw):
        """A fresh async client for this engine (use as ``async with``)."""
        return self.kind.make_client([self.url], **kw)

    def sync_client(self, **kw):
        """The blocking client the trainer builds for this kind (:data:`megatron_dapo.engines.engine_set.BACKENDS`)."""
        from megatron_dapo.engines.engine_set import BACKENDS

        kw = {"router_url": None, "api_key": None, "request_timeout_s": 3600.0, "max_retries": 3, **kw}
        return BACKENDS[self.kind.name].client([self.url], **kw)

    def run(self, fn, **kw):
        """``asyncio.run(fn(client))`` with a fresh client."""
        async def go():
            async with self.client(**kw) as c:
                return await fn(c)
        return asyncio.run(go())

    def inflight(self) -> int:
        return self.kind.inflight(self.url)

    def restore_protocol_weights(self, scratch: Path) -> None:
        """Load the protocol model's weights back into the server (after a test that changed them), from a
        copy under ``scratch``: a client may add files to the directory it loads (vLLM's
        ``lm_head.safetensors``) and the protocol model is shared by every engine kind."""
        import shutil

        src = shutil.copytree(self.model_dir, Path(scratch) / "restore")
        self.run(lambda c: c.update_weights_from_disk(str(src), weight_version="restored"))


def make_protocol_model(out_dir: Path) -> Path:
    """Write the protocol model (:data:`MODEL_KW`) to ``out_dir``."""
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(out_dir, **MODEL_KW)


@pytest.fixture(scope="session")
def protocol_model(tmp_path_factory) -> Path:
    """Directory of the tiny fp32 protocol model shared by every engine."""
    return make_protocol_model(tmp_path_factory.mktemp("protocol_model"))


@pytest.fixture(scope="session")
def protocol_hf(protocol_model):
    """The protocol model loaded with transformers (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(protocol_model), dtype=torch.float32).eval()


_STARTED: dict[str, RunningEngine | str] = {}


@pytest.fixture(scope="session")
def engine_pool(protocol_model, tmp_path_factory):
    """Starts engines lazily (first test of each kind) and stops them all at session end."""
    def get(kind: str) -> RunningEngine:
        if kind not in _STARTED:
            k = ENGINE_KINDS[kind]
            try:
                procs = k.start(protocol_model, tmp_path_factory.mktemp(f"engine_logs_{kind}"))
                _STARTED[kind] = RunningEngine(k, procs.urls[0], procs, protocol_model)
            except Exception as exc:  # missing venv / failed start-up: remembered, reported once per test
                from megatron_dapo.backend import MissingBackendError

                hint = f" - run {k.needs}" if k.needs and isinstance(exc, (MissingBackendError, ImportError)) else ""
                _STARTED[kind] = f"engine kind {kind!r} cannot start: {type(exc).__name__}: {exc}{hint}"
        got = _STARTED[kind]
        if isinstance(got, str):
            unavailable(got)
        if any(e.proc.poll() is not None for e in got.procs.engines):  # killed by a kills_engine test
            got.procs.stop()
            del _STARTED[kind]
            return get(kind)
        return got

    yield get
    for got in _STARTED.values():
        if isinstance(got, RunningEngine):
            got.procs.stop()
    _STARTED.clear()


def pytest_configure(config):
    config.addinivalue_line("markers", "kills_engine: kills a session engine; runs after every other test")


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``kills_engine`` run last, so the session's engines serve everything else first."""
    items.sort(key=lambda item: item.get_closest_marker("kills_engine") is not None)


def pytest_generate_tests(metafunc):
    """Parametrise every test using ``engine`` over the enabled kinds (ids = kind names). A module whose test on
    our CPU engine is covered by fuller tests elsewhere names them in ``CPU_ENGINE_COVERED_BY`` (``path::test``
    strings, each asserted to exist) and runs on the real kinds only."""
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get("engine") or []
    if "engine" in metafunc.fixturenames and defs and defs[-1].func.__module__ == __name__:
        kinds = enabled_kinds()
        covered = getattr(metafunc.module, "CPU_ENGINE_COVERED_BY", ())
        for test in covered:
            path, _, name = test.partition("::")
            target = Path(__file__).resolve().parent.parent / path
            if not target.is_file() or f"def {name}(" not in target.read_text():
                raise pytest.UsageError(f"{metafunc.module.__name__}.CPU_ENGINE_COVERED_BY names {test}, which "
                                        f"does not exist")
        if covered:
            kinds = [k for k in kinds if k != "cpu"]
        metafunc.parametrize("engine", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def engine(request, engine_pool) -> RunningEngine:
    """The running engine of the parametrised kind."""
    return engine_pool(request.param)


@pytest.fixture
def restore_protocol_weights(engine, tmp_path):
    """For tests whose training runs push weights into the shared server: the protocol model's weights go
    back afterwards (:meth:`RunningEngine.restore_protocol_weights`)."""
    yield
    engine.restore_protocol_weights(tmp_path)


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout_s`` (a generous upper bound)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
