"""vLLM (0.32, ``VLLM_SERVER_DEV_MODE=1``) as a rollout backend behind the interface of
:class:`~megatron_dapo.engines.client.EngineClient`.

Generation: ``POST /inference/v1/generate`` (server started with ``--enable-scale-out``, see
:func:`~megatron_dapo.engines.launch_vllm.launch_vllm_servers`) rather than ``/v1/completions``: it is
vLLM's token-in/token-out route (no tokenizer on the path, ``token_ids`` in and out), its logprobs
carry the integer ``token_id`` of every sampled token (checked against ``token_ids``), each choice
reports ``weight_versions`` spans (which weight version produced which tokens), the request id is ours
(engine id ``generate-tokens-<request_id>``, which is what ``/abort_requests`` takes; the completions
route renames it ``cmpl-<id>-<prompt index>``), and ``prompt_logprobs`` come back keyed by token id
(:meth:`VLLMClient.score`). One HTTP request per prompt with vLLM's own ``n`` (it seeds sample ``k``
with ``seed + k``); ``sampling_seed`` of prompt ``i`` is ``sampling_seed + i * n`` as with SGLang.

SGLang-named sampling params are translated by :func:`build_vllm_generate_payload`
(``max_new_tokens -> max_tokens``, ``sampling_seed -> seed``, ``min_new_tokens -> min_tokens``,
``top_k = -1 -> 0`` (off)); logprobs are those of the processed (temperature-scaled) distribution
(``--logprobs-mode processed_logprobs``).

Control (all routes of vLLM's RL router ``vllm/entrypoints/rl/online/api_router.py``):

* abort: ``POST /abort_requests {"request_ids": ["generate-tokens-<id>"]}``; ``{}`` aborts all;
  aborted choices come back with ``finish_reason: "abort"`` and their partial tokens.
* pause / resume: ``POST /pause?mode=abort|wait|keep``, ``POST /resume``, ``GET /is_paused``.
* weight version: ``POST /update_weight_version {"new_version"}``, ``GET /weight_info``.
* weights from disk (CPU and GPU): ``/pause`` -> ``POST /collective_rpc {"method": "reload_weights",
  "kwargs": {"weights_path": DIR}}`` -> ``/reset_prefix_cache`` -> ``/update_weight_version`` ->
  ``/resume``. vLLM 0.32's ``reload_weights`` loads only the names present on disk, so a tied output
  layer would keep its old weights: the servers serve an untied copy of a tied model and every reloaded
  directory gets an explicit ``lm_head.weight`` (:func:`megatron_dapo.models.export.add_output_layer_copy`).
  (The older ``update_config`` + ``reload_weights`` payload fails on 0.32: ``_hf_config_revision``.)
* native weight transfer (GPU only; CPU answers HTTP 500 "Weight transfer not configured"):
  ``/init_weight_transfer_engine {"init_info"}``, ``/start_weight_update``, ``/update_weights
  {"update_info"}``, ``/finish_weight_update {"weight_version"}``, for the ``nccl`` and ``ipc``
  backends; payloads from :func:`build_nccl_init_info`, :func:`build_nccl_update_info` and
  :func:`build_ipc_update_info` (checked against vLLM's own routes and dataclasses by
  :func:`check_payloads_in_vllm`, which runs :mod:`megatron_dapo.engines.vllm_payload_check` inside
  ``.venv-vllm``).
* sleep / wake (``/sleep?level=1``, ``/wake_up?tags=..``): GPU memory only; vLLM answers 200 but does
  nothing on CPU, so the CPU lifecycle never relies on them (:attr:`VLLMClient.capabilities` lacks
  ``memory_release`` there and the calls are skipped).
* SGLang-only routes (``/update_weights_from_tensor``, ``/init_weights_update_group``,
  ``/begin_weight_update``, ``/get_weights_by_name``, ...) are never sent: those methods raise
  :class:`EngineError` without a request, and :meth:`VLLMClient.weight_update_bracket` answers ``False``.

Every failing control call raises :class:`~megatron_dapo.engines.transport.EngineError` naming the URL.
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import pickle
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any, Sequence

from megatron_dapo.engines.client import (EngineClient, EngineError, GenerateOutput, SyncEngineClient, _check_prompts,
                                          validate_sampling_params)
from megatron_dapo.engines.launch_common import default_engine_python
from megatron_dapo.engines.launch_vllm import vllm_env
from megatron_dapo.models.export import add_output_layer_copy

ABORT_PREFIX = "generate-tokens-"
"""vLLM's engine request id of a ``/inference/v1/generate`` request is this prefix + our ``request_id``."""

