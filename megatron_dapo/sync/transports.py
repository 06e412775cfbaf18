"""The three weight-sync transports: how one stream of ``(bucket, is_last)`` reaches the engines.

SGLang native HTTP API (``python/sglang/srt/entrypoints/http_server.py`` and ``managers/io_struct.py``):

* ``disk`` — the sender streams buckets into safetensors shards of a temporary directory under
  ``work_dir`` (plus ``model.safetensors.index.json`` and the HF config files), renames it atomically
  to ``work_dir/weights-<version>`` and calls ``/update_weights_from_disk`` (``model_path``,
  ``weight_version``). ``work_dir`` must be visible to every engine (shared file system).
* ``distributed`` — once, rank 0 creates a weight-update group with ``/init_weights_update_group``
  (engine ``e`` gets ``rank_offset = 1 + e * tp_size``; gloo on CPU, NCCL on GPU); then per
  bucket ``/update_weights_from_distributed`` (names / dtypes / shapes) while rank 0 broadcasts each
  tensor in the same order.
* ``tensor`` — colocated engines: ``/update_weights_from_tensor`` with SGLang's serialised tensor
  handles (``MultiprocessingSerializer``, :mod:`megatron_dapo.engines.tensor_ipc`): CUDA-IPC on GPU,
  shared-memory segment names on CPU. Handles only open on the sender's node (engines on several nodes:
  :mod:`megatron_dapo.sync.nodes`).

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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse, urlsplit

import torch
import torch.multiprocessing as tmp

from ..backend import MissingBackendError, has_cuda
from ..engines.client import serialize_named_tensors_for_sglang
from ..engines.launch_common import find_free_ports
from ..engines.protocols import RolloutEngine, WeightTransportName
from ..engines.tensor_ipc import share_bucket
from ..errors import MegatronDapoError
from ..models.export import copy_side_files, write_safetensors_shards

logger = logging.getLogger(__name__)

_CONFIG_FILES = ("config.json", "generation_config.json")
_DIR_PREFIX = "weights-"
_TMP_PREFIX = ".tmp-weights-"
ENGINE_NODES_ENV = "MEGATRON_DAPO_ENGINE_NODES"
"""Engine -> node mapping override (:mod:`megatron_dapo.sync.nodes`), named in the tensor transport's error."""


class WeightSyncError(MegatronDapoError, RuntimeError):
    """A weight sync failed; the message names the engine(s) / tensor(s) involved."""



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


def tp_from_engine_world_size(engine_world_size: int, num_engines: int) -> int:
    """``engine_world_size`` (ranks of ALL engines, ``num_engines * tp_size``) divided by ``num_engines``.

    Raises:
        ValueError: not a positive multiple of ``num_engines``.
    """
    ews = int(engine_world_size)
    if ews < num_engines or ews % num_engines:
        raise ValueError(f"engine_world_size={ews} must be a positive multiple of the number of engines "
                         f"({num_engines}): it counts all engine ranks (num_engines x tp_size)")
    return ews // num_engines


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
        return tp_from_engine_world_size(engine_world_size, len(urls))
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


@dataclass(frozen=True)
class TransportOptions:
    """What the transports are built from (:class:`~megatron_dapo.sync.weight_sync.WeightSync`'s arguments).

    Attributes:
        work_dir: ``disk``: directory of the synced checkpoints (visible to every engine).
        hf_path: ``disk``: HF directory whose config files are copied next to the weights (``None``: none).
        bucket_bytes: ``disk``: shard size in bytes (0 = one shard).
        engine_world_size: engine ranks over all engines (``None``: ask the engines).
        timeout_s: ``distributed``: rendezvous / collective timeout (seconds).
        master_address: ``distributed``: address the engines reach rank 0 at (``None``: detected).
        group_name: ``distributed``: update-group name (``None``: unique).
    """

    work_dir: Path
    hf_path: Optional[Path] = None
    bucket_bytes: int = 0
    engine_world_size: Optional[int] = None
    timeout_s: float = 600.0
    master_address: Optional[str] = None
    group_name: Optional[str] = None


