"""HTTP transport under :class:`~megatron_dapo.engines.client.EngineClient`: one aiohttp session,
least-outstanding-requests balancing, retries with failover, and control-call fan-out.

Generation requests go to the generation URL (an engine, or the ``router_url``) with the fewest
outstanding requests among those not marked dead (ties broken round-robin).  Connection errors,
timeouts and 5xx answers are retried with exponential back-off (``retry_backoff_s · 2**attempt``,
capped at 10 s), preferring an engine not yet tried; an engine that failed with a connection error
or a timeout is avoided for ``dead_cooldown_s``; a 4xx answer is final.  When retries run out an
:class:`EngineError` names the URL(s) tried and the last error — a dead engine never hangs a
rollout.  Control calls are sent to every engine concurrently; any failure raises an
:class:`EngineError` naming every failing URL.  With a ``router_url`` (``sglang-router``),
generation goes to the router only, and aborts of requests sent through it go to every engine
behind it (the router has no ``/abort_request`` route; it forwards the ``rid`` unchanged).

The SGLang endpoints themselves (``/generate``, weight updates, memory release ...) are the
methods of :class:`~megatron_dapo.engines.client.EngineClient`, which subclasses
:class:`EngineTransport`.  :class:`EngineError` and :class:`EngineTransport` are also importable
from :mod:`megatron_dapo.engines.client`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Any, Sequence

import aiohttp

from ..errors import MegatronDapoError, RestartableFailure

# The records keep the logger name they had before this module was split out of client.py.
logger = logging.getLogger("megatron_dapo.engines.client")


class EngineError(MegatronDapoError, RuntimeError):
    """A rollout engine call failed (after retries); the message names URL(s) and the last error."""

    def __init__(self, message: str, *, urls: Sequence[str] = (), status: int | None = None):
        super().__init__(message)
        self.urls = list(urls)
        self.status = status


class EngineLostError(EngineError, RestartableFailure):
    """An engine this run cannot replace died (one named in ``rollout.engine_urls``, e.g. started on its node by
    ``slurm/dapo_disaggregated.sbatch``): the run stops with exit code 4, and the job script's restart starts it
    again."""


def _is_retryable_exc(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
                            ConnectionError))


class EngineTransport:
    """Connection pool, balancing and retry machinery shared by every engine call.

    Constructor arguments are documented on :class:`~megatron_dapo.engines.client.EngineClient`
    (the class to use).

    Raises:
        ValueError: no engine URL and no router, duplicate engine URLs, ``max_retries < 0`` or
            ``prompts_per_request < 1``.
    """

    def __init__(self, engine_urls: Sequence[str] | str = (), *, router_url: str | None = None,
                 api_key: str | None = None, request_timeout_s: float = 3600.0,
                 control_timeout_s: float = 600.0, max_retries: int = 3, retry_backoff_s: float = 0.5,
                 dead_cooldown_s: float = 5.0, prompts_per_request: int = 1) -> None:
        if isinstance(engine_urls, str):
            engine_urls = [engine_urls]
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        if not self.engine_urls and not self.router_url:
            raise ValueError("EngineClient needs at least one engine URL or a router_url")
        if len(set(self.engine_urls)) != len(self.engine_urls):
            raise ValueError(f"duplicate engine URLs: {self.engine_urls}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if prompts_per_request < 1:
            raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
        self.api_key = api_key
        self.request_timeout_s = float(request_timeout_s)
        self.control_timeout_s = float(control_timeout_s)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.dead_cooldown_s = float(dead_cooldown_s)
        self.prompts_per_request = int(prompts_per_request)
        gen_urls = [self.router_url] if self.router_url else self.engine_urls
        self._gen_urls = list(gen_urls)
        self.outstanding: dict[str, int] = {u: 0 for u in self._gen_urls}
        self._dead_until: dict[str, float] = {}
        self._rr = itertools.count()
        self._rid_locations: dict[str, list[tuple[str, list[str]]]] = {}
        self._session = None
        self._session_loop = None
        # engines out of rotation (:meth:`mark_down`: failed; :meth:`mark_warming`: control calls only)
        self._down: dict[str, str] = {}
        self._warming: set[str] = set()
        self._inflight: dict[str, set[asyncio.Task]] = {}
        self.requests_resubmitted = 0
        """Generation requests sent again to another engine after theirs failed (connection lost, timeout, 5xx,
        or the engine left rotation while they ran); counts every request id of a resent batch."""

    # ---- plumbing ----------------------------------------------------------------------
    @property
    def control_urls(self) -> list[str]:
        """URLs that receive control calls: every engine in rotation or warming up (not those marked down); the
        router if no engine URL is known."""
        if not self.engine_urls:
            return [self.router_url]
        return [u for u in self.engine_urls if u not in self._down]

    # ---- rotation (engine health is decided by the owner of the engines: EngineSet) --------------
    @property
    def down_urls(self) -> dict[str, str]:
        """``{url: cause}`` of the engines out of rotation (:meth:`mark_down`)."""
        return dict(self._down)

    def mark_down(self, url: str, cause: str) -> int:
        """Take engine ``url`` out of rotation: no generation request or control call goes to it any more, and
        the generation requests running on it are cancelled here and resent to another engine. Call on the
        client's event loop (:meth:`SyncEngineClient.mark_down` from other threads).

        Returns:
            The number of running requests cancelled (each is resent).

        Raises:
            ValueError: ``url`` is not one of :attr:`engine_urls`.
        """
        url = self._known(url)
        self._down[url] = str(cause)
        self._warming.discard(url)
        tasks = [t for t in self._inflight.get(url, ()) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            logger.warning("engine %s left rotation (%s): resending its %d running request(s)", url, cause, len(tasks))
        return len(tasks)

    def mark_warming(self, url: str) -> None:
        """Engine ``url`` (a replacement) takes control calls (weight pushes, checks) but no generation yet."""
        url = self._known(url)
        self._down.pop(url, None)
        self._warming.add(url)

    def mark_up(self, url: str) -> None:
        """Engine ``url`` is back in rotation (generation and control)."""
        url = self._known(url)
        self._down.pop(url, None)
        self._warming.discard(url)

    def _known(self, url: str) -> str:
        url = url.rstrip("/")
        if url not in self.engine_urls:
            raise ValueError(f"{url} is not one of this client's engines {self.engine_urls}")
        return url

    def _in_rotation(self, url: str) -> bool:
        return url not in self._down and url not in self._warming

    async def _ensure_session(self):
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers,
                                                  connector=aiohttp.TCPConnector(limit=0, force_close=False))
            self._session_loop = loop
        return self._session

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _http(self, method: str, url: str, path: str, payload: Any = None,
                    timeout_s: float | None = None) -> tuple[int, Any]:
        """One HTTP call; returns ``(status, parsed JSON or text)``; raises aiohttp errors."""
        session = await self._ensure_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        async with session.request(method, url + path, json=payload, timeout=timeout) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else None
            except json.JSONDecodeError:
                data = text
            return resp.status, data

    def _pick(self, tried: set[str]) -> str:
        now = time.monotonic()
        usable = [u for u in self._gen_urls if self._in_rotation(u)]
        if not usable:
            down = "; ".join(f"{u}: {self._down.get(u, 'warming up')}" for u in self._gen_urls)
            raise EngineError(f"no engine in rotation ({down})", urls=list(self._gen_urls))
        alive = [u for u in usable if self._dead_until.get(u, 0.0) <= now]
        pool = [u for u in alive if u not in tried] or alive or \
            [u for u in usable if u not in tried] or usable
        lowest = min(self.outstanding[u] for u in pool)
        best = [u for u in pool if self.outstanding[u] == lowest]
        return best[next(self._rr) % len(best)]

    @staticmethod
    def _err_text(status: int, data: Any) -> str:
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                return str(err.get("message", err))
            if err is not None:
                return str(err)
            if "message" in data:
                return str(data["message"])
        return str(data)[:500]

    async def _post_balanced(self, path: str, payload: dict, rids: list[str]) -> tuple[str, Any]:
        """POST to the least-loaded generation URL with retries / failover."""
        tried: set[str] = set()
        last = "no attempt made"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            url = self._pick(tried)
            tried.add(url)
            self.outstanding[url] += 1
            for rid in rids:
                self._rid_locations.setdefault(rid, []).append((url, [rid]))
            call = asyncio.ensure_future(self._http("POST", url, path, payload, self.request_timeout_s))
            self._inflight.setdefault(url, set()).add(call)
            try:
                try:
                    status, data = await call
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if not (call.cancelled() and url in self._down and not (me and me.cancelling())):
                        raise  # the caller cancelled us (abort, shutdown): not an engine failure
                    raise ConnectionError(f"engine left rotation ({self._down[url]})") from None
            except Exception as exc:
                if not _is_retryable_exc(exc):
                    raise EngineError(f"{path} on {url} failed: {type(exc).__name__}: {exc}", urls=[url]) from exc
                last = f"{url}: {type(exc).__name__}: {exc or 'timeout'}"
                self._dead_until[url] = time.monotonic() + self.dead_cooldown_s
                if isinstance(exc, asyncio.TimeoutError):
                    asyncio.ensure_future(self._abort_quietly(url, rids))
            else:
                if status < 400:
                    return url, data
                msg = self._err_text(status, data)
                if status < 500:
                    raise EngineError(f"{path} on {url} rejected the request (HTTP {status}): {msg}",
                                      urls=[url], status=status)
                last = f"{url}: HTTP {status}: {msg}"
            finally:
                self._inflight.get(url, set()).discard(call)
                if not call.done():
                    call.cancel()
                self.outstanding[url] -= 1
                for rid in rids:
                    locs = self._rid_locations.get(rid)
                    if locs:
                        locs[:] = [x for x in locs if x[0] != url]
                        if not locs:
                            self._rid_locations.pop(rid, None)
            logger.warning("%s attempt %d/%d failed (%s)", path, attempt + 1, attempts, last)
            if attempt + 1 < attempts:
                self.requests_resubmitted += len(rids)
                await asyncio.sleep(min(self.retry_backoff_s * (2 ** attempt), 10.0))
        raise EngineError(f"{path} failed after {attempts} attempt(s) on {sorted(tried)}; last error: {last}",
                          urls=sorted(tried))

    def _abort_urls(self, url: str) -> list[str]:
        """Where to abort a request that was sent to ``url``: the URL itself, or every engine when
        it is the router (``sglang-router`` has no ``/abort_request``; it keeps the ``rid``, so the
        engine running the request finds it and the others answer a no-op)."""
        if self.router_url and url == self.router_url and self.engine_urls:
            return list(self.engine_urls)
        return [url]

    async def _abort_quietly(self, url: str, rids: list[str]) -> None:
        for target in self._abort_urls(url):
            for rid in rids:
                try:
                    await self._http("POST", target, "/abort_request", {"rid": rid}, timeout_s=5)
                except Exception:
                    break

    async def _control(self, method: str, path: str, payload: Any = None, *, urls: Sequence[str] | None = None,
                       timeout_s: float | None = None, check_success: bool = True) -> dict[str, Any]:
        """Send one control call to each URL concurrently (retrying connection errors on the same
        URL); returns ``{url: response}``.

        Raises:
            EngineError: any URL failed (HTTP >= 400, ``success: false`` when ``check_success``,
                or connection errors after retries) - names every failing URL.
        """
        urls = list(urls) if urls is not None else self.control_urls

        async def one(url):
            last = ""
            for attempt in range(self.max_retries + 1):
                try:
                    status, data = await self._http(method, url, path, payload, timeout_s or self.control_timeout_s)
                except Exception as exc:
                    if not _is_retryable_exc(exc):
                        return url, None, f"{type(exc).__name__}: {exc}"
                    last = f"{type(exc).__name__}: {exc or 'timeout'}"
                    if attempt < self.max_retries:
                        await asyncio.sleep(min(self.retry_backoff_s * (2 ** attempt), 10.0))
                    continue
                if status >= 400:
                    return url, data, f"HTTP {status}: {self._err_text(status, data)}"
                if check_success and isinstance(data, dict) and data.get("success") is False:
                    return url, data, f"success=false: {data.get('message')}"
                return url, data, None
            return url, None, last

        results = await asyncio.gather(*(one(u) for u in urls))
        errors = [(u, e) for u, _, e in results if e is not None]
        if errors:
            detail = "; ".join(f"{u}: {e}" for u, e in errors)
            raise EngineError(f"{path} failed on {len(errors)}/{len(urls)} engine(s): {detail}",
                              urls=[u for u, _ in errors])
        return {u: d for u, d, _ in results}
