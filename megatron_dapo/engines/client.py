"""Async client for SGLang's native HTTP API (real SGLang servers and the CPU engine alike).

Generation requests are balanced across data-parallel engines by least-outstanding-requests
(or all sent to one ``router_url``, e.g. an ``sglang-router``); control calls (weight updates,
memory release / resume, cache flush, abort) go to every engine.  Through a router every flat item
(prompt x sample) is its own ``/generate`` request, which ``sglang-router`` 0.3.x requires and which
lets it spread one batch over all engines.  Connection errors, timeouts and
5xx answers are retried with exponential back-off on another engine; when retries run out an
:class:`EngineError` names the URL(s) tried and the last error — a dead engine never hangs a
rollout.  That machinery is :class:`~megatron_dapo.engines.transport.EngineTransport`, the base
class of :class:`EngineClient`; this module adds SGLang's endpoints on top of it.

The JSON bodies (SGLang's ``GenerateReqInput`` / ``SamplingParams`` and the weight-update
requests) are built and parsed by the pure helpers of :mod:`megatron_dapo.engines.payloads`.
Those helpers, :class:`EngineError` and :class:`GenerateOutput` are all importable from here.

``n > 1`` is expanded CLIENT-side exactly as SGLang expands it (``input_ids * n``, sample-major),
each copy with ``n = 1`` and, when ``sampling_seed`` is set, seed ``sampling_seed + k`` for flat
item ``k`` so copies differ; results are returned prompt-major: ``outputs[i * n + j]`` is sample
``j`` of prompt ``i``.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import torch

# Re-exported: these names were defined here before payloads.py / transport.py were split out,
# and callers import them from this module.
from megatron_dapo.engines.payloads import (  # noqa: F401
    _FIELD_HINTS, FINISH_REASONS, SGLANG_SAMPLING_FIELDS, GenerateOutput, _check_prompts, _finish_reason,
    build_generate_payload, build_init_weights_update_group_payload,
    build_update_weights_from_distributed_payload, parse_generate_response,
    reorder_sample_major_to_prompt_major, serialize_named_tensors_for_sglang, validate_sampling_params,
)
from megatron_dapo.engines.transport import EngineError, EngineTransport, _is_retryable_exc, logger  # noqa: F401
from megatron_dapo.engines.update_group import create_weight_update_group


WEIGHT_UPDATE_BRACKET_SINCE = (0, 5, 23)
"""SGLang versions from this one on reject ``/update_weights_from_tensor`` and
``/update_weights_from_distributed`` (HTTP 400) unless they run between ``POST /begin_weight_update``
and ``POST /end_weight_update`` (``BeginWeightUpdateReqInput`` / ``EndWeightUpdateReqInput``); older
servers have no such routes."""


def parse_server_version(version) -> tuple[int, ...] | None:
    """``"0.5.23"`` / ``"0.5.10rc0"`` / ``"0.5.3.post1"`` -> ``(0, 5, 23)`` / ``(0, 5, 10)`` / ``(0, 5, 3)``;
    ``None`` when absent or not a dotted number (the CPU engine reports none)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version)) if version is not None else None
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def needs_weight_update_bracket(server_info) -> bool:
    """Whether a server whose ``/get_server_info`` answered ``server_info`` needs the
    begin/end bracket around tensor / distributed weight updates (SGLang >= :data:`WEIGHT_UPDATE_BRACKET_SINCE`)."""
    version = parse_server_version(server_info.get("version")) if isinstance(server_info, dict) else None
    return version is not None and version >= WEIGHT_UPDATE_BRACKET_SINCE


