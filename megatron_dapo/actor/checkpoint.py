"""Atomic, resharding-capable training checkpoints for :class:`~megatron_dapo.actor.megatron_actor.MegatronActor`.

Layout of one checkpoint (``root`` is e.g. ``outputs/<run>/checkpoints``)::

    root/
      latest                      text file: the name of the newest complete checkpoint ("iter_0000005")
      iter_0000005/
        metadata.json, common.pt, __*.distcp   megatron-core ``dist_checkpointing`` (torch_dist) save of
                                               the model, optimizer and LR scheduler
        rng/rank_00000.pt ...     per-rank RNG states (python, numpy, torch CPU, CUDA, Megatron tracker)
        layout.json               TP / PP / VPP / DP / distributed-optimizer layout it was saved with
        trainer_state.json        whatever the trainer passed (step, data position, sampler state, ...)

Atomicity: every rank writes into ``root/iter_0000005.tmp-<nonce>/``; after a barrier rank 0 renames
it to ``iter_0000005`` and then replaces ``root/latest`` with ``os.replace`` (atomic on POSIX). A
process killed at any point leaves the previous checkpoint complete and ``latest`` pointing at it;
leftover ``*.tmp-*`` directories are ignored by :func:`latest_checkpoint` and removed by the next save.
Re-saving the step ``latest`` names moves the old directory aside (``*.tmp-old-*``) before the new
one takes its name; a crash in between leaves the old copy, which :func:`latest_checkpoint` returns
and the next save moves back.

Resharding: model tensors are saved by megatron-core as *global* tensors (keys carry global layer
indices; vocabulary-padded embeddings are marked ``allow_shape_mismatch``), so a checkpoint saved at
one TP/PP/VPP layout loads at another. The optimizer state is resharded too with the regular
(non-distributed) optimizer. The distributed optimizer's state is saved in one of
:data:`OPTIM_CKPT_FORMATS` (``actor.dist_optimizer_ckpt_format``): ``fully_reshardable`` loads at any
layout; ``dp_reshardable`` (the default, cheaper to save) only at the layout it was saved with
(:class:`CheckpointLayoutError` otherwise; ``load_optimizer=False`` loads only the weights).

Exact resume: the next step after a load equals the uninterrupted run bit for bit, also with the
distributed optimizer. Two megatron-core 0.16.1 defects on the torch-Adam path (no apex/TE) are worked
around here: the loaded per-parameter Adam ``step`` tensors are one shared object
(:func:`_unshare_adam_steps`), and the reshardable loaders fail on the ``step`` key
(:func:`_step_tolerant_param_state_load`).

API reference: megatron-core ``dist_checkpointing.save/load`` (megatron/core/dist_checkpointing/
serialization.py) and ``MegatronOptimizer.sharded_state_dict``.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..backend import has_cuda
from ..cpu_shims import device_remap
from ..errors import MegatronDapoError
from ..sync.collective import on_rank0

ITER_RE = re.compile(r"^iter_(\d{7,})$")
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
LAYOUT_FILE = "layout.json"
_KILL_ENV = "MEGATRON_DAPO_CKPT_KILL_AT"
"""Test-only hook (never set in production): naming one of :data:`KILL_POINTS` makes rank 0 of
:func:`save_checkpoint` exit (``os._exit(17)``) at that point, as a crash would."""
#: Every point of :func:`save_checkpoint` a crash can interrupt, in order (tests kill at each):
#: tmp dir created | shards written, before rng/trainer state | before tmp -> iter rename |
#: an existing same-step dir moved aside, before tmp -> iter | before ``latest`` is written |
#: ``latest.tmp`` written and synced, before it replaces ``latest``.
KILL_POINTS = ("after_tmp_created", "after_shards", "before_rename", "after_old_moved_aside",
               "before_latest", "before_latest_replace")


class CheckpointError(MegatronDapoError, RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable (the message names the path)."""


class CheckpointLayoutError(CheckpointError):
    """The requested optimizer-state load needs the parallel layout the checkpoint was saved with."""


class NonFiniteCheckpointError(CheckpointError):
    """:func:`save_checkpoint` refused to write NaN/inf weights or optimizer state (the message names the
    first offending tensor); the previous checkpoint stays the latest."""


