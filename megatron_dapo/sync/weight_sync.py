"""Resharded weight sync: Megatron actor (TP/PP/VPP/DP shards) → SGLang-API rollout engines.

Flow of one :meth:`WeightSync.sync` (collective over every trainer rank)::

    rank 0: pause generation (POST /abort_request {"abort_all": true}; POST /flush_cache)
    all   : actor.iter_hf_tensors(dtype)        # TP all-gather in the owning stage, PP broadcast
    rank 0: iter_buckets(...) -> transport      # one bucket + one tensor in memory at a time
    rank 0: flush cache, GET /get_weight_version on every engine == weight_version
    all   : metrics / error broadcast from rank 0

Transports (SGLang native HTTP API, ``python/sglang/srt/entrypoints/http_server.py`` and
``managers/io_struct.py``):

* ``disk`` — rank 0 streams buckets into safetensors shards of a temporary directory under
  ``work_dir`` (plus ``model.safetensors.index.json`` and the HF config files), renames it atomically
  to ``work_dir/weights-<version>`` and calls ``/update_weights_from_disk`` (``model_path``,
  ``weight_version``). ``work_dir`` must be visible to every engine (shared file system).
* ``distributed`` — once, rank 0 creates a weight-update group with ``/init_weights_update_group``
  (engine ``e`` gets ``rank_offset = 1 + e * tp_size``; gloo on CPU, NCCL on GPU); then per
  bucket ``/update_weights_from_distributed`` (names / dtypes / shapes) while rank 0 broadcasts each
  tensor in the same order.
* ``tensor`` — colocated GPU engines only: ``/update_weights_from_tensor`` with SGLang's serialised
  CUDA-IPC handles (``MultiprocessingSerializer``); needs ``sglang`` and CUDA.

The ``weight_version`` is sent with the last bucket only, so an engine reports the new version only
once it holds the complete new weights.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from .bucketing import bucket_bytes_from_mb, bucket_nbytes, iter_buckets_with_last, resolve_dtype

logger = logging.getLogger(__name__)

TRANSPORTS = ("disk", "distributed", "tensor")
_CONFIG_FILES = ("config.json", "generation_config.json")
_DIR_PREFIX = "weights-"
_TMP_PREFIX = ".tmp-weights-"


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the engine(s) / tensor(s) involved."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _share_from_rank0(obj: Any) -> Any:
    """Broadcast a picklable object from global rank 0 to every rank (identity without torch.distributed)."""
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _safe_version(weight_version: str) -> str:
    """File-system-safe form of a weight version (directory names)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", weight_version).strip("._") or "v"
    return safe[:80]


def _is_loopback(host: Optional[str]) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_towards(urls: list[str]) -> str:
    """The local IP address engines at ``urls`` can reach this process on (for the update group).

    ``127.0.0.1`` when every engine is local; otherwise the source address the kernel would use to
    reach the first remote engine (a UDP ``connect`` sends no packet).

    Raises:
        WeightSyncError: no route to the engine host.
    """
    remote = [urlparse(u) for u in urls if not _is_loopback(urlparse(u).hostname)]
    if not remote:
        return "127.0.0.1"
    target = remote[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target.hostname, target.port or 80))
            return s.getsockname()[0]
    except OSError as exc:
        raise WeightSyncError(f"cannot find a local address that reaches engine {target.geturl()}: {exc}") from exc


