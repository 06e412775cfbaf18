"""vLLM as a second rollout backend behind the same protocol as :class:`EngineClient`.

Generation uses vLLM's OpenAI-compatible ``POST /v1/completions`` with the prompt given as token
ids (``"prompt": [ids...]``), ``logprobs=1`` and ``return_tokens_as_token_ids=true`` so that
the sampled ids are recoverable from ``choices[i].logprobs.tokens`` (``"token_id:<id>"``) when
the server does not return ``token_ids`` directly.  SGLang-named sampling params are translated:
``max_new_tokens -> max_tokens``, ``sampling_seed -> seed``; ``temperature``, ``top_p``,
``top_k``, ``n``, ``stop_token_ids`` and ``ignore_eos`` keep their names (vLLM extensions).

Weight sync and memory (vLLM dev-mode endpoints, server started with ``VLLM_SERVER_DEV_MODE=1``,
see :func:`megatron_dapo.rollout.launch.vllm_env`):

* reload from disk: ``POST /collective_rpc`` ``{"method": "update_config", "args":
  [{"model_config": {"model": <dir>}}]}`` then ``{"method": "reload_weights"}`` - each worker
  re-reads the checkpoint in ``<dir>`` into the live model;
* ``release_memory_occupation`` -> ``POST /sleep?level=1``; ``resume`` -> ``POST /wake_up``
  (optionally ``?tags=weights`` / ``?tags=kv_cache``).

This backend cannot run in the CPU container: only payload building / parsing are tested.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from megatron_dapo.rollout.client import (
    EngineClient,
    GenerateOutput,
    _check_prompts,
    validate_sampling_params,
)

_RENAME = {"max_new_tokens": "max_tokens", "sampling_seed": "seed"}
_PASS = {"temperature", "top_p", "top_k", "n", "stop_token_ids", "ignore_eos", "min_p", "stop",
         "presence_penalty", "frequency_penalty", "repetition_penalty", "skip_special_tokens",
         "spaces_between_special_tokens", "min_tokens"}


def build_vllm_completions_payload(prompt_ids: Sequence[int], sampling_params: dict, *, model: str,
                                   return_logprob: bool = True) -> dict:
    """``/v1/completions`` body for ONE prompt (``n`` samples) from SGLang-named params.

    Raises:
        ValueError: bad prompt or a sampling field vLLM's completions API does not take.
    """
    prompt = _check_prompts([list(prompt_ids)])[0]
    sp = validate_sampling_params(sampling_params)
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": 128,
                            "return_tokens_as_token_ids": True, "return_token_ids": True}
    for key, value in sp.items():
        if key in _RENAME:
            body[_RENAME[key]] = value
        elif key == "min_new_tokens":
            body["min_tokens"] = value
        elif key in _PASS:
            body[key] = value
        else:
            raise ValueError(f"sampling_params.{key} has no vLLM /v1/completions equivalent")
    if return_logprob:
        body["logprobs"] = 1
    return body


def _token_id(tok: str, where: str) -> int:
    if isinstance(tok, str) and tok.startswith("token_id:"):
        return int(tok.split(":", 1)[1])
    raise ValueError(f"{where}: token {tok!r} is not 'token_id:<id>' (send return_tokens_as_token_ids=true)")


def parse_vllm_completions_response(obj: dict, *, prompt_len: int, weight_version: str | None = None,
                                    engine_url: str | None = None) -> list[GenerateOutput]:
    """Parse a ``/v1/completions`` response into :class:`GenerateOutput` (ordered by ``index``).

    ``finish_reason`` ``"stop"`` / ``"length"`` / ``"abort"`` map 1:1; ``None`` (cut off) maps to
    ``"abort"``.  Token ids come from ``choices[i].token_ids`` (vLLM >= 0.10 with
    ``return_token_ids``) or from ``logprobs.tokens``.

    Raises:
        ValueError: malformed response / unknown finish reason / length mismatch.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise ValueError(f"vLLM response has no choices: {str(obj)[:200]}")
    outs = []
    for c in sorted(obj["choices"], key=lambda c: c.get("index", 0)):
        where = f"choice {c.get('index')}"
        fr = c.get("finish_reason")
        fr = "abort" if fr is None else fr
        if fr not in ("stop", "length", "abort"):
            raise ValueError(f"{where}: unknown finish_reason {fr!r}")
        lp = c.get("logprobs") or None
        ids = c.get("token_ids")
        if ids is None:
            if lp is None:
                raise ValueError(f"{where}: neither token_ids nor logprobs.tokens returned")
            ids = [_token_id(t, where) for t in lp.get("tokens", [])]
        ids = [int(t) for t in ids]
        logprobs = None
        if lp is not None:
            logprobs = [float(x) for x in lp.get("token_logprobs", [])]
            if len(logprobs) != len(ids):
                raise ValueError(f"{where}: {len(logprobs)} logprobs for {len(ids)} tokens")
        outs.append(GenerateOutput(output_ids=ids, output_logprobs=logprobs, finish_reason=fr,
                                   prompt_tokens=int(prompt_len), weight_version=weight_version,
                                   text=c.get("text") or "", rid=obj.get("id"), completion_tokens=len(ids),
                                   finish_reason_detail={"type": fr}, engine_url=engine_url))
    return outs


