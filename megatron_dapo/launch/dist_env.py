"""Where am I in the job? Rank, world size and rendezvous address from torchrun, Slurm or nothing.

:func:`resolve_dist_env` is what the trainer calls before ``torch.distributed.init_process_group``.
Precedence (first match wins):

1. **torchrun** (``torch.distributed.run``; detected by ``TORCHELASTIC_RUN_ID`` or the trio
   ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node rank), ``GROUP_WORLD_SIZE``, ``MASTER_ADDR``,
   ``MASTER_PORT`` (names from the torchrun documentation, "Environment Variables").
2. **Slurm step** (a process started by ``srun``; detected by ``SLURM_STEP_ID``/``SLURM_STEPID`` together
   with ``SLURM_PROCID``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``),
   ``SLURM_LOCALID``, ``SLURM_NODEID`` (node index *within the step*), ``SLURM_STEP_NUM_NODES``,
   ``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``8(x2),4``), ``SLURM_STEP_NODELIST`` (else
   ``SLURM_JOB_NODELIST``/``SLURM_NODELIST``) — names from the ``srun(1)`` man page, "OUTPUT
   ENVIRONMENT VARIABLES". The batch script itself also carries ``SLURM_PROCID=0`` and the job's
   ``SLURM_NTASKS`` but no step id; a process started there directly is treated as a single process
   (it is not one of ``SLURM_NTASKS`` peers, so waiting for them would hang).
3. **single process**: rank 0 of 1.

``MASTER_ADDR`` defaults to the first host of the step's node list (Slurm) or ``127.0.0.1``.
``MASTER_PORT`` defaults, under Slurm, to :func:`master_port_for_job` (deterministic in the job id, so
every task of the step computes the same value without talking to the others); for a single process
a free local port is picked.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

from ..errors import MegatronDapoError

MASTER_PORT_BASE = 20000
"""Lowest port :func:`master_port_for_job` returns (below Linux's default ephemeral range 32768+)."""
MASTER_PORT_SPAN = 10000
"""Number of distinct ports :func:`master_port_for_job` cycles through."""


class DistEnvError(MegatronDapoError, ValueError):
    """A launcher environment variable is missing, malformed or inconsistent (the message names it)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. All fields are plain ints/strings; ``nodelist`` is hostnames.

    ``rank``/``world_size``: global process index/count. ``local_rank``/``local_world_size``: index/count
    on this node. ``node_rank``/``num_nodes``: this node's index/node count (within the launch step).
    ``source``: ``"torchrun"``, ``"slurm"`` or ``"single"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    nodelist: list[str] = field(default_factory=list)
    source: str = "single"

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        """``tcp://MASTER_ADDR:MASTER_PORT`` for ``torch.distributed.init_process_group(init_method=...)``."""
        return f"tcp://{self.master_addr}:{self.master_port}"

    def torch_env(self) -> dict[str, str]:
        """The variables ``init_process_group(init_method="env://")`` reads, as strings."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- hostlists


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_bracket(body: str, text: str) -> list[str]:
    """``"1-3,05"`` → ``["1", "2", "3", "05"]``; width of a range = digits of its lower bound."""
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        m = _RANGE.match(part)
        if not m:
            raise DistEnvError(f"hostlist {text!r}: bad range {part!r} inside brackets")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DistEnvError(f"hostlist {text!r}: range {part!r} is decreasing")
        if hi - lo > 1_000_000:
            raise DistEnvError(f"hostlist {text!r}: range {part!r} is implausibly large")
        width = len(lo_s) if lo_s.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistEnvError(f"hostlist {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"hostlist {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DistEnvError(f"hostlist {text!r}: unbalanced '['")
    items.append("".join(cur))
    return items


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist expression into hostnames, in order, duplicates kept.

    Supports comma-separated items, bracket ranges and lists (``node[1-3,5]``), zero padding taken
    from the lower bound (``gpu[08-10]`` → ``gpu08, gpu09, gpu10``), several bracket groups in one
    item (``r[1-2]n[01-02]`` → ``r1n01, r1n02, r2n01, r2n02``: the cartesian product, rightmost group
    fastest, as ``scontrol show hostnames`` prints it) and text after a group (``a[1-2]-ib``).
    Whitespace around items is ignored; an empty string gives ``[]``.

    Raises:
        DistEnvError: unbalanced/nested brackets, an empty item, a non-numeric or decreasing range.
    Source: Slurm's hostlist syntax (``scontrol show hostnames``; ``slurm.conf(5)`` "NodeName").
    """
    text = nodelist.strip()
    if not text:
        return []
    hosts: list[str] = []
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            raise DistEnvError(f"hostlist {nodelist!r}: empty item")
        parts: list[list[str]] = []
        pos = 0
        for m in re.finditer(r"\[([^\]]*)\]", item):
            parts.append([item[pos:m.start()]])
            parts.append(_expand_bracket(m.group(1), nodelist))
            pos = m.end()
        parts.append([item[pos:]])
        if "[" in item[pos:] or "]" in item[pos:]:
            raise DistEnvError(f"hostlist {nodelist!r}: malformed brackets in {item!r}")
        expanded = [""]
        for choices in parts:
            expanded = [prefix + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's ``SLURM_TASKS_PER_NODE`` syntax: ``"8(x2),4"`` → ``[8, 8, 4]``.

    Raises:
        DistEnvError: an item is neither ``N`` nor ``N(xK)``.
    """
    out: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise DistEnvError(f"tasks-per-node {spec!r}: bad item {item!r} (expected N or N(xK))")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def master_port_for_job(job_id: int | str, base: int = MASTER_PORT_BASE, span: int = MASTER_PORT_SPAN) -> int:
    """Deterministic rendezvous port for a Slurm job: ``base + job_id mod span`` (default 20000–29999).

    Every task of a job computes the same port from ``SLURM_JOB_ID`` alone. Two jobs sharing a node
    collide only when their ids are congruent mod ``span``. Raises DistEnvError for a non-integer id.
    """
    try:
        jid = int(str(job_id).strip())
    except ValueError:
        raise DistEnvError(f"SLURM_JOB_ID: expected an integer, got {job_id!r}") from None
    if not (1 <= base and base + span - 1 <= 65535 and span >= 1):
        raise DistEnvError(f"master port range [{base}, {base + span}) is not within 1..65535")
    return base + jid % span


def engine_urls_for_nodes(nodes: list[str] | str, base_port: int, engines_per_node: int = 1,
                          scheme: str = "http") -> list[str]:
    """URLs of rollout engines started one port apart on each node.

    ``nodes``: hostnames, or a hostlist expression (expanded with :func:`expand_nodelist`).
    Returns ``[f"{scheme}://{node}:{base_port + i}" for node in nodes for i in range(engines_per_node)]``
    (node-major), the format ``rollout.engine_urls`` takes.

    Raises:
        DistEnvError: no nodes, ``engines_per_node < 1``, or a port outside 1..65535.
    """
    hosts = expand_nodelist(nodes) if isinstance(nodes, str) else list(nodes)
    if not hosts:
        raise DistEnvError("engine_urls_for_nodes: empty node list")
    if engines_per_node < 1:
        raise DistEnvError(f"engines_per_node must be >= 1 (got {engines_per_node})")
    if not (1 <= base_port and base_port + engines_per_node - 1 <= 65535):
        raise DistEnvError(f"base_port {base_port} + {engines_per_node} engines is outside 1..65535")
    if scheme not in ("http", "https"):
        raise DistEnvError(f"scheme must be http or https (got {scheme!r})")
    return [f"{scheme}://{h}:{base_port + i}" for h in hosts for i in range(engines_per_node)]


# --------------------------------------------------------------------------- resolution


def _int(environ: Mapping[str, str], *names: str, default: Optional[int] = None) -> int:
    for name in names:
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            return int(raw.strip())
        except ValueError:
            raise DistEnvError(f"{name}: expected an integer, got {raw!r}") from None
    if default is None:
        raise DistEnvError(f"{' or '.join(names)}: not set")
    return default


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(env: DistEnv) -> DistEnv:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise DistEnvError(f"{env.source} environment: {msg}")

    need(env.world_size >= 1, f"world size {env.world_size} must be >= 1")
    need(0 <= env.rank < env.world_size, f"rank {env.rank} is outside [0, {env.world_size})")
    need(env.local_world_size >= 1, f"local world size {env.local_world_size} must be >= 1")
    need(0 <= env.local_rank < env.local_world_size,
         f"local rank {env.local_rank} is outside [0, {env.local_world_size})")
    need(env.num_nodes >= 1 and 0 <= env.node_rank < env.num_nodes,
         f"node rank {env.node_rank} is outside [0, {env.num_nodes})")
    need(1 <= env.master_port <= 65535, f"MASTER_PORT {env.master_port} is outside 1..65535")
    need(bool(env.master_addr), "MASTER_ADDR is empty")
    return env


def resolve_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Discover rank/world/rendezvous from ``environ`` (default ``os.environ``); see the module doc.

    Returns a validated :class:`DistEnv`. Under Slurm, ``nodelist`` is the step's hosts, ``master_addr``
    its first host unless ``MASTER_ADDR`` is set, and ``master_port`` is ``MASTER_PORT`` or
    :func:`master_port_for_job` of ``SLURM_HET_JOB_ID``/``SLURM_JOB_ID``.

    Raises:
        DistEnvError: a variable is not an integer, or ranks are out of range (the message names it).
    """
    env = os.environ if environ is None else environ

    if env.get("TORCHELASTIC_RUN_ID") or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
        num_nodes = _int(env, "GROUP_WORLD_SIZE", default=max(1, world // max(local_world, 1)))
        nodes_raw = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        return _check(DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK"),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", default=0),
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", default=29500),
            nodelist=expand_nodelist(nodes_raw) if nodes_raw else [],
            source="torchrun",
        ))

    in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
    if in_step and "SLURM_PROCID" in env:
        nodes_raw = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        nodelist = expand_nodelist(nodes_raw)
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=max(len(nodelist), 1))
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default=1)
        node_rank = _int(env, "SLURM_NODEID", default=0)
        tpn_raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if tpn_raw:
            tpn = expand_tasks_per_node(tpn_raw)
            if node_rank >= len(tpn):
                raise DistEnvError(f"SLURM_NODEID={node_rank} but SLURM_STEP_TASKS_PER_NODE={tpn_raw!r} "
                                   f"lists {len(tpn)} nodes")
            local_world = tpn[node_rank]
        else:
            local_world = max(1, world // num_nodes)
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        else:
            jid = env.get("SLURM_HET_JOB_ID") or env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
            port = master_port_for_job(jid) if jid else 29500
        return _check(DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or (nodelist[0] if nodelist else "127.0.0.1"),
            master_port=port,
            nodelist=nodelist,
            source="slurm",
        ))

    return _check(DistEnv(
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else _free_port(),
        nodelist=[socket.gethostname()],
        source="single",
    ))