def ranks_per_engine(client, engine_world_size: Optional[int]) -> int:
    """Ranks of ONE engine in the update group (SGLang ``tp_size``).

    ``engine_world_size`` is the total over all engines (``num_engines * tp_size``; the update group has
    ``1 + engine_world_size`` ranks). ``None``: read ``tp_size`` from each engine's ``/get_server_info``
    (1 when an engine does not report it, like the CPU engine).

    Raises:
        ValueError: ``engine_world_size`` not a positive multiple of the number of engines.
        WeightSyncError: engines report different ``tp_size`` values.
    """
    urls = list(client.control_urls)
    if engine_world_size is not None:
        ews = int(engine_world_size)
        if ews < len(urls) or ews % len(urls):
            raise ValueError(f"engine_world_size={ews} must be a positive multiple of the number of engines "
                             f"({len(urls)}): it counts all engine ranks (num_engines x tp_size)")
        return ews // len(urls)
    sizes = set()
    for url in urls:
        try:
            info = client.get_server_info(urls=[url])[url]
        except Exception:
            info = None
        tp = info.get("tp_size", 1) if isinstance(info, dict) else 1
        sizes.add(int(tp or 1))
    if len(sizes) != 1:
        raise WeightSyncError(f"engines report different tp_size values {sorted(sizes)}; pass engine_world_size")
    return sizes.pop()


class _Stats:
    """Export / transfer timing and volume of one sync (driver rank)."""

    def __init__(self) -> None:
        self.export_s = 0.0
        self.bytes = 0
        self.num_buckets = 0
        self.num_tensors = 0


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


# --------------------------------------------------------------------------------------------
# transports (run on the driver rank only)
# --------------------------------------------------------------------------------------------


class DiskTransport:
    """safetensors shards in an atomically renamed directory + ``/update_weights_from_disk``."""

    name = "disk"

    def __init__(self, client, work_dir: Path, hf_path: Optional[Path] = None, shard_bytes: int = 0) -> None:
        self.client = client
        self.shard_bytes = int(shard_bytes)
        self.work_dir = Path(work_dir)
        self.hf_path = Path(hf_path) if hf_path is not None else None
        self.current: Optional[Path] = None
        self._tmp_dirs: set[Path] = set()

    def write(self, buckets: Iterator, weight_version: str) -> Path:
        """Write the buckets as safetensors shards (one per bucket) + index + config files into a temporary
        directory; return the final directory (atomic rename)."""
        from ..models.export import copy_side_files, write_safetensors_shards

        self.work_dir.mkdir(parents=True, exist_ok=True)
        safe = _safe_version(weight_version)
        tmp = self.work_dir / f"{_TMP_PREFIX}{safe}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self._tmp_dirs.add(tmp)
        try:
            named = ((n, t) for bucket, _ in buckets for n, t in bucket)
            try:  # buckets are already sized: the writer's shard limit regroups them identically
                write_safetensors_shards(named, tmp, max_shard_bytes=self.shard_bytes,
                                         index_metadata={"weight_version": weight_version})
            except ValueError as e:
                if str(e) != "no tensors to write":  # bucketing errors (duplicate name, bad dtype) pass through
                    raise
                raise WeightSyncError("the actor exported no tensors") from None
            if self.hf_path is not None:
                copy_side_files(self.hf_path, tmp, _CONFIG_FILES)
            final = self.work_dir / f"{_DIR_PREFIX}{safe}"
            if final.exists():
                stale = self.work_dir / f"{_TMP_PREFIX}stale-{uuid.uuid4().hex[:8]}"
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
            self._tmp_dirs.discard(tmp)
            return final
        finally:
            if tmp in self._tmp_dirs:
                shutil.rmtree(tmp, ignore_errors=True)
                self._tmp_dirs.discard(tmp)

    def send(self, buckets: Iterator, weight_version: str) -> None:
        final = self.write(buckets, weight_version)
        try:
            self.client.update_weights_from_disk(str(final), weight_version)
        except Exception as exc:
            raise WeightSyncError(f"/update_weights_from_disk({final}) failed: {exc}") from exc
        previous, self.current = self.current, final
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)

    def close(self) -> None:
        for d in list(self._tmp_dirs) + ([self.current] if self.current is not None else []):
            shutil.rmtree(d, ignore_errors=True)
        self._tmp_dirs.clear()
        self.current = None


