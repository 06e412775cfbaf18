"""CPU rollout engine speaking SGLang's native HTTP API, backed by HF transformers (fp32).

Run::

    python -m megatron_dapo.engines.cpu.server --model-path DIR --host 127.0.0.1 --port P \
        [--api-key K] [--seed S] [--max-batch-size 64] [--num-threads 1]

It is a drop-in stand-in for ``python -m sglang.launch_server`` at tiny scale so that the same
:class:`megatron_dapo.engines.client.EngineClient` drives both.  Endpoints and payloads follow
SGLang's native API (``io_struct.GenerateReqInput``, ``sampling_params.SamplingParams``,
``UpdateWeightFromDiskReqInput``, ``InitWeightsUpdateGroupReqInput``,
``UpdateWeightsFromDistributedReqInput``, ``ReleaseMemoryOccupationReqInput``, ``AbortReq``):

``POST /generate``
    ``input_ids`` (``list[int]`` or ``list[list[int]]``), ``sampling_params`` (dict or one per
    prompt: ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``stop_token_ids``,
    ``n``, ``sampling_seed``, ``ignore_eos``), ``return_logprob``, ``logprob_start_len``, ``rid``.
    With ``n > 1`` the inputs are expanded like SGLang (``input_ids * n``: output ``k`` belongs
    to prompt ``k % batch_size``); copy ``j`` of a seeded request uses ``sampling_seed + j``
    (SGLang would reuse the same seed and produce identical copies).  Each item answers
    ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
    "completion_tokens", "cached_tokens", "weight_version", "output_token_logprobs",
    "input_token_logprobs", "e2e_latency"}}``; a batched input answers a list.

    Log-probabilities: ``output_token_logprobs[i] = [logprob, token_id, None]`` where
    ``logprob = log_softmax(logits / T)[token_id]`` of the temperature-scaled distribution
    BEFORE top-p / top-k truncation (``T = 1`` when ``temperature == 0`` = greedy).  The trainer
    computes exactly this quantity from the actor.  ``input_token_logprobs`` (when
    ``logprob_start_len >= 0``) score the prompt tokens ``input_ids[logprob_start_len:]`` with
    the same temperature; the entry of position 0 has logprob ``None`` (no context), as in
    SGLang.  ``max_new_tokens == 0`` scores a given sequence without generating.
    A generated stop / EOS token is included in ``output_ids`` (and has a logprob) and reported
    as ``finish_reason = {"type": "stop", "matched": token_id}``; the length limit gives
    ``{"type": "length", "length": n}``, an abort ``{"type": "abort", "message": ...}``.

    Sampling draws from a per-sequence ``torch.Generator`` (seeded by ``sampling_seed`` or by
    the engine's ``--seed``-initialised master generator in arrival order), so a sequence's
    tokens and logprobs never depend on its batch-mates (left padding + explicit
    ``position_ids``).

``POST /abort_request`` (``rid`` or ``abort_all``), ``POST|GET /flush_cache``, ``GET /health``,
``GET /health_generate``, ``GET /get_model_info`` (alias ``/model_info``),
``GET /get_weight_version`` (alias ``/weight_version``), ``GET /get_server_info``,
``POST /update_weights_from_disk``, ``POST /init_weights_update_group``,
``POST /update_weights_from_distributed``, ``POST /destroy_weights_update_group``,
``POST /release_memory_occupation``, ``POST /resume_memory_occupation`` (state machine only on
CPU: nothing is freed, but generating while ``weights``/``kv_cache`` are released answers 400),
``POST /update_weights_from_tensor`` (``serialized_named_tensors``: SGLang's ForkingPickler/base64 format; on
CPU the handles name shared-memory segments of a process on this host, see :mod:`.tensor_ipc`),
``GET|POST /get_weights_by_name`` (``name``, ``truncate_size``: ``param[:truncate_size].tolist()``).

``GET /get_server_info`` also reports ``tp_size`` / ``dp_size`` (1) and this process's served-request
counters ``num_generate_requests`` (HTTP ``/generate`` calls), ``num_generated_sequences`` (items after
``n`` expansion) and ``num_aborted_sequences`` - how a router spread the work.  ``--access-log``
logs every HTTP request (e.g. to see which routes ``sglang-router`` 0.3.2 polls: ``/health``,
``/server_info`` and ``/model_info`` when it adds a worker, ``/get_load`` for its load monitor).
``GET /get_load`` answers SGLang's per-DP-rank list ``[{"dp_rank": 0, "num_reqs", "num_waiting_reqs",
"num_tokens"}]`` (``num_tokens``: prompt + ``max_new_tokens`` of the requests in flight; the
router's load figure). ``GET /v1/loads`` answers SGLang 0.5.x's ``{"loads": [{"dp_rank": 0,
"num_running_reqs", "num_waiting_reqs", "num_total_tokens"}]}`` (the client waits on it for an idle engine
before ``/release_memory_occupation``).

``--api-key K`` requires ``Authorization: Bearer K`` on every route except ``/health*``
(SGLang's middleware does the same) and answers 401 ``{"error": "Unauthorized"}`` otherwise.

This module is the HTTP layer (:class:`CPUEngineServer`: one method per route, the aiohttp application
from :meth:`CPUEngineServer.app`) and the CLI (:func:`main`).  The model, its batching worker thread and
weight loading are :class:`~megatron_dapo.engines.cpu.model.CPUEngine`; request validation, ``n``
expansion and top-k / top-p sampling are in :mod:`megatron_dapo.engines.cpu.requests`.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import torch
from aiohttp import web

from megatron_dapo.engines.cpu.faults import FaultPlan
from megatron_dapo.engines.cpu.model import CPUEngine, _Job
from megatron_dapo.engines.cpu.requests import RequestError, SamplingConfig, SeqRequest, expand_generate_request
from megatron_dapo.engines.tensor_ipc import deserialize_payload
from megatron_dapo.engines.update_group import WeightUpdateGroup, create_weight_update_group, parse_torch_dtype

logger = logging.getLogger("megatron_dapo.cpu_engine")

ALL_MEMORY_TAGS = ("weights", "kv_cache")
"""The memory tags of ``/release_memory_occupation`` / ``/resume_memory_occupation`` (all of them by default)."""

_DEFAULT_GROUP = "weight_update_group"  # SGLang's default group_name
_WEIGHTS_RELEASED = "weights are released; call /resume_memory_occupation with tags=['weights'] first"


def _json_error(status: int, message: str) -> web.Response:
    """A rejected request: ``{"error": {"message"}, "success": false, "message"}`` with HTTP ``status``."""
    return web.json_response({"error": {"message": message}, "success": False, "message": message},
                             status=status)


def _failure(message: str, **extra: Any) -> web.Response:
    """A failed control operation as SGLang answers it: 400 ``{"success": false, "message", **extra}``."""
    return web.json_response({"success": False, "message": message, **extra}, status=400)


async def _read_json(request: web.Request) -> dict:
    """The request's JSON object body; ``{}`` without a body or for ``null``.

    Raises:
        RequestError: the body is not JSON, or not a JSON object.
    """
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, ValueError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _parse_tags(body: dict) -> list[str]:
    """``body["tags"]`` of a memory-occupation request; every tag of :data:`ALL_MEMORY_TAGS` when absent.

    Raises:
        RequestError: ``tags`` is not a list of known tags.
    """
    tags = body.get("tags")
    if tags is None:
        return list(ALL_MEMORY_TAGS)
    if not isinstance(tags, list) or any(t not in ALL_MEMORY_TAGS for t in tags):
        raise RequestError(f"tags must be a list drawn from {list(ALL_MEMORY_TAGS)}, got {tags!r}")
    return list(tags)


class CPUEngineServer:
    """SGLang's native HTTP routes over one :class:`CPUEngine`: one method per route.

    The server owns the HTTP-side state: the weight-update groups joined by ``/init_weights_update_group``
    (by ``group_name``), the memory tags released by ``/release_memory_occupation``, the served-request
    counters of ``/get_server_info`` and the token load of ``/get_load``.  The model, its worker thread and
    the weight version stay on the engine.  Blocking control work (loading weights, joining a group,
    receiving broadcasts) runs on a small thread pool, so the event loop keeps serving meanwhile.

    Args:
        engine: the model and its batching worker; stopped when the application shuts down.
        api_key: when set, every route except ``/health*`` requires ``Authorization: Bearer <api_key>``
            and answers 401 ``{"error": "Unauthorized"}`` otherwise.
    """

    def __init__(self, engine: CPUEngine, *, api_key: str | None = None) -> None:
        self.engine = engine
        self.api_key = api_key
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.released_tags: set[str] = set()
        # served-request counters, reported by /get_server_info (which engine a router sent work to)
        self.served = {"num_generate_requests": 0, "num_generated_sequences": 0, "num_aborted_sequences": 0}
        self.load_tokens = 0  # prompt + max_new_tokens of the requests in flight (KV-cache demand)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cpu-engine-ctl")

    # ---- application --------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        """Every route: method, path and the bound handler (``GET`` routes also answer ``HEAD``)."""
        return [
            web.post("/generate", self.generate),
            web.post("/abort_request", self.abort_request),
            web.route("*", "/flush_cache", self.flush_cache),
            web.get("/health", self.health),
            web.get("/health_generate", self.health_generate),
            web.get("/get_model_info", self.get_model_info),
            web.get("/model_info", self.get_model_info),
            web.get("/get_weight_version", self.get_weight_version),
            web.get("/weight_version", self.get_weight_version),
            web.get("/get_server_info", self.get_server_info),
            web.get("/server_info", self.get_server_info),
            web.get("/get_load", self.get_load),
            web.get("/v1/loads", self.get_loads),
            web.post("/update_weights_from_disk", self.update_weights_from_disk),
            web.post("/init_weights_update_group", self.init_weights_update_group),
            web.post("/destroy_weights_update_group", self.destroy_weights_update_group),
            web.post("/update_weights_from_distributed", self.update_weights_from_distributed),
            web.post("/update_weights_from_tensor", self.update_weights_from_tensor),
            web.route("*", "/get_weights_by_name", self.get_weights_by_name),
            web.post("/release_memory_occupation", self.release_memory_occupation),
            web.post("/resume_memory_occupation", self.resume_memory_occupation),
        ]

    def app(self) -> web.Application:
        """A new aiohttp application: the API-key middleware, :meth:`routes`, request bodies up to 1 GiB;
        its cleanup stops the engine, destroys the weight-update groups and the control thread pool."""
        # fault injection for the tests of fault tolerance only (engines/cpu/faults.py; none unless the env asks)
        middlewares = [self._auth] + [plan.middleware(lambda: self.engine.weight_version)
                                      for plan in FaultPlan.from_env()]
        app = web.Application(middlewares=middlewares, client_max_size=1 << 30)
        app.router.add_routes(self.routes())
        app.on_cleanup.append(self._on_cleanup)
        return app

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.api_key and not request.path.startswith("/health") and request.method != "OPTIONS":
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _on_cleanup(self, app: web.Application) -> None:
        self.engine.stop()
        for group in list(self.groups.values()):
            group.destroy()
        self.groups.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- helpers ------------------------------------------------------------------------
    async def _run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _wait_job(self, job: _Job) -> None:
        try:
            await job.future
        finally:
            self.engine.finish_job(job)
        if job.error is not None:
            raise job.error

    def _memory_block(self) -> str | None:
        """Why generation is refused now (memory released), or None."""
        if self.released_tags:
            return (f"memory occupation released for tags {sorted(self.released_tags)}; call "
                    "/resume_memory_occupation before generating")
        return None

    def _abort_all_if_asked(self, body: dict) -> None:
        if body.get("abort_all_requests"):
            self.engine.abort(abort_all=True)

    def _item_response(self, s: SeqRequest, version: str, latency: float) -> dict:
        meta = {
            "id": s.rid,
            "finish_reason": s.finish_reason,
            "prompt_tokens": len(s.input_ids),
            "completion_tokens": len(s.output_ids),
            "cached_tokens": 0,
            "weight_version": version,
            "e2e_latency": latency,
        }
        if s.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.output_logprobs, s.output_ids)]
            if s.input_logprobs is not None:
                start = s.logprob_start_len
                meta["input_token_logprobs"] = [[lp, s.input_ids[start + i], None]
                                                for i, lp in enumerate(s.input_logprobs)]
            else:
                meta["input_token_logprobs"] = []
        return {"text": self.engine.decode(s.output_ids), "output_ids": list(s.output_ids), "meta_info": meta}

    def _model_info(self) -> dict:
        engine = self.engine
        return {
            "model_path": engine.model_path,
            "tokenizer_path": engine.model_path if engine.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "model_type": getattr(engine.config, "model_type", None),
            "architectures": getattr(engine.config, "architectures", None),
        }

    # ---- generation ---------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.Response:
        """``POST /generate``: one item, or a list for a batched input (see the module docstring).

        400 for a malformed body or while memory is released; 500 when the batch fails.
        """
        engine = self.engine
        try:
            body = await _read_json(request)
            seqs, is_batch = expand_generate_request(body, engine.next_seed, engine.vocab_size)
        except RequestError as exc:
            return _json_error(400, str(exc))
        blocked = self._memory_block()
        if blocked:
            return _json_error(400, blocked)
        self.served["num_generate_requests"] += 1
        self.served["num_generated_sequences"] += len(seqs)
        reserved = sum(len(s.input_ids) + s.params.max_new_tokens for s in seqs)
        self.load_tokens += reserved
        job = engine.submit(seqs, asyncio.get_running_loop())
        try:
            await self._wait_job(job)
        except asyncio.CancelledError:  # the client went away: stop its sequences at the next step
            for s in seqs:
                s.aborted = True
            raise
        except Exception as exc:
            return _json_error(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            self.load_tokens -= reserved
        latency = time.time() - job.t_start
        self.served["num_aborted_sequences"] += sum(
            1 for s in seqs if (s.finish_reason or {}).get("type") == "abort")
        items = [self._item_response(s, job.weight_version, latency) for s in seqs]
        return web.json_response(items if is_batch else items[0])

    async def abort_request(self, request: web.Request) -> web.Response:
        """``POST /abort_request``: abort ``rid`` (and its ``rid-*`` copies) or, with ``abort_all``, everything.

        Answers ``{"success": true, "num_aborted"}``; 400 without ``rid`` or ``abort_all``.
        """
        try:
            body = await _read_json(request)
        except RequestError as exc:
            return _json_error(400, str(exc))
        abort_all = bool(body.get("abort_all", False))
        rid = body.get("rid")
        if not abort_all and not rid:
            return _json_error(400, "abort_request needs rid or abort_all=true")
        n = self.engine.abort(rid=str(rid) if rid else None, abort_all=abort_all)
        return web.json_response({"success": True, "num_aborted": n})

    async def flush_cache(self, request: web.Request) -> web.Response:
        """``/flush_cache`` (any method): succeeds; the CPU engine keeps no prefix cache."""
        return web.json_response({"success": True, "message": "Cache flushed (CPU engine keeps no prefix cache)."})

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: ``OK`` while the server runs."""
        return web.Response(text="OK")

    async def health_generate(self, request: web.Request) -> web.Response:
        """``GET /health_generate``: ``OK`` after generating one token; 503 (with the reason) while memory
        is released or when that generation fails or takes over 60 s."""
        blocked = self._memory_block()
        if blocked:
            return web.Response(status=503, text=blocked)
        seq = SeqRequest(rid=f"health-{uuid.uuid4().hex}", input_ids=[0],
                         params=SamplingConfig(max_new_tokens=1, temperature=0.0), return_logprob=False,
                         logprob_start_len=-1, seed=0)
        job = self.engine.submit([seq], asyncio.get_running_loop())
        try:
            await asyncio.wait_for(self._wait_job(job), timeout=60)
        except Exception as exc:
            return web.Response(status=503, text=f"health_generate failed: {exc}")
        return web.Response(text="OK")

    # ---- information --------------------------------------------------------------------
    async def get_model_info(self, request: web.Request) -> web.Response:
        """``GET /get_model_info`` (alias ``/model_info``): model path, tokenizer, weight version, HF type."""
        return web.json_response(self._model_info())

    async def get_weight_version(self, request: web.Request) -> web.Response:
        """``GET /get_weight_version`` (alias ``/weight_version``): ``{"weight_version"}``."""
        return web.json_response({"weight_version": self.engine.weight_version})

    async def get_server_info(self, request: web.Request) -> web.Response:
        """``GET /get_server_info`` (alias ``/server_info``): the model info plus this server's state and
        served-request counters."""
        engine = self.engine
        info = self._model_info()
        info.update({"backend": "megatron_dapo.cpu_engine", "max_batch_size": engine.max_batch_size,
                     "released_tags": sorted(self.released_tags), "inflight_requests": engine.inflight,
                     "weight_update_groups": sorted(self.groups), "tp_size": 1, "dp_size": 1, **self.served})
        return web.json_response(info)

    async def get_load(self, request: web.Request) -> web.Response:
        """``GET /get_load``: SGLang's list of one entry per data-parallel rank (sglang-router reads
        ``num_tokens`` as the load)."""
        return web.json_response([{"dp_rank": 0, "num_reqs": self.engine.inflight, "num_waiting_reqs": 0,
                                   "num_tokens": self.load_tokens}])

    async def get_loads(self, request: web.Request) -> web.Response:
        """``GET /v1/loads``: SGLang 0.5.x's ``{"loads": [...]}``, one entry per data-parallel rank (the
        fields the trainer reads)."""
        return web.json_response({"loads": [{"dp_rank": 0, "num_running_reqs": self.engine.inflight,
                                             "num_waiting_reqs": 0, "num_total_tokens": self.load_tokens}]})

    # ---- weights ------------------------------------------------------------------------
    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        """``POST /update_weights_from_disk``: load every ``*.safetensors`` tensor of ``model_path``.

        400 for a malformed body, while ``weights`` are released, or when loading fails.
        """
        try:
            body = await _read_json(request)
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise RequestError("model_path (str) is required")
            if body.get("load_format") not in (None, "auto", "safetensors"):
                raise RequestError(f"load_format={body['load_format']!r} unsupported (use safetensors)")
        except RequestError as exc:
            return _json_error(400, str(exc))
        if "weights" in self.released_tags:
            return _failure(_WEIGHTS_RELEASED, num_paused_requests=0)
        self._abort_all_if_asked(body)
        try:
            msg = await self._run_blocking(self.engine.update_from_disk, path, body.get("weight_version"))
        except Exception as exc:
            return _failure(f"update_weights_from_disk failed: {exc}", num_paused_requests=0)
        return web.json_response({"success": True, "message": msg, "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """``POST /init_weights_update_group``: join a gloo group as rank ``rank_offset`` of ``world_size``.

        400 for a malformed body, an existing ``group_name``, a backend other than gloo, or a failed join.
        """
        try:
            body = await _read_json(request)
            for key in ("master_address", "master_port", "rank_offset", "world_size"):
                if body.get(key) is None:
                    raise RequestError(f"{key} is required")
            group_name = str(body.get("group_name") or _DEFAULT_GROUP)
            backend = str(body.get("backend") or "gloo")
            if group_name in self.groups:
                raise RequestError(f"weight update group {group_name!r} already exists; destroy it first")
            rank = int(body["rank_offset"])
            world = int(body["world_size"])
        except (RequestError, TypeError, ValueError) as exc:
            return _json_error(400, str(exc))
        if backend != "gloo":
            return _failure(f"backend={backend!r}: the CPU engine only supports gloo (SGLang uses nccl on GPU)")
        timeout_s = float(body.get("timeout_s") or 120)
        join = functools.partial(create_weight_update_group, str(body["master_address"]), int(body["master_port"]),
                                 rank, world, backend=backend, timeout_s=timeout_s, group_name=group_name)
        try:
            group = await self._run_blocking(join)
        except Exception as exc:
            return _failure(f"init_weights_update_group failed: {exc}")
        self.groups[group_name] = group
        return web.json_response({"success": True, "message": f"joined {group_name} as rank {rank}/{world}"})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        """``POST /destroy_weights_update_group``: leave ``group_name``; 400 when there is no such group."""
        try:
            body = await _read_json(request)
        except RequestError as exc:
            return _json_error(400, str(exc))
        name = str(body.get("group_name") or _DEFAULT_GROUP)
        group = self.groups.pop(name, None)
        if group is None:
            return _failure(f"no weight update group {name!r}")
        group.destroy()
        return web.json_response({"success": True, "message": f"destroyed {name}"})

    def _receive_distributed(self, group: WeightUpdateGroup, names: list, dtypes: list, shapes: list,
                             version: str | None) -> str:
        # always drain every broadcast first so the trainer (src) never blocks on us
        received: dict[str, torch.Tensor] = {}
        for name, dt, shape in zip(names, dtypes, shapes):
            buf = torch.empty(tuple(int(x) for x in shape), dtype=parse_torch_dtype(dt))
            group.broadcast(buf, src=0)
            received[name] = buf
        if "weights" in self.released_tags:
            raise ValueError("weights are released; received tensors were dropped - call "
                             "/resume_memory_occupation with tags=['weights'] before updating")
        return self.engine.update_weights(received, version, require_complete=False, source="via broadcast")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """``POST /update_weights_from_distributed``: receive ``names`` (``dtypes``, ``shapes``) broadcast
        from rank 0 of ``group_name`` and load them.

        400 for a malformed body, an unknown group, or a failed receive / load (all broadcasts are
        received even when the load then fails).
        """
        try:
            body = await _read_json(request)
            names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
            if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
                raise RequestError("names, dtypes and shapes must be lists")
            if not len(names) == len(dtypes) == len(shapes):
                raise RequestError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
            for i, dt in enumerate(dtypes):
                try:
                    parse_torch_dtype(dt)
                except ValueError as exc:
                    raise RequestError(f"dtypes[{i}]: {exc}") from None
            group_name = str(body.get("group_name") or _DEFAULT_GROUP)
            group = self.groups.get(group_name)
            if group is None:
                raise RequestError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        except RequestError as exc:
            return _json_error(400, str(exc))
        self._abort_all_if_asked(body)
        try:
            msg = await self._run_blocking(self._receive_distributed, group, names, dtypes, shapes,
                                           body.get("weight_version"))
        except Exception as exc:
            return _failure(f"update_weights_from_distributed failed: {exc}")
        return web.json_response({"success": True, "message": msg})

    def _load_from_tensor_handles(self, serialized: str, version: str | None, load_format: str | None) -> str:
        named = deserialize_payload(serialized, load_format)  # maps the sender's shared memory (no copy yet)
        names = [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name appears twice in one update")
        return self.engine.update_weights(dict(named), version, require_complete=False, source="from tensor handles")

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """``POST /update_weights_from_tensor``: load the tensors of ``serialized_named_tensors[0]``
        (SGLang's handle format, ``load_format`` null, ``"direct"`` or ``"flattened_bucket"``).

        400 for a malformed body, while ``weights`` are released, or when decoding / loading fails.
        """
        try:
            body = await _read_json(request)
            entries = body.get("serialized_named_tensors")
            if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
                raise RequestError("serialized_named_tensors must be a non-empty list of strings (one per TP rank)")
            if body.get("load_format") not in (None, "direct", "flattened_bucket"):
                raise RequestError(f"load_format={body['load_format']!r} unsupported by the CPU engine (null, "
                                   f"'direct' or 'flattened_bucket')")
        except RequestError as exc:
            return _json_error(400, str(exc))
        if "weights" in self.released_tags:
            return _failure(_WEIGHTS_RELEASED)
        self._abort_all_if_asked(body)
        fmt = body.get("load_format")
        try:
            # one engine TP rank here: entry 0 (SGLang hands entry i to its TP rank i)
            msg = await self._run_blocking(self._load_from_tensor_handles, entries[0], body.get("weight_version"),
                                           None if fmt == "direct" else fmt)
        except Exception as exc:
            return _failure(f"update_weights_from_tensor failed: {exc}")
        return web.json_response({"success": True, "message": msg})

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """``/get_weights_by_name`` (any method): ``param[:truncate_size].tolist()`` of parameter ``name``
        (default ``truncate_size`` 100); 400 for an unknown name or a non-integer size."""
        try:
            body = await _read_json(request)
            name = body.get("name")
            table = self.engine.param_table()
            if name not in table:
                raise RequestError(f"unknown parameter name {name!r}")
            truncate = int(body.get("truncate_size", 100))
        except (RequestError, TypeError, ValueError) as exc:
            return _json_error(400, str(exc))
        with self.engine.model_lock:
            values = table[name].detach()[:truncate].tolist()
        return web.json_response(values)

    # ---- memory occupation --------------------------------------------------------------
    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        """``POST /release_memory_occupation``: mark ``tags`` released (state only on CPU: generation and
        weight updates are refused until resumed); 400 for bad tags or while requests are in flight."""
        try:
            tags = _parse_tags(await _read_json(request))
        except RequestError as exc:
            return _json_error(400, str(exc))
        if self.engine.inflight:
            return _json_error(400, f"{self.engine.inflight} request(s) in flight; abort or finish them before "
                                    "releasing memory occupation")
        self.released_tags.update(tags)
        return web.json_response({"success": True, "message": f"released {tags} (CPU engine: state only)",
                                  "released_tags": sorted(self.released_tags)})

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        """``POST /resume_memory_occupation``: un-release ``tags``; 400 for bad tags."""
        try:
            tags = _parse_tags(await _read_json(request))
        except RequestError as exc:
            return _json_error(400, str(exc))
        self.released_tags.difference_update(tags)
        return web.json_response({"success": True, "message": f"resumed {tags}",
                                  "released_tags": sorted(self.released_tags)})


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (``python -m megatron_dapo.engines.cpu.server``): serve until SIGINT / SIGTERM.

    Raises:
        SystemExit: bad flags (argparse), e.g. ``--max-batch-size`` or ``--num-threads`` below 1.
        FileNotFoundError: ``--model-path`` is not a directory.
    """
    parser = argparse.ArgumentParser(description="CPU rollout engine with SGLang's native HTTP API")
    parser.add_argument("--model-path", required=True, help="HF model directory (config + safetensors)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's master RNG")
    parser.add_argument("--max-batch-size", type=int, default=64, help="max sequences per decode batch")
    parser.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu",
                        help="torch device of the model, e.g. cuda or cuda:0 (benchmarks/gpu: CUDA-IPC weight "
                             "updates); sampling stays on the CPU")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--access-log", action="store_true",
                        help="log every HTTP request (method, path, status) - e.g. to see what a router polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[cpu_engine %(asctime)s] %(levelname)s %(message)s")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    if args.num_threads < 1:
        parser.error("--num-threads must be >= 1")
    torch.set_num_threads(args.num_threads)
    torch.set_grad_enabled(False)
    engine = CPUEngine(args.model_path, seed=args.seed, max_batch_size=args.max_batch_size,
                       attn_implementation=args.attn_implementation, device=args.device)
    app = CPUEngineServer(engine, api_key=args.api_key).app()
    logger.info("serving %s on http://%s:%d (pid %d)", engine.model_path, args.host, args.port, os.getpid())
    # run_app installs SIGINT/SIGTERM handlers -> graceful shutdown (the app's cleanup stops the worker)
    access_log = logging.getLogger("aiohttp.access") if args.access_log else None
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=access_log,
                shutdown_timeout=5, handle_signals=True)
    logger.info("cpu engine on port %d stopped", args.port)


def _exit_on_sigterm(signum: int, frame: Any) -> None:  # until aiohttp installs its own handlers
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
