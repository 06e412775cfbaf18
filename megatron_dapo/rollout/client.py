"""Async client for SGLang's native HTTP API (real SGLang servers and the CPU engine alike).

Generation requests are balanced across data-parallel engines by least-outstanding-requests
(or all sent to one ``router_url``, e.g. an ``sglang-router``); control calls (weight updates,
memory release / resume, cache flush, abort) go to every engine.  Connection errors, timeouts and
5xx answers are retried with exponential back-off on another engine; when retries run out an
:class:`EngineError` names the URL(s) tried and the last error — a dead engine never hangs a
rollout.

Payloads follow SGLang's ``GenerateReqInput`` / ``SamplingParams`` (see
``docs/basic_usage/sampling_params.md`` and ``python/sglang/srt/managers/io_struct.py``):
``input_ids``, ``sampling_params`` (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
``stop_token_ids``, ``ignore_eos``, ``n``, ``sampling_seed``...), ``return_logprob``,
``logprob_start_len``, ``rid``; responses carry ``output_ids`` and ``meta_info`` with
``finish_reason``, ``prompt_tokens``, ``output_token_logprobs`` (``[logprob, token_id, text]``)
and ``weight_version``.

``n > 1`` is expanded CLIENT-side exactly as SGLang expands it (``input_ids * n``, sample-major),
each copy with ``n = 1`` and, when ``sampling_seed`` is set, seed ``sampling_seed + k`` for flat
item ``k`` so copies differ; results are returned prompt-major: ``outputs[i * n + j]`` is sample
``j`` of prompt ``i``.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort")

# Fields of SGLang's SamplingParams (sampling_params.py); anything else is a typo.
SGLANG_SAMPLING_FIELDS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
})
_FIELD_HINTS = {"max_tokens": "max_new_tokens", "seed": "sampling_seed", "stop_ids": "stop_token_ids",
                "num_samples": "n", "n_samples_per_prompt": "n"}


class EngineError(RuntimeError):
    """A rollout engine call failed (after retries); the message names URL(s) and the last error."""

    def __init__(self, message: str, *, urls: Sequence[str] = (), status: int | None = None):
        super().__init__(message)
        self.urls = list(urls)
        self.status = status


@dataclass
class GenerateOutput:
    """One generated sample (SGLang ``/generate`` item).

    Attributes:
        output_ids: generated token ids (a matched stop / EOS token included).
        output_logprobs: per-token ``log p`` (float32 precision) of ``output_ids`` under the
            engine's sampling distribution (temperature-scaled, before top-p/top-k truncation on
            the CPU engine), or ``None`` when ``return_logprob=False``.
        finish_reason: ``"stop"`` | ``"length"`` | ``"abort"``.
        prompt_tokens: prompt length in tokens.
        weight_version: the engine's weight version that generated it (``None`` if not reported).
        text: detokenised output ("" without a tokenizer).
        rid: request id of this item.
        completion_tokens: ``len(output_ids)`` as reported by the engine.
        finish_reason_detail: the raw ``finish_reason`` dict (``matched`` / ``length`` / ``message``).
        input_logprobs: ``input_token_logprobs`` values (first may be ``None``) when requested.
        engine_url: the engine that answered.
    """

    output_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    weight_version: str | None
    text: str = ""
    rid: str | None = None
    completion_tokens: int = 0
    finish_reason_detail: dict = field(default_factory=dict)
    input_logprobs: list[float | None] | None = None
    engine_url: str | None = None


# --------------------------------------------------------------------------------------------
# Pure payload builders / parsers
# --------------------------------------------------------------------------------------------


def validate_sampling_params(sampling_params: dict) -> dict:
    """Check field names against SGLang's ``SamplingParams``; returns a copy.

    Raises:
        ValueError: unknown field (with the SGLang name when it is a known alias, e.g.
            ``max_tokens -> max_new_tokens``, ``seed -> sampling_seed``) or bad ``n``.
    """
    if not isinstance(sampling_params, dict):
        raise ValueError(f"sampling_params must be a dict, got {type(sampling_params).__name__}")
    for key in sampling_params:
        if key not in SGLANG_SAMPLING_FIELDS:
            hint = f" (SGLang calls it {_FIELD_HINTS[key]!r})" if key in _FIELD_HINTS else ""
            raise ValueError(f"sampling_params.{key} is not an SGLang SamplingParams field{hint}")
    n = sampling_params.get("n", 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sampling_params.n must be an int >= 1, got {n!r}")
    return dict(sampling_params)


def _check_prompts(input_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    if not isinstance(input_ids, (list, tuple)) or len(input_ids) == 0:
        raise ValueError("input_ids must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(input_ids):
        if isinstance(p, int) or not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"input_ids[{i}] must be a non-empty list of ints")
        row = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"input_ids[{i}] contains {t!r}, not a non-negative int token id")
            row.append(int(t))
        out.append(row)
    return out


def build_generate_payload(
    input_ids: Sequence[Sequence[int]],
    sampling_params: dict,
    *,
    return_logprob: bool = True,
    rid: str | None = None,
    logprob_start_len: int | Sequence[int] | None = None,
) -> dict:
    """Build an SGLang ``/generate`` JSON body (``GenerateReqInput``) for a batch of prompts.

    ``n`` is expanded here: ``input_ids * n`` (sample-major, SGLang's own expansion order), one
    ``sampling_params`` dict per flat item with ``n = 1`` and ``sampling_seed + k`` when a
    ``sampling_seed`` is given; ``rid`` becomes per-item ids ``f"{rid}-{k}"`` (a fresh uuid
    prefix when ``None``) so each item can be aborted.

    Args:
        input_ids: ``B`` prompts of token ids.
        sampling_params: SGLang ``SamplingParams`` fields.
        return_logprob: ask for ``output_token_logprobs``.
        rid: request-id prefix.
        logprob_start_len: SGLang's field (int or one per prompt; ``-1`` = outputs only).

    Returns:
        dict with ``input_ids`` (``B*n`` lists), ``sampling_params`` (list), ``return_logprob``,
        ``rid`` (list) and, when given, ``logprob_start_len``.

    Raises:
        ValueError: malformed prompts or sampling params (names the field / index).
    """
    prompts = _check_prompts(input_ids)
    sp = validate_sampling_params(sampling_params)
    n = int(sp.pop("n", 1))
    B = len(prompts)
    seed = sp.get("sampling_seed")
    prefix = rid if rid is not None else uuid.uuid4().hex
    flat_ids, flat_sp, rids = [], [], []
    for k in range(B * n):
        i = k % B
        flat_ids.append(prompts[i])
        item = dict(sp)
        if seed is not None:
            item["sampling_seed"] = int(seed) + k
        flat_sp.append(item)
        rids.append(f"{prefix}-{k}")
    payload: dict[str, Any] = {
        "input_ids": flat_ids,
        "sampling_params": flat_sp,
        "return_logprob": bool(return_logprob),
        "rid": rids,
    }
    if logprob_start_len is not None:
        if isinstance(logprob_start_len, int):
            payload["logprob_start_len"] = int(logprob_start_len)
        else:
            starts = [int(x) for x in logprob_start_len]
            if len(starts) != B:
                raise ValueError(f"logprob_start_len has {len(starts)} entries for {B} prompts")
            payload["logprob_start_len"] = [starts[k % B] for k in range(B * n)]
    return payload


def _finish_reason(raw: Any, where: str) -> tuple[str, dict]:
    if raw is None:
        raise ValueError(f"{where}: meta_info.finish_reason is missing (request still running?)")
    if isinstance(raw, str):
        kind, detail = raw, {"type": raw}
    elif isinstance(raw, dict):
        kind, detail = raw.get("type"), dict(raw)
    else:
        raise ValueError(f"{where}: finish_reason {raw!r} is neither a dict nor a str")
    if kind not in FINISH_REASONS:
        raise ValueError(f"{where}: finish_reason type {kind!r} not in {FINISH_REASONS}")
    return kind, detail


def parse_generate_response(obj: Any, *, engine_url: str | None = None) -> list[GenerateOutput]:
    """Parse an SGLang ``/generate`` response (one item dict or a list of them).

    ``output_ids`` are taken from the item's ``output_ids`` (or, when absent, from the token ids
    in ``meta_info.output_token_logprobs``); logprobs from ``output_token_logprobs[i][0]``.

    Raises:
        ValueError: missing fields, unknown finish reason, or logprobs / ids length mismatch
            (names the item index).
    """
    items = obj if isinstance(obj, list) else [obj]
    outs = []
    for idx, item in enumerate(items):
        where = f"response item {idx}"
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise ValueError(f"{where}: expected an object with meta_info, got {str(item)[:200]}")
        meta = item["meta_info"]
        kind, detail = _finish_reason(meta.get("finish_reason"), where)
        lp_entries = meta.get("output_token_logprobs")
        ids = item.get("output_ids")
        if ids is None:
            if lp_entries is None:
                raise ValueError(f"{where}: neither output_ids nor meta_info.output_token_logprobs present")
            ids = [int(e[1]) for e in lp_entries]
        ids = [int(t) for t in ids]
        logprobs = None
        if lp_entries is not None:
            logprobs = [float(e[0]) for e in lp_entries]
            if len(logprobs) != len(ids):
                raise ValueError(f"{where}: {len(logprobs)} output_token_logprobs for {len(ids)} output_ids")
            lp_ids = [int(e[1]) for e in lp_entries]
            if lp_ids != ids:
                raise ValueError(f"{where}: token ids in output_token_logprobs differ from output_ids")
        in_lp = meta.get("input_token_logprobs")
        outs.append(GenerateOutput(
            output_ids=ids,
            output_logprobs=logprobs,
            finish_reason=kind,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            weight_version=None if meta.get("weight_version") is None else str(meta["weight_version"]),
            text=item.get("text") or "",
            rid=None if meta.get("id") is None else str(meta["id"]),
            completion_tokens=int(meta.get("completion_tokens", len(ids))),
            finish_reason_detail=detail,
            input_logprobs=None if in_lp is None else [None if e[0] is None else float(e[0]) for e in in_lp],
            engine_url=engine_url,
        ))
    return outs


def reorder_sample_major_to_prompt_major(items: Sequence[Any], num_prompts: int, n: int) -> list[Any]:
    """Map SGLang's flat order (item ``k`` = prompt ``k % B``, sample ``k // B``) to prompt-major
    order (``out[i * n + j]`` = prompt ``i``, sample ``j``).

    Raises:
        ValueError: ``len(items) != num_prompts * n``.
    """
    if len(items) != num_prompts * n:
        raise ValueError(f"engine answered {len(items)} items, expected {num_prompts} prompts x n={n}")
    return [items[j * num_prompts + i] for i in range(num_prompts) for j in range(n)]


def build_init_weights_update_group_payload(master_address: str, master_port: int, rank_offset: int,
                                            world_size: int, group_name: str = "weight_update_group",
                                            backend: str = "nccl") -> dict:
    """SGLang ``InitWeightsUpdateGroupReqInput`` body."""
    return {"master_address": str(master_address), "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size),
            "group_name": str(group_name), "backend": str(backend)}


def build_update_weights_from_distributed_payload(names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                                  shapes: Sequence[Sequence[int]], *,
                                                  group_name: str = "weight_update_group",
                                                  flush_cache: bool = True, weight_version: str | None = None,
                                                  abort_all_requests: bool = False) -> dict:
    """SGLang ``UpdateWeightsFromDistributedReqInput`` body (dtypes as ``"bfloat16"`` etc.).

    Raises:
        ValueError: list lengths differ.
    """
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    body = {
        "names": [str(x) for x in names],
        "dtypes": [str(d).replace("torch.", "") for d in dtypes],
        "shapes": [[int(s) for s in shp] for shp in shapes],
        "group_name": group_name,
        "flush_cache": bool(flush_cache),
        "abort_all_requests": bool(abort_all_requests),
    }
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def serialize_named_tensors_for_sglang(named_tensors: Sequence[tuple[str, torch.Tensor]], tp_size: int = 1) -> list:
    """Build ``serialized_named_tensors`` for ``/update_weights_from_tensor`` (CUDA-IPC handles).

    Uses ``sglang.srt.utils.MultiprocessingSerializer.serialize(..., output_str=True)`` once per
    TP rank, as SGLang's HTTP test-suite does; only meaningful for CUDA tensors on the same node.

    Raises:
        ImportError: sglang is not installed (GPU-only dependency).
    """
    try:
        from sglang.srt.utils import MultiprocessingSerializer  # type: ignore
    except ImportError as exc:
        raise ImportError("update_weights_from_tensor needs the `sglang` package (GPU nodes only) to "
                          "serialise CUDA-IPC tensor handles; on CPU use update_weights_from_disk or "
                          "update_weights_from_distributed") from exc
    return [MultiprocessingSerializer.serialize(list(named_tensors), output_str=True) for _ in range(tp_size)]


# --------------------------------------------------------------------------------------------
# Async client
# --------------------------------------------------------------------------------------------


def _is_retryable_exc(exc: BaseException) -> bool:
    import aiohttp

    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError,
                            ConnectionError))


class EngineClient:
    """Async client for one or more SGLang-API engines (see module docstring).

    Args:
        engine_urls: base URLs (``http://host:port``) of the data-parallel engines; control
            calls go to all of them.
        router_url: optional router (e.g. ``sglang-router``) URL; when set, generation goes to it
            (no client-side balancing) and control calls still go to ``engine_urls``.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        request_timeout_s: total timeout per HTTP request (generation included).
        control_timeout_s: timeout for control calls (weight updates can be slow).
        max_retries: retries after the first attempt on connection errors / timeouts / 5xx.
        retry_backoff_s: first back-off; doubles each retry (capped at 10 s).
        dead_cooldown_s: how long an engine that failed with a connection error is avoided.
        prompts_per_request: prompts per ``/generate`` HTTP request (with their ``n`` samples).

    Use as ``async with EngineClient([...]) as c: outs = await c.generate(...)``.
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

    # ---- plumbing ----------------------------------------------------------------------
    @property
    def control_urls(self) -> list[str]:
        """URLs that receive control calls (all engines; the router if no engine URL is known)."""
        return self.engine_urls or [self.router_url]

    async def _ensure_session(self):
        import aiohttp

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

    async def __aenter__(self) -> "EngineClient":
        await self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _http(self, method: str, url: str, path: str, payload: Any = None,
                    timeout_s: float | None = None) -> tuple[int, Any]:
        """One HTTP call; returns ``(status, parsed JSON or text)``; raises aiohttp errors."""
        import aiohttp

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
        alive = [u for u in self._gen_urls if self._dead_until.get(u, 0.0) <= now]
        pool = [u for u in alive if u not in tried] or alive or \
            [u for u in self._gen_urls if u not in tried] or list(self._gen_urls)
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
            try:
                status, data = await self._http("POST", url, path, payload, self.request_timeout_s)
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
                self.outstanding[url] -= 1
                for rid in rids:
                    locs = self._rid_locations.get(rid)
                    if locs:
                        locs[:] = [x for x in locs if x[0] != url]
                        if not locs:
                            self._rid_locations.pop(rid, None)
            logger.warning("%s attempt %d/%d failed (%s)", path, attempt + 1, attempts, last)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(self.retry_backoff_s * (2 ** attempt), 10.0))
        raise EngineError(f"{path} failed after {attempts} attempt(s) on {sorted(tried)}; last error: {last}",
                          urls=sorted(tried))

    async def _abort_quietly(self, url: str, rids: list[str]) -> None:
        for rid in rids:
            try:
                await self._http("POST", url, "/abort_request", {"rid": rid}, timeout_s=5)
            except Exception:
                return

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
            url, data = await self._post_balanced("/generate", payload, payload["rid"])
            try:
                outs = parse_generate_response(data, engine_url=url)
            except ValueError as exc:
                raise EngineError(f"/generate on {url} returned a malformed response: {exc}", urls=[url]) from exc
            return reorder_sample_major_to_prompt_major(outs, len(chunk), n)

        parts = await asyncio.gather(*(run_chunk(ci, c) for ci, c in enumerate(chunks)))
        return [o for part in parts for o in part]

    async def score(self, sequences: Sequence[Sequence[int]], start_lens: int | Sequence[int] = 0, *,
                    temperature: float = 1.0) -> list[list[float | None]]:
        """Score given sequences: ``input_token_logprobs`` of tokens ``seq[start:]``.

        Sends ``max_new_tokens = 0``, ``return_logprob = True``, ``logprob_start_len = start``.
        Position 0 (no context) scores ``None``.

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
        payload = build_generate_payload(seqs, {"max_new_tokens": 0, "temperature": float(temperature)},
                                         return_logprob=True, logprob_start_len=starts)
        url, data = await self._post_balanced("/generate", payload, payload["rid"])
        outs = parse_generate_response(data, engine_url=url)
        res = []
        for i, o in enumerate(outs):
            if o.input_logprobs is None or len(o.input_logprobs) != len(seqs[i]) - starts[i]:
                raise EngineError(f"/generate on {url}: input_token_logprobs missing or of wrong length for "
                                  f"sequence {i}", urls=[url])
            res.append(o.input_logprobs)
        return res

    async def abort(self, rid: str | None = None) -> int:
        """Abort the in-flight items of ``generate(..., rid=rid)`` (all requests if ``rid`` is None).

        Returns:
            number of abort calls sent.
        """
        if rid is None:
            await self.abort_all()
            return len(self.control_urls)
        targets = [(url, item) for key, locs in list(self._rid_locations.items())
                   if key.startswith(f"{rid}-") or key == rid for url, items in locs for item in items]
        await asyncio.gather(*(self._control("POST", "/abort_request", {"rid": item}, urls=[url],
                                             check_success=False) for url, item in targets))
        return len(targets)

    async def abort_all(self) -> dict[str, Any]:
        """``POST /abort_request {"abort_all": true}`` on every engine (and the router if any)."""
        urls = list(dict.fromkeys(self.control_urls + ([self.router_url] if self.router_url else [])))
        return await self._control("POST", "/abort_request", {"abort_all": True}, urls=urls, check_success=False)

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

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /release_memory_occupation {"tags": tags}`` (None = all: weights + kv_cache)."""
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
        :func:`~megatron_dapo.rollout.update_group.create_weight_update_group` (or use
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
        :class:`~megatron_dapo.rollout.update_group.WeightUpdateGroup`."""
        from megatron_dapo.rollout.update_group import create_weight_update_group

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
        """``POST /update_weights_from_distributed`` on every engine; they then receive each tensor by
        broadcast from rank 0 in the order of ``names`` (the trainer must broadcast concurrently -
        see :meth:`push_weights_distributed`)."""
        body = build_update_weights_from_distributed_payload(
            names, dtypes, shapes, group_name=group_name, flush_cache=flush_cache,
            weight_version=weight_version, abort_all_requests=abort_all_requests)
        return await self._control("POST", "/update_weights_from_distributed", body)

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

        await asyncio.get_running_loop().run_in_executor(None, send)
        return await announce

    async def update_weights_from_tensor(self, serialized_named_tensors: list, *, load_format: str | None = None,
                                         flush_cache: bool = True, weight_version: str | None = None) -> dict[str, Any]:
        """``POST /update_weights_from_tensor`` (``UpdateWeightsFromTensorReqInput``: one serialized
        string per TP rank, see :func:`serialize_named_tensors_for_sglang`).  GPU / CUDA-IPC only;
        the CPU engine answers 400."""
        body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                                "load_format": load_format, "flush_cache": bool(flush_cache)}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return await self._control("POST", "/update_weights_from_tensor", body)


class SyncEngineClient:
    """Blocking facade over :class:`EngineClient` for the (synchronous) trainer.

    Runs a private event loop in a daemon thread; every public coroutine method of
    :class:`EngineClient` is available as a blocking method with the same signature.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-client-loop", daemon=True)
        self._thread.start()
        self.client = EngineClient(*args, **kwargs)

    def run(self, coro, timeout: float | None = None):
        """Run ``coro`` on the client's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if inspect.iscoroutinefunction(attr):
            def call(*args, **kwargs):
                return self.run(attr(*args, **kwargs))
            call.__doc__ = attr.__doc__
            call.__name__ = name
            return call
        return attr

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
