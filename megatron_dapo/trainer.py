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
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from .actor.parallel import destroy_parallel
from .algorithm import DynamicSamplingExhausted, logprob_mismatch_parts
from .config import DAPOConfig, dump_config
from .data import generate_tasks, load_rows, make_tiny_checkpoint, render_batch
from .engines import BACKENDS, EngineSet
from .errors import EXIT_USER_ERROR, MegatronDapoError, one_line
from .launch import REQUEUE_EXIT_CODE
from .metrics import scalars, scoped, timed
from .models.real_model import MissingExtraError, prepare_from_gguf
from .rollout.generation import collect_batch, stop_ids_for_model
from .sync.collective import from_rank0 as _broadcast
from .sync.collective import on_rank0

if TYPE_CHECKING:
    from .actor.dispatch import Dispatcher, LocalShard

log = logging.getLogger("megatron_dapo")


class TrainingStopped(MegatronDapoError, RuntimeError):
    """The run cannot continue; the message says why and what to change (no traceback needed)."""


#: The metrics printed on the console line of a step (``steps.jsonl`` and TensorBoard get every scalar).
CONSOLE_KEYS = ("rollout/reward_mean", "rollout/acc", "rollout/response_length_mean",
                "dynamic_sampling/num_gen_batches", "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm",
                "actor/lr", "timing/step_s")


# ---------------------------------------------------------------------------------------------- setup


def _local_rank0() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0


def demo_rows(cfg: DAPOConfig) -> list[dict]:
    """The embedded default task: the project's own arithmetic problems (deterministic in ``seed``)."""
    return generate_tasks(cfg.data.demo_num_rows, seed=cfg.seed)


def val_rows(cfg: DAPOConfig) -> list[dict]:
    """Evaluation rows: ``data.val_files``, else (demo task only) held-out generated problems, else none."""
    if cfg.data.val_files:
        return load_rows(cfg.data.val_files)
    if not cfg.data.train_files:
        return generate_tasks(cfg.data.demo_num_val_rows, seed=cfg.seed + 1)
    return []


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