def iter_dir_name(step: int) -> str:
    """``iter_0000005`` for ``step=5`` (zero-padded to 7 digits)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"iter_{step:07d}"


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / "metadata.json").is_file() and (d / TRAINER_STATE_FILE).is_file()


def _moved_aside(root: Path, name: str) -> Optional[Path]:
    """The complete ``<name>.tmp-old-*`` copy a crashed same-step re-save left, when ``name`` is gone."""
    if not ITER_RE.match(name) or (root / name).exists():
        return None
    return next((p for p in sorted(root.glob(f"{name}.tmp-old-*")) if _is_complete(p)), None)


def _restore_moved_aside(root: Path) -> None:
    """Rank 0, before a save: put back the checkpoint ``latest`` names if a crash left it moved aside."""
    lf = root / LATEST_FILE
    if lf.is_file():
        name = lf.read_text().strip()
        aside = _moved_aside(root, name)
        if aside is not None:
            aside.rename(root / name)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` or ``None``.

    Reads ``root/latest``; when it is missing or names a directory that is not a complete checkpoint,
    falls back to the highest-numbered complete ``iter_*`` directory. ``*.tmp-*`` directories (an
    interrupted save) are never returned.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    lf = root / LATEST_FILE
    if lf.is_file():
        name = lf.read_text().strip()
        if ITER_RE.match(name) and _is_complete(root / name):
            return root / name
        aside = _moved_aside(root, name)
        if aside is not None:  # a crash while re-saving that step: its old copy is still complete
            return aside
    done = sorted((p for p in root.iterdir() if ITER_RE.match(p.name) and _is_complete(p)),
                  key=lambda p: int(ITER_RE.match(p.name).group(1)))
    return done[-1] if done else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (never the one ``latest`` names)
    and every leftover ``*.tmp-*`` directory. Call on one rank only. Returns the removed paths.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    if not root.is_dir():
        return []
    latest = latest_checkpoint(root)
    ckpts = sorted((p for p in root.iterdir() if ITER_RE.match(p.name)),
                   key=lambda p: int(ITER_RE.match(p.name).group(1)))
    removed = []
    for p in ckpts[:-keep_last]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in root.glob("iter_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if has_cuda() else None,
        "tracker": {k: v.clone() if torch.is_tensor(v) else v
                    for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(state["tracker"])


# ---------------------------------------------------------------------------------------------- layout
def _layout(actor) -> dict[str, Any]:
    return {"tp": actor.tp, "pp": actor.pp, "vpp": actor.vpp, "dp": actor.dp_size,
            "ep": getattr(actor, "ep", 1), "etp": getattr(actor, "etp", actor.tp),
            "world_size": dist.get_world_size(),
            "use_distributed_optimizer": bool(actor.cfg.use_distributed_optimizer),
            "optimizer_ckpt_format": _optim_format(actor) if actor.cfg.use_distributed_optimizer else None,
            "params_dtype": actor.cfg.params_dtype, "family": actor.spec.family,
            "num_layers": actor.spec.num_layers, "vocab_size": actor.spec.vocab_size}


OPTIM_CKPT_FORMATS = ("dp_reshardable", "fully_reshardable")
"""Distributed-optimizer state formats (megatron-core ``distrib_optim_sharding_type``): ``dp_reshardable``
saves each DP rank's flat shard as is (fast; loads only at the saved TP/PP/VPP/DP layout);
``fully_reshardable`` gathers each parameter's state on DP rank 0 while saving (slower, more host memory)
and loads at any layout."""


def _optim_format(actor) -> str:
    return actor.cfg.dist_optimizer_ckpt_format


def _sharded_state_dict(actor, with_optimizer: bool, is_loading: bool,
                        optim_format: Optional[str] = None) -> dict[str, Any]:
    """Model (+ optimizer + scheduler) sharded state dict of this rank."""
    sd: dict[str, Any] = {}
    for i, m in enumerate(actor.chunks):
        gpt = m.module if hasattr(m, "module") else m
        while hasattr(gpt, "module"):
            gpt = gpt.module
        sd[f"model{i}" if len(actor.chunks) > 1 else "model"] = gpt.sharded_state_dict()
    if with_optimizer:
        kw: dict[str, Any] = {"is_loading": is_loading}
        if actor.cfg.use_distributed_optimizer:
            kw["metadata"] = {"distrib_optim_sharding_type": optim_format or _optim_format(actor)}
            if is_loading:
                # DistributedOptimizer.state_dict() needs existing Adam states (one common 'step'); a fresh
                # optimizer gets megatron-core's own dummy states (one zero-grad step on the fp32 master
                # shards), which the load then overwrites (the format stores the master params too).
                for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
                    inner = getattr(opt, "optimizer", None)
                    if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                        opt._init_optimizer_states_with_dummy_values()
        sd["optimizer"] = actor.optimizer.sharded_state_dict(sd, **kw)
        sd["opt_param_scheduler"] = actor.scheduler.state_dict()
    return sd


def _unshare_adam_steps(optimizer) -> int:
    """Give every parameter's Adam ``step`` its own tensor; returns how many were un-shared.

    Without apex/TE, megatron-core's ``DistributedOptimizer.load_state_dict`` (0.16.1) stores ONE ``step``
    tensor object in the state of every parameter. torch's Adam increments ``state["step"]`` in place once per
    parameter, so the shared counter advanced by the number of parameters at the first step after a resume
    and the bias correction (Kingma & Ba, Alg. 1) was wrong: the next step's parameters differed by ~3e-3
    at lr 1e-2. Copies keep the loaded value; tensors already distinct are left alone.
    """
    n = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step") if isinstance(state, dict) else None
            if not torch.is_tensor(step):
                continue
            if id(step) in seen:
                state["step"] = step.detach().clone()
                n += 1
            else:
                seen.add(id(step))
    return n


@contextlib.contextmanager
def _step_tolerant_param_state_load(optimizer):
    """Let megatron-core's reshardable optimizer-state loaders run with torch's own Adam.

    ``load_parameter_state_from_fully_reshardable`` (megatron-core 0.16.1) drops the per-parameter ``step``
    from the loaded tensors (the step is restored from the param groups instead), but
    ``_set_main_param_and_optimizer_states`` then copies every key of the live state, ``step`` included,
    and fails with ``KeyError: 'step'`` whenever apex/TE's fused Adam (which keeps no per-parameter step)
    is absent. Inside this context each distributed optimizer copies only the keys it was given; any other
    missing key (a real mismatch) still raises, naming the key.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states") or getattr(
                opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue

        def _set(model_param, tensors, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **_opt.optimizer.state[main_param]}
            missing = [k for k in dst if k not in tensors and k != "step"]
            if missing:
                raise CheckpointError(f"optimizer checkpoint lacks state {missing} for a parameter of shape "
                                      f"{tuple(model_param.shape)}")
            for k, v in tensors.items():
                if k in dst:
                    dst[k].copy_(v)

        opt._set_main_param_and_optimizer_states = _set
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _maybe_kill(point: str, root: Path) -> None:
    """Test-only crash hook (:data:`_KILL_ENV` unset in production: returns at once).

    ``<point>``: rank 0 exits with code 17 here. ``copy:<dir>``: rank 0 copies ``root`` to
    ``<dir>/<point>`` at every point (the disk state a crash there would leave) and carries on.
    """
    armed = os.environ.get(_KILL_ENV)
    if not armed or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if armed.startswith("copy:"):
        shutil.copytree(root, Path(armed[len("copy:"):]) / point, symlinks=True)
        return
    if armed == point:
        # dist_checkpointing keeps a multiprocessing Manager process; a hard exit would orphan it
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(17)