class DistributedTransport:
    """Weight-update group (``/init_weights_update_group``) + per-bucket ``/update_weights_from_distributed``
    with a broadcast of each tensor from rank 0."""

    name = "distributed"

    def __init__(self, client, *, engine_world_size: Optional[int], timeout_s: float,
                 master_address: Optional[str] = None, group_name: Optional[str] = None) -> None:
        self.client = client
        self.engine_world_size = engine_world_size
        self.timeout_s = float(timeout_s)
        self.master_address = master_address
        self.group_name = group_name or f"megatron_dapo_sync_{uuid.uuid4().hex[:8]}"
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.group = None

    def _resolve_engine_tp(self) -> int:
        return ranks_per_engine(self.client, self.engine_world_size)

    def connect(self) -> None:
        """Create the group once (rank 0 = this process; engine ranks offset per engine)."""
        from ..rollout.launch import find_free_ports

        ews = self._resolve_engine_tp()
        addr = self.master_address or address_towards(list(self.client.control_urls))
        port = find_free_ports(1, "0.0.0.0")[0]
        try:
            self.group = self.client.connect_weight_update_group(
                addr, port, group_name=self.group_name, backend=self.backend, tp_size=ews,
                timeout_s=self.timeout_s)
        except Exception as exc:
            raise WeightSyncError(f"creating weight update group {self.group_name!r} on {addr}:{port} "
                                  f"with engines {list(self.client.control_urls)} failed: {exc}") from exc
        logger.info("weight update group %s ready (%s, %d engine rank(s) per engine)", self.group_name,
                    self.backend, ews)

    def send(self, buckets: Iterator, weight_version: str) -> None:
        if self.group is None:
            self.connect()
        dev = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        for bucket, last in buckets:
            tensors = [(n, t if t.device == dev else t.to(dev)) for n, t in bucket]
            try:
                self.client.push_weights_distributed(self.group, tensors, group_name=self.group_name,
                                                     weight_version=weight_version if last else None)
            except Exception as exc:
                # a half-finished broadcast leaves the communicator in an unknown state: rebuild next time
                self._teardown()
                raise WeightSyncError(f"/update_weights_from_distributed failed: {exc}") from exc

    def _teardown(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        try:
            self.client.destroy_weights_update_group(self.group_name)
        except Exception as exc:  # an engine that is gone has no group to destroy
            logger.warning("destroy_weights_update_group %s: %s", self.group_name, exc)
        group.destroy()

    def close(self) -> None:
        self._teardown()


class TensorTransport:
    """``/update_weights_from_tensor`` with tensor handles (colocated engines on this node).

    On GPU each bucket's tensors are moved to this rank's device and pass as CUDA-IPC handles; on CPU they
    are copied into one shared-memory segment per dtype (:func:`~megatron_dapo.rollout.tensor_ipc.share_bucket`)
    and pass as segment names. Either way the engine maps the memory and copies it into its weights; the
    bucket is kept alive until the engine has answered.
    """

    name = "tensor"

    def __init__(self, client, *, engine_world_size: Optional[int]) -> None:
        self.client = client
        self.engine_world_size = engine_world_size
        self.tp_per_engine: Optional[int] = None

    def send(self, buckets: Iterator, weight_version: str) -> None:
        from ..rollout.client import serialize_named_tensors_for_sglang
        from ..rollout.tensor_ipc import share_bucket

        if self.tp_per_engine is None:
            remote = [u for u in getattr(self.client, "control_urls", []) if not url_is_on_this_host(u)]
            if remote:
                raise WeightSyncError(
                    f"weight_sync.transport=tensor passes memory handles, which only engines on this node (rank "
                    f"0's) can open; {len(remote)} engine(s) are elsewhere, e.g. {remote[0]}. Use "
                    f"weight_sync.transport=distributed for engines on several nodes")
            self.tp_per_engine = ranks_per_engine(self.client, self.engine_world_size)
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        for bucket, last in buckets:
            if dev is not None:
                tensors = [(n, t if t.device == dev else t.to(dev)) for n, t in bucket]
                torch.cuda.synchronize()
            else:
                tensors = share_bucket(bucket)
            payload = serialize_named_tensors_for_sglang(tensors, tp_size=self.tp_per_engine)
            try:
                self.client.update_weights_from_tensor(payload, flush_cache=last,
                                                       weight_version=weight_version if last else None)
            except Exception as exc:
                raise WeightSyncError(f"/update_weights_from_tensor failed: {exc}") from exc
            del tensors, payload

    def close(self) -> None:
        return None


def url_is_on_this_host(url: str) -> bool:
    """Whether ``url``'s host is an address of this machine (resolved, then bound to a free port: binding
    succeeds only for local addresses). Unresolvable hosts count as remote."""
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def check_tensor_transport_available() -> None:
    """Raise :class:`~megatron_dapo.backend.MissingBackendError` where tensor handles cannot be shared.

    CUDA tensors need CUDA-IPC; CPU tensors need the ``file_system`` sharing strategy of
    ``torch.multiprocessing`` (POSIX shared memory), which every Linux build has.
    """
    import torch.multiprocessing as tmp

    from ..backend import MissingBackendError, has_cuda

    if not has_cuda() and "file_system" not in tmp.get_all_sharing_strategies():
        raise MissingBackendError("weight_sync.transport=tensor on CPU needs torch.multiprocessing's "
                                  "file_system sharing strategy (POSIX shared memory); use disk or distributed")


# --------------------------------------------------------------------------------------------
# the public object
# --------------------------------------------------------------------------------------------


class WeightSync:
    """Push the actor's weights to every rollout engine (see the module docstring for the protocol).

    Args:
        actor: :class:`~megatron_dapo.actor.megatron_actor.MegatronActor` or any object with ``.spec``
            (optional; enables the name check), ``.rank`` (global rank) and
            ``.iter_hf_tensors(dtype)`` (collective generator of ``(hf_name, tensor)``; rank 0 must
            receive every tensor).  ``.hf_path`` (optional) supplies config files for ``disk``;
            ``.offload()`` / ``.onload()`` are used by the colocated helpers.
        client: :class:`~megatron_dapo.rollout.client.SyncEngineClient` over ALL engines; required on
            rank 0, ignored (may be ``None``) elsewhere.
        transport: ``disk`` | ``distributed`` | ``tensor`` (``weight_sync.transport``).
        bucket_mb: bucket capacity in MiB (fractions allowed; ``0`` = one unbounded bucket).
        dtype: engine dtype (``torch.dtype`` or ``fp32``/``bf16``/``fp16``); ``None`` = the actor's
            ``params_dtype``.
        work_dir: directory for ``disk`` checkpoints (must be on a file system the engines see).
        engine_world_size: engine ranks in the update group over ALL engines (``num_engines * tp_size``;
            the group has ``1 + engine_world_size`` ranks, engine ``e`` starts at ``1 + e * tp_size``);
            ``None`` = read ``tp_size`` from each engine's ``/get_server_info`` (1 when absent).
        timeout_s: rendezvous / collective timeout of the update group and bound on cache-flush retries.
        master_address: address engines use to reach rank 0 (``distributed``); default: detected.
        group_name: update-group name (default: unique per instance).
        offload_actor: whether the colocated helpers offload the actor while the engines hold the GPU
            (``actor.offload``; ``False`` keeps it resident when both fit).

    Raises:
        ValueError: unknown transport / bad bucket size / dtype, or no client on rank 0.
        MissingBackendError: ``tensor`` without sglang or CUDA.
    """

    def __init__(self, actor, client, *, transport: str = "disk", bucket_mb: float = 512,
                 dtype: torch.dtype | str | None = None, work_dir: str | Path,
                 engine_world_size: int | None = None, timeout_s: float = 600.0,
                 master_address: str | None = None, group_name: str | None = None,
                 offload_actor: bool = True) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"weight_sync.transport={transport!r}; expected one of {', '.join(TRANSPORTS)}")
        if engine_world_size is not None and int(engine_world_size) < 1:
            raise ValueError(f"engine_world_size must be >= 1, got {engine_world_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.actor = actor
        self.offload_actor = bool(offload_actor)
        self.transport_name = transport
        self.bucket_bytes = bucket_bytes_from_mb(bucket_mb)
        self.dtype = resolve_dtype(dtype, actor)
        self.work_dir = Path(work_dir)
        self.timeout_s = float(timeout_s)
        rank = getattr(actor, "rank", None)
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = int(rank)
        self.is_driver = self.rank == 0
        self.client = client if self.is_driver else None
        if self.is_driver and client is None:
            raise ValueError("WeightSync on rank 0 needs the engine client (client=None given)")
        if transport == "tensor":
            check_tensor_transport_available()
        spec = getattr(actor, "spec", None)
        self._expected: Optional[list[str]] = None
        if spec is not None:
            from ..models import mapping

            self._expected = mapping.hf_names(spec)
        self._transport = None
        if self.is_driver:
            if transport == "disk":
                self._transport = DiskTransport(client, self.work_dir, getattr(actor, "hf_path", None),
                                                shard_bytes=self.bucket_bytes)
            elif transport == "distributed":
                self._transport = DistributedTransport(client, engine_world_size=engine_world_size,
                                                       timeout_s=timeout_s, master_address=master_address,
                                                       group_name=group_name)
            else:
                self._transport = TensorTransport(client, engine_world_size=engine_world_size)
        self._closed = False

    # ---- engine control (driver) -----------------------------------------------------------
    def _flush_cache(self) -> None:
        """``/flush_cache`` on every engine, retried while requests are still draining (SGLang answers
        an error until its running batch is empty)."""
        deadline = time.monotonic() + min(self.timeout_s, 60.0)
        while True:
            try:
                self.client.flush_cache()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise WeightSyncError(f"/flush_cache kept failing: {exc}") from exc
                time.sleep(0.2)

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

    def _on_driver(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on rank 0, then share success / the error with every rank (a barrier)."""
        err = None
        if self.is_driver:
            try:
                fn()
            except Exception as exc:
                err = f"{what}: {type(exc).__name__}: {exc}"
        err = _share_from_rank0(err)
        if err is not None:
            raise WeightSyncError(err)

    # ---- the sync --------------------------------------------------------------------------
    def sync(self, weight_version: str) -> dict[str, float]:
        """Move the actor's current weights into every engine (collective over all trainer ranks).

        Pauses generation (abort in-flight requests + flush the cache), exports and buckets the
        weights, sends them with the configured transport, flushes the cache and checks that every
        engine reports ``weight_version``.

        Returns:
            On every rank (rank 0's measurements): ``weight_sync/seconds`` (wall, whole call),
            ``weight_sync/bytes`` (payload bytes per engine), ``weight_sync/num_buckets``,
            ``weight_sync/export_s`` (gather + cast + bucketing on rank 0) and
            ``weight_sync/transfer_s`` (sending + engine load + version check) and
            ``weight_sync/pause_s`` (abort + flush before the export).

        Raises:
            WeightSyncError: on every rank, when any step failed on rank 0 (message names the engine).
        """
        return self._sync(weight_version, pause=True)

    def _sync(self, weight_version: str, *, pause: bool) -> dict[str, float]:
        if self._closed:
            raise WeightSyncError("WeightSync.sync called after close()")
        weight_version = str(weight_version)
        if not weight_version:
            raise ValueError("weight_version must be a non-empty string")
        t0 = time.perf_counter()
        stats = _Stats()
        err: Optional[BaseException] = None
        if self.is_driver and pause:
            try:
                self._pause()
            except Exception as exc:
                err = exc
        pause_s = time.perf_counter() - t0
        stream = self.actor.iter_hf_tensors(self.dtype)
        if self.is_driver and err is None:
            buckets = _timed_buckets(iter_buckets_with_last(_checked_names(stream, self._expected),
                                                            self.bucket_bytes, dtype=self.dtype), stats)
            try:
                self._transport.send(buckets, weight_version)
            except Exception as exc:
                err = exc
            finally:
                for _ in stream:  # keep the actor's collectives matched on the other ranks
                    pass
        else:
            for _ in stream:
                pass
        if self.is_driver and err is None:
            try:
                if pause:
                    self._flush_cache()
                self.check_versions(weight_version)
            except Exception as exc:
                err = exc
        total = time.perf_counter() - t0
        if self.is_driver and err is not None:
            logger.error("weight sync %s failed: %s", weight_version, err)
        payload = None
        if self.is_driver:
            payload = {
                "error": None if err is None else f"{type(err).__name__}: {err}",
                "metrics": {
                    "weight_sync/seconds": total,
                    "weight_sync/bytes": float(stats.bytes),
                    "weight_sync/num_buckets": float(stats.num_buckets),
                    "weight_sync/export_s": stats.export_s,
                    "weight_sync/transfer_s": max(total - pause_s - stats.export_s, 0.0),
                    "weight_sync/pause_s": pause_s,
                },
            }
        payload = _share_from_rank0(payload)
        if payload["error"] is not None:
            msg = f"weight sync to version {weight_version!r} ({self.transport_name}) failed: {payload['error']}"
            if err is not None:
                raise WeightSyncError(msg) from err
            raise WeightSyncError(msg)
        return dict(payload["metrics"])

    # ---- GPU colocation --------------------------------------------------------------------
    def colocated_sync(self, weight_version: str) -> dict[str, float]:
        """Before a rollout on engines that share GPUs with the actor (collective).

        Order: engines ``resume_memory_occupation(["weights"])`` → :meth:`sync` → ``actor.offload()`` (when
        ``offload_actor``)
        → engines ``resume_memory_occupation(["kv_cache"])``.  The actor is offloaded *after* the export
        because :meth:`~megatron_dapo.actor.megatron_actor.MegatronActor.offload` frees the parameter
        storage the export reads; the KV cache (the large allocation) comes back only after the actor's
        memory is gone.  Generation is already stopped (engines are released), so no abort is sent.

        Returns:
            :meth:`sync`'s metrics plus ``colocate/engine_resume_weights_s``, ``colocate/sync_s``,
            ``colocate/actor_offload_s``, ``colocate/engine_resume_kv_cache_s`` (seconds).

        Raises:
            WeightSyncError: an engine call or the sync failed (on every rank).
        """
        out: dict[str, float] = {}
        t = time.perf_counter()
        self._on_driver("resume_memory_occupation(['weights'])",
                        lambda: self.client.resume_memory_occupation(["weights"]))
        out["colocate/engine_resume_weights_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out.update(self._sync(weight_version, pause=False))
        out["colocate/sync_s"] = time.perf_counter() - t
        t = time.perf_counter()
        offload = getattr(self.actor, "offload", None) if self.offload_actor else None
        if offload is not None:
            offload()
        out["colocate/actor_offload_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self._on_driver("resume_memory_occupation(['kv_cache'])",
                        lambda: self.client.resume_memory_occupation(["kv_cache"]))
        out["colocate/engine_resume_kv_cache_s"] = time.perf_counter() - t
        return out

    def colocated_release(self) -> dict[str, float]:
        """After a rollout (collective): engines ``release_memory_occupation()`` (weights + KV cache)
        → ``actor.onload()``.  Also call it once before the first training step.

        Returns:
            ``colocate/engine_release_s``, ``colocate/actor_onload_s`` (seconds).

        Raises:
            WeightSyncError: the engines refused (e.g. requests still in flight), on every rank.
        """
        out: dict[str, float] = {}
        t = time.perf_counter()
        self._on_driver("release_memory_occupation()", lambda: self.client.release_memory_occupation())
        out["colocate/engine_release_s"] = time.perf_counter() - t
        t = time.perf_counter()
        onload = getattr(self.actor, "onload", None) if self.offload_actor else None
        if onload is not None:
            onload()
        out["colocate/actor_onload_s"] = time.perf_counter() - t
        return out

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the update group on the engines and here, remove temporary files (idempotent; local)."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
