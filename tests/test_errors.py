"""One root for user-facing failures (issue 12): :class:`MegatronDapoError`.

* every project error class derives from it and keeps its builtin base (``except ValueError`` still works);
* ``run_training`` ends an EngineError, WeightSyncError, CheckpointError, DynamicSamplingExhausted (any root
  error, and FileNotFoundError) with exactly one stderr line and exit 2, no traceback; other exceptions
  propagate;
* the rollout returns such an error instead of raising it on rank 0 alone, so it can be broadcast and
  raised on every rank (it survives pickling, which the broadcast uses).
"""
from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import pytest

import megatron_dapo.trainer as trainer_mod
from megatron_dapo.actor.checkpoint import CheckpointError, CheckpointLayoutError, NonFiniteCheckpointError
from megatron_dapo.algorithm.advantages import NonFiniteAdvantageError
from megatron_dapo.algorithm.dynamic_sampling import DynamicSamplingExhausted
from megatron_dapo.backend import MissingBackendError
from megatron_dapo.config import ConfigError
from megatron_dapo.data.dataset import RowValidationError
from megatron_dapo.errors import EXIT_USER_ERROR, MegatronDapoError, one_line
from megatron_dapo.launch.dist_env import DistEnvError
from megatron_dapo.launch.nemo import LaunchError
from megatron_dapo.launch.param_count import PlanError
from megatron_dapo.models.hf_config import UnsupportedModelError
from megatron_dapo.models.mapping import MappingError
from megatron_dapo.models.real_model import MissingExtraError
from megatron_dapo.reward.math_verify_pool import MathVerifyWorkerError
from megatron_dapo.rollout import batch_source
from megatron_dapo.engines.launch_common import EngineLaunchError
from megatron_dapo.engines.launch_router import RouterNotInstalledError
from megatron_dapo.engines.transport import EngineError
from megatron_dapo.rollout.validate import MalformedEngineOutput
from megatron_dapo.sync.transports import WeightSyncError
from megatron_dapo.trainer import TrainingStopped, run_training

ROOTED = {  # class -> the builtin base it kept
    ConfigError: ValueError, RowValidationError: ValueError, UnsupportedModelError: ValueError,
    MappingError: ValueError, DistEnvError: ValueError, PlanError: ValueError, NonFiniteAdvantageError: ValueError,
    EngineError: RuntimeError, EngineLaunchError: RuntimeError, RouterNotInstalledError: RuntimeError,
    MalformedEngineOutput: RuntimeError, WeightSyncError: RuntimeError, CheckpointError: RuntimeError,
    CheckpointLayoutError: RuntimeError, NonFiniteCheckpointError: RuntimeError,
    DynamicSamplingExhausted: RuntimeError, MissingBackendError: RuntimeError, MissingExtraError: RuntimeError,
    MathVerifyWorkerError: RuntimeError, LaunchError: RuntimeError, TrainingStopped: RuntimeError,
}


@pytest.mark.parametrize("cls", list(ROOTED), ids=lambda c: c.__name__)
def test_error_classes_derive_from_the_root_and_keep_their_base(cls):
    assert issubclass(cls, MegatronDapoError) and issubclass(cls, ROOTED[cls])


def test_one_line_folds_multi_line_messages():
    assert one_line("engine exited\n  log tail:\n\n  CUDA out of memory\n") == \
        "engine exited; log tail:; CUDA out of memory"


