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
check names and shapes strictly; MoE models whose transformers module stores the experts fused (transformers 5:
``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``) also answer to the
checkpoint's per-expert names (:func:`fused_expert_aliases`), so the trainer's per-expert tensors load by name;
:meth:`CPUEngine.update_weights` copies them and bumps the weight version under ``model_lock``, so updates happen
between batches.  The HTTP server around it is
:mod:`megatron_dapo.engines.cpu.server`.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megatron_dapo.engines.cpu.requests import SeqRequest, truncated_sample

#: ``config.model_type`` of MoE families whose checkpoints name each expert
#: ``mlp.experts.<e>.{gate,up,down}_proj.weight`` (transformers 5 fuses them on load:
#: ``transformers/conversion_mapping.py``, the ``qwen2_moe`` entry, which ``qwen3_moe`` shares):
#: :func:`fused_expert_aliases` maps those names onto the fused parameters.
PER_EXPERT_CHECKPOINT_TYPES = ("qwen2_moe", "qwen3_moe")


def fused_expert_aliases(model: torch.nn.Module) -> dict[str, tuple[str, int, slice]]:
    """Checkpoint names of fused MoE expert tensors -> ``(fused parameter name, expert index, row slice)``.

    transformers 5 keeps a MoE layer's experts in one module with two 3-D parameters, ``gate_up_proj``
    ``[E, 2I, H]`` (expert ``e``'s ``[gate_e; up_e]``: its forward takes ``linear(x, gate_up_proj[e]).chunk(2)``)
    and ``down_proj`` ``[E, H, I]``, where the checkpoint (and the trainer's weight sync) has per-expert
    ``<module>.<e>.gate_proj.weight`` ``[I, H]``, ``up_proj.weight`` ``[I, H]`` and ``down_proj.weight`` ``[H, I]``.
    Each alias is a view: ``fused[e, rows]``. Only for ``config.model_type`` in :data:`PER_EXPERT_CHECKPOINT_TYPES`
    (other families name their experts differently) and only for modules whose shapes are exactly that layout;
    empty for a dense model, or with transformers 4 (per-expert modules, the names are the parameters' own).
    """
    if getattr(model.config, "model_type", None) not in PER_EXPERT_CHECKPOINT_TYPES:
        return {}
    out: dict[str, tuple[str, int, slice]] = {}
    for mname, mod in model.named_modules():
        gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)
                and gate_up.dim() == 3 and down.dim() == 3):
            continue
        n_exp, hidden, inter = down.shape
        if tuple(gate_up.shape) != (n_exp, 2 * inter, hidden):
            continue
        for e in range(n_exp):
            out[f"{mname}.{e}.gate_proj.weight"] = (f"{mname}.gate_up_proj", e, slice(0, inter))
            out[f"{mname}.{e}.up_proj.weight"] = (f"{mname}.gate_up_proj", e, slice(inter, 2 * inter))
            out[f"{mname}.{e}.down_proj.weight"] = (f"{mname}.down_proj", e, slice(None))
    return out


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
        self.model_path = os.path.abspath(model_path)
        if not os.path.isdir(self.model_path):
            raise FileNotFoundError(f"--model-path {model_path!r} is not a directory")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, attn_implementation=attn_implementation)
        self.device = torch.device(device)  # "cuda[:i]": weights and forward passes there; sampling stays on CPU
        self.model.to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.expert_aliases = fused_expert_aliases(self.model)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30) or (1 << 30))
        self.tokenizer = None
        tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if any(os.path.exists(os.path.join(self.model_path, f)) for f in tok_files):
            try:
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
        """The next seed of the master generator, in ``[0, 2**62)`` (thread-safe; arrival order)."""
        with self._seed_lock:
            return int(torch.randint(0, 2**62, (1,), generator=self._seed_gen).item())

    def decode(self, ids: list[int]) -> str:
        """Text of token ``ids`` without special tokens; ``""`` without a (working) tokenizer."""
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except Exception:
            return ""

    def stop(self) -> None:
        """Abort every in-flight sequence and stop the worker thread (waits up to 5 s for it)."""
        self._stop.set()
        self.abort(abort_all=True)
        self._worker.join(timeout=5)

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
        """Forget ``job``'s sequences (no longer abortable) and count it out of ``inflight``."""
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
    def param_table(self) -> dict[str, torch.Tensor]:
        """The model's parameters and persistent buffers by HF name (tied names included), live tensors, plus
        the per-expert checkpoint names of fused MoE experts (:func:`fused_expert_aliases`) as views into them."""
        table = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = set(self.model.state_dict().keys())
        for name, buf in self.model.named_buffers(remove_duplicate=False):
            if name in persistent:
                table.setdefault(name, buf)
        for alias, (fused, e, rows) in self.expert_aliases.items():
            table[alias] = table[fused].data[e, rows]
        return table

    def _owner(self, name: str, table: dict[str, torch.Tensor]) -> torch.Tensor:
        """The parameter (or buffer) that table entry ``name`` writes into: itself, or a fused expert parameter."""
        alias = self.expert_aliases.get(name)
        return table[alias[0]] if alias is not None else table[name]

    def load_named_tensors(self, named: dict[str, torch.Tensor], *, require_complete: bool) -> str:
        """Strict-check then copy ``named`` (HF names) into the model; returns a summary.

        ``named`` maps HF names (:meth:`param_table`'s keys: per-expert checkpoint names of fused experts
        included) to tensors of exactly the entry's shape, any floating dtype (cast to the model's).

        Raises:
            ValueError: unknown name, shape mismatch, or (``require_complete``) a parameter not entirely
                covered (a fused expert parameter counts as covered when every expert's slices are given).
        """
        table = self.param_table()
        unknown = sorted(k for k in named if k not in table)
        if unknown:
            raise ValueError(f"unknown parameter name(s) for this model: {unknown[:8]}"
                             f"{' ...' if len(unknown) > 8 else ''}")
        bad = [f"{k}: got {tuple(v.shape)}, model has {tuple(table[k].shape)}"
               for k, v in named.items() if tuple(v.shape) != tuple(table[k].shape)]
        if bad:
            raise ValueError("shape mismatch: " + "; ".join(bad[:8]))
        if require_complete:
            covered: dict[int, int] = {}  # id(parameter) -> elements given (tied names share one parameter)
            for k in named:
                owner = id(self._owner(k, table))
                covered[owner] = covered.get(owner, 0) + table[k].numel()
            missing = sorted(k for k, p in self.model.named_parameters() if covered.get(id(p), 0) < p.numel())
            if missing:
                raise ValueError(f"checkpoint misses parameter(s): {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''}")
        with torch.no_grad():
            for k, v in named.items():
                table[k].copy_(v.to(dtype=table[k].dtype))
        return f"loaded {len(named)} tensors"

    def update_weights(self, named: dict[str, torch.Tensor], weight_version: str | None, *,
                       require_complete: bool, source: str) -> str:
        """Load ``named`` (:meth:`load_named_tensors`) and set the weight version, under ``model_lock``.

        The new version is ``weight_version``, or the number of updates so far when it is None.
        Returns ``"loaded N tensors {source}; weight_version=V"``.

        Raises:
            ValueError: as :meth:`load_named_tensors`; nothing is loaded and the version stays.
        """
        with self.model_lock:
            msg = self.load_named_tensors(named, require_complete=require_complete)
            self._num_updates += 1
            version = str(weight_version) if weight_version is not None else str(self._num_updates)
            self.weight_version = version
        return f"{msg} {source}; weight_version={version}"

    def update_from_disk(self, path: str, weight_version: str | None) -> str:
        """Load every tensor of the ``*.safetensors`` files in directory ``path`` (all parameters required).

        Returns the summary of :meth:`update_weights`.

        Raises:
            ValueError: ``path`` is not a directory, has no safetensors file, repeats a tensor across
                files, or fails :meth:`load_named_tensors`.
        """
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
        return self.update_weights(named, weight_version, require_complete=True, source=f"from {len(files)} file(s)")
