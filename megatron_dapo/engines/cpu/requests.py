"""Request handling of the CPU engine, pure: ``/generate`` bodies to per-sequence requests, and sampling.

:func:`expand_generate_request` validates SGLang's ``GenerateReqInput`` fields (``input_ids``,
``sampling_params`` as one dict or one per prompt, ``return_logprob``, ``logprob_start_len``,
``rid``) and expands a batch with ``n > 1`` the way SGLang does (``input_ids * n``: sequence ``k``
belongs to prompt ``k % batch_size``); copy ``j`` of a seeded prompt uses ``sampling_seed + j``
(SGLang would reuse the same seed and produce identical copies), unseeded sequences draw a seed
from the engine.  :func:`parse_sampling_params` checks one ``SamplingParams`` dict and rejects
what the CPU engine does not implement (stop strings, penalties, ``min_p``).
:func:`truncated_sample` draws one token per row under top-k then top-p truncation.

Bad input raises :class:`RequestError` naming the field (the server answers HTTP 400).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

_TOP_K_ALL = 1 << 30  # top_k meaning "no limit" (SGLang's -1)


class RequestError(ValueError):
    """A malformed request (answered with HTTP 400)."""


# --------------------------------------------------------------------------------------------
# Request normalisation (pure)
# --------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """Validated SGLang ``SamplingParams`` subset for one sequence."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = _TOP_K_ALL
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.temperature < 1e-6 else float(self.temperature)


_KNOWN_SAMPLING_KEYS = {
    "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "n", "sampling_seed",
    "ignore_eos", "min_p", "stop", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
}