@pytest.fixture
def fake_trainer(monkeypatch):
    """``run_training`` with a Trainer whose ``fit`` raises the given exception (signal handlers restored)."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    closed = []

    def install(exc):
        class FakeTrainer:
            def __init__(self, cfg, preempt):
                pass

            def fit(self):
                raise exc

            def close(self):
                closed.append(True)

        monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
        return closed

    yield install
    for s, h in saved.items():
        signal.signal(s, h)


STOPS = [
    (EngineError("engine http://127.0.0.1:1 failed after 3 tries: connection refused",
                 urls=["http://127.0.0.1:1"]), "EngineError: engine http://127.0.0.1:1 failed after 3 tries"),
    (WeightSyncError("engine http://e0: update_weights_from_disk returned 500\nlog: bad shape"),
     "WeightSyncError: engine http://e0: update_weights_from_disk returned 500; log: bad shape"),
    (CheckpointError("/ckpt/iter_0000003: not a complete checkpoint (no metadata.json)"),
     "CheckpointError: /ckpt/iter_0000003: not a complete checkpoint"),
    (DynamicSamplingExhausted("max_num_gen_batches=2 rounds gave 1/4 groups"),
     "DynamicSamplingExhausted: max_num_gen_batches=2 rounds gave 1/4 groups"),
    (TrainingStopped("3 consecutive optimizer updates were skipped"),
     "training stopped: 3 consecutive optimizer updates were skipped"),
    (FileNotFoundError("no such file: /data/x.parquet"), "FileNotFoundError: no such file: /data/x.parquet"),
]


@pytest.mark.parametrize("exc,line", STOPS, ids=[type(e).__name__ for e, _ in STOPS])
def test_run_training_ends_known_errors_with_one_line_exit_2(fake_trainer, capsys, exc, line):
    closed = fake_trainer(exc)
    assert run_training(SimpleNamespace()) == EXIT_USER_ERROR == 2
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"megatron-dapo: {line}"), err
    assert "Traceback" not in err + out
    assert closed == [True]  # the trainer (engines, writer) is closed on the way out


def test_run_training_ends_a_restartable_failure_with_one_line_exit_4(fake_trainer, capsys):
    """An engine the run did not start died: exit 4, which the Slurm scripts requeue (a restart starts it again)."""
    from megatron_dapo.engines.transport import EngineLostError
    from megatron_dapo.errors import EXIT_RESTARTABLE

    closed = fake_trainer(EngineLostError("rollout engine http://n3:30000 failed (its connection was refused twice "
                                          "in a row); it was not started by this run", urls=["http://n3:30000"]))
    assert run_training(SimpleNamespace()) == EXIT_RESTARTABLE == 4
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("megatron-dapo: EngineLostError: rollout engine http://n3:30000")
    assert "Traceback" not in err + out and closed == [True]
    assert isinstance(EngineLostError("x"), EngineError)  # callers catching EngineError still see it


def test_run_training_lets_bugs_propagate(fake_trainer):
    fake_trainer(KeyError("a bug"))
    with pytest.raises(KeyError):
        run_training(SimpleNamespace())


# ---------------------------------------------------------------------------------------------- rollout
def _fake_rollout(validator_dropped: int = 0, prompt_skips: int = 0) -> batch_source.Rollout:
    validator = SimpleNamespace(start_step=lambda: None, groups_dropped=validator_dropped,
                                examples=["token id 999 >= vocab 300"], metrics=lambda: {})
    rollout = batch_source.Rollout(SimpleNamespace(client=None, weight_version="0"), dataset=None, sampler=None,
                                   tokenizer=None, settings=None, validator=validator, max_prompt_length=64)
    rollout.prompt_skips = prompt_skips
    return rollout


@pytest.mark.parametrize("exc", [EngineError("engine http://e0 died", urls=["http://e0"], status=503),
                                 MalformedEngineOutput("engine http://e0 returned 4 malformed responses in a row"),
                                 MathVerifyWorkerError("math-verify workers cannot be started")],
                         ids=lambda e: type(e).__name__)
def test_rollout_returns_the_error_for_every_rank(monkeypatch, exc):
    def failing(*a, **k):
        raise exc

    monkeypatch.setattr(batch_source, "collect_batch", failing)
    groups, metrics, error = _fake_rollout()(0)
    assert groups is None and metrics == {} and error is exc
    copy = pickle.loads(pickle.dumps(error))  # what _broadcast does to it
    assert type(copy) is type(exc) and str(copy) == str(exc)


def test_rollout_exhausted_sampling_adds_its_notes(monkeypatch):
    def failing(*a, **k):
        raise DynamicSamplingExhausted("max_num_gen_batches=2 rounds gave 1/4 groups.")

    monkeypatch.setattr(batch_source, "collect_batch", failing)
    _, _, error = _fake_rollout(validator_dropped=2, prompt_skips=5)(0)
    assert isinstance(error, DynamicSamplingExhausted)
    assert "2 groups were dropped for malformed engine responses (e.g. token id 999 >= vocab 300)" in str(error)
    assert "5 prompts were skipped as longer than data.max_prompt_length=64" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_rollout_lets_bugs_propagate(monkeypatch):
    def failing(*a, **k):
        raise ZeroDivisionError

    monkeypatch.setattr(batch_source, "collect_batch", failing)
    with pytest.raises(ZeroDivisionError):
        _fake_rollout()(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
