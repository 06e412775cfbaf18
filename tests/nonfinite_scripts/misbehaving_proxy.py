"""A misbehaving engine for tests/test_nonfinite.py: an aiohttp server that forwards every request to a real
engine (``upstream``: our CPU engine, an SGLang server or a vLLM server) and corrupts chosen generation answers:
the items of SGLang's ``/generate`` (our CPU engine speaks it too) and the choices of vLLM's
``/inference/v1/generate``.

Items are numbered across all generation answers in arrival order (a batched answer's list in its order, a vLLM
answer's choices by ``index``).
``plan`` maps an item number to a corruption; ``corrupt_all`` corrupts every item. Corruptions (each keeps the
answer parseable by :func:`megatron_dapo.engines.payloads.parse_generate_response` and
:func:`megatron_dapo.engines.vllm_client.parse_vllm_generate_response`):

* ``oov``: the first token id becomes ``vocab_size + 7`` (in ``output_ids`` and ``output_token_logprobs``);
* ``nan_logprob``: the first logprob becomes NaN (JSON ``NaN``, as Python's json writes it);
* ``wrong_length``: the last ``output_token_logprobs`` entry is removed.

An item without tokens cannot be corrupted; the corruption moves to the next item. ``corrupted`` lists
``(item number, kind)`` of what was done. Use as ``with MisbehavingProxy(url, vocab_size=...) as p: p.url``.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Optional

import aiohttp
from aiohttp import web

KINDS = ("oov", "nan_logprob", "wrong_length")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


class MisbehavingProxy:
    def __init__(self, upstream: str, *, vocab_size: int, plan: Optional[dict[int, str]] = None,
                 corrupt_all: Optional[str] = None, host: str = "127.0.0.1") -> None:
        for kind in list((plan or {}).values()) + ([corrupt_all] if corrupt_all else []):
            if kind not in KINDS:
                raise ValueError(f"unknown corruption {kind!r}; one of {KINDS}")
        self.upstream = upstream.rstrip("/")
        self.vocab_size = int(vocab_size)
        self.plan = dict(plan or {})
        self.corrupt_all = corrupt_all
        self.host = host
        self.corrupted: list[tuple[int, str]] = []
        self.items_seen = 0
        self.requests = 0
        self._carry: list[str] = []  # corruptions moved on from items without tokens
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self.url = ""

    # ------------------------------------------------------------------ corruption
    def _corrupt(self, item: dict, kind: str) -> bool:
        if "token_ids" in item:  # a vLLM choice: logprobs.content = [{"token_id", "logprob", ...}]
            ids = item.get("token_ids")
            entries = (item.get("logprobs") or {}).get("content")
            id_key, lp_key = "token_id", "logprob"
        else:  # an SGLang item: meta_info.output_token_logprobs = [[logprob, token id, text]]
            ids = item.get("output_ids")
            entries = (item.get("meta_info") or {}).get("output_token_logprobs")
            id_key, lp_key = 1, 0
        if not ids or not entries:
            return False
        if kind == "oov":
            bad = self.vocab_size + 7
            ids[0] = bad
            entries[0][id_key] = bad
        elif kind == "nan_logprob":
            entries[0][lp_key] = float("nan")
        else:
            entries.pop()
        return True

    def _rewrite(self, data):
        if isinstance(data, dict) and isinstance(data.get("choices"), list):
            items = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
        else:
            items = data if isinstance(data, list) else [data]
        for item in items:
            n = self.items_seen
            self.items_seen += 1
            want = [self.corrupt_all] if self.corrupt_all else self._carry + ([self.plan[n]] if n in self.plan else [])
            self._carry = []
            if not want:
                continue
            if self._corrupt(item, want[0]):
                self.corrupted.append((n, want[0]))
                self._carry = want[1:] if not self.corrupt_all else []
            elif not self.corrupt_all:
                self._carry = want
        return data

    # ------------------------------------------------------------------ server
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = self.upstream + request.path_qs
        async with self._session.request(request.method, url, data=body, headers=headers) as resp:
            payload = await resp.read()
            status, ctype = resp.status, resp.headers.get("Content-Type", "application/json")
        if request.path in ("/generate", "/inference/v1/generate") and status == 200:
            data = self._rewrite(json.loads(payload))
            payload = json.dumps(data).encode()  # allow_nan: NaN stays a JSON NaN literal
        return web.Response(body=payload, status=status, content_type=ctype.split(";")[0])

    async def _start(self, port: int) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, port).start()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def start(self) -> "MisbehavingProxy":
        with socket.socket() as s:
            s.bind((self.host, 0))
            port = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="misbehaving-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(port), self._loop).result(30)
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "MisbehavingProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
