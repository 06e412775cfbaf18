"""The DAPO training loop (arXiv 2503.14476, Algorithm 1) — one readable file.

Every trainer process (one per GPU; gloo processes on CPU) runs this loop in lockstep. Rank 0 alone talks
to the rollout engines and writes TensorBoard; it sends each data-parallel rank only its share of each
step's batch (:mod:`megatron_dapo.actor.dispatch`).

Per step::

    rollout   sample prompts × G responses on the engines (SGLang HTTP API)
    reward    DAPO rule (+1 / -1 from the last "Answer:" line) + soft overlong punishment (eq. 13)
    filter    dynamic sampling: keep groups with 0 < #correct < G, generate more until full (eq. 11)
    advantage group-normalised rewards (eq. 9), broadcast per token
    old logp  log π_old of the response tokens from the actor
    update    mini-batches of the token-level decoupled-clip loss (eq. 8, ε_low / ε_high)
    sync      reshard the actor's weights into the engines
    log       TensorBoard scalars; periodic checkpoint; SIGUSR1/SIGTERM → checkpoint → exit 3 (requeue)

The batch comes from a :class:`~megatron_dapo.rollout.batch_source.BatchSource`: synchronous (generated at
the step's start with the current weights) or one-step off-policy (``rollout.max_staleness: 1``,
disaggregated engines: generated in the background during the previous step, by the weights of one step
earlier; the source also decides when the step's weights can be pushed). The batch in flight at a
checkpoint is part of it (exact resume).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from .actor.batching import FlatBatch
from .actor.checkpoint import (NonFiniteCheckpointError, latest_checkpoint, load_checkpoint, prune_checkpoints,
                               save_checkpoint)
from .actor.dispatch import Dispatcher, LocalShard, StepPlan, plan_step
from .actor.megatron_actor import LossSettings, MegatronActor
from .actor.parallel import destroy_parallel
from .algorithm import (DynamicSampler, Group, flatten_groups, logprob_mismatch_parts,
                        rollout_correction_keep_mask)
from .backend import default_device, has_cuda
from .config import DAPOConfig, dump_config
from .data import (PromptDataset, demo_rows, load_rows, load_tokenizer, make_tiny_checkpoint, val_rows,
                   write_rows)
from .engines.engine_set import BACKENDS, EngineSet
from .evaluation import evaluate, log_eval_to_tensorboard
from .errors import EXIT_RESTARTABLE, EXIT_USER_ERROR, MegatronDapoError, RestartableFailure, TrainingStopped, one_line
from .launch import REQUEUE_EXIT_CODE
from .metrics import scalars, scoped, timed
from .models.export import save_hf_checkpoint
from .models.real_model import MissingExtraError, prepare_from_gguf
from .reward import scoring_resources
from .rollout.batch_source import BatchSource, OneStepOffBatchSource, Rollout, SyncBatchSource
from .rollout.generation import RolloutSettings, stop_ids_for_model
from .rollout.validate import ResponseValidator
from .sync.collective import from_rank0 as _broadcast
from .sync.collective import on_rank0

log = logging.getLogger("megatron_dapo")


#: The metrics printed on the console line of a step (``steps.jsonl`` and TensorBoard get every scalar).
CONSOLE_KEYS = ("rollout/reward_mean", "rollout/acc", "rollout/response_length_mean",
                "dynamic_sampling/num_gen_batches", "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm",
                "actor/lr", "timing/step_s")


# ---------------------------------------------------------------------------------------------- setup


def _local_rank0() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0


def prepare_model(cfg: DAPOConfig, wait_s: float = 600.0) -> Path:
    """Make sure ``model.hf_path`` exists; create the tiny random checkpoint when ``model.make_tiny``, or
    dequantise the GGUF named by ``model.from_gguf`` (:mod:`megatron_dapo.models.real_model`).

    Creation is atomic (temporary directory, then rename) and done by one process per node; the others
    wait for it. Returns the model directory.
    """
    path = Path(cfg.model.hf_path)
    if (path / "config.json").exists():
        return path
    if not (cfg.model.make_tiny or cfg.model.from_gguf):
        raise TrainingStopped(f"model.hf_path={path} has no config.json (set model.make_tiny=true for a demo model)")
    if _local_rank0() and cfg.model.from_gguf:
        try:
            prepare_from_gguf(cfg.model.from_gguf, path)
        except MissingExtraError as e:
            raise TrainingStopped(str(e)) from None
    elif _local_rank0():
        m = cfg.model
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        make_tiny_checkpoint(tmp, family=m.tiny_family, tokenizer_dir=m.tiny_tokenizer_dir,
                             demo_rows=None if m.tiny_tokenizer_dir else demo_rows(cfg),
                             hidden_size=m.tiny_hidden_size, num_layers=m.tiny_num_layers,
                             num_attention_heads=m.tiny_num_attention_heads,
                             num_key_value_heads=m.tiny_num_key_value_heads,
                             intermediate_size=m.tiny_intermediate_size, seed=cfg.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("created tiny %s checkpoint at %s", m.tiny_family, path)
    deadline = time.time() + wait_s
    while not (path / "config.json").exists():
        if time.time() > deadline:
            raise TrainingStopped(f"timed out waiting for {path} to be created")
        time.sleep(0.5)
    return path


def trim_steps_log(path: Path, last_step: int) -> int:
    """Keep the lines of a ``steps.jsonl`` up to step ``last_step`` (the step a run resumes after; 0: none).

    After a crash the log can hold steps past the checkpoint the next run resumes from (it saves every
    ``trainer.save_interval`` steps), and a line cut short by the kill; the resumed run logs those steps again,
    so they go (rewritten atomically). Returns the number of lines removed (0 when ``path`` does not exist)."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # torn or foreign line
            continue
        if step <= last_step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _all_flag(flag: bool) -> bool:
    """True on every rank when any rank saw ``flag``."""
    t = torch.tensor([1.0 if flag else 0.0], device=default_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _signals_deferred:
    """Block SIGUSR1/SIGTERM while a checkpoint is written: helper processes spawned by the checkpoint writer
    inherit the blocked mask (a signal sent to the whole process group cannot kill them), and the trainer
    receives the signal when the block ends."""

    SIGNALS = {signal.SIGUSR1, signal.SIGTERM}

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


class _Preemption:
    """SIGUSR1 / SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 3."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: will checkpoint and exit after the current step", self.signal_name)


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds every component from a validated :class:`DAPOConfig` and runs the loop (:meth:`fit`)."""

    def __init__(self, cfg: DAPOConfig, preempt: Optional["_Preemption"] = None):
        self.cfg = cfg
        self._stack = ExitStack()
        self._dispatcher: Optional[Dispatcher] = None  # built collectively at the first step (:attr:`dispatcher`)
        self._batch_ids: list[int] = []  # the prompt indices of the step's batch (rank 0), for steps.jsonl
        self._stack.enter_context(scoring_resources())  # the reward threads and math-verify workers end with the run
        self.preempt = preempt or _Preemption()
        self.alg = cfg.resolved_algorithm()
        if not cfg.rollout.engine_urls:  # a missing engine venv fails fast, before the actor is built
            BACKENDS[cfg.rollout.backend].preflight(cfg.rollout.engine_python)
        self.hf_path = prepare_model(cfg)
        self._build_actor()
        rows = self._build_data()
        self.loss = LossSettings.from_config(cfg)
        self.step = 0
        self.writer = self._open_run_dir(rows)
        # the engines (rank 0 launches them), their state and weight version, and the weight sync (every rank)
        self.engines = EngineSet.launch(cfg, self.actor, self.hf_path, self._stack)
        self.client = self.engines.client  # rank 0: the rollout's blocking client; None elsewhere
        self.nonfinite_streak = 0  # consecutive skipped (non-finite) optimizer updates
        self.batches = self._build_batch_source()
        self.val_rows = val_rows(cfg)
        self._resume_push_metrics: dict[str, float] = {}  # the push at resume: logged with the first step
        self.engines.to_training()  # colocated: the actor takes the GPUs (a checkpoint may be loaded)
        self._resume()
        if self.rank == 0:  # a crashed run may have logged steps after the checkpoint it resumes from
            dropped = trim_steps_log(cfg.run_dir / "steps.jsonl", self.step)
            if dropped:
                log.warning("steps.jsonl: dropped %d line(s) after step %d, where this run resumes", dropped, self.step)
        self.engines.to_generation(str(self.step))

    # ------------------------------------------------------------------ builders
    def _build_actor(self) -> None:
        """The Megatron actor (initialises the process group), this process's rank and the world size; the
        config is validated against the world size."""
        # the LR schedule counts rollout steps (actor.lr_warmup_steps); fit() moves it once per step
        # a collective that hangs longer than trainer.collective_timeout_min (a dead or stuck rank) raises: the
        # process exits and the Slurm script requeues the job (slurm/common.sh, dapo_finish)
        t = self.cfg.trainer
        self.actor = MegatronActor(self.hf_path, self.cfg.actor, total_train_steps=t.total_steps, seed=self.cfg.seed,
                                   collective_timeout_s=t.collective_timeout_min * 60)
        self._stack.callback(self.actor.close)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.cfg.validate(world_size=self.world)

    def _build_data(self) -> list[dict]:
        """The tokenizer, the prompt dataset and the dynamic sampler; returns the training rows."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer_path or self.hf_path)
        rows = load_rows(cfg.data.train_files) if cfg.data.train_files else demo_rows(cfg)
        self.dataset = PromptDataset(rows, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.sampler = DynamicSampler(cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt,
                                      enabled=self.alg.dynamic_sampling,
                                      oversample_factor=cfg.algorithm.oversample_factor,
                                      max_num_gen_batches=cfg.algorithm.max_num_gen_batches,
                                      carry_over_surplus=cfg.carries_surplus())
        return rows

    def _open_run_dir(self, rows: list[dict]) -> Optional[SummaryWriter]:
        """Rank 0: the run directory with ``config.yaml`` (and ``demo_train.jsonl`` for the demo task); returns
        its TensorBoard writer (``None`` on other ranks)."""
        if self.rank != 0:
            return None
        cfg = self.cfg
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, cfg.run_dir / "config.yaml")
        if not cfg.data.train_files:
            write_rows(rows, cfg.run_dir / "demo_train.jsonl")
        return self._stack.enter_context(SummaryWriter(log_dir=str(cfg.tb_dir)))

    def _build_batch_source(self) -> BatchSource:
        """The response validator, the rollout settings, rank 0's :class:`Rollout` and the batch source of
        ``rollout.max_staleness`` (0: :class:`SyncBatchSource`, 1: :class:`OneStepOffBatchSource`)."""
        cfg, r = self.cfg, self.cfg.rollout
        self.response_validator = ResponseValidator(self.actor.spec.vocab_size, r.max_response_length,
                                                    r.max_consecutive_malformed_per_engine)
        self.rollout_settings = RolloutSettings.from_config(
            cfg, stop_token_ids=stop_ids_for_model(self.tokenizer, self.hf_path),
            response_validator=self.response_validator)
        if self.rank == 0:
            log.info("stop token ids: %s", list(self.rollout_settings.stop_token_ids))
        self.rollout = Rollout(self.engines, self.dataset, self.sampler, self.tokenizer, self.rollout_settings,
                               self.response_validator, cfg.data.max_prompt_length)
        if self.rank == 0 and cfg.algorithm.tis_cap is None and self.loss.correction.tis_cap is not None:
            log.info("%s trains tokens from older weights and no correction is set: algorithm.tis_cap defaults to "
                     "%s (truncated importance weight against the engine's behaviour policy)",
                     " and ".join(cfg.stale_token_sources()), self.loss.correction.tis_cap)
        source = OneStepOffBatchSource if r.max_staleness else SyncBatchSource
        return source(self.rollout, self.engines, is_rank0=self.rank == 0)

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        """JSON-serialisable state besides the actor's. ``prefetch`` (one-step off-policy, rank 0): the next
        step's batch already generated (:meth:`BatchSource.state_dict`); dataset and sampler are as after it."""
        return {"step": self.step, "dataset": self.dataset.state_dict(), "sampler": self.sampler.state_dict(),
                "prompt_skips": self.rollout.prompt_skips, "python_random": repr(random.getstate()),
                "prefetch": self.batches.state_dict()}

    def _resume(self) -> None:
        c = self.cfg
        if c.resume == "none":
            return
        path = latest_checkpoint(c.ckpt_dir) if c.resume == "auto" else Path(c.resume)
        if path is None:
            return
        state = load_checkpoint(self.actor, path)
        self.step = int(state["step"])
        self.dataset.load_state_dict(state["dataset"])
        self.sampler.load_state_dict(state["sampler"])
        self.rollout.prompt_skips = int(state.get("prompt_skips", 0))
        self.batches.load_state_dict(state.get("prefetch"), self.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        # the engines started from the HF weights, not the checkpoint's; the push (and its logprob check) is
        # logged with the first step after the resume
        self._resume_push_metrics = self.engines.to_generation(str(self.step))

    def save(self) -> Path:
        self.batches.drain()  # one-step off-policy: the batch in flight becomes part of the checkpoint
        self.engines.to_training()
        with _signals_deferred():
            try:
                path = save_checkpoint(self.actor, self.cfg.ckpt_dir, self.step, self._trainer_state())
            except NonFiniteCheckpointError as e:
                raise TrainingStopped(str(e)) from None
        if self.rank == 0:
            prune_checkpoints(self.cfg.ckpt_dir, self.cfg.trainer.keep_last_checkpoints)
            log.info("checkpoint saved: %s", path)
        return path

    # ------------------------------------------------------------------ one step
    def train_one_step(self) -> dict[str, float]:
        """One DAPO step (Algorithm 1). Collective; returns the step's scalars (identical on every rank).

        The phases, in order: generate and score, then filter (dynamic sampling; both in the batch source,
        which generates until the batch is full) → advantages (rank 0) → each DP rank its rows → log π_old →
        mini-batch updates → weights into the engines (when the batch source deems it safe: at once, or with
        one-step off-policy at the next step's start, after the batch generating meanwhile)."""
        metrics, self._resume_push_metrics = dict(self._resume_push_metrics), {}
        with timed(metrics, "step"):
            groups, rollout_metrics = self.batches.next(self.step)  # generate + score + filter
            metrics.update(rollout_metrics)
            metrics.update(self.engines.to_training())  # colocated: engines sleep, the actor comes back
            flat, plan = self._advantages(groups)
            shard = self._dispatch(flat, plan)
            self._batch_ids = [g.prompt_index for g in groups] if groups is not None else []
            batch = shard.batch.to_actor_batch()  # this DP rank's rows, padded
            del shard.batch  # the flat copy is no longer needed (memory: bench_batch_dispatch.py)
            with timed(metrics, "old_logprob"):
                metrics.update(self._old_logprobs(batch, shard))
            with timed(metrics, "train"):
                metrics.update(self._update(batch, shard))
            self.step += 1
            metrics.update(self._push())  # a failed engine is replaced here, before the push
            metrics.update(self.engines.health_metrics())
        return metrics

    def _advantages(self, groups: Optional[list[Group]]) -> tuple[Optional[FlatBatch], Optional[StepPlan]]:
        """Rank 0: the step's rows with their group-normalised advantages and loss mask
        (:func:`~megatron_dapo.algorithm.flatten_groups`, eq. 9) and their assignment to the updates and DP
        ranks (:func:`~megatron_dapo.actor.dispatch.plan_step`); ``(None, None)`` on other ranks. Collective
        (the dispatcher is built at the first step).

        Raises:
            ValueError (e.g. :class:`~megatron_dapo.algorithm.NonFiniteAdvantageError`): on every rank.
        """
        dp_size = self.dispatcher.dp_size
        flat = plan = failure = None
        if self.rank == 0:
            try:
                correction = self.loss.correction
                flat = flatten_groups(groups, self.alg,
                                      require_rollout_logprobs=correction is not None and correction.enabled,
                                      mask_offpolicy_prefix=self.cfg.algorithm.mask_offpolicy_in_partial_rollout)
                gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
                plan = plan_step(flat, mini_batch_size=self.cfg.actor.ppo_mini_batch_size,
                                 ppo_epochs=self.cfg.actor.ppo_epochs, dp_size=dp_size, generator=gen)
            except ValueError as e:  # e.g. non-finite rewards: every rank raises it, none waits forever
                failure = e
        failure = _broadcast(failure)
        if failure is not None:
            raise failure
        return flat, plan

    def _dispatch(self, flat: Optional[FlatBatch], plan: Optional[StepPlan]) -> LocalShard:
        """This DP rank's share of the step's rows (collective: rank 0 sends each DP rank only its rows)."""
        return self.dispatcher.dispatch(flat, plan)

    def _push(self) -> dict[str, float]:
        """Weight sync: the actor's weights become the engines' version ``self.step`` (steps done) once nothing
        generates with older ones (:meth:`BatchSource.push`). Returns the metrics of a push done now."""
        return self.batches.push(self.step)

    @property
    def dispatcher(self) -> Dispatcher:
        """Sends each DP rank its rows (built on first use; collective)."""
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.actor.dp_rank, self.actor.dp_size,
                                          device=default_device() if has_cuda() else None)
        return self._dispatcher

    def _old_logprobs(self, batch, shard: "LocalShard") -> dict[str, float]:
        """log π_old of this DP rank's rows into ``batch.old_logprobs`` (collective); returns the batch-wide
        ``actor/old_entropy`` and the engine-vs-actor logprob mismatch, every row counted once over DP."""
        old_lp, old_ent = self.actor.compute_logprobs(batch, temperature=self.cfg.rollout.temperature, local=True)
        batch.old_logprobs = old_lp
        mask = batch.response_mask * shard.owned.to(torch.float32).unsqueeze(1)
        parts = [mask.sum(), (old_ent * mask).sum()]
        if batch.rollout_logprobs is not None:
            mis = logprob_mismatch_parts(old_lp, batch.rollout_logprobs, mask)
            parts += [mis[0], mis[1]]
        tot = self.dispatcher.sum_over_rows(torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in parts]))
        m = {"actor/old_entropy": float(tot[1]) / max(float(tot[0]), 1.0)}
        if batch.rollout_logprobs is not None:
            mis_max = self.dispatcher.max_over_ranks(mis[2:3])
            m["rollout/train_rollout_logprob_abs_diff"] = float(tot[2]) / max(float(tot[3]), 1.0)
            m["rollout/train_rollout_logprob_abs_diff_max"] = float(mis_max[0])
        return m

    def _update(self, batch, shard: "LocalShard") -> dict[str, float]:
        """The step's optimizer updates (``ppo_epochs`` × mini-batches of the decoupled-clip loss, eq. 8) on
        this DP rank's rows of each (collective). Returns ``actor/*``: loss figures averaged over the applied
        updates, ``update_skipped`` / ``nonfinite_*`` counted over all, ``num_updates``, and ``loss_tokens``: the
        response tokens of the step's batch that enter the loss, over all DP ranks, per epoch (the plan's counts:
        without overlong-filtered rows, empty responses and masked off-policy prefixes; before the behaviour
        corrections' masks)."""
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}  # update_skipped / nonfinite_*: counted over all updates
        updates = applied = 0
        denominators = self._kept_counts(batch, shard)
        for upd, (n_tok, n_seq) in zip(shard.updates, denominators):  # ppo_epochs x mini-batches (plan_step)
            mb = batch.select(list(upd.rows))
            m = self.actor.train_step(mb, self.loss, global_num_tokens=n_tok, global_num_seqs=n_seq, local=True)
            updates += 1
            for k in [k for k in m if k == "update_skipped" or k.startswith("nonfinite_")]:
                counts[k] = counts.get(k, 0.0) + m.pop(k)
            if self.actor.last_nonfinite is not None and self.actor.last_nonfinite.skipped:
                self._nonfinite_update_skipped()
                continue  # its (non-finite) loss figures stay out of the averages
            self.nonfinite_streak = 0
            applied += 1
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        out = {k: v / max(applied, 1) for k, v in sums.items()}
        out.update(counts)
        out["num_updates"] = float(updates)
        out["loss_tokens"] = sum(u.num_tokens for u in shard.updates) / max(self.cfg.actor.ppo_epochs, 1)
        return scoped("actor", out)

    def _kept_counts(self, batch, shard: "LocalShard") -> list[tuple[int, int]]:
        """Per update of ``shard``, the loss normaliser of the whole mini-batch over all DP ranks: ``(tokens,
        sequences with at least one)``. The plan's counts, unless the corrections drop masked tokens from the
        denominator (``algorithm.masked_tokens_in_denominator: false`` with a masking rule, and engine logprobs):
        then the tokens of :func:`~megatron_dapo.algorithm.corrections.rollout_correction_keep_mask`, which
        depend on ``batch.old_logprobs`` and so are counted here, after the old-logprob pass, on this rank's
        rows and summed over DP ranks (one all-reduce for all the step's updates; collective)."""
        plan_counts = [(upd.num_tokens, upd.num_seqs) for upd in shard.updates]
        correction = self.loss.correction
        if correction is None or not correction.drops_masked_tokens or batch.rollout_logprobs is None:
            return plan_counts
        kept = rollout_correction_keep_mask(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask,
                                            correction).sum(dim=1)
        local = [[float(kept[list(upd.rows)].sum()), float((kept[list(upd.rows)] > 0).sum())]
                 for upd in shard.updates]
        total = self.dispatcher.sum_over_rows(torch.tensor(local, dtype=torch.float64).reshape(-1))
        return [(int(total[2 * i]), int(total[2 * i + 1])) for i in range(len(shard.updates))]

    def _nonfinite_update_skipped(self) -> None:
        """Count a skipped update; stop after ``trainer.max_consecutive_nonfinite`` in a row (every rank
        sees the same skip, so every rank raises)."""
        self.nonfinite_streak += 1
        limit = self.cfg.trainer.max_consecutive_nonfinite
        if self.nonfinite_streak >= limit:
            last = latest_checkpoint(self.cfg.ckpt_dir)
            raise TrainingStopped(
                f"{self.nonfinite_streak} consecutive optimizer updates were skipped as non-finite at step "
                f"{self.step + 1} (last: {self.actor.last_nonfinite.describe()}); no update was applied, the "
                f"latest checkpoint is {last or 'none'} (trainer.max_consecutive_nonfinite={limit}); lower "
                f"actor.lr, check the data and rewards, or resume from an earlier checkpoint")

    def evaluate(self) -> dict[str, float]:
        """avg@k / pass@k on ``data.val_files`` with the current engine weights (rank 0; others wait).

        Nothing may be generating (one-step off-policy: the batch in flight is waited for, it stays the next
        step's); the engines are then brought to generation with the current weights (collective; a no-op
        unless a checkpoint or an HF export released colocated engines, or an off-policy push is pending), so
        evaluating at the step of a save works.
        """
        self.batches.drain()
        self.engines.to_generation(str(self.step))

        def run() -> dict[str, float]:  # rank 0; the metrics, or the same typed error, reach every rank
            if not self.val_rows:
                return {}
            t, r = self.cfg.trainer, self.cfg.rollout
            res = evaluate(self.client, self.tokenizer, self.val_rows, n_samples=t.eval_n_samples,
                           temperature=t.eval_temperature, top_p=t.eval_top_p, max_prompts=t.eval_max_prompts,
                           max_response_length=r.max_response_length, max_prompt_length=self.cfg.data.max_prompt_length,
                           stop_token_ids=self.rollout_settings.stop_token_ids, seed=self.cfg.seed, progress=False)
            log_eval_to_tensorboard(self.writer, res, self.step)
            m = dict(res.metrics)
            print(f"[eval step {self.step}] " + "  ".join(f"{k}={v:.4g}" for k, v in m.items()
                                                        if "avg@" in k or "pass@1" in k), flush=True)
            return m

        metrics = on_rank0(run, is_rank0=self.rank == 0)
        return metrics

    # ------------------------------------------------------------------ loop
    def _log(self, metrics: dict[str, float]) -> None:
        """Rank 0: every scalar of the step to TensorBoard and, with the step and its prompt indices, as one
        JSON line to ``<run_dir>/steps.jsonl`` (NaN/inf as JSON's ``NaN``/``Infinity``); a short console line
        (:data:`CONSOLE_KEYS`)."""
        if self.rank != 0:
            return
        values = scalars(metrics)
        for k, v in values.items():
            self.writer.add_scalar(k, v, self.step)
        self.writer.flush()
        with open(self.cfg.run_dir / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "prompt_indices": self._batch_ids, **values}) + "\n")
        short = "  ".join(f"{k.split('/')[-1]}={values[k]:.4g}" for k in CONSOLE_KEYS if k in values)
        print(f"[step {self.step}/{self.cfg.trainer.total_steps}] {short}", flush=True)

    def fit(self) -> int:
        """Run until ``trainer.total_steps``. Returns the process exit code (0, or 3 after preemption)."""
        cfg = self.cfg
        t = cfg.trainer
        while self.step < t.total_steps:
            lr = self.actor.set_lr_step(self.step)  # constant within the rollout step
            metrics = self.train_one_step()
            metrics["actor/lr"] = lr  # logged even when no update of the step was applied
            self._log(metrics)
            if _all_flag(self.preempt.requested):
                self.save()
                dist.barrier()
                if self.rank == 0:
                    print(f"preempted ({self.preempt.signal_name or 'signal on another rank'}): checkpoint at step "
                          f"{self.step}; exiting with {REQUEUE_EXIT_CODE} so Slurm requeues", flush=True)
                return REQUEUE_EXIT_CODE
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.total_steps:
                self.save()
            if t.eval_interval and self.step % t.eval_interval == 0:
                self.evaluate()
        final = self.save()
        if t.export_hf:
            self.export_hf(cfg.hf_export_dir)
        if self.rank == 0:
            print("\nrun finished:", flush=True)
            print(f"  TensorBoard : tensorboard --logdir {cfg.tb_dir}")
            print(f"  checkpoint  : {final}")
            if t.export_hf:
                print(f"  HF export   : {cfg.hf_export_dir}")
        return 0

    def export_hf(self, out_dir: Path) -> None:
        """Write the current policy as a HF checkpoint (collective; rank 0 writes)."""
        self.engines.to_training()
        save_hf_checkpoint(self.actor, out_dir, src_hf_dir=self.hf_path)

    def close(self) -> None:
        self._stack.close()