def build_vllm_reload_payloads(model_dir: str) -> list[dict]:
    """The two ``/collective_rpc`` bodies that reload weights from ``model_dir``."""
    return [{"method": "update_config", "args": [{"model_config": {"model": str(model_dir)}}]},
            {"method": "reload_weights"}]


class VLLMClient(EngineClient):
    """:class:`EngineClient` variant for vLLM servers (same balancing / retries / errors).

    Args:
        engine_urls: vLLM server base URLs.
        model: the served model name (``--served-model-name`` or the model path).
        **kwargs: as :class:`EngineClient`.
    """

    def __init__(self, engine_urls, *, model: str, **kwargs) -> None:
        super().__init__(engine_urls, **kwargs)
        self.model = model
        self.weight_version: str | None = "default"
        self._updates = 0

    async def generate(self, input_ids, sampling_params, *, return_logprob=True, rid=None,
                       logprob_start_len=None) -> list[GenerateOutput]:
        """Same contract as :meth:`EngineClient.generate` (prompt-major ``B * n`` outputs)."""
        if logprob_start_len not in (None, -1):
            raise ValueError("VLLMClient.generate does not support logprob_start_len (prompt logprobs)")
        prompts = _check_prompts(input_ids)
        sp = validate_sampling_params(sampling_params)
        n = int(sp.get("n", 1))
        seed = sp.get("sampling_seed")

        async def one(i, p):
            psp = dict(sp)
            if seed is not None:
                psp["sampling_seed"] = int(seed) + i * n
            body = build_vllm_completions_payload(p, psp, model=self.model, return_logprob=return_logprob)
            url, data = await self._post_balanced("/v1/completions", body, [])
            outs = parse_vllm_completions_response(data, prompt_len=len(p), weight_version=self.weight_version,
                                                   engine_url=url)
            if len(outs) != n:
                raise ValueError(f"vLLM at {url} answered {len(outs)} choices, expected n={n}")
            return outs

        parts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return [o for part in parts for o in part]

    async def update_weights_from_disk(self, path: str, weight_version: str | None = None, *,
                                       abort_all_requests: bool = False) -> dict[str, Any]:
        """Reload weights from ``path`` on every server via ``/collective_rpc`` (dev mode)."""
        res: dict[str, Any] = {}
        for body in build_vllm_reload_payloads(path):
            res = await self._control("POST", "/collective_rpc", body, check_success=False)
        self._updates += 1
        self.weight_version = str(weight_version) if weight_version is not None else str(self._updates)
        return res

    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /sleep?level=1`` (offload weights, drop KV cache)."""
        return await self._control("POST", "/sleep?level=1", None, check_success=False)

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``POST /wake_up`` (``?tags=weights&tags=kv_cache`` subset when given)."""
        query = "" if not tags else "?" + "&".join(f"tags={t}" for t in tags)
        return await self._control("POST", "/wake_up" + query, None, check_success=False)

    async def flush_cache(self) -> dict[str, Any]:
        """``POST /reset_prefix_cache``."""
        return await self._control("POST", "/reset_prefix_cache", None, check_success=False)

    async def get_weight_version(self) -> dict[str, str]:
        """vLLM has no weight-version route: the version this client last installed."""
        return {u: str(self.weight_version) for u in self.control_urls}