_RENAME = {"max_new_tokens": "max_tokens", "sampling_seed": "seed", "min_new_tokens": "min_tokens"}
_PASS = {"temperature", "top_p", "top_k", "n", "stop_token_ids", "ignore_eos", "min_p", "stop",
         "presence_penalty", "frequency_penalty", "repetition_penalty", "skip_special_tokens",
         "spaces_between_special_tokens", "logit_bias"}
DEFAULT_MAX_TOKENS = 128
"""SGLang's default ``max_new_tokens``, sent when the caller gives none (vLLM would fill the context)."""

CAPABILITIES_COMMON = frozenset({
    "generate", "logprobs", "score", "abort", "abort_all", "pause", "weight_version",
    "disk_update", "flush_cache", "weight_versions_per_token", "honours_seed",
})
"""What every vLLM server behind :class:`VLLMClient` does (CPU and GPU). Names shared with the protocol
suite's capability table (``tests/engine_fixtures.py``): ``abort`` (``/abort_requests``), ``disk_update``
(``/collective_rpc reload_weights``), ``honours_seed`` (``SamplingParams.seed``)."""
CAPABILITIES_GPU = frozenset({"memory_release", "weight_transfer_nccl", "weight_transfer_ipc"})
"""Only with CUDA: ``memory_release`` (``/sleep`` / ``/wake_up`` that free memory) and the native
weight-transfer engines (``/init_weight_transfer_engine`` with ``nccl`` / ``ipc``)."""


def to_vllm_sampling_params(sampling_params: dict, *, return_logprob: bool = True) -> dict:
    """SGLang-named ``sampling_params`` -> vLLM ``SamplingParams`` JSON (pure).

    Raises:
        ValueError: a field that is not an SGLang field, or one vLLM's generate route has no
            equivalent for (``regex``, ``json_schema``, ...).
    """
    sp = validate_sampling_params(sampling_params)
    out: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    for key, value in sp.items():
        if key in _RENAME:
            out[_RENAME[key]] = value
        elif key in _PASS:
            out[key] = value
        else:
            raise ValueError(f"sampling_params.{key} has no vLLM SamplingParams equivalent")
    if out.get("top_k") is not None and int(out["top_k"]) < 0:
        out["top_k"] = 0  # SGLang's -1 (all tokens) is vLLM's 0
    if out.get("seed") is not None:
        out["seed"] = int(out["seed"]) % (2 ** 63)
    if return_logprob:
        out["logprobs"] = 0  # only the sampled token's logprob
    return out


def build_vllm_generate_payload(prompt_ids: Sequence[int], sampling_params: dict, *, request_id: str,
                                return_logprob: bool = True, model: str | None = None) -> dict:
    """``/inference/v1/generate`` body (vLLM ``GenerateRequest``) for ONE prompt and its ``n`` samples.

    Raises:
        ValueError: bad prompt / sampling field (see :func:`to_vllm_sampling_params`).
    """
    prompt = _check_prompts([list(prompt_ids)])[0]
    body: dict[str, Any] = {"request_id": str(request_id), "token_ids": prompt,
                            "sampling_params": to_vllm_sampling_params(sampling_params, return_logprob=return_logprob)}
    if model:
        body["model"] = model
    return body


