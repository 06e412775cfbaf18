"""The CPU engine's model: an HF-transformers causal LM (fp32) plus a worker thread that batches requests.

Generation (:meth:`CPUEngine._run_batch`): prompts are left-padded with explicit ``position_ids``,
prefilled once into a ``transformers.DynamicCache``, then decoded one token per step; finished rows
and their KV entries are dropped from the running batch.  Each sequence samples from its own
``torch.Generator`` (seeded by ``sampling_seed`` or by the engine's ``--seed``-initialised master
generator in arrival order), so its tokens and logprobs never depend on its batch-mates.

Log-probabilities are ``log_softmax(logits / T)[token_id]`` of the temperature-scaled distribution
BEFORE top-p / top-k truncation (``T = 1`` for greedy, ``temperature == 0``) — the quantity the
trainer computes from the actor.  Prompt scoring (``logprob_start_len >= 0``) uses the same
temperature; position 0 has no context and scores ``None``.  A generated stop / EOS token is kept
in ``output_ids`` with its logprob.

Weights: :meth:`CPUEngine.update_from_disk` (``*.safetensors`` of a HF checkpoint, all parameters
required) and :meth:`CPUEngine.load_named_tensors` (a subset by HF name, used after a broadcast)
check names and shapes strictly before copying, under ``model_lock`` so updates happen between
batches.  The HTTP server around it is :mod:`megatron_dapo.engines.cpu.server`, from which
:class:`CPUEngine` is also importable.
"""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from megatron_dapo.engines.cpu.requests import SeqRequest, truncated_sample
from megatron_dapo.engines.update_group import WeightUpdateGroup

# Same logger name as the server module: one name for all of the engine's records.
logger = logging.getLogger("megatron_dapo.cpu_engine")


@dataclass
class _Job:
    """The sequences of one HTTP request, queued for the worker thread."""

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

    ``device`` (default ``"cpu"``) places the fp32 model and its forward passes, e.g. ``"cuda"`` for the
    CUDA-IPC check of benchmarks/gpu; logits come back to the CPU, where sampling runs either way.
    """

    def __init__(self, model_path: str, *, seed: int = 0, max_batch_size: int = 64,
                 attn_implementation: str = "sdpa", device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM  # heavy: transformers, only loaded where a model or tokenizer is

        self.model_path = os.path.abspath(model_path)
        if not os.path.isdir(self.model_path):
            raise FileNotFoundError(f"--model-path {model_path!r} is not a directory")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, attn_implementation=attn_implementation)
        self.device = torch.device(device)  # "cuda[:i]": weights and forward passes there; sampling stays on CPU
        self.model.to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30) or (1 << 30))
        self.tokenizer = None
        tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if any(os.path.exists(os.path.join(self.model_path, f)) for f in tok_files):
            try:
                from transformers import AutoTokenizer  # heavy: transformers, only loaded where a model or tokenizer is

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
        from transformers import DynamicCache  # heavy: transformers, only loaded where a model or tokenizer is

        cache = DynamicCache()
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        logits = out.logits.float().cpu()  # [B, keep, V]
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
                cache.batch_select_indices(idx.to(dev))
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
            out = self.model(input_ids=tok.unsqueeze(1).to(dev), attention_mask=cur_mask.to(dev),
                             position_ids=last_pos.unsqueeze(1).to(dev), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            next_logits = out.logits[:, -1, :].float().cpu()

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
