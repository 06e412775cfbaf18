"""``tensor`` weight sync with engines on several nodes: node identity, engine -> node plan, bucket relay.

Tensor handles (CUDA IPC, shared memory) only open on the sender's node, so with engines on several nodes
(e.g. 16 colocated nodes; NCCL ``distributed`` is impossible there because a trainer rank and an engine rank
on one GPU cannot share a communicator) every node feeds its own engines. At the first sync every rank
all-gathers its node id (env ``MEGATRON_DAPO_NODE_ID``, else the host name) and whether its actor stream is
full (data-parallel rank 0); rank 0 shares its engine URLs (and API key). Each engine is assigned to one
node: ``MEGATRON_DAPO_ENGINE_NODES`` / ``engine_nodes`` (one node id per URL), else the node whose lowest
rank finds the URL local; an engine claimed by no node or by several is a :class:`WeightSyncError` naming
it. The sender of a node is its lowest rank; it builds its own engine client over its node's engines.
Senders that are data-parallel rank 0 bucket their own (full) stream exactly as rank 0 does; the others get
each bucket from rank 0 over a relay group ``G = {0} + those senders`` (created once with
``dist.new_group`` on all ranks): per bucket one ``broadcast_object_list`` of names/shapes/dtypes/is_last,
then one flat tensor per dtype. Every sender posts its buckets like the single-node path; each rank's error
is all-gathered, so all ranks raise the same error naming node and engines; rank 0 then checks every
engine's weight version. When every engine is on rank 0's node nothing changes: rank 0 sends alone and no
relay group exists. The protocol itself is :meth:`megatron_dapo.sync.weight_sync.WeightSync._sync_nodes`.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from ..backend import default_device
from .transports import ENGINE_NODES_ENV, WeightSyncError

__all__ = ["ENGINE_NODES_ENV", "NODE_ID_ENV", "NodePlan", "assign_engines_to_nodes", "local_node_id", "node_leaders",
           "parse_engine_nodes", "relay_recv", "relay_send"]

NODE_ID_ENV = "MEGATRON_DAPO_NODE_ID"


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


def node_leaders(rank_nodes: list[str]) -> dict[str, int]:
    """``{node: lowest global rank on it}`` from ``rank_nodes[r]`` = node id of rank ``r``."""
    leaders: dict[str, int] = {}
    for r, node in enumerate(rank_nodes):
        leaders.setdefault(node, r)
    return leaders


class NodePlan:
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
        self.leaders = leaders = node_leaders(rank_nodes)
        self.senders: dict[int, list[str]] = {}
        for url in urls:
            self.senders.setdefault(leaders[engine_node[url]], []).append(url)
        self.single = set(self.senders) <= {0}
        self.receivers = sorted(r for r in self.senders if not full_stream[r])
        self.group = None

    def describe(self) -> str:
        return "; ".join(f"node {self.rank_nodes[r]!r} (rank {r}{', via relay' if r in self.receivers else ''}) "
                         f"-> {', '.join(u)}" for r, u in sorted(self.senders.items()))



def relay_send(group, bucket: Optional[list], last: bool, abort: Optional[str] = None) -> None:
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
    dev = default_device()
    for dtype in dict.fromkeys(meta["dtypes"]):
        flat = torch.cat([t.reshape(-1).to(dev) for _, t in bucket if t.dtype == dtype])
        dist.broadcast(flat, src=0, group=group)
        del flat


def relay_recv(group) -> tuple[Optional[list[tuple[str, torch.Tensor]]], bool, Optional[str]]:
    """A relay receiver: the next bucket from rank 0 as ``(bucket, is_last, abort)``; ``bucket`` is
    ``None`` (and ``is_last`` True) when rank 0 aborted the stream (``abort`` says why)."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    meta = box[0]
    if meta["abort"] is not None:
        return None, True, meta["abort"]
    dev = default_device()
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
