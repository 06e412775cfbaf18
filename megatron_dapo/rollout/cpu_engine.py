"""CPU rollout engine speaking SGLang's native HTTP API, backed by HF transformers (fp32).

Run::

    python -m megatron_dapo.rollout.cpu_engine --model-path DIR --host 127.0.0.1 --port P \
        [--api-key K] [--seed S] [--max-batch-size 64] [--num-threads 1]

It is a drop-in stand-in for ``python -m sglang.launch_server`` at tiny scale so that the same
:class:`megatron_dapo.rollout.client.EngineClient` drives both.  Endpoints and payloads follow
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
``POST /update_weights_from_tensor`` (answers 400: CUDA-IPC transport, GPU only),
``GET|POST /get_weights_by_name`` (``name``, ``truncate_size``: ``param[:truncate_size].tolist()``).

``--api-key K`` requires ``Authorization: Bearer K`` on every route except ``/health*``
(SGLang's middleware does the same) and answers 401 ``{"error": "Unauthorized"}`` otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from megatron_dapo.rollout.update_group import WeightUpdateGroup, create_weight_update_group, parse_torch_dtype

logger = logging.getLogger("megatron_dapo.cpu_engine")

ALL_MEMORY_TAGS = ("weights", "kv_cache")
_TOP_K_ALL = 1 << 30


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


# --------------------------------------------------------------------------------------------
# The engine (model + worker thread)
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    seqs: list[SeqRequest]
    loop: asyncio.AbstractEventLoop | None = None
    future: "asyncio.Future | None" = None
    error: BaseException | None = None
    weight_version: str = ""
    t_start: float = field(default_factory=time.time)

    def mark_done(self) -> None:
        """Resolve the awaiting handler's future from the worker thread."""
        if self.loop is None or self.future is None:
            return

        def _set():
            if not self.future.done():
                self.future.set_result(None)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # event loop already closed (shutdown)
            pass