def parse_vllm_generate_response(obj: Any, *, prompt_len: int, return_logprob: bool = True,
                                 engine_url: str | None = None) -> list[GenerateOutput]:
    """Parse a ``/inference/v1/generate`` answer into :class:`GenerateOutput` (ordered by ``index``).

    ``output_logprobs[k]`` is ``choices[i].logprobs.content[k].logprob`` (its ``token_id`` must equal
    ``token_ids[k]``; a ``content`` of another length than ``token_ids`` is returned as is, for the rollout
    validator to drop and count, as :func:`~megatron_dapo.engines.payloads.parse_generate_response` does);
    ``weight_version`` is the version of the last ``weight_versions`` span (the one
    that produced the last token), ``None`` when the server reports none.

    Raises:
        ValueError: malformed answer, unknown ``finish_reason``, logprobs missing, or logprob token ids that
            differ from ``token_ids`` at the same length.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise ValueError(f"vLLM answer has no choices: {str(obj)[:200]}")
    outs = []
    for c in sorted(obj["choices"], key=lambda c: int(c.get("index", 0))):
        where = f"choice {c.get('index')}"
        fr = c.get("finish_reason")
        fr = "abort" if fr is None else str(fr)
        if fr not in ("stop", "length", "abort"):
            raise ValueError(f"{where}: unknown finish_reason {fr!r}")
        ids = [int(t) for t in (c.get("token_ids") or [])]
        logprobs = None
        if return_logprob:
            content = (c.get("logprobs") or {}).get("content")
            if content is None:
                if ids:
                    raise ValueError(f"{where}: logprobs requested but not returned")
                content = []
            # a count mismatch is returned as is, as the SGLang parser does: megatron_dapo.rollout.validate drops
            # that one response and counts it (malformed/logprob_count) instead of failing the whole request
            if len(content) == len(ids) and [int(e["token_id"]) for e in content] != ids:
                raise ValueError(f"{where}: logprob token ids do not match token_ids")
            logprobs = [float(e["logprob"]) for e in content]
        spans = c.get("weight_versions") or []
        version = str(spans[-1]["version"]) if spans and spans[-1].get("version") is not None else None
        detail = {"type": fr}
        if c.get("stop_reason") is not None:
            detail["matched"] = c["stop_reason"]
        if spans:
            detail["weight_versions"] = spans
        outs.append(GenerateOutput(output_ids=ids, output_logprobs=logprobs, finish_reason=fr,
                                   prompt_tokens=int(prompt_len), weight_version=version,
                                   rid=obj.get("request_id"), completion_tokens=len(ids),
                                   finish_reason_detail=detail, engine_url=engine_url))
    return outs


def parse_prompt_logprobs(obj: Any, sequence: Sequence[int], start: int) -> list[list[tuple[int, float]]]:
    """``prompt_logprobs`` of a generate answer -> per position ``j`` in ``[start, len)`` the list of
    ``(token_id, logprob)`` it reports (position 0 has none).

    Raises:
        ValueError: missing / too short ``prompt_logprobs`` or a position without the sequence's token.
    """
    plp = obj.get("prompt_logprobs") if isinstance(obj, dict) else None
    if not isinstance(plp, list) or len(plp) != len(sequence):
        raise ValueError(f"prompt_logprobs missing or of length {len(plp) if isinstance(plp, list) else None} "
                         f"for a sequence of {len(sequence)}")
    rows = []
    for j in range(start, len(sequence)):
        entry = plp[j]
        if j == 0:
            rows.append([])
            continue
        if not isinstance(entry, dict) or str(sequence[j]) not in {str(k) for k in entry}:
            raise ValueError(f"prompt_logprobs[{j}] lacks token {sequence[j]}")
        rows.append([(int(k), float(v["logprob"] if isinstance(v, dict) else v)) for k, v in entry.items()])
    return rows


def build_reload_payload(weights_path: str) -> dict:
    """``/collective_rpc`` body that reloads every worker's weights in place from ``weights_path``
    (``GPUModelRunner.reload_weights(weights_path=...)``; safetensors in HF names)."""
    return {"method": "reload_weights", "kwargs": {"weights_path": str(weights_path)}}


def build_nccl_init_info(master_address: str, master_port: int, rank_offset: int, world_size: int, *,
                         packed: bool = False) -> dict:
    """``init_info`` of ``/init_weight_transfer_engine`` for the ``nccl`` backend (vLLM
    ``NCCLWeightTransferInitInfo``: TCP-store rendezvous at ``master_address:master_port``; the engine's
    first worker is rank ``rank_offset`` of a ``world_size`` group whose rank 0 is the trainer).

    Raises:
        ValueError: ranks outside the group.
    """
    if not 0 < int(rank_offset) < int(world_size):
        raise ValueError(f"rank_offset={rank_offset} must be in [1, world_size={world_size})")
    if not 0 < int(master_port) < 65536:
        raise ValueError(f"master_port {master_port} is not a valid TCP port")
    return {"master_address": str(master_address), "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size), "packed": bool(packed)}


def _dtype_name(dtype) -> str:
    name = str(dtype)
    return name.split(".", 1)[1] if name.startswith("torch.") else name


def build_nccl_update_info(names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]]) -> dict:
    """``update_info`` of ``/update_weights`` for ``nccl`` (``NCCLWeightTransferUpdateInfo``): the
    tensors rank 0 then broadcasts, in this order (dtype names without ``torch.``).

    Raises:
        ValueError: lists of different lengths or empty.
    """
    if not names or not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names / dtypes / shapes must be non-empty and of equal length "
                         f"({len(names)}, {len(dtypes)}, {len(shapes)})")
    return {"names": [str(n) for n in names], "dtype_names": [_dtype_name(d) for d in dtypes],
            "shapes": [[int(x) for x in s] for s in shapes]}


def build_ipc_update_info(names: Sequence[str], dtypes: Sequence, shapes: Sequence[Sequence[int]],
                          ipc_handles: list[dict[str, tuple]]) -> dict:
    """``update_info`` of ``/update_weights`` for ``ipc`` (``IPCWeightTransferUpdateInfo``) over HTTP:
    one ``{gpu uuid: rebuild_cuda_tensor args}`` dict per tensor, pickled and base64-encoded as
    ``ipc_handles_pickled`` (the server needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``).

    Raises:
        ValueError: lists of different lengths.
    """
    info = build_nccl_update_info(names, dtypes, shapes)
    if len(ipc_handles) != len(info["names"]):
        raise ValueError(f"{len(ipc_handles)} IPC handles for {len(info['names'])} tensors")
    info["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(list(ipc_handles))).decode("ascii")
    return info


class VLLMClient(EngineClient):
    """:class:`EngineClient` for vLLM servers: same constructor arguments, balancing, retries and
    :class:`EngineError` semantics, vLLM's routes underneath (see the module docstring).

    Args:
        engine_urls: vLLM server base URLs.
        model: served model name sent with generation (``None``: the server's only model).
        cpu: servers run on CPU (sleep / wake and weight transfer unavailable); ``None`` = ask each
            server (``/server_info`` device type) at the first call that needs it.
        **kwargs: as :class:`EngineClient` (``router_url`` is not supported).

    Attributes:
        capabilities: :data:`CAPABILITIES_COMMON`, plus :data:`CAPABILITIES_GPU` on GPU servers.
    """

    backend = "vllm"

    def __init__(self, engine_urls, *, model: str | None = None, cpu: bool | None = None, **kwargs) -> None:
        if kwargs.get("router_url"):
            raise ValueError("VLLMClient talks to the vLLM servers directly: router_url is not supported")
        super().__init__(engine_urls, **kwargs)
        self.model = model
        self._cpu = cpu

    # ---- capabilities -----------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset:
        """Declared features (CPU servers lack :data:`CAPABILITIES_GPU`); unknown device = CPU set."""
        return CAPABILITIES_COMMON | (CAPABILITIES_GPU if self._cpu is False else frozenset())

    async def on_cpu(self) -> bool:
        """Whether the servers run on CPU (``/server_info``: ``device_config=cpu`` in ``vllm_config``), cached.

        Raises:
            EngineError: an engine failed or its ``/server_info`` names no device.
        """
        if self._cpu is None:
            info = await self._control("GET", "/server_info", None, check_success=False)
            devices = set()
            for d in info.values():
                cfg = d.get("vllm_config", "") if isinstance(d, dict) else ""
                devices.update(re.findall(r"device_config=([A-Za-z]+)", str(cfg)))
            if not devices:
                raise EngineError(f"/server_info names no device_config: {str(info)[:200]}", urls=self.control_urls)
            self._cpu = devices == {"cpu"}
        return bool(self._cpu)

    # ---- generation --------------------------------------------------------------------
    async def generate(self, input_ids, sampling_params, *, return_logprob=True, rid=None,
                       logprob_start_len=None) -> list[GenerateOutput]:
        """Same contract as :meth:`EngineClient.generate`: ``B * n`` outputs, prompt-major; prompt ``i``
        is request ``<rid>-<i>`` with seed ``sampling_seed + i * n``.

        Raises:
            ValueError: bad inputs, ``logprob_start_len`` (use :meth:`score`).
            EngineError: engine failure after retries / 4xx / malformed answer.
        """
        if logprob_start_len not in (None, -1):
            raise ValueError("VLLMClient.generate does not return prompt logprobs: use score()")
        prompts = _check_prompts(input_ids)
        sp = validate_sampling_params(sampling_params)
        n = int(sp.get("n", 1))
        seed = sp.get("sampling_seed")
        prefix = rid if rid is not None else uuid.uuid4().hex

        async def one(i: int, p: list[int]) -> list[GenerateOutput]:
            psp = dict(sp)
            if seed is not None:
                psp["sampling_seed"] = int(seed) + i * n
            request_id = f"{prefix}-{i}"
            body = build_vllm_generate_payload(p, psp, request_id=request_id, return_logprob=return_logprob,
                                               model=self.model)
            url, data = await self._post_balanced("/inference/v1/generate", body, [request_id])
            try:
                outs = parse_vllm_generate_response(data, prompt_len=len(p), return_logprob=return_logprob,
                                                    engine_url=url)
            except (ValueError, KeyError, TypeError) as exc:
                raise EngineError(f"/inference/v1/generate on {url} returned a malformed answer: {exc}",
                                  urls=[url]) from exc
            if len(outs) != n:
                raise EngineError(f"/inference/v1/generate on {url} answered {len(outs)} choices for n={n}",
                                  urls=[url])
            return outs

        parts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return [o for part in parts for o in part]

    async def score(self, sequences, start_lens=0, *, temperature: float = 1.0) -> list[list[float | None]]:
        """Logprobs of ``seq[start:]`` under the served weights at ``temperature`` (teacher forcing).

        vLLM's ``prompt_logprobs`` come from the unscaled distribution, so at ``temperature != 1`` the
        whole vocabulary is requested (``prompt_logprobs: -1``, the server needs ``--max-logprobs -1``)
        and ``log_softmax(logprob / T)`` is taken here; at 1 only the sequence's tokens are requested.
        Position 0 scores ``None``.

        Raises:
            ValueError: ``start`` outside ``[0, len(seq))`` or ``temperature <= 0``.  EngineError: engine failure.
        """
        seqs = _check_prompts(sequences)
        starts = [int(start_lens)] * len(seqs) if isinstance(start_lens, int) else [int(s) for s in start_lens]
        if len(starts) != len(seqs):
            raise ValueError(f"start_lens has {len(starts)} entries for {len(seqs)} sequences")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        full = abs(float(temperature) - 1.0) > 1e-12

        async def one(i: int, seq: list[int], start: int) -> list[float | None]:
            if not 0 <= start < len(seq):
                raise ValueError(f"start_lens[{i}]={start} outside [0, {len(seq)})")
            request_id = f"score-{uuid.uuid4().hex[:12]}-{i}"
            body = {"request_id": request_id, "token_ids": seq,
                    "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": -1 if full else 0,
                                        "detokenize": False}}
            if self.model:
                body["model"] = self.model
            url, data = await self._post_balanced("/inference/v1/generate", body, [request_id])
            try:
                rows = parse_prompt_logprobs(data, seq, start)
            except ValueError as exc:
                raise EngineError(f"score on {url}: {exc}", urls=[url]) from exc
            out: list[float | None] = []
            for j, row in zip(range(start, len(seq)), rows):
                if j == 0:
                    out.append(None)
                    continue
                lp = dict(row)
                if not full:
                    out.append(lp[seq[j]])
                    continue
                scaled = {k: v / float(temperature) for k, v in lp.items()}
                top = max(scaled.values())
                lse = top + math.log(math.fsum(math.exp(v - top) for v in scaled.values()))
                out.append(scaled[seq[j]] - lse)
            return out

        return list(await asyncio.gather(*(one(i, s, st) for i, (s, st) in enumerate(zip(seqs, starts)))))

    # ---- abort / pause -----------------------------------------------------------------
    async def abort(self, rid: str | None = None) -> int:
        """Abort the in-flight requests of ``generate(..., rid=rid)`` (all when ``rid`` is None) by their
        engine ids ``generate-tokens-<rid>-<i>``; they return ``finish_reason == "abort"`` with partial
        tokens. Returns the number of request ids sent.

        Raises:
            EngineError: an engine refused the abort.
        """
        if rid is None:
            await self.abort_all()
            return len(self.control_urls)
        by_url: dict[str, list[str]] = {}
        for key, locs in list(self._rid_locations.items()):
            if key == rid or key.startswith(f"{rid}-"):
                for url, items in locs:
                    by_url.setdefault(url, []).extend(ABORT_PREFIX + item for item in items)
        await asyncio.gather(*(self._control("POST", "/abort_requests", {"request_ids": ids}, urls=[url],
                                             check_success=False) for url, ids in by_url.items()))
        return sum(len(v) for v in by_url.values())

    async def abort_all(self) -> dict[str, Any]:
        """``POST /abort_requests {}`` on every engine (aborts everything in flight)."""
        return await self._control("POST", "/abort_requests", {}, check_success=False)

    async def _abort_quietly(self, url: str, rids: list[str]) -> None:
        try:
            await self._http("POST", url, "/abort_requests", {"request_ids": [ABORT_PREFIX + r for r in rids]},
                             timeout_s=5)
        except Exception:
            pass

    async def pause(self, mode: str = "abort") -> dict[str, Any]:
        """``POST /pause?mode=abort|wait|keep`` on every engine: ``abort`` ends in-flight requests
        (partial outputs return), ``wait`` lets them finish, ``keep`` freezes them until :meth:`resume`.

        Raises:
            ValueError: unknown mode.  EngineError: an engine failed.
        """
        if mode not in ("abort", "wait", "keep"):
            raise ValueError(f"pause mode must be abort, wait or keep, got {mode!r}")
        return await self._control("POST", f"/pause?mode={mode}", None, check_success=False)

    async def resume(self) -> dict[str, Any]:
        """``POST /resume`` on every engine."""
        return await self._control("POST", "/resume", None, check_success=False)

    async def is_paused(self) -> dict[str, bool]:
        """``GET /is_paused`` per engine."""
        res = await self._control("GET", "/is_paused", None, check_success=False)
        return {u: bool((d or {}).get("is_paused")) for u, d in res.items()}

    # ---- info / health -----------------------------------------------------------------
    async def health_generate(self, timeout_s: float = 60.0) -> dict[str, bool]:
        """A 1-token generation on every engine; ``{url: ok}`` (never raises)."""
        async def one(u):
            body = {"token_ids": [0], "sampling_params": {"max_tokens": 1}}
            try:
                status, _ = await self._http("POST", u, "/inference/v1/generate", body, timeout_s)
                return u, status == 200
            except Exception:
                return u, False
        return dict(await asyncio.gather(*(one(u) for u in self.control_urls)))

    async def get_server_info(self, urls: Sequence[str] | None = None) -> dict[str, Any]:
        """Per engine: ``/server_info`` plus ``tp_size`` (``/get_world_size?include_dp=false``) and
        ``version`` (``/version``), the keys the weight sync reads.

        Raises:
            EngineError: an engine failed.
        """
        info = await self._control("GET", "/server_info", None, urls=urls, check_success=False)
        world = await self._control("GET", "/get_world_size?include_dp=false", None, urls=urls, check_success=False)
        version = await self._control("GET", "/version", None, urls=urls, check_success=False)
        out = {}
        for u, d in info.items():
            entry = dict(d) if isinstance(d, dict) else {"server_info": d}
            entry["tp_size"] = int((world.get(u) or {}).get("world_size", 1))
            entry["version"] = (version.get(u) or {}).get("version")
            entry["backend"] = "vllm"
            out[u] = entry
        return out

    async def get_model_info(self) -> dict[str, Any]:
        """``GET /v1/models`` per engine."""
        return await self._control("GET", "/v1/models", None, check_success=False)

    async def get_weight_version(self) -> dict[str, str]:
        """``GET /weight_info`` per engine: ``{url: weight_version}`` (``"None"`` before any update).

        Raises:
            EngineError: an engine failed or reports no ``weight_version`` key.
        """
        res = await self._control("GET", "/weight_info", None, check_success=False)
        out = {}
        for u, d in res.items():
            if not isinstance(d, dict) or "weight_version" not in d:
                raise EngineError(f"/weight_info on {u} has no weight_version: {str(d)[:200]}", urls=[u])
            out[u] = str(d["weight_version"])
        return out

    async def update_weight_version(self, version: str) -> dict[str, Any]:
        """``POST /update_weight_version {"new_version": version}`` on every engine."""
        res = await self._control("POST", "/update_weight_version", {"new_version": str(version)})
        return res

    async def flush_cache(self) -> dict[str, Any]:
        """``POST /reset_prefix_cache`` on every engine.

        Raises:
            EngineError: an engine failed or answered ``success: false`` (blocks still held by running
                requests; :class:`~megatron_dapo.sync.WeightSync` retries).
        """
        return await self._control("POST", "/reset_prefix_cache", None)

    # ---- weights -----------------------------------------------------------------------
    async def collective_rpc(self, method: str, kwargs: dict | None = None) -> dict[str, Any]:
        """``POST /collective_rpc {"method", "kwargs"}`` on every engine (runs on every worker).

        Raises:
            EngineError: HTTP error, or an answer whose ``results`` carry an error.
        """
        res = await self._control("POST", "/collective_rpc", {"method": method, "kwargs": dict(kwargs or {})},
                                  check_success=False)
        for u, d in res.items():
            if isinstance(d, dict) and (d.get("error") or d.get("detail")):
                raise EngineError(f"/collective_rpc {method} on {u} failed: {str(d)[:500]}", urls=[u])
        return res

    async def update_weights_from_disk(self, path: str, weight_version: str | None = None, *,
                                       abort_all_requests: bool = False) -> dict[str, Any]:
        """Reload every server's weights from the HF safetensors directory ``path`` (seen by the servers).

        Steps: give a tied checkpoint an explicit ``lm_head.weight``
        (:func:`~megatron_dapo.models.export.add_output_layer_copy`); ``/pause`` (``mode=abort`` when
        ``abort_all_requests``, else ``wait``: in-flight requests finish on the old weights);
        ``/collective_rpc reload_weights(weights_path=path)``; ``/reset_prefix_cache``;
        ``/update_weight_version`` (when ``weight_version`` is given); ``/resume`` (also after a failure).

        Raises:
            EngineError: any step failed on any engine (the servers are resumed first).
            FileNotFoundError: ``path`` holds no safetensors checkpoint.
        """
        add_output_layer_copy(path)
        await self.pause("abort" if abort_all_requests else "wait")
        try:
            res = await self.collective_rpc("reload_weights", {"weights_path": str(path)})
            await self.flush_cache()
            if weight_version is not None:
                await self.update_weight_version(str(weight_version))
        finally:
            await self.resume()
        return res

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """GPU: ``POST /sleep?level=1`` (weights offloaded, KV cache dropped; server started with
        ``--enable-sleep-mode``). CPU: nothing (vLLM's sleep is a no-op there): ``{url: {"skipped": ...}}``."""
        if await self.on_cpu():
            return {u: {"skipped": "sleep mode is GPU-only"} for u in self.control_urls}
        return await self._control("POST", "/sleep?level=1", None, check_success=False)

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """GPU: ``POST /wake_up`` (``?tags=weights`` / ``kv_cache`` for a subset). CPU: nothing."""
        if await self.on_cpu():
            return {u: {"skipped": "sleep mode is GPU-only"} for u in self.control_urls}
        query = "" if not tags else "?" + "&".join(f"tags={t}" for t in tags)
        return await self._control("POST", "/wake_up" + query, None, check_success=False)

    # ---- native weight transfer (GPU) --------------------------------------------------
    async def init_weight_transfer(self, master_address: str, master_port: int, *, tp_size: int = 1,
                                   packed: bool = False, backend: str = "nccl") -> dict[str, Any]:
        """``POST /init_weight_transfer_engine {"init_info"}`` on every engine. ``nccl``: engine ``e``
        joins as ranks ``1 + e * tp_size ..`` of a group of ``1 + num_engines * tp_size`` (trainer = 0),
        blocking until the trainer joins; ``ipc``: ``{"packed": packed}``.

        Raises:
            ValueError: unknown backend.  EngineError: an engine failed (on CPU: "not configured").
        """
        if backend == "ipc":
            return await self._control("POST", "/init_weight_transfer_engine",
                                       {"init_info": {"packed": bool(packed)}}, check_success=False)
        if backend != "nccl":
            raise ValueError(f"weight transfer backend must be nccl or ipc, got {backend!r}")
        world = 1 + len(self.control_urls) * int(tp_size)

        async def one(e, url):
            info = build_nccl_init_info(master_address, master_port, 1 + e * int(tp_size), world, packed=packed)
            return await self._control("POST", "/init_weight_transfer_engine", {"init_info": info}, urls=[url],
                                       check_success=False)

        res = await asyncio.gather(*(one(e, u) for e, u in enumerate(self.control_urls)))
        return {k: v for d in res for k, v in d.items()}

    async def start_weight_update(self) -> dict[str, Any]:
        """``POST /start_weight_update`` on every engine."""
        return await self._control("POST", "/start_weight_update", None, check_success=False)

    async def update_weights(self, update_info: dict | list[dict]) -> dict[str, Any]:
        """``POST /update_weights {"update_info"}`` (from :func:`build_nccl_update_info` /
        :func:`build_ipc_update_info`) on every engine; for ``nccl`` the trainer broadcasts meanwhile."""
        return await self._control("POST", "/update_weights", {"update_info": update_info}, check_success=False)

    async def finish_weight_update(self, weight_version: str | None = None) -> dict[str, Any]:
        """``POST /finish_weight_update {"weight_version"}`` on every engine."""
        body = {"weight_version": str(weight_version)} if weight_version is not None else None
        return await self._control("POST", "/finish_weight_update", body, check_success=False)

    async def shutdown_weight_transfer(self) -> dict[str, Any]:
        """``POST /shutdown_weight_transfer_engine`` on every engine."""
        return await self._control("POST", "/shutdown_weight_transfer_engine", None, check_success=False)

    async def weight_update_bracket(self, urls: Sequence[str] | None = None) -> dict[str, bool]:
        """``{url: False}`` without a request: vLLM has no SGLang ``/begin_weight_update`` bracket (its own
        ``/start_weight_update`` / ``/finish_weight_update`` belong to the native weight transfer)."""
        return {u: False for u in (list(urls) if urls is not None else self.control_urls)}

    async def begin_weight_update(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`start_weight_update`)."""
        await self._unsupported("/begin_weight_update")

    async def end_weight_update(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`finish_weight_update`)."""
        await self._unsupported("/end_weight_update")

    async def get_weights_by_name(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError`."""
        await self._unsupported("/get_weights_by_name")

    async def _unsupported(self, what: str):
        raise EngineError(f"{what} is SGLang's protocol; vLLM servers use the weight-transfer API "
                          f"(weight_sync.transport=disk on CPU)", urls=self.control_urls)

    async def init_weights_update_group(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`init_weight_transfer`)."""
        await self._unsupported("/init_weights_update_group")

    async def connect_weight_update_group(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError`."""
        await self._unsupported("connect_weight_update_group")

    async def update_weights_from_distributed(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`update_weights`)."""
        await self._unsupported("/update_weights_from_distributed")

    async def update_weights_from_tensor(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`update_weights` with ``ipc``)."""
        await self._unsupported("/update_weights_from_tensor")

    async def destroy_weights_update_group(self, *args, **kwargs):
        """Not a vLLM route: raises :class:`EngineError` (use :meth:`shutdown_weight_transfer`)."""
        await self._unsupported("/destroy_weights_update_group")


class SyncVLLMClient(SyncEngineClient):
    """Blocking client over :class:`VLLMClient` (the :class:`~megatron_dapo.engines.protocols.RolloutEngine` of vLLM):
    :class:`SyncEngineClient`'s methods plus vLLM's own routes, each the coroutine of the same name run on the
    client's loop."""

    def _make_client(self, *args, **kwargs) -> VLLMClient:
        return VLLMClient(*args, **kwargs)

    @property
    def capabilities(self) -> frozenset:
        """:attr:`VLLMClient.capabilities`."""
        return self.client.capabilities

    def on_cpu(self) -> bool:
        """:meth:`VLLMClient.on_cpu`."""
        return self.run(self.client.on_cpu())

    def pause(self, mode: str = "abort") -> dict[str, Any]:
        """:meth:`VLLMClient.pause`."""
        return self.run(self.client.pause(mode))

    def resume(self) -> dict[str, Any]:
        """:meth:`VLLMClient.resume`."""
        return self.run(self.client.resume())

    def is_paused(self) -> dict[str, bool]:
        """:meth:`VLLMClient.is_paused`."""
        return self.run(self.client.is_paused())

    def update_weight_version(self, version: str) -> dict[str, Any]:
        """:meth:`VLLMClient.update_weight_version`."""
        return self.run(self.client.update_weight_version(version))

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> dict[str, Any]:
        """:meth:`VLLMClient.collective_rpc`."""
        return self.run(self.client.collective_rpc(method, kwargs))

    def init_weight_transfer(self, master_address: str, master_port: int, **kwargs) -> dict[str, Any]:
        """:meth:`VLLMClient.init_weight_transfer`."""
        return self.run(self.client.init_weight_transfer(master_address, master_port, **kwargs))

    def start_weight_update(self) -> dict[str, Any]:
        """:meth:`VLLMClient.start_weight_update`."""
        return self.run(self.client.start_weight_update())

    def update_weights(self, update_info: dict | list[dict]) -> dict[str, Any]:
        """:meth:`VLLMClient.update_weights`."""
        return self.run(self.client.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> dict[str, Any]:
        """:meth:`VLLMClient.finish_weight_update`."""
        return self.run(self.client.finish_weight_update(weight_version))

    def shutdown_weight_transfer(self) -> dict[str, Any]:
        """:meth:`VLLMClient.shutdown_weight_transfer`."""
        return self.run(self.client.shutdown_weight_transfer())


def check_payloads_in_vllm(items: list[dict], *, python: str | None = None, timeout_s: float = 600.0) -> list[dict]:
    """Validate HTTP requests (``{"path", "body", "backend"?}``) against vLLM's own routes and request
    classes in ONE subprocess of the vLLM interpreter (:mod:`megatron_dapo.engines.vllm_payload_check`).

    Args:
        items: the requests, e.g. recorded from a :class:`VLLMClient`.
        python: the vLLM interpreter; default :func:`~megatron_dapo.engines.launch_common.default_engine_python`.

    Returns:
        one ``{"ok", "error", "call"}`` per item.

    Raises:
        MissingBackendError: no vLLM interpreter (``make engines``).
        RuntimeError: the checker itself failed (its stderr tail in the message).
    """

    py = python or default_engine_python("vllm")
    script = Path(__file__).with_name("vllm_payload_check.py")
    env = vllm_env(cpu=True)
    env.pop("PYTHONPATH", None)  # the checker imports only vLLM and the standard library
    proc = subprocess.run([py, str(script)], input=json.dumps(items), capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM payload checker ({py}) exited {proc.returncode}: {proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if not lines:
        raise RuntimeError(f"vLLM payload checker printed no result: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    if len(out) != len(items):
        raise RuntimeError(f"vLLM payload checker answered {len(out)} results for {len(items)} items")
    return out