def run_training(cfg: DAPOConfig) -> int:
    """Build a :class:`Trainer` and run it.

    A :class:`~megatron_dapo.errors.MegatronDapoError` (config, data, model, engine, weight sync,
    checkpoint, dynamic sampling, ...) or a ``FileNotFoundError`` ends the run with one line on stderr
    (``megatron-dapo: <what>: <message>``, printed by rank 0; the errors raised on every rank carry the same
    message) and returns :data:`~megatron_dapo.errors.EXIT_USER_ERROR` (2), without a traceback; a
    :class:`~megatron_dapo.errors.RestartableFailure` (a cluster failure a restart of the job fixes, e.g. an engine
    the run did not start died) returns :data:`~megatron_dapo.errors.EXIT_RESTARTABLE` (4) instead, which the Slurm
    scripts requeue. Any other exception is a bug and propagates.

    Returns:
        The process exit code: 0, 3 after a preemption checkpoint, 4, or 2.
    """
    trainer = None
    preempt = _Preemption()  # first thing: a SIGUSR1 during start-up must not kill the process
    try:
        trainer = Trainer(cfg, preempt)
        return trainer.fit()
    except (MegatronDapoError, FileNotFoundError) as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            what = "training stopped" if isinstance(e, TrainingStopped) else type(e).__name__
            print(f"\nmegatron-dapo: {what}: {one_line(str(e))}", file=sys.stderr, flush=True)
        return EXIT_RESTARTABLE if isinstance(e, RestartableFailure) else EXIT_USER_ERROR
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