def _all_flag(flag: bool) -> bool:
    """True on every rank when any rank saw ``flag``."""
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        t = t.cuda()
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
        self.preempt = preempt or _Preemption()
        self.alg = cfg.resolved_algorithm()
        if not cfg.rollout.engine_urls:  # a missing engine venv fails fast, before the actor is built
            BACKENDS[cfg.rollout.backend].preflight(cfg.rollout.engine_python)
        self.hf_path = prepare_model(cfg)

        from .actor.megatron_actor import LossSettings, MegatronActor
        from .algorithm import DynamicSampler
        from .data import PromptDataset, load_rows, load_tokenizer

        # the LR schedule counts rollout steps (actor.lr_warmup_steps); fit() moves it once per step
        self.actor = MegatronActor(self.hf_path, cfg.actor, total_train_steps=cfg.trainer.total_steps, seed=cfg.seed)
        self._stack.callback(self.actor.close)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        cfg.validate(world_size=self.world)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer_path or self.hf_path)
        rows = load_rows(cfg.data.train_files) if cfg.data.train_files else demo_rows(cfg)
        self.dataset = PromptDataset(rows, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.sampler = DynamicSampler(cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt,
                                      enabled=self.alg.dynamic_sampling,
                                      oversample_factor=cfg.algorithm.oversample_factor,
                                      max_num_gen_batches=cfg.algorithm.max_num_gen_batches,
                                      carry_over_surplus=cfg.algorithm.carry_over_surplus)
        self.loss = LossSettings(clip_ratio_low=self.alg.clip_ratio_low, clip_ratio_high=self.alg.clip_ratio_high,
                                 clip_ratio_c=self.alg.clip_ratio_c, loss_agg_mode=self.alg.loss_agg_mode,
                                 entropy_coeff=cfg.algorithm.entropy_coeff,
                                 kl_loss_coef=float(self.alg.kl_loss_coef) if self.alg.kl_loss else 0.0,
                                 kl_loss_type=self.alg.kl_loss_type, tis_cap=cfg.algorithm.tis_cap,
                                 seq_is_mask_low=cfg.algorithm.seq_is_mask_low,
                                 seq_is_mask_high=cfg.algorithm.seq_is_mask_high,
                                 icepop_low=cfg.algorithm.icepop_low, icepop_high=cfg.algorithm.icepop_high,
                                 temperature=cfg.rollout.temperature)
        self.step = 0
        self.prompt_skips = 0
        self.writer = None
        if self.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, cfg.run_dir / "config.yaml")
            if not cfg.data.train_files:
                from .data import write_rows

                write_rows(rows, cfg.run_dir / "demo_train.jsonl")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = self._stack.enter_context(SummaryWriter(log_dir=str(cfg.tb_dir)))
        # the engines (rank 0 launches them), their state and weight version, and the weight sync (every rank)
        self.engines = EngineSet.launch(cfg, self.actor, self.hf_path, self._stack)
        self.client = self.engines.client  # rank 0: the rollout's blocking client; None elsewhere
        from .rollout.generation import RolloutSettings
        from .rollout.validate import ResponseValidator

        r = cfg.rollout
        self.response_validator = ResponseValidator(self.actor.spec.vocab_size, r.max_response_length,
                                                    r.max_consecutive_malformed_per_engine)
        self.nonfinite_streak = 0  # consecutive skipped (non-finite) optimizer updates
        self.rollout_settings = RolloutSettings(
            n_samples_per_prompt=r.n_samples_per_prompt, max_response_length=r.max_response_length,
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            stop_token_ids=stop_ids_for_model(self.tokenizer, self.hf_path),
            soft_overlong_punishment=self.alg.soft_overlong_punishment,
            overlong_buffer_length=self.alg.overlong_buffer_length,
            overlong_penalty_factor=self.alg.overlong_penalty_factor, seed=cfg.seed,
            deterministic=r.deterministic, response_validator=self.response_validator,
            partial_rollout=r.partial_rollout, partial_max_age=r.partial_max_age)
        if self.rank == 0:
            log.info("stop token ids: %s", list(self.rollout_settings.stop_token_ids))
        self.val_rows = val_rows(cfg)
        self.engines.to_training()  # colocated: the actor takes the GPUs (a checkpoint may be loaded)
        self._resume()
        self.engines.to_generation(str(self.step))

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "dataset": self.dataset.state_dict(), "sampler": self.sampler.state_dict(),
                "prompt_skips": self.prompt_skips, "python_random": repr(random.getstate())}

    def _resume(self) -> None:
        from .actor.checkpoint import latest_checkpoint, load_checkpoint

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
        self.prompt_skips = int(state.get("prompt_skips", 0))
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        self.engines.to_generation(str(self.step))  # the engines started from the HF weights, not the checkpoint's

    def save(self) -> Path:
        from .actor.checkpoint import NonFiniteCheckpointError, prune_checkpoints, save_checkpoint

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
    def _rollout(self) -> tuple[Optional[list], dict[str, float], Optional[MegatronDapoError]]:
        """Rank 0: generate, score and filter until the dynamic sampler is full (Algorithm 1, lines 3-6).

        Returns ``(groups, metrics, error)``. A failure the user can act on (an engine that failed after its
        retries or keeps returning malformed output, dynamic sampling exhausted, the reward workers) is
        returned as ``error`` instead of raised, so that the caller broadcasts it and every rank raises the
        same :class:`~megatron_dapo.errors.MegatronDapoError` (rank 0 raising alone would leave the other
        ranks waiting in the broadcast).
        """
        def next_prompts(n: int):
            kept, skipped = render_batch(self.tokenizer, self.dataset.next_batch(n), self.cfg.data.max_prompt_length)
            self.prompt_skips += len(skipped)
            return kept

        timing: dict[str, float] = {}
        self.response_validator.start_step()
        try:
            with timed(timing, "rollout"):
                groups, stats = collect_batch(self.client, self.sampler, next_prompts, self.tokenizer,
                                              self.rollout_settings, self.step)
        except DynamicSamplingExhausted as e:
            msg = str(e)
            if self.response_validator.groups_dropped:
                msg += (f" Note: {self.response_validator.groups_dropped} groups were dropped for malformed engine "
                        f"responses (e.g. {self.response_validator.examples[0]}).")
            if self.prompt_skips:
                msg += (f" Note: {self.prompt_skips} prompts were skipped as longer than data.max_prompt_length="
                        f"{self.cfg.data.max_prompt_length}; raise it if that is most of them.")
            return None, {}, DynamicSamplingExhausted(msg)
        except MegatronDapoError as e:
            return None, {}, e
        m = scoped("rollout", stats.metrics())
        m.update(scoped("rollout", self.response_validator.metrics()))
        m.update(scoped("dynamic_sampling", self.sampler.metrics()))
        # scoring runs in a worker pool while other groups generate: reward_s is the wall time during which some
        # group was being scored (overlapping generation), rollout_s the whole phase (generate + score + filter)
        m["timing/reward_s"] = stats.reward_seconds
        m["timing/rollout_s"] = timing["timing/rollout_s"]
        m["data/prompts_skipped_too_long"] = float(self.prompt_skips)
        return groups, m, None

    def _dispatch_batch(self, groups) -> "LocalShard":
        """This rank's share of the step's batch (collective): rank 0 builds the rows from ``groups``
        (:func:`~megatron_dapo.algorithm.flatten_groups`), assigns them to the updates and DP ranks
        (:func:`~megatron_dapo.actor.dispatch.plan_step`) and sends each DP rank only its rows."""
        from .actor.dispatch import plan_step
        from .algorithm import flatten_groups

        dispatcher = self.dispatcher  # built collectively at the first step
        flat = plan = failure = None
        if self.rank == 0:
            try:
                flat = flatten_groups(groups, self.alg)
                gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
                plan = plan_step(flat, mini_batch_size=self.cfg.actor.ppo_mini_batch_size,
                                 ppo_epochs=self.cfg.actor.ppo_epochs, dp_size=dispatcher.dp_size, generator=gen)
            except ValueError as e:  # e.g. non-finite rewards: every rank raises it, none waits forever
                failure = e
        failure = _broadcast(failure)
        if failure is not None:
            raise failure
        return dispatcher.dispatch(flat, plan)

    @property
    def dispatcher(self) -> "Dispatcher":
        """Sends each DP rank its rows (built on first use; collective)."""
        if getattr(self, "_dispatcher", None) is None:
            from .actor.dispatch import Dispatcher

            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            self._dispatcher = Dispatcher(self.actor.dp_rank, self.actor.dp_size, device=dev)
        return self._dispatcher

    def train_one_step(self) -> dict[str, float]:
        """One DAPO step (Algorithm 1): rollout → filter → advantages → π_old → mini-batch updates → weights
        into the engines. Collective; returns the step's scalars (identical on every rank)."""
        metrics: dict[str, float] = {}
        with timed(metrics, "step"):
            self.engines.to_generation(str(self.step))  # wakes engines a checkpoint / export released
            groups, rollout_metrics, error = self._rollout() if self.rank == 0 else (None, {}, None)
            rollout_metrics, error = _broadcast((rollout_metrics, error))  # the groups stay on rank 0
            if error is not None:
                raise error  # the same typed error on every rank
            metrics.update(rollout_metrics)
            metrics.update(self.engines.to_training())  # colocated: engines sleep, the actor comes back
            shard = self._dispatch_batch(groups)  # advantages + loss mask on rank 0; each DP rank its rows
            self._batch_ids = [g.prompt_index for g in groups] if groups is not None else []
            batch = shard.batch.to_actor_batch()  # this DP rank's rows, padded
            del shard.batch  # the flat copy is no longer needed (memory: bench_batch_dispatch.py)
            with timed(metrics, "old_logprob"):
                metrics.update(self._old_logprobs(batch, shard))
            with timed(metrics, "train"):
                metrics.update(self._update(batch, shard))
            self.step += 1
            metrics.update(self.engines.to_generation(str(self.step)))  # weight version = steps done
        return metrics

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
        updates, ``update_skipped`` / ``nonfinite_*`` counted over all, and ``num_updates``."""
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}  # update_skipped / nonfinite_*: counted over all updates
        updates = applied = 0
        for upd in shard.updates:  # ppo_epochs x mini-batches, this DP rank's rows of each (plan_step)
            mb = batch.select(list(upd.rows))
            m = self.actor.train_step(mb, self.loss, global_num_tokens=upd.num_tokens,
                                      global_num_seqs=upd.num_seqs, local=True)
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
        return scoped("actor", out)

    def _nonfinite_update_skipped(self) -> None:
        """Count a skipped update; stop after ``trainer.max_consecutive_nonfinite`` in a row (every rank
        sees the same skip, so every rank raises)."""
        from .actor.checkpoint import latest_checkpoint

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

        The engines are brought to generation with the current weights first (collective; a no-op unless a
        checkpoint or an HF export released colocated engines), so evaluating at the step of a save works.
        """
        self.engines.to_generation(str(self.step))

        def run() -> dict[str, float]:  # rank 0; the metrics, or the same typed error, reach every rank
            from .evaluation import evaluate, log_eval_to_tensorboard  # evaluation imports this module

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
            f.write(json.dumps({"step": self.step, "prompt_indices": getattr(self, "_batch_ids", []), **values}) + "\n")
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
        from .models.export import save_hf_checkpoint

        self.engines.to_training()
        save_hf_checkpoint(self.actor, out_dir, src_hf_dir=self.hf_path)

    def close(self) -> None:
        self._stack.close()


def run_training(cfg: DAPOConfig) -> int:
    """Build a :class:`Trainer` and run it.

    A :class:`~megatron_dapo.errors.MegatronDapoError` (config, data, model, engine, weight sync,
    checkpoint, dynamic sampling, ...) or a ``FileNotFoundError`` ends the run with one line on stderr
    (``megatron-dapo: <what>: <message>``, printed by rank 0; the errors raised on every rank carry the same
    message) and returns :data:`~megatron_dapo.errors.EXIT_USER_ERROR` (2), without a traceback. Any other
    exception is a bug and propagates.

    Returns:
        The process exit code: 0, 3 after a preemption checkpoint, or 2.
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
        return EXIT_USER_ERROR
    finally:
        if trainer is not None:
            trainer.close()
        destroy_parallel()