class EngineClient(EngineTransport):
    """Async client for one or more SGLang-API engines (see module docstring).

    Args:
        engine_urls: base URLs (``http://host:port``) of the data-parallel engines; control
            calls go to all of them.
        router_url: optional router (e.g. ``sglang-router``) URL; when set, generation goes to it
            (no client-side balancing, one ``/generate`` request per flat item) and control calls
            - aborts of routed requests included - still go to ``engine_urls``.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        request_timeout_s: total timeout per HTTP request (generation included).
        control_timeout_s: timeout for control calls (weight updates can be slow).
        max_retries: retries after the first attempt on connection errors / timeouts / 5xx.
        retry_backoff_s: first back-off; doubles each retry (capped at 10 s).
        dead_cooldown_s: how long an engine that failed with a connection error is avoided.
        prompts_per_request: prompts per ``/generate`` HTTP request (with their ``n`` samples).

    Use as ``async with EngineClient([...]) as c: outs = await c.generate(...)``.
    """

    async def __aenter__(self) -> "EngineClient":
        await self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- generation --------------------------------------------------------------------
    async def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict, *,
                       return_logprob: bool = True, rid: str | None = None,
                       logprob_start_len: int | None = None) -> list[GenerateOutput]:
        """Generate ``n = sampling_params.get("n", 1)`` samples per prompt.

        Args:
            input_ids: ``B`` prompts (token ids).
            sampling_params: SGLang ``SamplingParams`` fields (``max_new_tokens``,
                ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``n``,
                ``sampling_seed``, ``ignore_eos`` ...).
            return_logprob: request ``output_token_logprobs``.
            rid: id prefix; ``abort(rid)`` cancels the whole call.
            logprob_start_len: SGLang's field, forwarded.

        Returns:
            ``B * n`` :class:`GenerateOutput`, prompt-major (``[i * n + j]``).

        Raises:
            ValueError: bad inputs.  EngineError: engine failure after retries / 4xx answer.
        """
        prompts = _check_prompts(input_ids)
        sp = validate_sampling_params(sampling_params)
        n = int(sp.get("n", 1))
        prefix = rid if rid is not None else uuid.uuid4().hex
        seed = sp.get("sampling_seed")
        chunks = [prompts[s:s + self.prompts_per_request] for s in range(0, len(prompts), self.prompts_per_request)]

        async def run_chunk(ci: int, chunk: list[list[int]]) -> list[GenerateOutput]:
            csp = dict(sp)
            if seed is not None:
                csp["sampling_seed"] = int(seed) + ci * self.prompts_per_request * n
            payload = build_generate_payload(chunk, csp, return_logprob=return_logprob, rid=f"{prefix}-c{ci}",
                                             logprob_start_len=logprob_start_len)
            url, outs = await self._post_generate(payload)
            return reorder_sample_major_to_prompt_major(outs, len(chunk), n)

        parts = await asyncio.gather(*(run_chunk(ci, c) for ci, c in enumerate(chunks)))
        return [o for part in parts for o in part]

    async def _post_generate(self, payload: dict) -> tuple[str, list[GenerateOutput]]:
        """POST one batched ``/generate`` body (from :func:`build_generate_payload`); returns the URL
        that answered and the parsed items in payload order.

        Through a router the batch is sent as one single-item request per flat item, concurrently:
        ``sglang-router`` 0.3.x deserialises ``/generate`` into a typed request whose ``rid`` is one
        string and ``sampling_params`` one object (a batch with per-item seeds / rids is rejected
        with HTTP 422), and single items also let the router spread one batch over all engines.

        Raises:
            EngineError: engine / router failure after retries, or a malformed response.
        """
        if self.router_url and isinstance(payload["rid"], list):
            keys = [k for k, v in payload.items() if isinstance(v, list)]
            items = [{k: (v[i] if k in keys else v) for k, v in payload.items()} for i in range(len(payload["rid"]))]
            parts = await asyncio.gather(*(self._post_generate(item) for item in items))
            return self.router_url, [o for _, outs in parts for o in outs]
        rids = payload["rid"] if isinstance(payload["rid"], list) else [payload["rid"]]
        url, data = await self._post_balanced("/generate", payload, rids)
        try:
            outs = parse_generate_response(data, engine_url=url)
        except ValueError as exc:
            raise EngineError(f"/generate on {url} returned a malformed response: {exc}", urls=[url]) from exc
        if len(outs) != len(rids):
            raise EngineError(f"/generate on {url} answered {len(outs)} item(s) for {len(rids)} input(s)", urls=[url])
        return url, outs

    async def score(self, sequences: Sequence[Sequence[int]], start_lens: int | Sequence[int] = 0, *,
                    temperature: float = 1.0) -> list[list[float | None]]:
        """Score given sequences: ``input_token_logprobs`` of tokens ``seq[start:]``.

        Sends ``max_new_tokens = 0``, ``return_logprob = True``, ``logprob_start_len = max(start - 1, 0)``
        and drops the extra first entry: SGLang 0.5.x answers ``None`` for the first position it
        reports whatever ``logprob_start_len`` is, so asking one position earlier makes
        ``seq[start]`` scored on every engine.  Position 0 (no context) scores ``None``.

        Returns:
            per sequence, ``len(seq) - start`` logprobs.

        Raises:
            ValueError: ``start`` outside ``[0, len(seq))``.  EngineError: engine failure.
        """
        seqs = _check_prompts(sequences)
        starts = [int(start_lens)] * len(seqs) if isinstance(start_lens, int) else [int(s) for s in start_lens]
        if len(starts) != len(seqs):
            raise ValueError(f"start_lens has {len(starts)} entries for {len(seqs)} sequences")
        for i, (s, st) in enumerate(zip(seqs, starts)):
            if not 0 <= st < len(s):
                raise ValueError(f"start_lens[{i}]={st} outside [0, {len(s)})")
        asked = [max(st - 1, 0) for st in starts]
        payload = build_generate_payload(seqs, {"max_new_tokens": 0, "temperature": float(temperature)},
                                         return_logprob=True, logprob_start_len=asked)
        url, outs = await self._post_generate(payload)
        res = []
        for i, o in enumerate(outs):
            if o.input_logprobs is None or len(o.input_logprobs) != len(seqs[i]) - asked[i]:
                raise EngineError(f"/generate on {url}: input_token_logprobs missing or of wrong length for "
                                  f"sequence {i}", urls=[url])
            res.append([None] + o.input_logprobs[1:] if starts[i] == 0 else o.input_logprobs[1:])
        return res

    async def abort(self, rid: str | None = None) -> int:
        """Abort the in-flight items of ``generate(..., rid=rid)`` (all requests if ``rid`` is None).

        Returns:
            number of abort calls sent.
        """
        if rid is None:
            await self.abort_all()
            return len(self.control_urls)
        targets = [(u, item) for key, locs in list(self._rid_locations.items())
                   if key.startswith(f"{rid}-") or key == rid for url, items in locs for item in items
                   for u in self._abort_urls(url)]
        await asyncio.gather(*(self._control("POST", "/abort_request", {"rid": item}, urls=[url],
                                             check_success=False) for url, item in targets))
        return len(targets)

    async def abort_all(self) -> dict[str, Any]:
        """``POST /abort_request {"abort_all": true}`` on every engine (``sglang-router`` has no
        ``/abort_request`` route: with a router, the engines behind it are aborted directly)."""
        return await self._control("POST", "/abort_request", {"abort_all": True}, urls=self.control_urls,
                                   check_success=False)

    # ---- control -----------------------------------------------------------------------
    async def flush_cache(self) -> dict[str, Any]:
        """``POST /flush_cache`` on every engine."""
        return await self._control("POST", "/flush_cache", None, check_success=False)

    async def health(self, timeout_s: float = 5.0) -> dict[str, bool]:
        """``GET /health`` on every engine; ``{url: healthy}`` (never raises for a dead engine)."""
        async def one(u):
            try:
                status, _ = await self._http("GET", u, "/health", None, timeout_s)
                return u, status == 200
            except Exception:
                return u, False
        return dict(await asyncio.gather(*(one(u) for u in self.control_urls)))

    async def health_generate(self, timeout_s: float = 60.0) -> dict[str, bool]:
        """``GET /health_generate`` (runs a 1-token generation) on every engine."""
        async def one(u):
            try:
                status, _ = await self._http("GET", u, "/health_generate", None, timeout_s)
                return u, status == 200
            except Exception:
                return u, False
        return dict(await asyncio.gather(*(one(u) for u in self.control_urls)))

    async def get_server_info(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """``GET /get_server_info`` (SGLang's server args + runtime state: ``tp_size``, ...) per
        engine: ``{url: info}`` for ``urls`` (default: every engine).

        Raises:
            EngineError: an engine failed / answered HTTP >= 400 (names every failing URL).
        """
        return await self._control("GET", "/get_server_info", None, urls=urls, check_success=False)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict[str, Any]:
        """``POST /destroy_weights_update_group {"group_name": group_name}`` on every engine
        (SGLang's ``DestroyWeightsUpdateGroupReqInput``); ``{url: response}``.

        Raises:
            EngineError: an engine failed or answered HTTP >= 400 (e.g. no such group).
        """
        return await self._control("POST", "/destroy_weights_update_group", {"group_name": str(group_name)},
                                   check_success=False)

    async def get_model_info(self) -> dict[str, Any]:
        """``GET /get_model_info`` (``/model_info`` on newer SGLang) on every engine."""
        out = {}
        for u in self.control_urls:
            status, data = await self._http("GET", u, "/get_model_info", None, self.control_timeout_s)
            if status == 404:
                status, data = await self._http("GET", u, "/model_info", None, self.control_timeout_s)
            if status >= 400:
                raise EngineError(f"get_model_info on {u}: HTTP {status}: {self._err_text(status, data)}", urls=[u])
            out[u] = data
        return out

    async def get_weight_version(self) -> dict[str, str]:
        """Weight version per engine (``/get_weight_version``, falling back to ``/weight_version`` and
        ``/model_info`` as SGLang renamed the route across versions)."""
        out = {}
        for u in self.control_urls:
            version = None
            for path in ("/get_weight_version", "/weight_version", "/get_model_info", "/model_info"):
                try:
                    status, data = await self._http("GET", u, path, None, self.control_timeout_s)
                except Exception as exc:
                    raise EngineError(f"get_weight_version on {u}: {type(exc).__name__}: {exc}", urls=[u]) from exc
                if status < 400 and isinstance(data, dict) and "weight_version" in data:
                    version = str(data["weight_version"])
                    break
            if version is None:
                raise EngineError(f"{u} reports no weight_version on any known route", urls=[u])
            out[u] = version
        return out

    async def get_weights_by_name(self, name: str, truncate_size: int = 100) -> dict[str, Any]:
        """``/get_weights_by_name`` (``GetWeightsByNameReqInput``): ``param[:truncate_size]`` as nested
        lists, per engine (debug / verification of weight sync)."""
        return await self._control("POST", "/get_weights_by_name",
                                   {"name": name, "truncate_size": int(truncate_size)}, check_success=False)

    async def wait_until_idle(self, timeout_s: float = 120.0, poll_s: float = 0.05, settle_polls: int = 3) -> float:
        """Wait until every engine reports no running and no waiting request (``GET /v1/loads``, SGLang 0.5.x:
        ``num_running_reqs`` + ``num_waiting_reqs`` summed over its DP ranks) on ``settle_polls`` polls in a
        row (the loads are a snapshot the scheduler publishes, one iteration behind). Aborted requests are
        still being retired for a moment after their HTTP responses return. An engine without the route
        (HTTP 404: an SGLang older than ``/v1/loads``) is not waited for. Returns the seconds waited.

        Raises:
            EngineError: an engine failed, or was still busy after ``timeout_s`` (names the URL).
        """
        t0 = time.monotonic()
        for u in self.control_urls:
            quiet = 0
            while quiet < settle_polls:
                try:
                    status, data = await self._http("GET", u, "/v1/loads", None, self.control_timeout_s)
                except Exception as exc:
                    raise EngineError(f"GET /v1/loads on {u}: {type(exc).__name__}: {exc}", urls=[u]) from exc
                if status == 404:
                    break
                if status >= 400 or not isinstance(data, dict):
                    raise EngineError(f"GET /v1/loads on {u}: HTTP {status}: {str(data)[:200]}", urls=[u])
                busy = sum(int(x.get("num_running_reqs", 0)) + int(x.get("num_waiting_reqs", 0))
                           for x in data.get("loads", []))
                quiet = quiet + 1 if busy == 0 else 0
                if time.monotonic() - t0 > timeout_s:
                    raise EngineError(f"{u} still has {busy} request(s) in flight after {timeout_s:.0f}s", urls=[u])
                if quiet < settle_polls:
                    await asyncio.sleep(poll_s)
        return time.monotonic() - t0

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /release_memory_occupation {"tags": tags}`` (None = all: weights + kv_cache), once every engine
        is idle (:meth:`wait_until_idle`): SGLang asserts an idle scheduler there, and the failed assertion
        kills the server."""
        await self.wait_until_idle()
        return await self._control("POST", "/release_memory_occupation",
                                   {"tags": list(tags) if tags is not None else None})

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /resume_memory_occupation {"tags": tags}``."""
        return await self._control("POST", "/resume_memory_occupation",
                                   {"tags": list(tags) if tags is not None else None})

    async def update_weights_from_disk(self, path: str, weight_version: str | None = None, *,
                                       abort_all_requests: bool = False) -> dict[str, Any]:
        """``POST /update_weights_from_disk`` (``UpdateWeightFromDiskReqInput``) on every engine."""
        body: dict[str, Any] = {"model_path": str(path), "abort_all_requests": bool(abort_all_requests)}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return await self._control("POST", "/update_weights_from_disk", body)

    async def init_weights_update_group(self, master_address: str, master_port: int, *,
                                        group_name: str = "weight_update_group", backend: str = "nccl",
                                        tp_size: int = 1) -> dict[str, Any]:
        """Ask every engine to join the weight-update group (blocks until the trainer joins too).

        Engine ``e`` gets ``rank_offset = 1 + e * tp_size`` and ``world_size = 1 +
        num_engines * tp_size`` (rank 0 = trainer).  Run concurrently with the trainer's
        :func:`~megatron_dapo.engines.update_group.create_weight_update_group` (or use
        :meth:`connect_weight_update_group`).
        """
        world = 1 + len(self.control_urls) * tp_size

        async def one(e, url):
            body = build_init_weights_update_group_payload(master_address, master_port, 1 + e * tp_size,
                                                           world, group_name, backend)
            return await self._control("POST", "/init_weights_update_group", body, urls=[url])

        res = await asyncio.gather(*(one(e, u) for e, u in enumerate(self.control_urls)))
        return {k: v for d in res for k, v in d.items()}

    async def connect_weight_update_group(self, master_address: str, master_port: int, *,
                                          group_name: str = "weight_update_group", backend: str = "gloo",
                                          tp_size: int = 1, timeout_s: float = 120.0):
        """Trainer side: create rank 0 of the group while the engines join; returns the
        :class:`~megatron_dapo.engines.update_group.WeightUpdateGroup`."""
        world = 1 + len(self.control_urls) * tp_size
        trainer = asyncio.get_running_loop().run_in_executor(
            None, lambda: create_weight_update_group(master_address, master_port, 0, world, backend=backend,
                                                     timeout_s=timeout_s, group_name=group_name))
        engines = asyncio.ensure_future(self.init_weights_update_group(
            master_address, master_port, group_name=group_name, backend=backend, tp_size=tp_size))
        group, _ = await asyncio.gather(trainer, engines)
        return group

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                              shapes: Sequence[Sequence[int]], *,
                                              group_name: str = "weight_update_group",
                                              weight_version: str | None = None, flush_cache: bool = True,
                                              abort_all_requests: bool = False) -> dict[str, Any]:
        """``POST /update_weights_from_distributed`` on every engine (inside begin/end_weight_update
        where the server needs it); they then receive each tensor by broadcast from rank 0 in the
        order of ``names`` (the trainer must broadcast concurrently - see :meth:`push_weights_distributed`)."""
        body = build_update_weights_from_distributed_payload(
            names, dtypes, shapes, group_name=group_name, flush_cache=flush_cache,
            weight_version=weight_version, abort_all_requests=abort_all_requests)
        return await self._bracketed("/update_weights_from_distributed", body)

    async def push_weights_distributed(self, group, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                                       group_name: str = "weight_update_group",
                                       weight_version: str | None = None) -> dict[str, Any]:
        """Trainer side of a distributed update: announce ``names/dtypes/shapes`` to every engine and
        broadcast each tensor (rank 0 = src) through ``group`` in the same order.

        Raises:
            EngineError: an engine rejected / failed the update.
        """
        tensors = [(str(k), v.detach().contiguous()) for k, v in named_tensors]
        names = [k for k, _ in tensors]
        dtypes = [v.dtype for _, v in tensors]
        shapes = [list(v.shape) for _, v in tensors]
        announce = asyncio.ensure_future(self.update_weights_from_distributed(
            names, dtypes, shapes, group_name=group_name, weight_version=weight_version))

        def send():
            for _, t in tensors:
                group.broadcast(t, src=0)

        try:
            await asyncio.get_running_loop().run_in_executor(None, send)
        except BaseException:
            announce.cancel()  # the broadcast broke (e.g. an engine died): its announcement's outcome is moot
            await asyncio.gather(announce, return_exceptions=True)
            raise
        return await announce

    async def update_weights_from_tensor(self, serialized_named_tensors: list, *, load_format: str | None = None,
                                         flush_cache: bool = True, weight_version: str | None = None) -> dict[str, Any]:
        """``POST /update_weights_from_tensor`` (``UpdateWeightsFromTensorReqInput``: one serialized
        string per TP rank, see :func:`serialize_named_tensors_for_sglang`; ``load_format`` ``None`` for a
        list of ``(name, tensor)`` or ``"flattened_bucket"`` for
        :func:`~megatron_dapo.engines.tensor_ipc.serialize_flattened_bucket`): CUDA-IPC handles on GPU,
        shared-memory handles on CPU (same host).  Bracketed by begin/end_weight_update where the
        server needs it (:meth:`weight_update_session`)."""
        body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                                "load_format": load_format, "flush_cache": bool(flush_cache)}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return await self._bracketed("/update_weights_from_tensor", body)

    # ---- weight-update sessions (SGLang >= 0.5.23) ------------------------------------------------
    async def weight_update_bracket(self, urls: Sequence[str] | None = None) -> dict[str, bool]:
        """``{url: needs begin/end_weight_update}`` from each engine's ``/get_server_info`` version
        (cached per URL; an engine whose info cannot be read counts as not needing it)."""
        urls = list(urls) if urls is not None else self.control_urls
        cache = self.__dict__.setdefault("_bracket", {})
        todo = [u for u in urls if u not in cache]

        async def one(u):
            try:
                status, data = await self._http("GET", u, "/get_server_info", None, self.control_timeout_s)
            except Exception:
                return u, False
            return u, status < 400 and needs_weight_update_bracket(data)

        for u, need in await asyncio.gather(*(one(u) for u in todo)):
            cache[u] = need
        return {u: cache[u] for u in urls}

    async def begin_weight_update(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /begin_weight_update {}`` (SGLang ``BeginWeightUpdateReqInput``) on ``urls``.

        Raises:
            EngineError: an engine refused (e.g. a session is already open) or failed."""
        return await self._control("POST", "/begin_weight_update", {}, urls=urls)

    async def end_weight_update(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /end_weight_update {}`` (SGLang ``EndWeightUpdateReqInput``) on ``urls``.

        Raises:
            EngineError: an engine refused (no session open) or failed."""
        return await self._control("POST", "/end_weight_update", {}, urls=urls)

    async def _bracketed(self, path: str, body: dict, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """POST a tensor / distributed weight update to every engine, each inside its own
        begin/end_weight_update session where it needs one.  A server that answers HTTP 400 naming
        ``begin_weight_update`` (a version this client did not recognise) is marked and retried
        bracketed - only for tensor updates: a distributed update's broadcast cannot be replayed.

        Raises:
            EngineError: any engine failed (the update's error wins over a failing end call).
        """
        urls = list(urls) if urls is not None else self.control_urls
        need = await self.weight_update_bracket(urls)

        async def one(url):
            if need[url]:
                await self.begin_weight_update([url])
                try:
                    return await self._control("POST", path, body, urls=[url])
                finally:
                    try:
                        await self.end_weight_update([url])
                    except EngineError as exc:
                        logger.warning("end_weight_update on %s: %s", url, exc)
            try:
                return await self._control("POST", path, body, urls=[url])
            except EngineError as exc:
                if path != "/update_weights_from_tensor" or "begin_weight_update" not in str(exc):
                    raise
            self._bracket[url] = need[url] = True
            return await one(url)

        results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if len(errors) == 1 or not all(isinstance(e, EngineError) for e in errors):
                raise errors[0]
            raise EngineError("; ".join(str(e) for e in errors), urls=[u for e in errors for u in e.urls])
        return {k: v for d in results for k, v in d.items()}


class SyncEngineClient:
    """Blocking client over :class:`EngineClient` for the (synchronous) trainer: the
    :class:`~megatron_dapo.engines.protocols.RolloutEngine` of the CPU engine and SGLang.

    Runs a private event loop in a daemon thread; each method below is the coroutine of the same name on
    :attr:`client`, run there and waited for (same arguments, same result, same exceptions). Code that needs
    the async client itself (the rollout driver, evaluation) uses :attr:`client` with :meth:`run`.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-client-loop", daemon=True)
        self._thread.start()
        self.client = self._make_client(*args, **kwargs)

    def _make_client(self, *args, **kwargs) -> EngineClient:
        return EngineClient(*args, **kwargs)

    def run(self, coro, timeout: float | None = None):
        """Run ``coro`` on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- attributes of the async client ------------------------------------------------------
    @property
    def control_urls(self) -> list[str]:
        """Every engine's base URL (control calls go to each)."""
        return self.client.control_urls

    @property
    def engine_urls(self) -> list[str]:
        return self.client.engine_urls

    # ---- rotation (:class:`~megatron_dapo.engines.protocols.EngineRotation`; any thread but the loop's) ------
    @property
    def requests_resubmitted(self) -> int:
        """:attr:`EngineTransport.requests_resubmitted`."""
        return self.client.requests_resubmitted

    @property
    def down_urls(self) -> dict[str, str]:
        """:attr:`EngineTransport.down_urls`."""
        return self.client.down_urls

    def _on_loop(self, fn, *args):
        async def call():
            return fn(*args)
        return self.run(call())

    def mark_down(self, url: str, cause: str) -> int:
        """:meth:`EngineTransport.mark_down`, run on the client's loop."""
        return self._on_loop(self.client.mark_down, url, cause)

    def mark_warming(self, url: str) -> None:
        """:meth:`EngineTransport.mark_warming`, run on the client's loop."""
        self._on_loop(self.client.mark_warming, url)

    def mark_up(self, url: str) -> None:
        """:meth:`EngineTransport.mark_up`, run on the client's loop."""
        self._on_loop(self.client.mark_up, url)

    @property
    def router_url(self) -> str | None:
        return self.client.router_url

    @property
    def api_key(self) -> str | None:
        return self.client.api_key

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict, **kwargs) -> list[GenerateOutput]:
        """:meth:`EngineClient.generate`."""
        return self.run(self.client.generate(input_ids, sampling_params, **kwargs))

    def score(self, sequences: Sequence[Sequence[int]], start_lens: int | Sequence[int] = 0, *,
              temperature: float = 1.0) -> list[list[float | None]]:
        """:meth:`EngineClient.score`."""
        return self.run(self.client.score(sequences, start_lens, temperature=temperature))

    def abort(self, rid: str | None = None) -> int:
        """:meth:`EngineClient.abort`."""
        return self.run(self.client.abort(rid))

    def abort_all(self) -> dict[str, Any]:
        """:meth:`EngineClient.abort_all`."""
        return self.run(self.client.abort_all())

    def flush_cache(self) -> dict[str, Any]:
        """:meth:`EngineClient.flush_cache`."""
        return self.run(self.client.flush_cache())

    # ---- state ----------------------------------------------------------------------------------
    def health(self, timeout_s: float = 5.0) -> dict[str, bool]:
        """:meth:`EngineClient.health`."""
        return self.run(self.client.health(timeout_s))

    def health_generate(self, timeout_s: float = 60.0) -> dict[str, bool]:
        """:meth:`EngineClient.health_generate`."""
        return self.run(self.client.health_generate(timeout_s))

    def get_server_info(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`EngineClient.get_server_info`."""
        return self.run(self.client.get_server_info(urls))

    def get_model_info(self) -> dict[str, Any]:
        """:meth:`EngineClient.get_model_info`."""
        return self.run(self.client.get_model_info())

    def get_weight_version(self) -> dict[str, str]:
        """:meth:`EngineClient.get_weight_version`."""
        return self.run(self.client.get_weight_version())

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> dict[str, Any]:
        """:meth:`EngineClient.get_weights_by_name`."""
        return self.run(self.client.get_weights_by_name(name, truncate_size))

    # ---- memory (colocated engines) ---------------------------------------------------------
    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`EngineClient.release_memory_occupation`."""
        return self.run(self.client.release_memory_occupation(tags))

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`EngineClient.resume_memory_occupation`."""
        return self.run(self.client.resume_memory_occupation(tags))

    # ---- weight updates -------------------------------------------------------------------------
    def update_weights_from_disk(self, path: str, weight_version: str | None = None, **kwargs) -> dict[str, Any]:
        """:meth:`EngineClient.update_weights_from_disk`."""
        return self.run(self.client.update_weights_from_disk(path, weight_version, **kwargs))

    def init_weights_update_group(self, master_address: str, master_port: int, **kwargs) -> dict[str, Any]:
        """:meth:`EngineClient.init_weights_update_group`."""
        return self.run(self.client.init_weights_update_group(master_address, master_port, **kwargs))

    def connect_weight_update_group(self, master_address: str, master_port: int, **kwargs):
        """:meth:`EngineClient.connect_weight_update_group`."""
        return self.run(self.client.connect_weight_update_group(master_address, master_port, **kwargs))

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                        shapes: Sequence[Sequence[int]], **kwargs) -> dict[str, Any]:
        """:meth:`EngineClient.update_weights_from_distributed`."""
        return self.run(self.client.update_weights_from_distributed(names, dtypes, shapes, **kwargs))

    def push_weights_distributed(self, group, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                 **kwargs) -> dict[str, Any]:
        """:meth:`EngineClient.push_weights_distributed`."""
        return self.run(self.client.push_weights_distributed(group, named_tensors, **kwargs))

    def update_weights_from_tensor(self, serialized_named_tensors: list, **kwargs) -> dict[str, Any]:
        """:meth:`EngineClient.update_weights_from_tensor`."""
        return self.run(self.client.update_weights_from_tensor(serialized_named_tensors, **kwargs))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict[str, Any]:
        """:meth:`EngineClient.destroy_weights_update_group`."""
        return self.run(self.client.destroy_weights_update_group(group_name))

    def weight_update_bracket(self, urls: Sequence[str] | None = None) -> dict[str, bool]:
        """:meth:`EngineClient.weight_update_bracket`."""
        return self.run(self.client.weight_update_bracket(urls))

    def begin_weight_update(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`EngineClient.begin_weight_update`."""
        return self.run(self.client.begin_weight_update(urls))

    def end_weight_update(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """:meth:`EngineClient.end_weight_update`."""
        return self.run(self.client.end_weight_update(urls))

    def close(self) -> None:
        """Close the session and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self.run(self.client.close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> "SyncEngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
