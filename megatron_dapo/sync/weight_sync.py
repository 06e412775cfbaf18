"""Resharded weight sync: Megatron actor (TP/PP/VPP/DP shards) → SGLang-API rollout engines.

Flow of one :meth:`WeightSync.sync` (collective over every trainer rank)::

    rank 0: pause generation (POST /abort_request {"abort_all": true}; POST /flush_cache)
    all   : actor.iter_hf_tensors(dtype)        # TP all-gather in the owning stage, PP broadcast
    rank 0: iter_buckets(...) -> transport      # one bucket + one tensor in memory at a time
            (tensor across nodes: one sender per node, see below)
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
* ``tensor`` — colocated engines: ``/update_weights_from_tensor`` with SGLang's serialised tensor
  handles (``MultiprocessingSerializer``): CUDA-IPC on GPU, shared-memory segment names on CPU. Handles
  only open on the sender's node, so with engines on several nodes every node feeds its own engines:

  Multi-node ``tensor`` sync (e.g. 16 colocated nodes; NCCL ``distributed`` is impossible there because a
  trainer rank and an engine rank on one GPU cannot share a communicator). At the first sync every rank
  all-gathers its node id (env ``MEGATRON_DAPO_NODE_ID``, else the host name) and whether its actor stream
  is full (data-parallel rank 0); rank 0 shares its engine URLs (and API key). Each engine is assigned to
  one node: ``MEGATRON_DAPO_ENGINE_NODES`` / ``engine_nodes`` (one node id per URL), else the node whose
  lowest rank finds the URL local; an engine claimed by no node or by several is a
  :class:`WeightSyncError` naming it. The sender of a node is its lowest rank; it builds its own engine
  client over its node's engines. Senders that are data-parallel rank 0 bucket their own (full) stream
  exactly as rank 0 does; the others get each bucket from rank 0 over a relay group
  ``G = {0} + those senders`` (created once with ``dist.new_group`` on all ranks): per bucket one
  ``broadcast_object_list`` of names/shapes/dtypes/is_last, then one flat tensor per dtype. Every sender
  posts its buckets like the single-node path (weight version + cache flush with the last bucket); each
  rank's error is all-gathered, so all ranks raise the same error naming node and engines; rank 0 then
  checks every engine's weight version. When every engine is on rank 0's node nothing changes: rank 0
  sends alone and no relay group exists.

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
    """``/update_weights_from_tensor`` with tensor handles (engines on the sending rank's node).

    On GPU each bucket's tensors are moved to this rank's device and pass as CUDA-IPC handles; on CPU they
    are copied into one shared-memory segment per dtype (:func:`~megatron_dapo.rollout.tensor_ipc.share_bucket`)
    and pass as segment names. Either way the engine maps the memory and copies it into its weights; the
    bucket is kept alive until the engine has answered.

    Args:
        client: engine client over the engines THIS rank feeds (all of them on a single node; one node's
            engines in the multi-node layout of :class:`WeightSync`).
        engine_world_size: engine ranks over the engines of ``client`` (``len(urls) * tp_size``), or
            ``None`` to ask the engines (``/get_server_info``); ignored when ``tp_per_engine`` is given.
        tp_per_engine: SGLang ``tp_size`` of one engine (number of serialized entries per request).
        node: this sender's node id (only used in error messages).
    """

    name = "tensor"

    def __init__(self, client, *, engine_world_size: Optional[int] = None, tp_per_engine: Optional[int] = None,
                 node: Optional[str] = None) -> None:
        self.client = client
        self.engine_world_size = engine_world_size
        self.tp_per_engine: Optional[int] = int(tp_per_engine) if tp_per_engine is not None else None
        self.node = node
        self._checked = False

    @property
    def urls(self) -> list[str]:
        return list(getattr(self.client, "control_urls", []))

    def _where(self) -> str:
        return f"node {self.node!r} -> engine(s) {', '.join(self.urls)}" if self.node is not None \
            else f"engine(s) {', '.join(self.urls)}"

    def prepare(self) -> None:
        """Check that every engine of ``client`` is on this host, and resolve ``tp_per_engine`` (once).

        Raises:
            WeightSyncError: an engine on another host (memory handles cannot reach it), or engines that
                disagree on ``tp_size``.
        """
        if self._checked:
            return
        remote = [u for u in self.urls if not url_is_on_this_host(u)]
        if remote:
            who = "rank 0's node" if self.node is None else f"node {self.node!r}"
            raise WeightSyncError(
                f"weight_sync.transport=tensor passes memory handles, which only engines on the sender's node "
                f"({who}) can open; {len(remote)} engine(s) are elsewhere, e.g. {remote[0]}. Fix the "
                f"engine-to-node mapping ({ENGINE_NODES_ENV}) or use weight_sync.transport=distributed")
        if self.tp_per_engine is None:
            self.tp_per_engine = ranks_per_engine(self.client, self.engine_world_size)
        self._checked = True

    def post(self, bucket: list[tuple[str, torch.Tensor]], last: bool, weight_version: str) -> None:
        """Send one bucket to every engine of ``client``; the last one also flushes the cache and sets
        ``weight_version``.

        Raises:
            WeightSyncError: an engine refused or could not be reached (names the node and engines).
        """
        from ..rollout.client import serialize_named_tensors_for_sglang
        from ..rollout.tensor_ipc import share_bucket

        self.prepare()
        if torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
            tensors = [(n, t if t.device == dev else t.to(dev)) for n, t in bucket]
            torch.cuda.synchronize()
        else:
            tensors = share_bucket(bucket)
        payload = serialize_named_tensors_for_sglang(tensors, tp_size=self.tp_per_engine)
        try:
            self.client.update_weights_from_tensor(payload, flush_cache=last,
                                                   weight_version=weight_version if last else None)
        except Exception as exc:
            raise WeightSyncError(f"/update_weights_from_tensor on {self._where()} failed: {exc}") from exc
        del tensors, payload

    def send(self, buckets: Iterator, weight_version: str) -> None:
        self.prepare()
        for bucket, last in buckets:
            self.post(bucket, last, weight_version)

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
# tensor transport across nodes: node identity, engine -> node assignment, bucket relay
# --------------------------------------------------------------------------------------------

NODE_ID_ENV = "MEGATRON_DAPO_NODE_ID"
ENGINE_NODES_ENV = "MEGATRON_DAPO_ENGINE_NODES"


def local_node_id() -> str:
    """This process's node id: env ``MEGATRON_DAPO_NODE_ID`` when set (tests simulate several nodes on
    one host with it), else ``socket.gethostname()``."""
    value = os.environ.get(NODE_ID_ENV, "").strip()
    return value or socket.gethostname()


def parse_engine_nodes(text: Optional[str], num_engines: int) -> Optional[list[str]]:
    """Parse ``MEGATRON_DAPO_ENGINE_NODES``: comma-separated node ids, one per engine URL, same order.

    Returns:
        ``None`` for an unset/blank value, else the list of ``num_engines`` node ids.

    Raises:
        WeightSyncError: wrong count or an empty entry (names the variable and the engine index).
    """
    if text is None or not str(text).strip():
        return None
    items = [x.strip() for x in str(text).split(",")]
    if len(items) != num_engines:
        raise WeightSyncError(f"{ENGINE_NODES_ENV}={text!r} names {len(items)} node(s) but there are "
                              f"{num_engines} engine URL(s); give one node id per engine, in URL order")
    for i, item in enumerate(items):
        if not item:
            raise WeightSyncError(f"{ENGINE_NODES_ENV}={text!r}: entry {i} (engine {i}) is empty")
    return items


def assign_engines_to_nodes(urls: list[str], nodes: list[str], *, engine_nodes: Optional[list[str]] = None,
                            claims: Optional[dict[str, list[str]]] = None) -> dict[str, str]:
    """Which node feeds each engine (``tensor`` transport across nodes).

    Args:
        urls: every engine URL (the same list on every rank).
        nodes: the trainer's node ids (each node appears once; order irrelevant).
        engine_nodes: explicit node id per URL (``MEGATRON_DAPO_ENGINE_NODES`` / the ``engine_nodes``
            argument); wins over ``claims``.
        claims: ``{node: [urls that node's sender finds on its host]}`` (:func:`url_is_on_this_host`).

    Returns:
        ``{url: node}`` covering every URL.

    Raises:
        WeightSyncError: an engine claimed by no node or by several nodes, or mapped to a node that runs
            no trainer rank; the message names every such engine.
        ValueError: neither ``engine_nodes`` nor ``claims`` given, or ``engine_nodes`` of the wrong length.
    """
    known = set(nodes)
    problems: list[str] = []
    out: dict[str, str] = {}
    if engine_nodes is not None:
        if len(engine_nodes) != len(urls):
            raise ValueError(f"engine_nodes has {len(engine_nodes)} entries for {len(urls)} engine URL(s)")
        for i, (url, node) in enumerate(zip(urls, engine_nodes)):
            if node not in known:
                problems.append(f"engine {i} ({url}) is mapped to node {node!r}, which runs no trainer rank "
                                f"(nodes: {', '.join(sorted(known))})")
            out[url] = node
    elif claims is not None:
        for i, url in enumerate(urls):
            owners = sorted(n for n in known if url in set(claims.get(n, ())))
            if not owners:
                problems.append(f"engine {i} ({url}) is claimed by no node: no trainer node finds it on its own "
                                f"host (nodes: {', '.join(sorted(known))})")
            elif len(owners) > 1:
                problems.append(f"engine {i} ({url}) is claimed by several nodes ({', '.join(owners)}): use "
                                f"routable host names in the engine URLs or set {ENGINE_NODES_ENV}")
            else:
                out[url] = owners[0]
    else:
        raise ValueError("assign_engines_to_nodes needs engine_nodes or claims")
    if problems:
        raise WeightSyncError("; ".join(problems) + ". weight_sync.transport=tensor needs every engine fed by "
                              "exactly one trainer node (tensor handles only open on the engine's own node); "
                              "otherwise use weight_sync.transport=distributed")
    return out


class _NodePlan:
    """Who sends what in a ``tensor`` sync (identical on every rank; built once by :meth:`WeightSync._plan`).

    ``rank_nodes[r]``: node id of global rank ``r``; ``engine_node``: ``{url: node}``; ``senders``:
    ``{rank: [urls]}`` (the lowest rank of each node that has engines); ``receivers``: senders whose actor
    stream is empty (data-parallel rank != 0), fed by rank 0 over ``group``; ``single``: every engine is on
    rank 0's node (rank 0 sends alone, as in the single-node protocol).
    """

    def __init__(self, urls: list[str], rank_nodes: list[str], full_stream: list[bool],
                 engine_node: dict[str, str]) -> None:
        self.urls = list(urls)
        self.rank_nodes = list(rank_nodes)
        self.full_stream = list(full_stream)
        self.engine_node = dict(engine_node)
        leaders: dict[str, int] = {}
        for r, node in enumerate(rank_nodes):
            leaders.setdefault(node, r)
        self.leaders = leaders
        self.senders: dict[int, list[str]] = {}
        for url in urls:
            self.senders.setdefault(leaders[engine_node[url]], []).append(url)
        self.single = set(self.senders) <= {0}
        self.receivers = sorted(r for r in self.senders if not full_stream[r])
        self.group = None

    def describe(self) -> str:
        return "; ".join(f"node {self.rank_nodes[r]!r} (rank {r}{', via relay' if r in self.receivers else ''}) "
                         f"-> {', '.join(u)}" for r, u in sorted(self.senders.items()))


def _stream_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _relay_send(group, bucket: Optional[list], last: bool, abort: Optional[str] = None) -> None:
    """Rank 0: broadcast one bucket (or an abort notice) to the relay group.

    One ``broadcast_object_list`` of ``{names, shapes, dtypes, last, abort}``, then one flat tensor per
    dtype (in order of first appearance) on this rank's device.
    """
    bucket = bucket or []
    meta = {"names": [n for n, _ in bucket], "shapes": [tuple(t.shape) for _, t in bucket],
            "dtypes": [t.dtype for _, t in bucket], "last": bool(last), "abort": abort}
    dist.broadcast_object_list([meta], src=0, group=group)
    if abort is not None:
        return
    dev = _stream_device()
    for dtype in dict.fromkeys(meta["dtypes"]):
        flat = torch.cat([t.reshape(-1).to(dev) for _, t in bucket if t.dtype == dtype])
        dist.broadcast(flat, src=0, group=group)
        del flat


def _relay_recv(group) -> tuple[Optional[list[tuple[str, torch.Tensor]]], bool, Optional[str]]:
    """A relay receiver: the next bucket from rank 0 as ``(bucket, is_last, abort)``; ``bucket`` is
    ``None`` (and ``is_last`` True) when rank 0 aborted the stream (``abort`` says why)."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    meta = box[0]
    if meta["abort"] is not None:
        return None, True, meta["abort"]
    dev = _stream_device()
    out: list = [None] * len(meta["names"])
    for dtype in dict.fromkeys(meta["dtypes"]):
        idx = [i for i, d in enumerate(meta["dtypes"]) if d == dtype]
        sizes = [int(torch.Size(meta["shapes"][i]).numel()) for i in idx]
        flat = torch.empty(sum(sizes), dtype=dtype, device=dev)
        dist.broadcast(flat, src=0, group=group)
        off = 0
        for i, n in zip(idx, sizes):
            out[i] = (meta["names"][i], flat[off: off + n].view(meta["shapes"][i]))
            off += n
    return out, bool(meta["last"]), None


def _default_client_factory(urls: list[str], api_key: Optional[str]):
    from ..rollout.client import SyncEngineClient

    return SyncEngineClient(urls, api_key=api_key)


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
        api_key: engine API key for the per-node clients of the ``tensor`` transport (pass it on every
            rank); ``None`` = rank 0's ``client.api_key``, shared at the first sync.
        engine_nodes: ``tensor`` only: node id per engine URL (URL order of rank 0's client); ``None`` =
            env ``MEGATRON_DAPO_ENGINE_NODES`` (comma-separated), else each engine belongs to the node whose
            lowest rank finds its URL local. Rank 0's value is used on every rank.
        node_id: this rank's node id; ``None`` = env ``MEGATRON_DAPO_NODE_ID``, else the host name.
        client_factory: ``f(urls, api_key) -> client`` building a node sender's engine client (``tensor``
            across nodes); default :class:`~megatron_dapo.rollout.client.SyncEngineClient`.

    The engine URLs need not be known off rank 0: the ``tensor`` transport shares rank 0's list (its
    client's ``control_urls``) with every rank at the first sync, which also fixes the node plan.

    Raises:
        ValueError: unknown transport / bad bucket size / dtype, or no client on rank 0.
        MissingBackendError: ``tensor`` without sglang or CUDA.
    """

    def __init__(self, actor, client, *, transport: str = "disk", bucket_mb: float = 512,
                 dtype: torch.dtype | str | None = None, work_dir: str | Path,
                 engine_world_size: int | None = None, timeout_s: float = 600.0,
                 master_address: str | None = None, group_name: str | None = None,
                 offload_actor: bool = True, api_key: str | None = None,
                 engine_nodes: list[str] | tuple[str, ...] | None = None, node_id: str | None = None,
                 client_factory: Callable[[list[str], Optional[str]], Any] | None = None) -> None:
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
        self._engine_world_size = int(engine_world_size) if engine_world_size is not None else None
        self._api_key = api_key
        self._engine_nodes = list(engine_nodes) if engine_nodes is not None else None
        self.node_id = str(node_id) if node_id else None
        self._client_factory = client_factory or _default_client_factory
        self._plan: Optional[_NodePlan] = None
        self._node_tx: Optional[TensorTransport] = None
        self._own_clients: list = []
        self.last_senders: list[dict[str, Any]] = []
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
        if plan is not None:
            self.last_senders = [{"rank": 0, "node": plan.rank_nodes[0], "engines": list(plan.urls), "relay": False,
                                  "bytes": int(payload["metrics"]["weight_sync/bytes"]),
                                  "num_buckets": int(payload["metrics"]["weight_sync/num_buckets"])}]
        if payload["error"] is not None:
            msg = f"weight sync to version {weight_version!r} ({self.transport_name}) failed: {payload['error']}"
            if err is not None:
                raise WeightSyncError(msg) from err
            raise WeightSyncError(msg)
        return dict(payload["metrics"])

    # ---- tensor transport across nodes -----------------------------------------------------
    def _has_full_stream(self) -> bool:
        """Whether ``actor.iter_hf_tensors`` yields every tensor on this rank (data-parallel rank 0;
        without ``actor.dp_rank``: rank 0 only)."""
        dp_rank = getattr(self.actor, "dp_rank", None)
        return int(dp_rank) == 0 if dp_rank is not None else self.rank == 0

    def _node_plan(self) -> _NodePlan:
        """Build (once, collectively) who feeds which engine; see :class:`_NodePlan`.

        Raises:
            WeightSyncError: on every rank alike: no engine URL, a bad ``MEGATRON_DAPO_ENGINE_NODES``, or
                an engine claimed by no node / several nodes (:func:`assign_engines_to_nodes`).
        """
        if self._plan is not None:
            return self._plan
        on = _dist_on()
        mine = (self.node_id or local_node_id(), self._has_full_stream())
        if on:
            infos: list = [None] * dist.get_world_size()
            dist.all_gather_object(infos, mine)
        else:
            infos = [mine]
        rank_nodes = [str(i[0]) for i in infos]
        full_stream = [bool(i[1]) for i in infos]
        shared = None
        if self.is_driver:
            urls = [u.rstrip("/") for u in getattr(self.client, "control_urls", [])]
            key = self._api_key if self._api_key is not None else getattr(self.client, "api_key", None)
            raw = ",".join(self._engine_nodes) if self._engine_nodes is not None else os.environ.get(ENGINE_NODES_ENV)
            shared = (urls, key, raw)
        urls, key0, raw = _share_from_rank0(shared)
        if not urls:
            raise WeightSyncError("rank 0's engine client lists no engine URL")
        if self._api_key is None:
            self._api_key = key0
        engine_nodes = parse_engine_nodes(raw, len(urls))
        claims = None
        if engine_nodes is None:
            leaders: dict[str, int] = {}
            for r, node in enumerate(rank_nodes):
                leaders.setdefault(node, r)
            local = [u for u in urls if url_is_on_this_host(u)] if self.rank in leaders.values() else None
            if on:
                gathered: list = [None] * len(rank_nodes)
                dist.all_gather_object(gathered, local)
            else:
                gathered = [local]
            claims = {rank_nodes[r]: c for r, c in enumerate(gathered) if c is not None}
        engine_node = assign_engines_to_nodes(urls, sorted(set(rank_nodes)), engine_nodes=engine_nodes, claims=claims)
        plan = _NodePlan(urls, rank_nodes, full_stream, engine_node)
        if plan.receivers:
            # dist.new_group is collective over the default group: every rank calls it here, in step
            plan.group = dist.new_group([0] + plan.receivers)
        if self.is_driver:
            logger.info("tensor weight sync plan: %s", plan.describe())
        self._plan = plan
        return plan

    def _node_transport(self, plan: _NodePlan) -> TensorTransport:
        """This sender's :class:`TensorTransport` over its node's engines (built once)."""
        if self._node_tx is None:
            urls = plan.senders[self.rank]
            tp = None
            if self._engine_world_size is not None:  # counts ALL engines' ranks, not just this node's
                ews, n = self._engine_world_size, len(plan.urls)
                if ews < n or ews % n:
                    raise ValueError(f"engine_world_size={ews} must be a positive multiple of the number of "
                                     f"engines ({n}): it counts all engine ranks (num_engines x tp_size)")
                tp = ews // n
            client = self._client_factory(list(urls), self._api_key)
            self._own_clients.append(client)
            self._node_tx = TensorTransport(client, tp_per_engine=tp, node=plan.rank_nodes[self.rank])
        return self._node_tx

    def _node_buckets(self, plan: _NodePlan, stream: Iterator, stats: _Stats) -> Iterator:
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
                    _relay_send(plan.group, bucket, last)
                    broken = False
                    done = last
                    yield bucket, last
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if not done and not broken:
                    _relay_send(plan.group, None, True, abort=f"rank 0 stopped the export: {reason}")
        elif self.rank in plan.receivers:
            # This rank's actor stream is empty (dp_rank != 0: iter_full_params returns before any
            # collective), so blocking here on the relay group cannot hold up the actor's TP/PP collectives;
            # rank 0 only waits for us inside a relay broadcast, and we wait only for rank 0: no cycle.
            while True:
                bucket, last, _abort = _relay_recv(plan.group)
                if bucket is None:
                    return
                yield bucket, last
                if last:
                    return
        elif self.rank in plan.senders:
            yield from iter_buckets_with_last(_checked_names(stream, self._expected), self.bucket_bytes,
                                              dtype=self.dtype)

    def _sync_nodes(self, weight_version: str, *, pause: bool, plan: _NodePlan) -> dict[str, float]:
        """``tensor`` sync with engines on several nodes: every node's sender feeds its own engines."""
        t0 = time.perf_counter()
        stats = _Stats()
        err: Optional[BaseException] = None
        if self.is_driver and pause:
            try:
                self._pause()
            except Exception as exc:
                err = exc
        pause_err = _share_from_rank0(None if err is None else f"{type(err).__name__}: {err}")
        pause_s = time.perf_counter() - t0
        stream = self.actor.iter_hf_tensors(self.dtype)
        node = plan.rank_nodes[self.rank]
        sender = self.rank in plan.senders
        posted_bytes = posted_buckets = 0
        transport = None
        if sender and pause_err is None:
            try:
                transport = self._node_transport(plan)
            except Exception as exc:
                err = exc
        if pause_err is None and (self.is_driver or sender):
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
                for _ in stream:  # keep the actor's collectives matched on the other ranks
                    pass
        else:
            for _ in stream:
                pass
        if self.is_driver and err is None and pause_err is None and stats.num_buckets == 0:
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
        if pause_err is not None:
            errors.insert(0, f"[rank 0] pausing the engines: {pause_err}")
        if self.is_driver and not errors:
            try:  # every node has answered its last bucket: the versions must be in place everywhere
                if pause:
                    self._flush_cache()
                self.check_versions(weight_version)
            except Exception as exc:
                errors.append(f"[rank 0] {type(exc).__name__}: {exc}")
        total = time.perf_counter() - t0
        payload = None
        if self.is_driver:
            metrics = {
                "weight_sync/seconds": total,
                "weight_sync/bytes": float(stats.bytes),
                "weight_sync/num_buckets": float(stats.num_buckets),
                "weight_sync/export_s": stats.export_s,
                "weight_sync/transfer_s": max(total - pause_s - stats.export_s, 0.0),
                "weight_sync/pause_s": pause_s,
                "weight_sync/num_sender_nodes": float(len(plan.senders)),
            }
            for info in infos:
                if info["sender"]:
                    metrics[f"weight_sync/node_bytes/{info['node']}"] = float(info["bytes"])
            payload = {"error": "; ".join(errors) if errors else None, "metrics": metrics}
            if errors:
                logger.error("weight sync %s failed: %s", weight_version, payload["error"])
        payload = _share_from_rank0(payload)
        self.last_senders = [{k: v for k, v in i.items() if k not in ("sender", "error")} for i in infos
                             if i["sender"]]
        if payload["error"] is not None:
            raise WeightSyncError(f"weight sync to version {weight_version!r} (tensor, "
                                  f"{len(plan.senders)} nodes) failed: {payload['error']}")
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
        for client in self._own_clients:
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # an engine client that cannot close cleanly must not mask others
                    logger.warning("closing a node sender's engine client: %s", exc)
        self._own_clients.clear()
        self._node_tx = None

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
