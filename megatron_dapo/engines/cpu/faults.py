"""Fault injection for our CPU engine: make one engine die or hang at a chosen request (tests of fault tolerance).

Set ``MEGATRON_DAPO_CPU_ENGINE_FAULT`` in the environment the engines start in to a JSON object, or a list of
them (several failures in one run, each with its own ``claim``):

* ``path``: the route whose requests are counted (``"/generate"``, ``"/update_weights_from_distributed"``,
  ``"/release_memory_occupation"``, ...);
* ``after``: the engine acts on its ``after``-th request to ``path`` (1 = the first);
* ``action``: ``"kill"`` (SIGKILL itself before answering: a crash in the middle of the request), ``"stop"``
  (SIGSTOP itself before answering: a hung process) or ``"kill_after_reply"`` (answer, then SIGKILL itself
  0.2 s later: a crash between requests, e.g. while released);
* ``claim``: a file path; only the engine that creates it first acts (``O_EXCL``), so exactly one engine of a
  run fails once, and its replacement, started with the same environment, runs normally;
* ``weight_version`` (optional): count only the requests that arrive while the engine holds this weight version
  (e.g. ``"1"``: during the second step), so that several failures of one run land in different steps.

Each engine counts on its own. Unset, nothing is added to the server. The real engines have no such hook: tests
kill them from outside.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from aiohttp import web

FAULT_ENV = "MEGATRON_DAPO_CPU_ENGINE_FAULT"
ACTIONS = ("kill", "stop", "kill_after_reply")


@dataclass(frozen=True)
class FaultPlan:
    """One planned failure (module docstring)."""

    path: str
    after: int
    action: str
    claim: str
    weight_version: Optional[str] = None

    @classmethod
    def from_env(cls, environ=os.environ) -> list["FaultPlan"]:
        """The plans in :data:`FAULT_ENV` (``[]`` when unset).

        Raises:
            ValueError: not a JSON object (or list of them) with ``path``, ``after`` >= 1, ``action`` in
                :data:`ACTIONS` and ``claim``.
        """
        raw = environ.get(FAULT_ENV)
        if not raw:
            return []
        try:
            specs = json.loads(raw)
            specs = specs if isinstance(specs, list) else [specs]
            plans = [cls(str(d["path"]), int(d["after"]), str(d["action"]), str(d["claim"]),
                         None if d.get("weight_version") is None else str(d["weight_version"])) for d in specs]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{FAULT_ENV}={raw!r}: expected a JSON object (or a list of them) with path, after, "
                             f"action and claim ({exc})") from exc
        for plan in plans:
            if plan.after < 1 or plan.action not in ACTIONS:
                raise ValueError(f"{FAULT_ENV}: after must be >= 1 and action one of {', '.join(ACTIONS)} "
                                 f"(got {raw!r})")
        return plans

    def middleware(self, weight_version: Callable[[], str]):
        """An aiohttp middleware that counts requests to :attr:`path` (while ``weight_version()`` is
        :attr:`weight_version`, when set) and carries out the plan."""
        seen = {"n": 0}

        @web.middleware
        async def fault(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path != self.path or (self.weight_version is not None
                                             and str(weight_version()) != self.weight_version):
                return await handler(request)
            seen["n"] += 1
            if seen["n"] != self.after or not self._claim():
                return await handler(request)
            if self.action == "kill_after_reply":
                asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGKILL)
                return await handler(request)
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)
            return await handler(request)  # reached after a SIGCONT only

        return fault

    def _claim(self) -> bool:
        try:
            fd = os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {self.action} {self.path} #{self.after}\n")
        return True
