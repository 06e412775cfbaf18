"""The rollout engines' lifecycle, owned in one place: launch, state, weight version, two transitions.

:class:`EngineSet` is what the trainer holds instead of engine flags. It launches the engines of
``rollout.backend`` (and ``sglang-router`` in front of them, ``rollout.use_router``) through
:func:`launch_engines`, which the standalone ``megatron-dapo eval`` command uses too, and offers two
idempotent, collective transitions (every trainer rank calls them at the same point)::

    to_generation(version)   colocated:  [release first if generating an older version]
                                         engines resume weights -> push weights (WeightSync, no pause)
                                         -> offload the actor -> engines resume KV cache
                             otherwise:  a paused push (abort + flush + push + version check)
                             a no-op when the engines already generate ``version``
    to_training()            colocated:  engines release memory -> onload the actor
                             otherwise:  nothing

The engines start serving the HF checkpoint the actor is built from: weight version ``"0"`` (the
trainer's step counter). Engine calls happen on rank 0; every rank gets the same result or the same
error (:func:`megatron_dapo.sync.collective.on_rank0`). Colocated engines share the GPUs with the actor:
they sleep (release weights + KV cache) while the actor trains, and the actor is offloaded while they
generate; on CPU the same contract holds with no memory moved.

Backends are chosen once from :data:`BACKENDS` (keyed by ``rollout.backend``): how to launch them, the
blocking client over them, and the weight transports they understand.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from ..batch import build_actor_batch
from ..config import DAPOConfig, RolloutConfig
from ..sync import WeightSync
from ..sync.collective import on_rank0
from ..sync.transports import WeightSyncError
from .client import SyncEngineClient
from .launch_common import EngineProcesses, default_engine_python
from .launch_cpu import launch_cpu_engines
from .launch_router import launch_sglang_router
from .launch_sglang import launch_sglang_servers
from .health import EngineHealthMonitor
from .launch_vllm import launch_vllm_servers
from .protocols import PolicyActor, RolloutBackendName, RolloutEngine, WeightTransportName
from .transport import EngineError, EngineLostError
from .vllm_client import SyncVLLMClient

log = logging.getLogger("megatron_dapo")

INITIAL_WEIGHT_VERSION = "0"
"""The version of the weights the engines are launched with (the actor's starting checkpoint, step 0)."""

ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""``weight_sync.dtype`` / ``actor.params_dtype`` -> the engine's ``--dtype``."""


# ---------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class LaunchRequest:
    """What one launch needs besides ``rollout.*``.

    Attributes:
        model_path: HF model directory the engines load.
        log_dir: directory of the engine logs.
        seed: sampling seed base (CPU engine, vLLM).
        colocated: engines share GPUs with a trainer (memory saver / sleep mode on).
        dtype: engine dtype (``float32`` / ``bfloat16``); ``None`` = the launcher's default.
    """

    model_path: str
    log_dir: Path
    seed: int
    colocated: bool
    dtype: Optional[str] = None


def _launch_cpu(r: RolloutConfig, req: LaunchRequest) -> EngineProcesses:
    return launch_cpu_engines(req.model_path, r.num_engines, host=r.host, base_port=r.base_port or None,
                              api_key=r.api_key, seed=req.seed, log_dir=req.log_dir,
                              health_timeout_s=r.health_timeout_s)


def _launch_sglang(r: RolloutConfig, req: LaunchRequest) -> EngineProcesses:
    # on CPU: the .venv-sglang server with the CPU flags, in the dtype the weights are synced in
    return launch_sglang_servers(req.model_path, num_engines=r.num_engines, tp_size=r.engine_tp_size,
                                 mem_fraction_static=r.mem_fraction_static, colocated=req.colocated, host=r.host,
                                 base_port=r.base_port or None, api_key=r.api_key, log_dir=req.log_dir,
                                 health_timeout_s=r.health_timeout_s, engine_python=r.engine_python,
                                 dtype=req.dtype or "auto")


def _launch_vllm(r: RolloutConfig, req: LaunchRequest) -> EngineProcesses:
    # its own venv on CPU (rollout.engine_python), the served copy untied if tied
    return launch_vllm_servers(req.model_path, num_engines=r.num_engines, tp_size=r.engine_tp_size, host=r.host,
                               base_port=r.base_port or None, api_key=r.api_key, seed=req.seed,
                               colocated=req.colocated, python=default_engine_python("vllm", r.engine_python),
                               log_dir=req.log_dir, health_timeout_s=r.health_timeout_s)


def _sglang_api_client(urls: list[str], *, router_url: Optional[str], api_key: Optional[str],
                       request_timeout_s: float, max_retries: int) -> RolloutEngine:
    return SyncEngineClient(urls, router_url=router_url, api_key=api_key, request_timeout_s=request_timeout_s,
                            max_retries=max_retries)


def _vllm_client(urls: list[str], *, router_url: Optional[str], api_key: Optional[str],
                 request_timeout_s: float, max_retries: int) -> RolloutEngine:
    if router_url is not None:
        raise ValueError("vLLM engines take no router_url (rollout.use_router / rollout.router_url are for "
                         "SGLang-API engines)")
    return SyncVLLMClient(urls, api_key=api_key, request_timeout_s=request_timeout_s, max_retries=max_retries)


def _no_preflight(_engine_python: Optional[str]) -> None:
    """The CPU engine runs in this interpreter: nothing to check."""


def _sglang_preflight(engine_python: Optional[str]) -> None:
    """:func:`~megatron_dapo.engines.launch_common.default_engine_python` finds an SGLang interpreter (or raises)."""
    default_engine_python("sglang", engine_python)


def _vllm_preflight(engine_python: Optional[str]) -> None:
    """:func:`~megatron_dapo.engines.launch_common.default_engine_python` finds a vLLM interpreter (or raises)."""
    default_engine_python("vllm", engine_python)


@dataclass(frozen=True)
class Backend:
    """One ``rollout.backend``.

    Attributes:
        launch: ``(rollout config, request) -> EngineProcesses`` (waits for health).
        client: ``(urls, *, router_url, api_key, request_timeout_s, max_retries) -> RolloutEngine`` (blocking).
        preflight: ``(rollout.engine_python) -> None``; raises
            :class:`~megatron_dapo.backend.MissingBackendError` when the engine cannot start here.
        weight_transports: the ``weight_sync.transport`` values the engines understand; the first is used
            when the configured one is not among them.
        liveness_path: a route the server's HTTP process answers without the model (the health monitor's probe:
            :mod:`megatron_dapo.engines.health`).
    """

    launch: Callable[[RolloutConfig, LaunchRequest], EngineProcesses]
    client: Callable[..., RolloutEngine]
    preflight: Callable[[Optional[str]], None]
    weight_transports: tuple[WeightTransportName, ...]
    liveness_path: str = "/health"


BACKENDS: dict[RolloutBackendName, Backend] = {
    "cpu": Backend(_launch_cpu, _sglang_api_client, _no_preflight, ("disk", "distributed", "tensor")),
    # SGLang's /health generates a token through the scheduler: /model_info is answered by the HTTP process
    "sglang": Backend(_launch_sglang, _sglang_api_client, _sglang_preflight, ("disk", "distributed", "tensor"),
                      liveness_path="/model_info"),
    # vLLM speaks disk reload only (distributed / tensor are SGLang's protocol)
    "vllm": Backend(_launch_vllm, _vllm_client, _vllm_preflight, ("disk",)),
}
"""``rollout.backend`` -> :class:`Backend`."""


def engine_transport(r: RolloutConfig, transport: WeightTransportName, *, warn: bool = True) -> WeightTransportName:
    """The transport the weight sync uses with ``rollout.backend``: ``transport`` when the engines speak it,
    else the backend's first (a warning when ``warn``)."""
    supported = BACKENDS[r.backend].weight_transports
    if transport in supported:
        return transport
    if warn:
        log.warning("rollout.backend=%s: weights sync by %s (weight_sync.transport=%s is not understood by "
                    "these engines)", r.backend, supported[0], transport)
    return supported[0]


@dataclass(frozen=True)
class Endpoints:
    """Where the engines answer: ``urls`` (one per engine, control calls) and ``router_url`` (generation
    through ``sglang-router``; ``None`` = balanced by the client)."""

    urls: list[str]
    router_url: Optional[str]
    processes: Optional[EngineProcesses] = None
    """The engines this call started (``None``: ``rollout.engine_urls`` named running ones)."""


def launch_engines(r: RolloutConfig, req: LaunchRequest, stack: ExitStack, *,
                   use_router: Optional[bool] = None) -> Endpoints:
    """Start the engines of ``rollout.backend`` unless ``rollout.engine_urls`` names running ones, and
    ``sglang-router`` in front of them when ``use_router`` (default ``rollout.use_router``).

    The processes stop when ``stack`` closes.

    Returns:
        :class:`Endpoints` (``router_url``: the started router, else ``rollout.router_url``).

    Raises:
        MissingBackendError: the backend's interpreter / package is missing (``make engines``).
        EngineLaunchError: an engine or the router did not become healthy (its log is named).
    """
    urls = list(r.engine_urls)
    procs = None
    if not urls:
        procs = BACKENDS[r.backend].launch(r, req)
        stack.enter_context(procs)
        urls = procs.urls
        log.info("rollout engines: %s (logs in %s)", ", ".join(urls), req.log_dir)
    router_url = r.router_url
    if r.use_router if use_router is None else use_router:  # generation through the router; control per engine
        router_log = req.log_dir / "sglang_router.log"
        router = launch_sglang_router(urls, host=r.host, policy=r.router_policy, api_key=r.api_key,
                                      timeout=r.health_timeout_s, log_path=router_log,
                                      request_timeout_s=r.request_timeout_s)
        stack.enter_context(router)
        router_url = router.url
        log.info("sglang-router (%s) at %s in front of %d engine(s) (log %s)", r.router_policy, router_url,
                 len(urls), router_log)
    return Endpoints(urls, router_url, procs)


def engine_client(r: RolloutConfig, endpoints: Endpoints, stack: ExitStack) -> RolloutEngine:
    """The blocking client of ``rollout.backend`` over ``endpoints`` (closed when ``stack`` closes)."""
    client = BACKENDS[r.backend].client(endpoints.urls, router_url=endpoints.router_url, api_key=r.api_key,
                                        request_timeout_s=r.request_timeout_s, max_retries=r.max_retries)
    stack.callback(client.close)
    return client


# ---------------------------------------------------------------------------------------------- logprob check


def fixed_sequence_logprobs(actor: PolicyActor, temperature: float) -> tuple[list[int], int, torch.Tensor]:
    """A fixed pseudo-random 24-token sequence (8 prompt + 16 response tokens) and the actor's float32 logprobs
    of its 16 response tokens at ``temperature`` (collective over the model-parallel group:
    :meth:`PolicyActor.compute_logprobs` with ``local=True`` on every data-parallel rank).

    Returns:
        ``(sequence, prompt_len, logprobs [16])``.
    """
    g = torch.Generator().manual_seed(12345)
    seq = torch.randint(0, actor.spec.vocab_size, (24,), generator=g).tolist()
    prompt, resp = seq[:8], seq[8:]
    # every DP rank scores the one sequence itself (local): one row cannot be split over DP ranks
    lp, _ = actor.compute_logprobs(build_actor_batch([prompt], [resp]), temperature=temperature, local=True)
    return seq, len(prompt), lp[0, len(prompt): len(seq)]


@dataclass(frozen=True)
class LogprobCheck:
    """``weight_sync.check_logprobs``: after each push every engine scores :func:`fixed_sequence_logprobs`'s
    sequence; the largest absolute difference to the actor must stay ``<= tolerance`` (fp32: 1e-4).

    Attributes:
        temperature: ``rollout.temperature`` (logprobs of the tempered distribution, as in training).
        one_engine_client: ``url -> RolloutEngine`` over that engine alone (closed after use).
        tolerance: largest allowed absolute difference (nats).
    """

    temperature: float
    one_engine_client: Callable[[str], RolloutEngine]
    tolerance: float = 1e-4


# ---------------------------------------------------------------------------------------------- the engine set


EngineState = Literal["generating", "released"]


class EngineSet:
    """The rollout engines, their state and weight version, and the two transitions (module docstring).

    Args:
        actor: the policy (every rank).
        client: blocking client over all engines (rank 0; ``None`` elsewhere).
        weight_sync: moves the actor's weights into the engines (every rank).
        colocated: ``rollout.colocated``.
        offload_actor: ``actor.offload`` (colocated only: offload the actor while the engines generate).
        logprob_check: :class:`LogprobCheck` after every push, or ``None``.
        is_rank0: whether this process talks to the engines (global rank 0).
        health: rank 0's :class:`~megatron_dapo.engines.health.EngineHealthMonitor` (``None``: failures are not
            watched, nothing is replaced).
        max_engine_restarts: ``rollout.max_engine_restarts`` (replacements per engine per run).
        relaunch_timeout_s: seconds a replacement has to become healthy (``rollout.health_timeout_s``).
        one_engine_client: ``url -> RolloutEngine`` over that engine alone (closed after use): releases a
            colocated replacement while the others are released.
    """

    def __init__(self, actor: PolicyActor, client: Optional[RolloutEngine], weight_sync: WeightSync, *,
                 colocated: bool, offload_actor: bool = True, logprob_check: Optional[LogprobCheck] = None,
                 is_rank0: bool = True, health: Optional[EngineHealthMonitor] = None,
                 max_engine_restarts: int = 3, relaunch_timeout_s: float = 300.0,
                 one_engine_client: Optional[Callable[[str], RolloutEngine]] = None) -> None:
        if is_rank0 and client is None:
            raise ValueError("EngineSet on rank 0 needs the engine client (client=None given)")
        self.actor = actor
        self.client = client
        self.weight_sync = weight_sync
        self.colocated = bool(colocated)
        self.offload_actor = bool(offload_actor)
        self.logprob_check = logprob_check
        self.is_rank0 = bool(is_rank0)
        self.state: EngineState = "generating"
        self.weight_version: str = INITIAL_WEIGHT_VERSION
        self.health = health
        self.max_engine_restarts = int(max_engine_restarts)
        self.relaunch_timeout_s = float(relaunch_timeout_s)
        self.one_engine_client = one_engine_client
        self.restarts: dict[str, int] = {}
        """Replacements so far, per engine URL (rank 0)."""
        self._warming: list[str] = []  # replacements waiting for their first push (rank 0)
        self._reported = {"restarts": 0, "resubmitted": 0}  # what health_metrics() reported so far

    @classmethod
    def launch(cls, cfg: DAPOConfig, actor: PolicyActor, hf_path: Path, stack: ExitStack) -> "EngineSet":
        """Start the engines of ``cfg.rollout`` (rank 0; :func:`launch_engines`), build the client and the
        weight sync (every rank), and register their shutdown on ``stack``.

        Raises:
            MissingBackendError / EngineLaunchError: the engines could not start (raised on every rank).
            ValueError / MissingBackendError: a bad weight-sync setting (every rank).
        """
        r = cfg.rollout
        is_rank0 = actor.rank == 0
        params_dtype = cfg.weight_sync.dtype or cfg.actor.params_dtype
        started: dict[str, object] = {}

        def start() -> None:  # rank 0; a launch failure reaches every rank as the same typed error
            req = LaunchRequest(str(hf_path), cfg.run_dir / "engine_logs", cfg.seed, r.colocated,
                                ENGINE_DTYPES[params_dtype])
            endpoints = launch_engines(r, req, stack)
            client = started["client"] = engine_client(r, endpoints, stack)
            # closed before the engines stop (the stack unwinds in reverse), so a shutdown is no failure
            health = EngineHealthMonitor(list(client.engine_urls), client.mark_down, processes=endpoints.processes,
                                         hang_timeout_s=r.engine_hang_timeout_s, api_key=r.api_key,
                                         probe_path=BACKENDS[r.backend].liveness_path)
            started["health"] = health.start()
            stack.callback(health.close)

        on_rank0(start, is_rank0=is_rank0)
        client = started.get("client")
        transport = engine_transport(r, cfg.weight_sync.transport, warn=is_rank0)
        weight_sync = WeightSync(actor, client, transport=transport, bucket_mb=cfg.weight_sync.bucket_mb,
                                 dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[params_dtype],
                                 work_dir=cfg.run_dir / "weight_sync", engine_world_size=r.num_engines * r.engine_tp_size,
                                 # tensor transport: every node's sender builds its own engine client
                                 # (URLs come from rank 0's client at the first sync; the key from here)
                                 api_key=r.api_key)
        stack.callback(weight_sync.close)
        backend = BACKENDS[r.backend]

        def one_engine_client(url: str) -> RolloutEngine:
            return backend.client([url], router_url=None, api_key=r.api_key, request_timeout_s=r.request_timeout_s,
                                  max_retries=r.max_retries)

        check = LogprobCheck(r.temperature, one_engine_client) if cfg.weight_sync.check_logprobs else None
        return cls(actor, client, weight_sync, colocated=r.colocated, offload_actor=cfg.actor.offload,
                   logprob_check=check, is_rank0=is_rank0, health=started.get("health"),
                   max_engine_restarts=r.max_engine_restarts, relaunch_timeout_s=r.health_timeout_s,
                   one_engine_client=one_engine_client)

    # ---- engine calls (rank 0; every rank gets the outcome) --------------------------------
    def _engines(self, what: str, call: Callable[[RolloutEngine], object]) -> float:
        """``call(client)`` on rank 0, its failure an :class:`EngineError` on every rank; returns seconds."""
        def run() -> None:
            call(self.client)  # the engines' JSON answers are not needed

        t = time.perf_counter()
        on_rank0(run, is_rank0=self.is_rank0, what=what, error=EngineError)
        return time.perf_counter() - t

    # ---- transitions -----------------------------------------------------------------------
    def to_training(self) -> dict[str, float]:
        """Give the GPUs to the actor (collective; idempotent).

        Colocated and generating: engines ``release_memory_occupation()`` (weights + KV cache), then
        ``actor.onload()`` (with ``offload_actor``). Otherwise nothing.

        Returns:
            ``colocate/engine_release_s``, ``colocate/actor_onload_s`` (seconds) when something was done, else ``{}``.

        Raises:
            EngineError: the engines refused (e.g. requests still in flight), on every rank.
        """
        if not self.colocated or self.state == "released":
            return {}
        out = {"colocate/engine_release_s": self._engines("release_memory_occupation()",
                                                          lambda c: c.release_memory_occupation())}
        self.state = "released"
        t = time.perf_counter()
        if self.offload_actor:
            self.actor.onload()
        out["colocate/actor_onload_s"] = time.perf_counter() - t
        return out

    def to_generation(self, weight_version: str, *, force: bool = False) -> dict[str, float]:
        """Make the engines generate with the actor's current weights as ``weight_version`` (collective;
        a no-op when they already do, unless ``force`` or a failed engine was replaced first:
        :meth:`replace_failed_engines`).

        Colocated: (release first when they generate another version) engines
        ``resume_memory_occupation(["weights"])`` -> push (no pause: nothing runs) -> ``actor.offload()``
        (with ``offload_actor``; after the export, which reads the parameters) ->
        ``resume_memory_occupation(["kv_cache"])`` (the large allocation comes back once the actor's memory
        is gone). Not colocated: a paused push (:meth:`WeightSync.sync`).

        Returns:
            :meth:`WeightSync.sync`'s ``weight_sync/*`` metrics, ``timing/weight_sync_s``; colocated also the
            ``colocate/*`` phase seconds and the actor's ``offload_metrics``; with the logprob check
            ``weight_sync/engine_actor_logprob_max_abs_diff``. ``{}`` for a no-op.

        Raises:
            EngineError: an engine memory call failed; WeightSyncError: the push failed or the engines'
            logprobs differ from the actor's by more than the check's tolerance (every rank alike).
        """
        weight_version = str(weight_version)
        replaced = self.replace_failed_engines()
        if not (replaced or force) and self.state == "generating" and self.weight_version == weight_version:
            return {}
        while True:
            try:
                m = self._to_generation(weight_version)
                break
            except (WeightSyncError, EngineError):
                # an engine that died during the push is replaced and the push repeated; any other failure stays
                if not self.replace_failed_engines(after_error=True):
                    raise
        self._put_back_warming()
        return m

    def _to_generation(self, weight_version: str) -> dict[str, float]:
        reference = None
        if self.logprob_check is not None:  # before a colocated offload
            reference = fixed_sequence_logprobs(self.actor, self.logprob_check.temperature)
        t0 = time.perf_counter()
        if self.colocated:
            m = self.to_training()
            m["colocate/engine_resume_weights_s"] = self._engines(
                "resume_memory_occupation(['weights'])", lambda c: c.resume_memory_occupation(["weights"]))
            t = time.perf_counter()
            m.update(self.weight_sync.sync(weight_version, pause=False))
            m["colocate/sync_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if self.offload_actor:
                self.actor.offload()
            m["colocate/actor_offload_s"] = time.perf_counter() - t
            m["colocate/engine_resume_kv_cache_s"] = self._engines(
                "resume_memory_occupation(['kv_cache'])", lambda c: c.resume_memory_occupation(["kv_cache"]))
            # bytes/seconds of this offload and of the onload that started the step (memory/actor_*, timing/actor_*)
            m.update(self.actor.offload_metrics)
        else:
            m = self.weight_sync.sync(weight_version)
        self.state = "generating"
        self.weight_version = weight_version
        m["timing/weight_sync_s"] = time.perf_counter() - t0
        if reference is not None:
            m.update(self.check_engine_logprobs(reference))
        return m

    def check_engine_logprobs(self, reference: tuple[list[int], int, torch.Tensor]) -> dict[str, float]:
        """Score :func:`fixed_sequence_logprobs`'s sequence on every engine alone; it must match the actor's
        logprobs ``reference`` within ``logprob_check.tolerance`` (collective).

        Returns:
            ``{"weight_sync/engine_actor_logprob_max_abs_diff": largest |engine - actor| (nats)}``.

        Raises:
            WeightSyncError: on every rank, naming the difference, when it exceeds the tolerance.
        """
        if self.logprob_check is None:
            raise ValueError("check_engine_logprobs needs a LogprobCheck (weight_sync.check_logprobs=true)")
        seq, prompt_len, actor_lp = reference
        check = self.logprob_check

        def largest_diff() -> float:
            diff = 0.0
            for url in self.client.control_urls:
                one = check.one_engine_client(url)
                try:
                    eng = one.score([seq], start_lens=prompt_len, temperature=check.temperature)[0]
                finally:
                    one.close()
                diff = max(diff, float((torch.tensor(eng, dtype=torch.float32) - actor_lp).abs().max()))
            if diff > check.tolerance:
                raise WeightSyncError(f"after weight sync the engines' logprobs differ from the actor's by "
                                      f"{diff:.3g} (> {check.tolerance}); the weight transport or the parameter "
                                      f"mapping is wrong")
            return diff

        return {"weight_sync/engine_actor_logprob_max_abs_diff": on_rank0(largest_diff, is_rank0=self.is_rank0)}

    # ---- failed engines (rank 0 decides; every rank gets the outcome) ---------------------
    def replace_failed_engines(self, *, after_error: bool = False) -> int:
        """Replace every engine the health monitor found failed (collective; the trainer calls it through
        :meth:`to_generation`, at a step boundary where nothing generates).

        Each is relaunched by the launcher that started it (same command, URL and log file:
        :meth:`~megatron_dapo.engines.launch_common.EngineProcesses.relaunch`), released again when the set is
        released (colocated), and warms up: it takes the next push and the logprob check but no generation
        until both passed. A ``distributed`` weight-update group is re-formed at the next push (the old one spans
        the dead engine's ranks).

        Args:
            after_error: a push or engine call just failed: check every engine now (process and ``/health``)
                instead of relying on the monitor's last round.

        Returns:
            How many engines were replaced (every rank).

        Raises:
            EngineError: on every rank, naming the engine, its log file and the log's last lines, when an engine
                failed more than ``rollout.max_engine_restarts`` times or its replacement did not become healthy;
                EngineLostError (exit code 4): the engine was not started by this run (``rollout.engine_urls``).
        """
        def run() -> int:
            if self.health is None:
                return 0
            failed = self.health.check_now(probe=True) if after_error else self.health.failed()
            for url, cause in failed.items():
                self._replace(url, cause)
            return len(failed)

        n = on_rank0(run, is_rank0=self.is_rank0)
        if n:
            self.weight_sync.reset_transport()
        return n

    def recover(self) -> bool:
        """After an engine failure stopped generation (e.g. ``no engine in rotation``): replace the failed engines
        and push them the actor's weights as :attr:`weight_version`, so that generation can go on (collective).
        Only valid while the actor still holds the weights the engines generate with (synchronous generation, not
        a batch generating in the background). Returns whether anything was replaced (``False``: the failure was
        not an engine's death).

        Raises:
            EngineError: as :meth:`replace_failed_engines` (past ``rollout.max_engine_restarts`` ...).
        """
        if not self.replace_failed_engines(after_error=True):
            return False
        self.to_generation(self.weight_version, force=True)
        return True

    def _replace(self, url: str, cause: str) -> None:
        ep = self.health.process_of(url)
        done = self.restarts.get(url, 0)
        log_path = ep.log_path if ep is not None else None
        if ep is None:
            raise EngineLostError(f"rollout engine {url} failed ({cause}); it was not started by this run "
                                  f"(rollout.engine_urls), so it cannot be replaced here: restart the job (the Slurm "
                                  f"scripts requeue it; exit code 4)", urls=[url])
        if done >= self.max_engine_restarts:
            raise EngineError(f"rollout engine {url} failed ({cause}) after {done} replacement(s) "
                              f"(rollout.max_engine_restarts={self.max_engine_restarts}); its log {log_path} ends: "
                              f"{' | '.join(_log_tail(log_path, 5))}", urls=[url])
        self.health.pause(url)
        t = time.perf_counter()
        try:
            self.health.processes.relaunch(self.health.processes.engines.index(ep), self.relaunch_timeout_s)
        except Exception as exc:
            raise EngineError(f"replacing rollout engine {url} (failed: {cause}) did not work: {exc}",
                              urls=[url]) from exc
        self.restarts[url] = done + 1
        self.health.forget(url)
        self.client.mark_warming(url)
        self._warming.append(url)
        if self.colocated and self.state == "released":  # like the others: released until the next push
            if self.one_engine_client is None:
                raise EngineError(f"replacement of {url} cannot be released like the other engines: the engine set "
                                  f"has no one_engine_client", urls=[url])
            one = self.one_engine_client(url)
            try:
                one.release_memory_occupation()
            finally:
                one.close()
        log.warning("rollout engine %s replaced in %.1f s (it had failed: %s; replacement %d of at most %d; log %s)",
                    url, time.perf_counter() - t, cause, done + 1, self.max_engine_restarts, log_path)

    def _put_back_warming(self) -> None:
        """After a push (and the logprob check) the replacements take generation requests again (rank 0)."""
        if self.is_rank0:
            for url in self._warming:
                self.client.mark_up(url)
            self._warming.clear()

    def health_metrics(self) -> dict[str, float]:
        """The step's engine health (collective): ``rollout/engine_restarts`` (engines replaced since the last
        call), ``rollout/engines_alive`` (engines in rotation now) and ``rollout/requests_resubmitted``
        (generation requests resent to another engine since the last call). ``{}`` without a health monitor."""
        def run() -> dict[str, float]:
            if self.health is None:
                return {}
            restarts = sum(self.restarts.values())
            resubmitted = int(getattr(self.client, "requests_resubmitted", 0))
            out = {"rollout/engine_restarts": float(restarts - self._reported["restarts"]),
                   "rollout/engines_alive": float(len(self.health.urls) - len(self.client.down_urls)),
                   "rollout/requests_resubmitted": float(resubmitted - self._reported["resubmitted"])}
            self._reported = {"restarts": restarts, "resubmitted": resubmitted}
            return out

        return on_rank0(run, is_rank0=self.is_rank0)


def _log_tail(path: Optional[Path], n: int) -> list[str]:
    """The last ``n`` non-empty lines of ``path`` (``["(no log)"]`` when unreadable)."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return ["(no log)"]
    return lines[-n:]
