"""Resharded weight sync: Megatron actor (TP/PP/VPP/DP shards) → SGLang-API rollout engines.

Flow of one :meth:`WeightSync.sync` (collective over every trainer rank)::

    rank 0: pause generation (client.abort_all(); client.flush_cache(): each client speaks its engine's
            routes - SGLang / CPU engine POST /abort_request {"abort_all": true} + /flush_cache,
            vLLM POST /abort_requests {} + /reset_prefix_cache)
    all   : actor.iter_hf_tensors(dtype)        # TP all-gather in the owning stage, PP broadcast
    rank 0: iter_buckets(...) -> transport      # one bucket + one tensor in memory at a time
            (tensor across nodes: one sender per node, :mod:`megatron_dapo.sync.nodes`)
    rank 0: flush cache, client.get_weight_version() on every engine == weight_version
    all   : metrics / error from rank 0 (:func:`megatron_dapo.sync.collective.on_rank0`)

It only moves weights: releasing / resuming the engines' memory and offloading the actor around a sync
(colocated engines) is :class:`megatron_dapo.engines.engine_set.EngineSet`'s job. The transports (``disk``,
``distributed``, ``tensor``) are in :mod:`megatron_dapo.sync.transports`, chosen from its ``TRANSPORTS``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..engines.client import SyncEngineClient
from ..engines.protocols import PolicyActor, RolloutEngine, WeightTransport, WeightTransportName
from ..models import mapping
from .bucketing import bucket_bytes_from_mb, bucket_nbytes, iter_buckets_with_last, resolve_dtype
from .collective import collective_timeout, distributed_on, on_rank0
from .nodes import (NodePlan, assign_engines_to_nodes, local_node_id, node_leaders, parse_engine_nodes, relay_recv,
                    relay_send)
from .transports import (ENGINE_NODES_ENV, TRANSPORTS, TensorTransport, TransportOptions, WeightSyncError,
                         tp_from_engine_world_size, url_is_on_this_host)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _Stats:
    """Export / transfer timing and volume of one sync (driver rank)."""

    def __init__(self) -> None:
        self.export_s = 0.0
        self.bytes = 0
        self.num_buckets = 0
        self.num_tensors = 0

    def metrics(self, total_s: float, pause_s: float) -> dict[str, float]:
        """The ``weight_sync/*`` scalars of one sync (seconds, bytes, buckets, export / transfer / pause)."""
        return {"weight_sync/seconds": total_s, "weight_sync/bytes": float(self.bytes),
                "weight_sync/num_buckets": float(self.num_buckets), "weight_sync/export_s": self.export_s,
                "weight_sync/transfer_s": max(total_s - pause_s - self.export_s, 0.0),
                "weight_sync/pause_s": pause_s}


def _timed_buckets(buckets: Iterator, stats: _Stats) -> Iterator:
    """Pass buckets through, charging the time spent producing them to ``stats.export_s``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(buckets)
        except StopIteration:
            stats.export_s += time.perf_counter() - t0
            return
        stats.export_s += time.perf_counter() - t0
        bucket, _ = item
        stats.num_buckets += 1
        stats.num_tensors += len(bucket)
        stats.bytes += bucket_nbytes(bucket)
        yield item


def _checked_names(stream: Iterator[tuple[str, torch.Tensor]], expected: Optional[list[str]]) -> Iterator:
    """Yield the actor's ``(hf_name, tensor)`` pairs; at the end check the set against ``expected``."""
    seen: set[str] = set()
    expected_set = set(expected) if expected is not None else None
    for name, t in stream:
        if expected_set is not None and name not in expected_set:
            raise WeightSyncError(f"actor exported tensor {name!r}, which is not an HF parameter of this model")
        seen.add(name)
        yield name, t
    if expected is not None:
        missing = [n for n in expected if n not in seen]
        if missing:
            raise WeightSyncError(f"actor export misses {len(missing)} tensor(s), e.g. {missing[:5]}")


TIED_OUTPUT_NAME = "lm_head.weight"
"""HF name of the output layer; never sent when the embeddings are tied (see :meth:`WeightSync._engine_tensors`)."""


def _drain(stream: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Consume what is left of the actor's tensor stream: producing it is collective, so every rank reads it to
    the end (keeping the actor's collectives matched on the other ranks), whether or not it sends anything."""
    for _ in stream:
        pass


def tied_embeddings(actor: PolicyActor) -> bool:
    """Whether ``actor``'s model ties the output layer to the input embedding: ``actor.spec.tie_word_embeddings``,
    else (``spec`` is ``None``) ``tie_word_embeddings`` of ``actor.hf_path/config.json`` (transformers'
    default ``True`` when absent there), else ``False``."""
    if actor.spec is not None:
        return bool(actor.spec.tie_word_embeddings)
    if actor.hf_path is not None and (Path(actor.hf_path) / "config.json").is_file():
        return bool(json.loads((Path(actor.hf_path) / "config.json").read_text()).get("tie_word_embeddings", True))
    return False


def _default_client_factory(urls: list[str], api_key: Optional[str]) -> RolloutEngine:
    return SyncEngineClient(urls, api_key=api_key)


# --------------------------------------------------------------------------------------------
# the public object
# --------------------------------------------------------------------------------------------


class WeightSync:
    """Push the actor's weights to every rollout engine (see the module docstring for the protocol).

    Args:
        actor: the :class:`~megatron_dapo.engines.protocols.PolicyActor` parts used here: ``.spec`` (``None``
            skips the name check), ``.rank`` (global rank), ``.dp_rank``, ``.hf_path`` (config files for
            ``disk``; may be ``None``) and ``.iter_hf_tensors(dtype)`` (collective generator of
            ``(hf_name, tensor)``; rank 0 must receive every tensor).
        client: the blocking :class:`~megatron_dapo.engines.protocols.RolloutEngine` over ALL engines
            (:data:`megatron_dapo.engines.engine_set.BACKENDS` builds it); required on rank 0, ignored (may be
            ``None``) elsewhere.
        transport: ``disk`` | ``distributed`` | ``tensor`` (``weight_sync.transport``; the class comes
            from :data:`~megatron_dapo.sync.transports.TRANSPORTS`).
        bucket_mb: bucket capacity in MiB (fractions allowed; ``0`` = one unbounded bucket).
        dtype: engine dtype (``torch.dtype`` or ``fp32``/``bf16``/``fp16``); the trainer passes the actor's
            ``params_dtype`` (:meth:`megatron_dapo.engines.engine_set.EngineSet.launch`).
        work_dir: directory for ``disk`` checkpoints (must be on a file system the engines see).
        engine_world_size: engine ranks in the update group over ALL engines (``num_engines * tp_size``;
            the group has ``1 + engine_world_size`` ranks, engine ``e`` starts at ``1 + e * tp_size``);
            ``None`` = read ``tp_size`` from each engine's ``/get_server_info`` (1 when absent).
        timeout_s: rendezvous / collective timeout of the update group and bound on cache-flush retries.
        master_address: address engines use to reach rank 0 (``distributed``); default: detected.
        group_name: update-group name (default: unique per instance).
        api_key: engine API key for the per-node clients of the ``tensor`` transport (pass it on every
            rank); ``None`` = rank 0's ``client.api_key``, shared at the first sync.
        engine_nodes: ``tensor`` only: node id per engine URL (URL order of rank 0's client); ``None`` =
            env ``MEGATRON_DAPO_ENGINE_NODES`` (comma-separated), else each engine belongs to the node whose
            lowest rank finds its URL local. Rank 0's value is used on every rank.
        node_id: this rank's node id; ``None`` = env ``MEGATRON_DAPO_NODE_ID``, else the host name.
        client_factory: ``f(urls, api_key) -> client`` building a node sender's engine client (``tensor``
            across nodes); default :class:`~megatron_dapo.engines.client.SyncEngineClient`.

    The engine URLs need not be known off rank 0: the ``tensor`` transport shares rank 0's list (its
    client's ``control_urls``) with every rank at the first sync, which also fixes the node plan.

    Raises:
        ValueError: unknown transport / bad bucket size / dtype, or no client on rank 0.
        MissingBackendError: ``tensor`` without sglang or CUDA.
    """

    def __init__(self, actor: PolicyActor, client: Optional[RolloutEngine], *,
                 transport: WeightTransportName = "disk", bucket_mb: float = 512,
                 dtype: torch.dtype | str = "fp32", work_dir: str | Path,
                 engine_world_size: int | None = None, timeout_s: float = 600.0,
                 master_address: str | None = None, group_name: str | None = None, api_key: str | None = None,
                 engine_nodes: list[str] | tuple[str, ...] | None = None, node_id: str | None = None,
                 client_factory: Callable[[list[str], Optional[str]], RolloutEngine] | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"weight_sync.transport={transport!r}; expected one of {', '.join(TRANSPORTS)}")
        if engine_world_size is not None and int(engine_world_size) < 1:
            raise ValueError(f"engine_world_size must be >= 1, got {engine_world_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.actor = actor
        self.transport_name = transport
        self.bucket_bytes = bucket_bytes_from_mb(bucket_mb)
        self.dtype = resolve_dtype(dtype)
        self.work_dir = Path(work_dir)
        self.timeout_s = float(timeout_s)
        self.rank = int(actor.rank)
        self.is_driver = self.rank == 0
        self.client = client if self.is_driver else None
        if self.is_driver and client is None:
            raise ValueError("WeightSync on rank 0 needs the engine client (client=None given)")
        transport_cls = TRANSPORTS[transport]
        transport_cls.check_available()
        self.tied_embeddings = tied_embeddings(actor)
        self._expected: Optional[list[str]] = None
        if actor.spec is not None:
            self._expected = mapping.hf_names(actor.spec)
        self._engine_world_size = int(engine_world_size) if engine_world_size is not None else None
        self._api_key = api_key
        self._engine_nodes = list(engine_nodes) if engine_nodes is not None else None
        self.node_id = str(node_id) if node_id else None
        self._client_factory = client_factory or _default_client_factory
        self._plan: Optional[NodePlan] = None
        self._node_tx: Optional[TensorTransport] = None
        self._own_clients: list = []
        self.last_senders: list[dict[str, Any]] = []
        self._transport: Optional[WeightTransport] = None
        if self.is_driver:
            opts = TransportOptions(work_dir=self.work_dir, hf_path=actor.hf_path, bucket_bytes=self.bucket_bytes,
                                    engine_world_size=engine_world_size, timeout_s=self.timeout_s,
                                    master_address=master_address, group_name=group_name)
            self._transport = transport_cls.build(client, opts)
        self._closed = False

    def _engine_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The actor's ``(hf_name, tensor)`` stream as engines load it: with tied embeddings
        (``tie_word_embeddings``) ``lm_head.weight`` is left out - SGLang's model has no such
        parameter then and its loader fails on it; the engine's output layer IS ``embed_tokens``."""
        for name, t in self.actor.iter_hf_tensors(self.dtype):
            if self.tied_embeddings and name == TIED_OUTPUT_NAME:
                continue
            yield name, t

    # ---- engine control (driver) -----------------------------------------------------------
    def _flush_cache(self) -> None:
        """``client.flush_cache()`` on every engine (SGLang ``/flush_cache``, vLLM ``/reset_prefix_cache``),
        retried while requests are still draining (both answer an error until their running batch is empty)."""
        deadline = time.monotonic() + min(self.timeout_s, 60.0)
        while True:
            try:
                self.client.flush_cache()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise WeightSyncError(f"flush_cache kept failing: {exc}") from exc
                time.sleep(0.2)

    def _pause_everywhere(self, pause: bool, weight_version: str) -> None:
        """With ``pause``: rank 0 pauses the engines (:meth:`_pause`); a failure is the same
        :class:`WeightSyncError` on every rank, raised before the export starts (collective)."""
        if pause:
            on_rank0(self._pause, is_rank0=self.is_driver, error=WeightSyncError,
                     what=f"weight sync to version {weight_version!r} ({self.transport_name}): pausing the engines")

    def _pause(self) -> None:
        try:
            self.client.abort_all()
        except Exception as exc:
            raise WeightSyncError(f"aborting in-flight generation failed: {exc}") from exc
        self._flush_cache()

    def check_versions(self, weight_version: str) -> None:
        """Raise :class:`WeightSyncError` naming every engine whose reported weight version differs."""
        try:
            versions = self.client.get_weight_version()
        except Exception as exc:
            raise WeightSyncError(f"reading the engines' weight versions failed: {exc}") from exc
        bad = {u: v for u, v in versions.items() if v != weight_version}
        if bad:
            detail = ", ".join(f"{u} reports {v!r}" for u, v in bad.items())
            raise WeightSyncError(f"after syncing weight_version {weight_version!r}: {detail}")

    def reset_transport(self) -> None:
        """An engine was replaced (same URL, fresh process): the transport rebuilds what spans the engines at the
        next sync (:meth:`~megatron_dapo.engines.protocols.WeightTransport.reset`; rank 0, a no-op elsewhere)."""
        if self._transport is not None:
            self._transport.reset()

    # ---- the sync --------------------------------------------------------------------------
    def sync(self, weight_version: str, *, pause: bool = True) -> dict[str, float]:
        """Move the actor's current weights into every engine (collective over all trainer ranks).

        With ``pause`` (engines that may be generating) first stops generation (abort in-flight requests +
        flush the cache); ``pause=False`` is for engines that were released and just resumed their weights
        (nothing runs on them). Then exports and buckets the weights, sends them with the configured
        transport, flushes the cache (with ``pause``) and checks that every engine reports ``weight_version``.

        Returns:
            On every rank (rank 0's measurements): ``weight_sync/seconds`` (wall, whole call),
            ``weight_sync/bytes`` (payload bytes per engine), ``weight_sync/num_buckets``,
            ``weight_sync/export_s`` (gather + cast + bucketing on rank 0) and
            ``weight_sync/transfer_s`` (sending + engine load + version check) and
            ``weight_sync/pause_s`` (abort + flush before the export).

        Raises:
            WeightSyncError: on every rank, when any step failed on rank 0 (message names the engine).
        """
        return self._sync(weight_version, pause=pause)

    def _sync(self, weight_version: str, *, pause: bool) -> dict[str, float]:
        if self._closed:
            raise WeightSyncError("WeightSync.sync called after close()")
        weight_version = str(weight_version)
        if not weight_version:
            raise ValueError("weight_version must be a non-empty string")
        plan = None
        if self.transport_name == "tensor":
            try:  # collective once; any error is computed from gathered data, so every rank raises it
                plan = self._node_plan()
            except WeightSyncError as exc:
                raise WeightSyncError(f"weight sync to version {weight_version!r} (tensor) failed: {exc}") from exc
            if not plan.single:
                return self._sync_nodes(weight_version, pause=pause, plan=plan)
        t0 = time.perf_counter()
        stats = _Stats()
        self._pause_everywhere(pause, weight_version)
        pause_s = time.perf_counter() - t0
        stream = self._engine_tensors()
        err: Optional[BaseException] = None
        if self.is_driver:
            buckets = _timed_buckets(iter_buckets_with_last(_checked_names(stream, self._expected),
                                                            self.bucket_bytes, dtype=self.dtype), stats)
            try:
                self._transport.send(buckets, weight_version)
            except Exception as exc:
                err = exc
            finally:
                _drain(stream)
        else:
            _drain(stream)
        if self.is_driver and err is None:
            try:
                if pause:
                    self._flush_cache()
                self.check_versions(weight_version)
            except Exception as exc:
                err = exc
        total = time.perf_counter() - t0

        def outcome() -> dict[str, float]:
            if err is not None:
                logger.error("weight sync %s failed: %s", weight_version, err)
                raise WeightSyncError(f"weight sync to version {weight_version!r} ({self.transport_name}) failed: "
                                      f"{type(err).__name__}: {err}") from err
            return stats.metrics(total, pause_s)

        metrics = on_rank0(outcome, is_rank0=self.is_driver)
        if plan is not None:
            self.last_senders = [{"rank": 0, "node": plan.rank_nodes[0], "engines": list(plan.urls), "relay": False,
                                  "bytes": int(metrics["weight_sync/bytes"]),
                                  "num_buckets": int(metrics["weight_sync/num_buckets"])}]
        return dict(metrics)

    # ---- tensor transport across nodes -----------------------------------------------------
    def _has_full_stream(self) -> bool:
        """Whether ``actor.iter_hf_tensors`` yields every tensor on this rank (data-parallel rank 0)."""
        return int(self.actor.dp_rank) == 0

    def _node_plan(self) -> NodePlan:
        """Build (once, collectively) who feeds which engine; see :class:`NodePlan`.

        Raises:
            WeightSyncError: on every rank alike: no engine URL, a bad ``MEGATRON_DAPO_ENGINE_NODES``, or
                an engine claimed by no node / several nodes (:func:`assign_engines_to_nodes`).
        """
        if self._plan is not None:
            return self._plan
        on = distributed_on()
        mine = (self.node_id or local_node_id(), self._has_full_stream())
        if on:
            infos: list = [None] * dist.get_world_size()
            dist.all_gather_object(infos, mine)
        else:
            infos = [mine]
        rank_nodes = [str(i[0]) for i in infos]
        full_stream = [bool(i[1]) for i in infos]
        def driver_view() -> tuple[list[str], Optional[str], Optional[str]]:
            urls = [u.rstrip("/") for u in self.client.control_urls]
            key = self._api_key if self._api_key is not None else self.client.api_key
            raw = ",".join(self._engine_nodes) if self._engine_nodes is not None else os.environ.get(ENGINE_NODES_ENV)
            return urls, key, raw

        urls, key0, raw = on_rank0(driver_view, is_rank0=self.is_driver)
        if not urls:
            raise WeightSyncError("rank 0's engine client lists no engine URL")
        if self._api_key is None:
            self._api_key = key0
        engine_nodes = parse_engine_nodes(raw, len(urls))
        claims = None
        if engine_nodes is None:
            leaders = node_leaders(rank_nodes)
            local = [u for u in urls if url_is_on_this_host(u)] if self.rank in leaders.values() else None
            if on:
                gathered: list = [None] * len(rank_nodes)
                dist.all_gather_object(gathered, local)
            else:
                gathered = [local]
            claims = {rank_nodes[r]: c for r, c in enumerate(gathered) if c is not None}
        engine_node = assign_engines_to_nodes(urls, sorted(set(rank_nodes)), engine_nodes=engine_nodes, claims=claims)
        plan = NodePlan(urls, rank_nodes, full_stream, engine_node)
        if plan.receivers and int(getattr(self.actor, "ep", 1)) > 1:
            # relay receivers block on rank 0's relay group, but with expert parallelism the data-parallel
            # ranks > 0 take part in the actor's expert broadcasts (actor.hf_weights.iter_full_params): a cycle
            raise WeightSyncError("weight_sync.transport=tensor with engines on several nodes relays buckets to "
                                  "ranks that also serve expert-parallel broadcasts; with "
                                  "actor.expert_model_parallel_size > 1 use weight_sync.transport=distributed or disk")
        if plan.receivers:
            # dist.new_group is collective over the default group: every rank calls it here, in step
            plan.group = dist.new_group([0] + plan.receivers, timeout=collective_timeout())
        if self.is_driver:
            logger.info("tensor weight sync plan: %s", plan.describe())
        self._plan = plan
        return plan

    def _node_transport(self, plan: NodePlan) -> TensorTransport:
        """This sender's :class:`TensorTransport` over its node's engines (built once)."""
        if self._node_tx is None:
            urls = plan.senders[self.rank]
            tp = None
            if self._engine_world_size is not None:  # counts ALL engines' ranks, not just this node's
                tp = tp_from_engine_world_size(self._engine_world_size, len(plan.urls))
            client = self._client_factory(list(urls), self._api_key)
            self._own_clients.append(client)
            self._node_tx = TensorTransport(client, tp_per_engine=tp, node=plan.rank_nodes[self.rank])
        return self._node_tx

    def _node_buckets(self, plan: NodePlan, stream: Iterator, stats: _Stats) -> Iterator:
        """This rank's ``(bucket, is_last)`` stream in a multi-node ``tensor`` sync.

        Rank 0 buckets its actor stream and relays every bucket over ``plan.group`` right after producing
        it (an abort notice if the export fails or yields nothing, so receivers never wait forever);
        relay receivers read the group until ``is_last``; other data-parallel-rank-0 senders bucket their
        own stream (same deterministic bucketing); everyone else yields nothing.
        """
        if self.is_driver:
            buckets = _timed_buckets(iter_buckets_with_last(_checked_names(stream, self._expected),
                                                            self.bucket_bytes, dtype=self.dtype), stats)
            if plan.group is None:
                yield from buckets
                return
            done = broken = False
            reason = "the actor exported no tensors"
            try:
                for bucket, last in buckets:
                    broken = True  # a failed broadcast leaves the group unusable: send no abort notice then
                    relay_send(plan.group, bucket, last)
                    broken = False
                    done = last
                    yield bucket, last
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if not done and not broken:
                    relay_send(plan.group, None, True, abort=f"rank 0 stopped the export: {reason}")
        elif self.rank in plan.receivers:
            # This rank's actor stream is empty (dp_rank != 0: iter_full_params returns before any
            # collective), so blocking here on the relay group cannot hold up the actor's TP/PP collectives;
            # rank 0 only waits for us inside a relay broadcast, and we wait only for rank 0: no cycle.
            while True:
                bucket, last, _abort = relay_recv(plan.group)
                if bucket is None:
                    return
                yield bucket, last
                if last:
                    return
        elif self.rank in plan.senders:
            yield from iter_buckets_with_last(_checked_names(stream, self._expected), self.bucket_bytes,
                                              dtype=self.dtype)

    def _sync_nodes(self, weight_version: str, *, pause: bool, plan: NodePlan) -> dict[str, float]:
        """``tensor`` sync with engines on several nodes: every node's sender feeds its own engines."""
        t0 = time.perf_counter()
        stats = _Stats()
        self._pause_everywhere(pause, weight_version)
        pause_s = time.perf_counter() - t0
        err: Optional[BaseException] = None
        stream = self._engine_tensors()
        node = plan.rank_nodes[self.rank]
        sender = self.rank in plan.senders
        posted_bytes = posted_buckets = 0
        transport = None
        if sender:
            try:
                transport = self._node_transport(plan)
            except Exception as exc:
                err = exc
        if self.is_driver or sender:
            try:
                for bucket, last in self._node_buckets(plan, stream, stats):
                    if transport is not None and err is None:
                        try:
                            transport.post(bucket, last, weight_version)
                            posted_bytes += bucket_nbytes(bucket)
                            posted_buckets += 1
                        except Exception as exc:  # keep consuming: rank 0 must finish the relay
                            err = exc
                    del bucket
            except Exception as exc:
                err = err or exc
            finally:
                _drain(stream)
        else:
            _drain(stream)
        if self.is_driver and err is None and stats.num_buckets == 0:
            err = WeightSyncError("the actor exported no tensors")
        mine = {"rank": self.rank, "node": node, "sender": sender, "engines": plan.senders.get(self.rank, []),
                "relay": self.rank in plan.receivers, "bytes": posted_bytes, "num_buckets": posted_buckets,
                "error": None if err is None else f"{type(err).__name__}: {err}"}
        infos: list = [None] * dist.get_world_size()
        dist.all_gather_object(infos, mine)
        by_msg: dict[str, list[str]] = {}
        for info in infos:
            if info["error"] is not None:
                by_msg.setdefault(info["error"], []).append(f"node {info['node']!r} rank {info['rank']}")
        errors = [f"[{', '.join(where)}] {msg}" for msg, where in by_msg.items()]
        self.last_senders = [{k: v for k, v in i.items() if k not in ("sender", "error")} for i in infos
                             if i["sender"]]

        def outcome() -> dict[str, float]:
            if not errors:
                try:  # every node has answered its last bucket: the versions must be in place everywhere
                    if pause:
                        self._flush_cache()
                    self.check_versions(weight_version)
                except Exception as exc:
                    errors.append(f"[rank 0] {type(exc).__name__}: {exc}")
            if errors:
                logger.error("weight sync %s failed: %s", weight_version, "; ".join(errors))
                raise WeightSyncError(f"weight sync to version {weight_version!r} (tensor, "
                                      f"{len(plan.senders)} nodes) failed: {'; '.join(errors)}")
            metrics = stats.metrics(time.perf_counter() - t0, pause_s)
            metrics["weight_sync/num_sender_nodes"] = float(len(plan.senders))
            for info in infos:
                if info["sender"]:
                    metrics[f"weight_sync/node_bytes/{info['node']}"] = float(info["bytes"])
            return metrics

        return dict(on_rank0(outcome, is_rank0=self.is_driver))

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the update group on the engines and here, remove temporary files (idempotent; local)."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        for client in self._own_clients:
            try:
                client.close()
            except Exception as exc:  # an engine client that cannot close cleanly must not mask others
                logger.warning("closing a node sender's engine client: %s", exc)
        self._own_clients.clear()
        self._node_tx = None

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