class CPUEngine:
    """HF-transformers model plus a generation worker thread that batches pending requests.

    Thread model: HTTP handlers (event loop) enqueue jobs; ONE worker thread runs batches under
    ``model_lock``; weight updates take the same lock, so they happen between batches.
    """

    def __init__(self, model_path: str, *, seed: int = 0, max_batch_size: int = 64,
                 attn_implementation: str = "sdpa") -> None:
        from transformers import AutoModelForCausalLM

        self.model_path = os.path.abspath(model_path)
        if not os.path.isdir(self.model_path):
            raise FileNotFoundError(f"--model-path {model_path!r} is not a directory")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, attn_implementation=attn_implementation)
        self.model.eval()
        self.config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30) or (1 << 30))
        self.tokenizer = None
        tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if any(os.path.exists(os.path.join(self.model_path, f)) for f in tok_files):
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            except Exception as exc:  # unreadable tokenizer: text fields are ""
                logger.warning("could not load the tokenizer in %s (%s); responses carry text=''",
                               self.model_path, exc)
        else:
            logger.info("no tokenizer files in %s; responses carry text=''", self.model_path)
        self.eos_token_ids = self._find_eos_ids()
        self.pad_token_id = int(getattr(self.config, "pad_token_id", None) or 0)
        self.max_batch_size = int(max_batch_size)
        self.weight_version = "default"
        self._num_updates = 0
        self._seed_gen = torch.Generator().manual_seed(int(seed))
        self._seed_lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.released_tags: set[str] = set()
        self.groups: dict[str, WeightUpdateGroup] = {}
        self._queue: "queue.Queue[_Job]" = queue.Queue()
        self._active: dict[str, SeqRequest] = {}
        self._active_lock = threading.Lock()
        self._abort_all_epoch = 0
        self._stop = threading.Event()
        self.inflight = 0
        self._worker = threading.Thread(target=self._worker_loop, name="cpu-engine-gen", daemon=True)
        self._worker.start()

    # ---- helpers -----------------------------------------------------------------------
    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.config):
            v = getattr(src, "eos_token_id", None) if src is not None else None
            if v is None:
                continue
            ids.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        return ids

    def next_seed(self) -> int:
        with self._seed_lock:
            return int(torch.randint(0, 2**62, (1,), generator=self._seed_gen).item())

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except Exception:
            return ""

    def stop(self) -> None:
        self._stop.set()
        self.abort(abort_all=True)
        self._worker.join(timeout=5)
        for g in list(self.groups.values()):
            g.destroy()
        self.groups.clear()

    # ---- requests ----------------------------------------------------------------------
    def submit(self, seqs: list[SeqRequest], loop: asyncio.AbstractEventLoop | None = None) -> _Job:
        """Queue ``seqs`` for the worker; ``loop`` gets a future resolved when they finish."""
        job = _Job(seqs=seqs, loop=loop, future=loop.create_future() if loop is not None else None)
        with self._active_lock:
            for s in seqs:
                self._active[s.rid] = s
            self.inflight += 1
        self._queue.put(job)
        return job

    def finish_job(self, job: _Job) -> None:
        with self._active_lock:
            for s in job.seqs:
                if self._active.get(s.rid) is s:
                    del self._active[s.rid]
            self.inflight -= 1

    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Flag matching in-flight sequences (``rid`` exact or prefix ``rid-``); returns count."""
        n = 0
        with self._active_lock:
            for key, s in self._active.items():
                if abort_all or key == rid or (rid and key.startswith(f"{rid}-")):
                    s.aborted = True
                    n += 1
        return n

    # ---- worker ------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [job]
            n_seqs = len(job.seqs)
            while n_seqs < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                jobs.append(nxt)
                n_seqs += len(nxt.seqs)
            try:
                with self.model_lock:
                    version = self.weight_version
                    for j in jobs:
                        j.weight_version = version
                    seqs = [s for j in jobs for s in j.seqs]
                    for start in range(0, len(seqs), self.max_batch_size):
                        self._run_batch(seqs[start:start + self.max_batch_size])
            except BaseException as exc:  # reported to the waiting handlers
                logger.exception("generation batch failed")
                for j in jobs:
                    j.error = exc
            for j in jobs:
                j.mark_done()

    @torch.no_grad()
    def _run_batch(self, seqs: list[SeqRequest]) -> None:
        """Prefill + decode a batch with left padding and a per-sequence generator."""
        for s in seqs:
            if s.aborted:
                s.finish_reason = {"type": "abort", "message": "Abort before prefill"}
        live = [s for s in seqs if s.finish_reason is None]
        if not live:
            return
        B = len(live)
        lens = [len(s.input_ids) for s in live]
        L = max(lens)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(live):
            ids[b, L - lens[b]:] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[b, L - lens[b]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        keep = 1
        for b, s in enumerate(live):
            if s.return_logprob and s.logprob_start_len >= 0:
                keep = max(keep, lens[b] - max(s.logprob_start_len, 1) + 1)
        temps = torch.tensor([s.params.logprob_temperature for s in live], dtype=torch.float32)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=keep)
        logits = out.logits.float()  # [B, keep, V]
        for b, s in enumerate(live):
            if s.return_logprob and s.logprob_start_len >= 0:
                s.input_logprobs = self._score_prompt(logits[b], s, temps[b].item(), keep)
        next_logits = logits[:, -1, :]
        cache = out.past_key_values
        gens = [torch.Generator().manual_seed(s.seed) for s in live]
        budgets = []
        for s in live:
            cap = max(0, self.max_positions - len(s.input_ids))
            budgets.append(min(s.params.max_new_tokens, cap))
        for b, s in enumerate(live):
            if budgets[b] == 0:
                s.finish_reason = {"type": "length", "length": 0}
        rows = list(range(B))  # batch row -> index into live
        cur_mask = mask
        last_pos = pos[:, -1]
        top_k = torch.tensor([min(s.params.top_k, self.vocab_size) for s in live], dtype=torch.long)
        top_p = torch.tensor([s.params.top_p for s in live], dtype=torch.float32)
        greedy = torch.tensor([s.params.greedy for s in live], dtype=torch.bool)
        while True:
            # drop finished rows (and their KV) from the running batch
            keep_rows = [r for r, i in enumerate(rows) if live[i].finish_reason is None]
            if not keep_rows:
                break
            if len(keep_rows) < len(rows):
                idx = torch.tensor(keep_rows, dtype=torch.long)
                cache.batch_select_indices(idx)
                next_logits = next_logits[idx]
                cur_mask = cur_mask[idx]
                last_pos = last_pos[idx]
                rows = [rows[r] for r in keep_rows]
            sel = torch.tensor(rows, dtype=torch.long)
            lp = torch.log_softmax(next_logits / temps[sel].unsqueeze(1), dim=-1)
            u = torch.stack([torch.rand((), generator=gens[i]) for i in rows])
            sampled = truncated_sample(lp, top_k[sel], top_p[sel], u)
            tok = torch.where(greedy[sel], next_logits.argmax(dim=-1), sampled)
            tok_lp = lp.gather(1, tok.unsqueeze(1)).squeeze(1)
            for r, i in enumerate(rows):
                s = live[i]
                t = int(tok[r])
                s.output_ids.append(t)
                s.output_logprobs.append(float(tok_lp[r]))
                if t in s.params.stop_token_ids or (not s.params.ignore_eos and t in self.eos_token_ids):
                    s.finish_reason = {"type": "stop", "matched": t}
                elif len(s.output_ids) >= budgets[i]:
                    s.finish_reason = {"type": "length", "length": len(s.output_ids)}
                elif s.aborted or self._stop.is_set():
                    s.finish_reason = {"type": "abort", "message": "Aborted by request"}
            if all(live[i].finish_reason is not None for i in rows):
                break
            cur_mask = torch.cat([cur_mask, torch.ones((len(rows), 1), dtype=cur_mask.dtype)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=tok.unsqueeze(1), attention_mask=cur_mask,
                             position_ids=last_pos.unsqueeze(1), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            next_logits = out.logits[:, -1, :].float()

    def _score_prompt(self, logits_b: torch.Tensor, s: SeqRequest, temp: float, keep: int) -> list:
        """Logprobs of prompt tokens ``input_ids[start:]`` from prefill logits (last ``keep`` slots)."""
        n = len(s.input_ids)
        res: list[float | None] = []
        lp = torch.log_softmax(logits_b / temp, dim=-1)  # [keep, V]; slot keep-1 = last prompt pos
        for p in range(s.logprob_start_len, n):
            if p == 0:
                res.append(None)
                continue
            slot = keep - 1 - (n - p)  # logits predicting position p sit at position p-1
            res.append(float(lp[slot, s.input_ids[p]]))
        return res

    # ---- weights -----------------------------------------------------------------------
    def _param_table(self) -> dict[str, torch.Tensor]:
        table = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = set(self.model.state_dict().keys())
        for name, buf in self.model.named_buffers(remove_duplicate=False):
            if name in persistent:
                table.setdefault(name, buf)
        return table

    def load_named_tensors(self, named: dict[str, torch.Tensor], *, require_complete: bool) -> str:
        """Strict-check then copy ``named`` (HF names) into the model; returns a summary.

        Raises:
            ValueError: unknown name, shape mismatch, or (``require_complete``) missing params.
        """
        table = self._param_table()
        unknown = sorted(k for k in named if k not in table)
        if unknown:
            raise ValueError(f"unknown parameter name(s) for this model: {unknown[:8]}"
                             f"{' ...' if len(unknown) > 8 else ''}")
        bad = [f"{k}: got {tuple(v.shape)}, model has {tuple(table[k].shape)}"
               for k, v in named.items() if tuple(v.shape) != tuple(table[k].shape)]
        if bad:
            raise ValueError("shape mismatch: " + "; ".join(bad[:8]))
        if require_complete:
            covered = {table[k].data_ptr() for k in named}
            missing = sorted(k for k, p in self.model.named_parameters() if p.data_ptr() not in covered)
            if missing:
                raise ValueError(f"checkpoint misses parameter(s): {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''}")
        with torch.no_grad():
            for k, v in named.items():
                table[k].copy_(v.to(dtype=table[k].dtype))
        return f"loaded {len(named)} tensors"

    def bump_version(self, weight_version: str | None) -> str:
        self._num_updates += 1
        self.weight_version = str(weight_version) if weight_version is not None else str(self._num_updates)
        return self.weight_version

    def update_from_disk(self, path: str, weight_version: str | None) -> str:
        from safetensors.torch import load_file

        if not os.path.isdir(path):
            raise ValueError(f"model_path {path!r} is not a directory")
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors files in {path!r}")
        named: dict[str, torch.Tensor] = {}
        for f in files:
            for k, v in load_file(f).items():
                if k in named:
                    raise ValueError(f"tensor {k!r} appears in more than one file under {path!r}")
                named[k] = v
        with self.model_lock:
            msg = self.load_named_tensors(named, require_complete=True)
            version = self.bump_version(weight_version)
        return f"{msg} from {len(files)} file(s); weight_version={version}"


# --------------------------------------------------------------------------------------------
# HTTP layer (aiohttp)
# --------------------------------------------------------------------------------------------


def _json_error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": {"message": message}, "success": False, "message": message},
                             status=status)


def build_app(engine: CPUEngine, *, api_key: str | None = None):
    """Build the aiohttp application exposing ``engine`` with SGLang's native routes."""
    from aiohttp import web

    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cpu-engine-ctl")

    @web.middleware
    async def auth(request, handler):
        if api_key and not request.path.startswith("/health") and request.method != "OPTIONS":
            if request.headers.get("Authorization") != f"Bearer {api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def read_json(request) -> dict:
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

    async def run_blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def wait_job(job: _Job):
        try:
            await job.future
        finally:
            engine.finish_job(job)
        if job.error is not None:
            raise job.error

    def item_response(s: SeqRequest, version: str, latency: float) -> dict:
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
        return {"text": engine.decode(s.output_ids), "output_ids": list(s.output_ids), "meta_info": meta}

    def memory_block() -> str | None:
        if engine.released_tags:
            return (f"memory occupation released for tags {sorted(engine.released_tags)}; call "
                    "/resume_memory_occupation before generating")
        return None

    async def generate(request):
        try:
            body = await read_json(request)
            seqs, is_batch = expand_generate_request(body, engine.next_seed, engine.vocab_size)
        except RequestError as exc:
            return _json_error(400, str(exc))
        blocked = memory_block()
        if blocked:
            return _json_error(400, blocked)
        job = engine.submit(seqs, asyncio.get_running_loop())
        try:
            await wait_job(job)
        except asyncio.CancelledError:
            for s in seqs:
                s.aborted = True
            raise
        except Exception as exc:
            return _json_error(500, f"generation failed: {type(exc).__name__}: {exc}")
        latency = time.time() - job.t_start
        items = [item_response(s, job.weight_version, latency) for s in seqs]
        return web.json_response(items if is_batch else items[0])

    async def abort_request(request):
        try:
            body = await read_json(request)
        except RequestError as exc:
            return _json_error(400, str(exc))
        abort_all = bool(body.get("abort_all", False))
        rid = body.get("rid")
        if not abort_all and not rid:
            return _json_error(400, "abort_request needs rid or abort_all=true")
        n = engine.abort(rid=str(rid) if rid else None, abort_all=abort_all)
        return web.json_response({"success": True, "num_aborted": n})

    async def flush_cache(request):
        return web.json_response({"success": True, "message": "Cache flushed (CPU engine keeps no prefix cache)."})

    async def health(request):
        return web.Response(text="OK")

    async def health_generate(request):
        if memory_block():
            return web.Response(status=503, text=memory_block())
        seq = SeqRequest(rid=f"health-{uuid.uuid4().hex}", input_ids=[0],
                         params=SamplingConfig(max_new_tokens=1, temperature=0.0), return_logprob=False,
                         logprob_start_len=-1, seed=0)
        job = engine.submit([seq], asyncio.get_running_loop())
        try:
            await asyncio.wait_for(wait_job(job), timeout=60)
        except Exception as exc:
            return web.Response(status=503, text=f"health_generate failed: {exc}")
        return web.Response(text="OK")

    def model_info_dict() -> dict:
        return {
            "model_path": engine.model_path,
            "tokenizer_path": engine.model_path if engine.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "model_type": getattr(engine.config, "model_type", None),
            "architectures": getattr(engine.config, "architectures", None),
        }

    async def get_model_info(request):
        return web.json_response(model_info_dict())

    async def get_weight_version(request):
        return web.json_response({"weight_version": engine.weight_version})

    async def get_server_info(request):
        info = model_info_dict()
        info.update({"backend": "megatron_dapo.cpu_engine", "max_batch_size": engine.max_batch_size,
                     "released_tags": sorted(engine.released_tags), "inflight_requests": engine.inflight,
                     "weight_update_groups": sorted(engine.groups)})
        return web.json_response(info)

    async def maybe_abort_all(body):
        if body.get("abort_all_requests"):
            engine.abort(abort_all=True)

    async def update_weights_from_disk(request):
        try:
            body = await read_json(request)
            path = body.get("model_path")
            if not isinstance(path, str) or not path:
                raise RequestError("model_path (str) is required")
            if body.get("load_format") not in (None, "auto", "safetensors"):
                raise RequestError(f"load_format={body['load_format']!r} unsupported (use safetensors)")
        except RequestError as exc:
            return _json_error(400, str(exc))
        if "weights" in engine.released_tags:
            return web.json_response({"success": False, "message": "weights are released; call "
                                      "/resume_memory_occupation with tags=['weights'] first",
                                      "num_paused_requests": 0}, status=400)
        await maybe_abort_all(body)
        try:
            msg = await run_blocking(engine.update_from_disk, path, body.get("weight_version"))
        except Exception as exc:
            return web.json_response({"success": False, "message": f"update_weights_from_disk failed: {exc}",
                                      "num_paused_requests": 0}, status=400)
        return web.json_response({"success": True, "message": msg, "num_paused_requests": 0})

    async def init_weights_update_group(request):
        try:
            body = await read_json(request)
            for key in ("master_address", "master_port", "rank_offset", "world_size"):
                if body.get(key) is None:
                    raise RequestError(f"{key} is required")
            group_name = str(body.get("group_name") or "weight_update_group")
            backend = str(body.get("backend") or "gloo")
            if group_name in engine.groups:
                raise RequestError(f"weight update group {group_name!r} already exists; destroy it first")
            rank = int(body["rank_offset"])
            world = int(body["world_size"])
        except (RequestError, TypeError, ValueError) as exc:
            return _json_error(400, str(exc))
        if backend != "gloo":
            return web.json_response({"success": False, "message": f"backend={backend!r}: the CPU engine "
                                      "only supports gloo (SGLang uses nccl on GPU)"}, status=400)
        timeout_s = float(body.get("timeout_s") or 120)
        try:
            group = await run_blocking(lambda: create_weight_update_group(
                str(body["master_address"]), int(body["master_port"]), rank, world, backend=backend,
                timeout_s=timeout_s, group_name=group_name))
        except Exception as exc:
            return web.json_response({"success": False, "message": f"init_weights_update_group failed: {exc}"},
                                     status=400)
        engine.groups[group_name] = group
        return web.json_response({"success": True, "message": f"joined {group_name} as rank {rank}/{world}"})

    async def destroy_weights_update_group(request):
        try:
            body = await read_json(request)
        except RequestError as exc:
            return _json_error(400, str(exc))
        name = str(body.get("group_name") or "weight_update_group")
        group = engine.groups.pop(name, None)
        if group is None:
            return web.json_response({"success": False, "message": f"no weight update group {name!r}"}, status=400)
        group.destroy()
        return web.json_response({"success": True, "message": f"destroyed {name}"})

    def receive_distributed(group: WeightUpdateGroup, names, dtypes, shapes, version):
        # always drain every broadcast first so the trainer (src) never blocks on us
        received: dict[str, torch.Tensor] = {}
        for name, dt, shape in zip(names, dtypes, shapes):
            buf = torch.empty(tuple(int(x) for x in shape), dtype=parse_torch_dtype(dt))
            group.broadcast(buf, src=0)
            received[name] = buf
        if "weights" in engine.released_tags:
            raise ValueError("weights are released; received tensors were dropped - call "
                             "/resume_memory_occupation with tags=['weights'] before updating")
        with engine.model_lock:
            msg = engine.load_named_tensors(received, require_complete=False)
            v = engine.bump_version(version)
        return f"{msg} via broadcast; weight_version={v}"

    async def update_weights_from_distributed(request):
        try:
            body = await read_json(request)
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
            group_name = str(body.get("group_name") or "weight_update_group")
            group = engine.groups.get(group_name)
            if group is None:
                raise RequestError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        except RequestError as exc:
            return _json_error(400, str(exc))
        await maybe_abort_all(body)
        try:
            msg = await run_blocking(receive_distributed, group, names, dtypes, shapes, body.get("weight_version"))
        except Exception as exc:
            return web.json_response({"success": False, "message": f"update_weights_from_distributed failed: {exc}"},
                                     status=400)
        return web.json_response({"success": True, "message": msg})

    async def get_weights_by_name(request):
        try:
            body = await read_json(request)
            name = body.get("name")
            table = engine._param_table()
            if name not in table:
                raise RequestError(f"unknown parameter name {name!r}")
            truncate = int(body.get("truncate_size", 100))
        except (RequestError, TypeError, ValueError) as exc:
            return _json_error(400, str(exc))
        with engine.model_lock:
            values = table[name].detach()[:truncate].tolist()
        return web.json_response(values)

    async def update_weights_from_tensor(request):
        return web.json_response({
            "success": False,
            "message": "update_weights_from_tensor passes CUDA-IPC tensor handles and only works with a "
                       "GPU SGLang server; on the CPU engine use /update_weights_from_disk or "
                       "/update_weights_from_distributed (gloo)"}, status=400)

    def parse_tags(body) -> list[str]:
        tags = body.get("tags")
        if tags is None:
            return list(ALL_MEMORY_TAGS)
        if not isinstance(tags, list) or any(t not in ALL_MEMORY_TAGS for t in tags):
            raise RequestError(f"tags must be a list drawn from {list(ALL_MEMORY_TAGS)}, got {tags!r}")
        return list(tags)

    async def release_memory_occupation(request):
        try:
            tags = parse_tags(await read_json(request))
        except RequestError as exc:
            return _json_error(400, str(exc))
        if engine.inflight:
            return _json_error(400, f"{engine.inflight} request(s) in flight; abort or finish them before "
                                    "releasing memory occupation")
        engine.released_tags.update(tags)
        return web.json_response({"success": True, "message": f"released {tags} (CPU engine: state only)",
                                  "released_tags": sorted(engine.released_tags)})

    async def resume_memory_occupation(request):
        try:
            tags = parse_tags(await read_json(request))
        except RequestError as exc:
            return _json_error(400, str(exc))
        engine.released_tags.difference_update(tags)
        return web.json_response({"success": True, "message": f"resumed {tags}",
                                  "released_tags": sorted(engine.released_tags)})

    async def on_cleanup(app):
        engine.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(middlewares=[auth], client_max_size=1 << 30)
    app.router.add_post("/generate", generate)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/get_model_info", "/model_info"):
        app.router.add_get(path, get_model_info)
    for path in ("/get_weight_version", "/weight_version"):
        app.router.add_get(path, get_weight_version)
    for path in ("/get_server_info", "/server_info"):
        app.router.add_get(path, get_server_info)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/destroy_weights_update_group", destroy_weights_update_group)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    app.router.add_post("/update_weights_from_tensor", update_weights_from_tensor)
    app.router.add_route("*", "/get_weights_by_name", get_weights_by_name)
    app.router.add_post("/release_memory_occupation", release_memory_occupation)
    app.router.add_post("/resume_memory_occupation", resume_memory_occupation)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (``python -m megatron_dapo.rollout.cpu_engine``)."""
    parser = argparse.ArgumentParser(description="CPU rollout engine with SGLang's native HTTP API")
    parser.add_argument("--model-path", required=True, help="HF model directory (config + safetensors)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's master RNG")
    parser.add_argument("--max-batch-size", type=int, default=64, help="max sequences per decode batch")
    parser.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[cpu_engine %(asctime)s] %(levelname)s %(message)s")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    if args.num_threads < 1:
        parser.error("--num-threads must be >= 1")
    torch.set_num_threads(args.num_threads)
    torch.set_grad_enabled(False)
    engine = CPUEngine(args.model_path, seed=args.seed, max_batch_size=args.max_batch_size,
                       attn_implementation=args.attn_implementation)
    from aiohttp import web

    app = build_app(engine, api_key=args.api_key)
    logger.info("serving %s on http://%s:%d (pid %d)", engine.model_path, args.host, args.port, os.getpid())
    # run_app installs SIGINT/SIGTERM handlers -> graceful shutdown (on_cleanup stops the worker)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                shutdown_timeout=5, handle_signals=True)
    logger.info("cpu engine on port %d stopped", args.port)


def _exit_on_sigterm(signum, frame):  # until aiohttp installs its own handlers
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
