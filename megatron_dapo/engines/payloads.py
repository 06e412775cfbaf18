"""SGLang native-API payloads: pure builders, parsers and validation (no HTTP, no event loop).

Payloads follow SGLang's ``GenerateReqInput`` / ``SamplingParams`` (see
``docs/basic_usage/sampling_params.md`` and ``python/sglang/srt/managers/io_struct.py``):
``input_ids``, ``sampling_params`` (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
``stop_token_ids``, ``ignore_eos``, ``n``, ``sampling_seed``...), ``return_logprob``,
``logprob_start_len``, ``rid``; responses carry ``output_ids`` and ``meta_info`` with
``finish_reason``, ``prompt_tokens``, ``output_token_logprobs`` (``[logprob, token_id, text]``)
and ``weight_version``.

``n > 1`` is expanded here exactly as SGLang expands it (``input_ids * n``, sample-major), each
copy with ``n = 1`` and, when ``sampling_seed`` is set, seed ``sampling_seed + k`` for flat item
``k`` so copies differ; :func:`reorder_sample_major_to_prompt_major` turns the answer prompt-major
(``outputs[i * n + j]`` is sample ``j`` of prompt ``i``).

Weight-update bodies: ``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``
and the ``serialized_named_tensors`` of ``UpdateWeightsFromTensorReqInput``.
:class:`~megatron_dapo.engines.client.EngineClient` sends all of them; everything here is also
importable from :mod:`megatron_dapo.engines.client`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .tensor_ipc import serialize_named_tensors

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
        ValueError: missing fields, unknown finish reason, or token ids differing between
            ``output_ids`` and ``output_token_logprobs`` (names the item index). A logprob list of
            another length than ``output_ids`` is returned as is (the rollout validator drops it).
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
            # a count mismatch is returned as is: megatron_dapo.rollout.validate drops that one response
            lp_ids = [int(e[1]) for e in lp_entries]
            if len(logprobs) == len(ids) and lp_ids != ids:
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
    """Build ``serialized_named_tensors`` for ``/update_weights_from_tensor``: one entry per engine TP rank.

    Each entry is :func:`megatron_dapo.engines.tensor_ipc.serialize_named_tensors` of the same list (SGLang's
    ``MultiprocessingSerializer`` format: base64 text of a ForkingPickler pickle); CUDA tensors travel as
    CUDA-IPC handles, CPU tensors as shared-memory names. No ``sglang`` import is needed.

    Raises:
        ValueError: ``tp_size < 1``.
        TypeError: an entry is not a ``(str, Tensor)`` pair.
    """
    if int(tp_size) < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    one = serialize_named_tensors(list(named_tensors))
    return [one] * int(tp_size)