# ---------------------------------------------------------------------------------------------- save
def _first_nonfinite_tensor(actor) -> Optional[str]:
    """Name of the first local tensor holding NaN/inf among the model parameters, the optimizer's fp32
    main parameters and its state (Adam moments), or ``None``."""
    for ci, chunk in enumerate(actor.chunks):
        for name, p in chunk.named_parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                return f"parameter {name} (model chunk {ci})"
    for oi, opt in enumerate(getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for gi, group in enumerate(inner.param_groups):
            for pi, p in enumerate(group["params"]):
                if not bool(torch.isfinite(p.detach()).all()):
                    return f"optimizer {oi} main parameter {gi}.{pi} of shape {tuple(p.shape)}"
                for key, v in inner.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        return f"optimizer {oi} state {key!r} of main parameter {gi}.{pi}"
    return None


def check_finite_state(actor) -> None:
    """Collective: raise :class:`NonFiniteCheckpointError` on every rank when any rank holds a NaN/inf
    parameter, fp32 main parameter or optimizer-state tensor (the message names rank and tensor)."""
    bad = _first_nonfinite_tensor(actor)
    found: list[Any] = [bad]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    for rank, what in enumerate(found):
        if what is not None:
            raise NonFiniteCheckpointError(f"refusing to save a checkpoint: rank {rank} holds NaN/inf in {what}; "
                                           f"the previous checkpoint stays the latest")


def save_checkpoint(actor, root: str | Path, step: int, trainer_state: dict) -> Path:
    """Save model, optimizer, LR scheduler, RNG states and ``trainer_state`` as ``root/iter_<step>``.

    Collective: every rank of the actor must call it with the same arguments. Atomic (see the module
    docstring); an existing checkpoint of the same step is replaced.

    Args:
        actor: a :class:`MegatronActor`.
        root: checkpoint root directory (created).
        step: training step (the directory name's number).
        trainer_state: JSON-serialisable dict written to ``trainer_state.json`` (rank 0's copy).

    Returns:
        The final checkpoint directory.

    Raises:
        TypeError: ``trainer_state`` is not JSON-serialisable (raised before anything is written).
        NonFiniteCheckpointError: some rank's weights or optimizer state hold NaN/inf (checked by
            :func:`check_finite_state` before anything is written).
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = iter_dir_name(step)
    state_text = json.dumps(trainer_state, indent=2, sort_keys=True)  # fail early, before any I/O
    check_finite_state(actor)  # never a checkpoint of NaN weights (issue 16)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp_name = on_rank0(lambda: f"{name}.tmp-{uuid.uuid4().hex[:10]}", is_rank0=rank == 0)  # one nonce for all
    tmp = root / tmp_name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _restore_moved_aside(root)
        for stale in root.glob("iter_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        _maybe_kill("after_tmp_created", root)
    _barrier()
    with device_remap():
        sd = _sharded_state_dict(actor, with_optimizer=True, is_loading=False)
        dist_checkpointing.save(sd, str(tmp))
    if rank == 0:
        _maybe_kill("after_shards", root)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / TRAINER_STATE_FILE).write_text(state_text + "\n")
        (tmp / LAYOUT_FILE).write_text(json.dumps(_layout(actor), indent=2) + "\n")
    _barrier()
    final = root / name
    if rank == 0:
        _maybe_kill("before_rename", root)
        if final.exists():
            old = root / f"{name}.tmp-old-{uuid.uuid4().hex[:6]}"
            final.rename(old)
            _maybe_kill("after_old_moved_aside", root)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _maybe_kill("before_latest", root)
        lf_tmp = root / f"{LATEST_FILE}.tmp-{uuid.uuid4().hex[:6]}"
        lf_tmp.write_text(name + "\n")
        with open(lf_tmp, "rb") as f:
            os.fsync(f.fileno())
        _maybe_kill("before_latest_replace", root)
        os.replace(lf_tmp, root / LATEST_FILE)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------- load
def _resolve(ckpt_dir_or_root: str | Path) -> Path:
    p = Path(ckpt_dir_or_root)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    if _is_complete(p):
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {p} (expected iter_<7-digit step>/ with metadata.json "
                              f"and {TRAINER_STATE_FILE}, or a 'latest' file)")
    return found


def read_layout(ckpt_dir: str | Path) -> dict[str, Any]:
    """The layout dict a checkpoint was saved with (``tp``, ``pp``, ``vpp``, ``dp``, ...)."""
    p = Path(ckpt_dir) / LAYOUT_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} not found")
    return json.loads(p.read_text())


def load_checkpoint(actor, ckpt_dir_or_root: str | Path, *, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Load a checkpoint into ``actor`` (collective); returns the saved ``trainer_state`` dict.

    ``ckpt_dir_or_root`` is either one ``iter_*`` directory or a root (its :func:`latest_checkpoint`).
    Model weights load at any TP/PP/VPP layout. Optimizer and scheduler state load when
    ``load_optimizer`` (at a different layout only with the regular optimizer). RNG states are restored
    when ``load_rng`` and the world size equals the saved one.

    Raises:
        CheckpointError: no complete checkpoint there.
        CheckpointLayoutError: ``load_optimizer=True`` with the distributed optimizer at another layout,
            or a saved/current optimizer mismatch (distributed vs regular).
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core import dist_checkpointing

    ckpt = _resolve(ckpt_dir_or_root)
    saved = read_layout(ckpt)
    now = _layout(actor)
    for k in ("family", "num_layers", "vocab_size"):
        if saved.get(k) != now[k]:
            raise CheckpointError(f"{ckpt}: saved model {k}={saved.get(k)!r} but the actor has {now[k]!r}")
    if load_optimizer:
        if saved["use_distributed_optimizer"] != now["use_distributed_optimizer"]:
            raise CheckpointLayoutError(
                f"{ckpt}: saved with use_distributed_optimizer={saved['use_distributed_optimizer']}, actor has "
                f"{now['use_distributed_optimizer']}; optimizer state cannot be converted (load_optimizer=False "
                f"loads only the weights)")
        saved_format = saved.get("optimizer_ckpt_format") or "dp_reshardable"
        # checkpoints written before expert parallelism existed: EP=1, expert TP = TP
        saved_ep, saved_etp = saved.get("ep", 1), saved.get("etp", saved["tp"])
        if (now["use_distributed_optimizer"] and saved_format == "dp_reshardable"
                and (any(saved[k] != now[k] for k in ("tp", "pp", "vpp", "dp"))
                     or (saved_ep, saved_etp) != (now["ep"], now["etp"]))):
            raise CheckpointLayoutError(
                f"{ckpt}: distributed-optimizer state was saved in the dp_reshardable format at TP={saved['tp']} "
                f"PP={saved['pp']} VPP={saved['vpp']} DP={saved['dp']} EP={saved_ep} ETP={saved_etp} and can only "
                f"be loaded there (actor: TP={now['tp']} PP={now['pp']} VPP={now['vpp']} DP={now['dp']} "
                f"EP={now['ep']} ETP={now['etp']}); pass load_optimizer=False to "
                f"load the weights, or save with actor.dist_optimizer_ckpt_format=fully_reshardable")
    else:
        saved_format = None
    with device_remap(), torch.no_grad():
        sd = _sharded_state_dict(actor, with_optimizer=load_optimizer, is_loading=True, optim_format=saved_format)
        loaded = dist_checkpointing.load(sd, str(ckpt))
        for i, m in enumerate(actor.chunks):
            gpt = m
            while hasattr(gpt, "module"):
                gpt = gpt.module
            key = f"model{i}" if len(actor.chunks) > 1 else "model"
            res = gpt.load_state_dict(loaded[key], strict=False)
            missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
            if missing:
                raise CheckpointError(f"{ckpt}: parameters missing from the checkpoint: {missing[:5]}")
        # master (fp32) params := the loaded model params; the optimizer load then overwrites what it stores
        actor.optimizer.reload_model_params()
        if load_optimizer:
            with _step_tolerant_param_state_load(actor.optimizer):
                actor.optimizer.load_state_dict(loaded["optimizer"])
            _unshare_adam_steps(actor.optimizer)
            # Megatron's load_state_dict advances the current step count by the saved one: start from 0
            # so loading into an actor that already trained (or loaded) gives the saved LR, not a sum
            actor.scheduler.num_steps = 0
            actor.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    actor._owners = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / "rng" / f"rank_{rank:05d}.pt"
    if load_rng and saved["world_size"] == now["world_size"] and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    _barrier()
    return json.loads((ckpt / TRAINER_STATE_FILE).read_text())