class DiskTransport:
    """safetensors shards in an atomically renamed directory + ``/update_weights_from_disk``."""

    name = "disk"

    @classmethod
    def check_available(cls) -> None:
        """Nothing to check: a shared file system is all ``disk`` needs."""

    @classmethod
    def build(cls, client: RolloutEngine, opts: TransportOptions) -> "DiskTransport":
        return cls(client, opts.work_dir, opts.hf_path, shard_bytes=opts.bucket_bytes)

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

    def reset(self) -> None:
        """Nothing to rebuild after an engine was replaced: each push writes a checkpoint every engine reads."""

    def close(self) -> None:
        for d in list(self._tmp_dirs) + ([self.current] if self.current is not None else []):
            shutil.rmtree(d, ignore_errors=True)
        self._tmp_dirs.clear()
        self.current = None


class DistributedTransport:
    """Weight-update group (``/init_weights_update_group``) + per-bucket ``/update_weights_from_distributed``
    with a broadcast of each tensor from rank 0."""

    name = "distributed"

    @classmethod
    def check_available(cls) -> None:
        """Nothing to check here: the engines answer ``/init_weights_update_group`` at the first sync."""

    @classmethod
    def build(cls, client: RolloutEngine, opts: TransportOptions) -> "DistributedTransport":
        return cls(client, engine_world_size=opts.engine_world_size, timeout_s=opts.timeout_s,
                   master_address=opts.master_address, group_name=opts.group_name)

    def __init__(self, client, *, engine_world_size: Optional[int], timeout_s: float,
                 master_address: Optional[str] = None, group_name: Optional[str] = None) -> None:
        self.client = client
        self.engine_world_size = engine_world_size
        self.timeout_s = float(timeout_s)
        self.master_address = master_address
        self.group_name = group_name or f"megatron_dapo_sync_{uuid.uuid4().hex[:8]}"
        self.backend = "nccl" if has_cuda() else "gloo"
        self.group = None

    def _resolve_engine_tp(self) -> int:
        return ranks_per_engine(self.client, self.engine_world_size)

    def connect(self) -> None:
        """Create the group once (rank 0 = this process; engine ranks offset per engine)."""
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

    def reset(self) -> None:
        """An engine was replaced: the weight-update group spans the old engine's ranks, so it is destroyed
        (on the engines still in it and here) and the next :meth:`send` forms a new one with every engine."""
        self._teardown()

    def close(self) -> None:
        self._teardown()


class TensorTransport:
    """``/update_weights_from_tensor`` with tensor handles (engines on the sending rank's node).

    On GPU each bucket's tensors are moved to this rank's device and pass as CUDA-IPC handles; on CPU they
    are copied into one shared-memory segment per dtype (:func:`~megatron_dapo.engines.tensor_ipc.share_bucket`)
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

    @classmethod
    def check_available(cls) -> None:
        """:func:`check_tensor_transport_available`."""
        check_tensor_transport_available()

    @classmethod
    def build(cls, client: RolloutEngine, opts: TransportOptions) -> "TensorTransport":
        return cls(client, engine_world_size=opts.engine_world_size)

    def __init__(self, client, *, engine_world_size: Optional[int] = None, tp_per_engine: Optional[int] = None,
                 node: Optional[str] = None) -> None:
        self.client = client
        self.engine_world_size = engine_world_size
        self.tp_per_engine: Optional[int] = int(tp_per_engine) if tp_per_engine is not None else None
        self.node = node
        self._checked = False

    @property
    def urls(self) -> list[str]:
        return list(self.client.control_urls)

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
        self.prepare()
        if has_cuda():
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

    def reset(self) -> None:
        """Nothing to rebuild after an engine was replaced: each push maps fresh handles for every engine."""

    def close(self) -> None:
        return None


def url_is_on_this_host(url: str) -> bool:
    """Whether ``url``'s host is an address of this machine (resolved, then bound to a free port: binding
    succeeds only for local addresses). Unresolvable hosts count as remote."""
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

    if not has_cuda() and "file_system" not in tmp.get_all_sharing_strategies():
        raise MissingBackendError("weight_sync.transport=tensor on CPU needs torch.multiprocessing's "
                                  "file_system sharing strategy (POSIX shared memory); use disk or distributed")


TRANSPORTS: dict[WeightTransportName, type[DiskTransport | DistributedTransport | TensorTransport]] = {
    "disk": DiskTransport, "distributed": DistributedTransport, "tensor": TensorTransport}
"""``weight_sync.transport`` -> transport class (each has ``check_available()`` and ``build(client, opts)``)."""