# --------------------------------------------------------------------------- shell helper


def main(argv: Optional[list[str]] = None) -> int:
    """Small CLI the sbatch scripts use, so shell and Python agree on hostlists, ports and URLs.

    ``hostnames NODELIST`` (one per line), ``master-port [JOB_ID]``, ``engine-urls NODELIST --base-port P
    [--engines-per-node K] [--scheme http]`` (comma-joined, for ``rollout.engine_urls=[...]``),
    ``show`` (this process's :class:`DistEnv` as JSON).
    """
    ap = argparse.ArgumentParser(prog="python -m megatron_dapo.launch.dist_env")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hostnames")
    p.add_argument("nodelist")
    p = sub.add_parser("master-port")
    p.add_argument("job_id", nargs="?", default=None)
    p = sub.add_parser("engine-urls")
    p.add_argument("nodelist")
    p.add_argument("--base-port", type=int, required=True)
    p.add_argument("--engines-per-node", type=int, default=1)
    p.add_argument("--scheme", default="http")
    sub.add_parser("show")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "hostnames":
            print("\n".join(expand_nodelist(args.nodelist)))
        elif args.cmd == "master-port":
            jid = args.job_id or os.environ.get("SLURM_HET_JOB_ID") or os.environ.get("SLURM_JOB_ID")
            if not jid:
                raise DistEnvError("master-port: pass a job id or run inside a Slurm job (SLURM_JOB_ID)")
            print(master_port_for_job(jid))
        elif args.cmd == "engine-urls":
            print(",".join(engine_urls_for_nodes(args.nodelist, args.base_port, args.engines_per_node, args.scheme)))
        else:
            print(json.dumps(resolve_dist_env().to_dict(), sort_keys=True))
    except DistEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