def parse_sampling_params(sp: dict | None, *, where: str = "sampling_params") -> SamplingConfig:
    """Validate one SGLang ``sampling_params`` dict.

    Supported: ``temperature`` (>= 0; 0 = greedy), ``top_p`` in (0, 1], ``top_k`` (-1 = all or
    >= 1), ``max_new_tokens`` (>= 0, default 128 as in SGLang), ``stop_token_ids``, ``n`` (>= 1),
    ``sampling_seed`` (SGLang's per-request seed field), ``ignore_eos``.  Penalties / ``stop``
    strings / ``min_p`` other than their neutral values are rejected (not implemented on CPU).

    Raises:
        RequestError: naming the offending field.
    """
    sp = dict(sp or {})
    unknown = set(sp) - _KNOWN_SAMPLING_KEYS
    if unknown:
        raise RequestError(f"{where}: unsupported field(s) {sorted(unknown)}")

    def num(key, default, cast):
        v = sp.get(key, default)
        if v is None:
            v = default
        try:
            return cast(v)
        except (TypeError, ValueError):
            raise RequestError(f"{where}.{key}={v!r} is not a valid {cast.__name__}") from None

    cfg = SamplingConfig(
        temperature=num("temperature", 1.0, float),
        top_p=num("top_p", 1.0, float),
        top_k=num("top_k", -1, int),
        max_new_tokens=num("max_new_tokens", 128, int),
        ignore_eos=bool(sp.get("ignore_eos") or False),
        n=num("n", 1, int),
    )
    if not (cfg.temperature >= 0.0 and cfg.temperature < float("inf")):
        raise RequestError(f"{where}.temperature must be a finite number >= 0, got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise RequestError(f"{where}.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k == -1:
        cfg.top_k = _TOP_K_ALL
    if cfg.top_k < 1:
        raise RequestError(f"{where}.top_k must be -1 (disabled) or >= 1, got {cfg.top_k}")
    if cfg.max_new_tokens < 0:
        raise RequestError(f"{where}.max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    if cfg.n < 1:
        raise RequestError(f"{where}.n must be >= 1, got {cfg.n}")
    seed = sp.get("sampling_seed")
    if seed is not None:
        try:
            cfg.sampling_seed = int(seed)
        except (TypeError, ValueError):
            raise RequestError(f"{where}.sampling_seed={seed!r} is not an int") from None
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, (list, tuple)) or not all(isinstance(t, int) for t in stop_ids):
        raise RequestError(f"{where}.stop_token_ids must be a list of ints, got {stop_ids!r}")
    cfg.stop_token_ids = tuple(int(t) for t in stop_ids)
    if sp.get("stop"):
        raise RequestError(f"{where}.stop (stop strings) is not supported by the CPU engine; use stop_token_ids")
    for key, neutral in (("min_p", 0.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                         ("repetition_penalty", 1.0), ("min_new_tokens", 0)):
        if sp.get(key) not in (None, neutral):
            raise RequestError(f"{where}.{key}={sp[key]!r} is not supported by the CPU engine")
    return cfg


@dataclass
class SeqRequest:
    """One sequence to generate / score (after batch and ``n`` expansion)."""

    rid: str
    input_ids: list[int]
    params: SamplingConfig
    return_logprob: bool
    logprob_start_len: int
    seed: int
    # filled by the engine
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] | None = None
    finish_reason: dict | None = None
    aborted: bool = False


def expand_generate_request(body: dict, next_seed, vocab_size: int) -> tuple[list[SeqRequest], bool]:
    """Normalise a ``/generate`` body into per-sequence requests (SGLang batching semantics).

    Args:
        body: the JSON body (``GenerateReqInput`` fields).
        next_seed: callable returning a fresh 63-bit seed for unseeded sequences.
        vocab_size: model vocabulary size (token ids are range-checked).

    Returns:
        ``(seqs, is_batch)``; ``is_batch`` says whether to answer a list.

    Raises:
        RequestError: bad / unsupported field, naming it (and the item index).
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    if body.get("text") is not None:
        raise RequestError("text input is not supported by the CPU engine; send input_ids")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the CPU engine")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or len(ids) == 0:
        raise RequestError("input_ids must be a non-empty list[int] or list[list[int]]")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or len(p) == 0:
            raise RequestError(f"input_ids[{i}] must be a non-empty list of ints")
        for t in p:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise RequestError(f"input_ids[{i}] holds {t!r}, not a token id in [0, {vocab_size})")
    B = len(prompts)
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if len(sp) != B:
            raise RequestError(f"sampling_params has {len(sp)} entries for {B} prompts")
        cfgs = [parse_sampling_params(s, where=f"sampling_params[{i}]") for i, s in enumerate(sp)]
    else:
        if sp is not None and not isinstance(sp, dict):
            raise RequestError("sampling_params must be a dict or a list of dicts")
        cfg = parse_sampling_params(sp)
        cfgs = [cfg] * B
    n = cfgs[0].n
    if any(c.n != n for c in cfgs):
        raise RequestError("sampling_params.n must be the same for all prompts (as in SGLang)")

    def per_item(key, default, cast):
        v = body.get(key)
        if v is None:
            return [default] * B
        if isinstance(v, list):
            if len(v) != B:
                raise RequestError(f"{key} has {len(v)} entries for {B} prompts")
            return [default if x is None else cast(x) for x in v]
        return [cast(v)] * B

    try:
        ret_lp = per_item("return_logprob", False, bool)
        start_len = per_item("logprob_start_len", -1, int)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"return_logprob / logprob_start_len: {exc}") from None
    for i, s in enumerate(start_len):
        if s >= len(prompts[i]):
            raise RequestError(f"logprob_start_len[{i}]={s} must be < prompt length {len(prompts[i])}")
    rid = body.get("rid")
    total = B * n
    if isinstance(rid, list):
        if len(rid) != total:
            raise RequestError(f"rid has {len(rid)} entries, expected {total} (= {B} prompts x n={n})")
        rids = [str(r) for r in rid]
    elif rid is not None:
        rids = [str(rid)] if total == 1 else [f"{rid}-{k}" for k in range(total)]
    else:
        rids = [uuid.uuid4().hex for _ in range(total)]
    seqs = []
    for k in range(total):
        i, j = k % B, k // B
        cfg = cfgs[i]
        seed = cfg.sampling_seed + j if cfg.sampling_seed is not None else next_seed()
        seqs.append(SeqRequest(rid=rids[k], input_ids=list(prompts[i]), params=cfg,
                               return_logprob=ret_lp[i], logprob_start_len=start_len[i], seed=seed))
    return seqs, (not single) or n > 1


# --------------------------------------------------------------------------------------------
# Sampling (pure tensor ops)
# --------------------------------------------------------------------------------------------


def truncated_sample(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from ``softmax(logprobs)`` restricted by top-k then top-p.

    Args:
        logprobs: ``[B, V]`` float32, temperature-scaled log-probabilities.
        top_k: ``[B]`` int64 (``>= V`` = no limit).
        top_p: ``[B]`` float32 in (0, 1].
        uniforms: ``[B]`` float32 in [0, 1), one draw per row from that row's generator.

    Returns:
        ``[B]`` int64 token ids (inverse-CDF sampling over the renormalised kept set; the
        top-p set is the smallest prefix of the sorted distribution whose mass reaches ``top_p``).
    """
    probs = logprobs.exp()
    sorted_p, order = probs.sort(dim=-1, descending=True)
    V = probs.shape[-1]
    ranks = torch.arange(V, device=probs.device).unsqueeze(0)
    keep = ranks < top_k.unsqueeze(1)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep &= mass_before < top_p.unsqueeze(1)
    keep[:, 0] = True
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    cdf = kept.cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)
    # never land on a truncated (zero-mass) slot because of float round-off
    n_kept = keep.sum(dim=-1, keepdim=True)
    pos = torch.minimum(pos, n_kept - 1)
    return order.gather(1, pos).squeeze(1)
