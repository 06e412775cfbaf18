"""The engine lifecycle (megatron_dapo.engines.engine_set.EngineSet), the rank-0 helper (sync.collective.on_rank0), the
backend / transport registries, and one Trainer.train_one_step with a fake actor and a fake engine set.

Fast: fake actors / engine clients (a real WeightSync over the disk transport where a push is involved); the
on_rank0 test runs two gloo processes.
"""
from __future__ import annotations

import os
import socket
import typing
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_dapo.config import DAPOConfig, RolloutConfig, WeightSyncConfig
from megatron_dapo.engines.engine_set import BACKENDS, EngineSet, LogprobCheck, engine_transport, fixed_sequence_logprobs
from megatron_dapo.engines.protocols import RolloutBackendName, WeightTransportName
from megatron_dapo.engines.transport import EngineError
from megatron_dapo.sync import WeightSync, WeightSyncError
from megatron_dapo.sync.collective import from_rank0, on_rank0
from megatron_dapo.sync.transports import TRANSPORTS
from fakes import Events, FakeEngineSet, HFActor, RecordingClient, StepActor


# ------------------------------------------------------------------------------------------ fakes


class LifecycleActor(HFActor):
    """HFActor (HF tensors of the tiny checkpoint) plus what EngineSet uses: offload / onload / metrics /
    compute_logprobs (a fixed function of the token ids, so engines can be made to agree or not)."""

    def __init__(self, path, events: Events):
        super().__init__(path)
        self.events = events

    def offload(self):
        self.events.log.append(("actor", "offload"))
        return {}

    def onload(self):
        self.events.log.append(("actor", "onload"))
        return {}

    @property
    def offload_metrics(self):
        return {"memory/actor_offloaded_bytes": 0.0}

    def compute_logprobs(self, batch, temperature=1.0, local=False):
        self.events.log.append(("actor", "compute_logprobs"))
        lp = -(batch.input_ids.float() % 7) / 10.0
        return lp, torch.zeros_like(lp)


class LifecycleClient(RecordingClient):
    """RecordingClient whose calls also land in the shared event log; ``score`` answers ``offset`` + the
    fake actor's logprobs; ``fail`` names a method that raises."""

    def __init__(self, events: Events, urls=("http://e0:1", "http://e1:2")):
        super().__init__(urls)
        self.events = events
        self.offset = 0.0
        self.fail = ""

    def _note(self, what, *args):
        self.events.log.append(("engines", what, *args))
        if self.fail == what:
            raise RuntimeError(f"simulated {what} failure")

    def abort_all(self):
        self._note("abort_all")
        super().abort_all()

    def release_memory_occupation(self, tags=None):
        self._note("release")
        super().release_memory_occupation(tags)

    def resume_memory_occupation(self, tags=None):
        self._note("resume", tuple(tags))
        super().resume_memory_occupation(tags)

    def update_weights_from_disk(self, path, weight_version=None):
        self._note("update_weights_from_disk", weight_version)
        super().update_weights_from_disk(path, weight_version)

    def score(self, sequences, start_lens=0, *, temperature=1.0):
        seq = torch.tensor(sequences[0])
        return [(-(seq[start_lens:].float() % 7) / 10.0 + self.offset).tolist()]

    def close(self):
        pass


def _engine_set(tiny_hf, tmp_path, *, colocated, offload_actor=True, check=False):  # noqa: F811
    events = Events()
    actor, client = LifecycleActor(tiny_hf, events), LifecycleClient(events)
    ws = WeightSync(actor, client, transport="disk", work_dir=tmp_path / "ws")
    lp_check = LogprobCheck(1.0, lambda url: client) if check else None
    engines = EngineSet(actor, client, ws, colocated=colocated, offload_actor=offload_actor, logprob_check=lp_check)
    return engines, events, client


def _kinds(events):
    """The event log without the version check reads (one per push)."""
    return [e[:3] if e[1] == "resume" else e[:2] for e in events.log if e[1] != "get_weight_version"]


# ------------------------------------------------------------------------------------------ EngineSet
def test_colocated_transitions_order_and_idempotence(tiny_hf, tmp_path):  # noqa: F811
    engines, events, client = _engine_set(tiny_hf, tmp_path, colocated=True)
    assert (engines.state, engines.weight_version) == ("generating", "0")  # launched with the HF weights
    m = engines.to_training()
    assert _kinds(events) == [("engines", "release"), ("actor", "onload")]
    assert set(m) == {"colocate/engine_release_s", "colocate/actor_onload_s"} and engines.state == "released"
    events.log.clear()
    assert engines.to_training() == {} and events.log == []  # already released: nothing happens
    m = engines.to_generation("0")  # released engines lost their weights: the same version is pushed again
    assert _kinds(events) == [("engines", "resume", ("weights",)), ("engines", "update_weights_from_disk"),
                              ("actor", "offload"), ("engines", "resume", ("kv_cache",))]
    assert [e for e in events.log if e[1] == "update_weights_from_disk"] == [("engines", "update_weights_from_disk", "0")]
    assert {"colocate/engine_resume_weights_s", "colocate/sync_s", "colocate/actor_offload_s",
            "colocate/engine_resume_kv_cache_s", "weight_sync/seconds", "timing/weight_sync_s",
            "memory/actor_offloaded_bytes"} <= set(m)
    assert ("abort_all",) not in client.calls  # nothing generates on released engines: no pause
    assert (engines.state, engines.weight_version) == ("generating", "0")
    events.log.clear()
    assert engines.to_generation("0") == {} and events.log == []  # already generating this version
    engines.to_generation("1")  # generating an older version: release first, then the same cycle
    assert _kinds(events) == [("engines", "release"), ("actor", "onload"), ("engines", "resume", ("weights",)),
                              ("engines", "update_weights_from_disk"), ("actor", "offload"),
                              ("engines", "resume", ("kv_cache",))]
    assert engines.weight_version == "1"


def test_colocated_without_actor_offload_keeps_the_actor_resident(tiny_hf, tmp_path):  # noqa: F811
    engines, events, _ = _engine_set(tiny_hf, tmp_path, colocated=True, offload_actor=False)
    engines.to_training()
    engines.to_generation("1")
    assert [e for e in events.log if e[0] == "actor"] == []
    assert [e[1] for e in events.log if e[1] in ("release", "resume")] == ["release", "resume", "resume"]


def test_not_colocated_training_does_nothing_generation_is_a_paused_push(tiny_hf, tmp_path):  # noqa: F811
    engines, events, client = _engine_set(tiny_hf, tmp_path, colocated=False)
    assert engines.to_training() == {} and events.log == [] and engines.state == "generating"
    assert engines.to_generation("0") == {} and events.log == []  # the launch weights are version 0
    m = engines.to_generation("1")
    assert _kinds(events) == [("engines", "abort_all"), ("engines", "update_weights_from_disk")]
    assert client.calls[0] == ("abort_all",) and "weight_sync/pause_s" in m and "timing/weight_sync_s" in m
    events.log.clear()
    assert engines.to_training() == {} and engines.to_generation("1") == {} and events.log == []


def test_a_refused_release_is_an_engine_error_and_the_state_stays(tiny_hf, tmp_path):  # noqa: F811
    engines, events, client = _engine_set(tiny_hf, tmp_path, colocated=True)
    client.fail = "release"
    with pytest.raises(EngineError, match=r"release_memory_occupation\(\): RuntimeError: simulated release"):
        engines.to_training()
    assert engines.state == "generating" and ("actor", "onload") not in events.log
    client.fail = ""
    engines.to_training()
    assert engines.state == "released"


def test_logprob_check_after_each_push(tiny_hf, tmp_path):  # noqa: F811
    engines, events, client = _engine_set(tiny_hf, tmp_path, colocated=True, check=True)
    engines.to_training()
    events.log.clear()
    m = engines.to_generation("1")
    assert m["weight_sync/engine_actor_logprob_max_abs_diff"] == pytest.approx(0.0, abs=1e-6)
    # the actor's reference logprobs are taken before it is offloaded
    assert events.log.index(("actor", "compute_logprobs")) < events.log.index(("actor", "offload"))
    client.offset = 0.01
    with pytest.raises(WeightSyncError, match="logprobs differ from the actor's by 0.01"):
        engines.to_generation("2")
    seq, prompt_len, lp = fixed_sequence_logprobs(engines.actor, 1.0)
    assert len(seq) == 24 and prompt_len == 8 and lp.shape == (16,)


def test_registries_cover_the_config_literals():
    hints = typing.get_type_hints(RolloutConfig)
    assert set(BACKENDS) == set(typing.get_args(hints["backend"])) == set(typing.get_args(RolloutBackendName))
    ws_hints = typing.get_type_hints(WeightSyncConfig)
    assert set(TRANSPORTS) == set(typing.get_args(ws_hints["transport"])) == set(typing.get_args(WeightTransportName))
    for backend in BACKENDS.values():
        assert set(backend.weight_transports) <= set(TRANSPORTS)
    # vLLM engines reload from disk only; SGLang-API engines take every transport as configured
    assert engine_transport(RolloutConfig(backend="vllm"), "tensor", warn=False) == "disk"
    assert engine_transport(RolloutConfig(backend="sglang"), "tensor", warn=False) == "tensor"


def test_config_rejects_a_backend_outside_the_literal(tmp_path):
    from megatron_dapo.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout:\n  backend: cpu\n")
    assert load_config(str(cfg), [], validate=False).rollout.backend == "cpu"
    with pytest.raises(ConfigError, match="rollout.backend: must be one of cpu, sglang, vllm, got 'tpu'"):
        load_config(str(cfg), ["rollout.backend=tpu"], validate=False)


# ------------------------------------------------------------------------------------------ on_rank0
class OddError(Exception):
    """An exception whose constructor does not take one message."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def _on_rank0_worker(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    got = {"value": on_rank0(lambda: {"rank0": [1, 2]}), "shared": from_rank0(f"from {rank}")}

    def fail():
        raise ValueError("rank 0 says no")

    for key, kw in (("same", {}), ("wrapped", {"error": WeightSyncError, "what": "pushing"})):
        try:
            on_rank0(fail, **kw)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion in the parent
            got[key] = (type(exc).__name__, str(exc))
    try:
        on_rank0(lambda: (_ for _ in ()).throw(OddError(1, 2)))
    except Exception as exc:  # noqa: BLE001
        got["odd"] = (type(exc).__name__, str(exc))
    out.put((rank, got))
    dist.destroy_process_group()


def test_on_rank0_gives_every_rank_the_result_or_the_same_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_on_rank0_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank in (0, 1):
        got = results[rank]
        assert got["value"] == {"rank0": [1, 2]} and got["shared"] == "from 0"
        assert got["same"] == ("ValueError", "rank 0 says no")
        assert got["wrapped"] == ("WeightSyncError", "pushing: ValueError: rank 0 says no")
    assert results[0]["odd"] == ("OddError", "1/2")  # rank 0 re-raises the original
    assert results[1]["odd"] == ("RuntimeError", "OddError: 1/2")


def test_on_rank0_without_a_process_group_calls_the_function():
    assert on_rank0(lambda: 3) == 3
    with pytest.raises(KeyError):
        on_rank0(lambda: {}["x"])


# ------------------------------------------------------------------------------------------ one trainer step


def test_train_one_step_transitions_around_rollout_and_update():
    """Rollout on generating engines, training on released ones, then the new weights pushed as the next
    version; the trainer itself holds no engine state."""
    from megatron_dapo.algorithm import Group
    from megatron_dapo.rollout.batch_source import SyncBatchSource
    from megatron_dapo.trainer import Trainer

    events = Events()
    trainer = Trainer.__new__(Trainer)  # no Megatron: only what train_one_step reads
    trainer.cfg = DAPOConfig()
    trainer.cfg.actor.ppo_mini_batch_size = 4
    trainer.rank, trainer.step = 0, 0
    trainer.alg = trainer.cfg.resolved_algorithm()
    trainer.loss = SimpleNamespace(correction=None)  # no behaviour correction: the plan's token counts
    trainer.nonfinite_streak = 0
    trainer._dispatcher, trainer._batch_ids = None, []
    trainer._resume_push_metrics = {}
    trainer.engines = FakeEngineSet(events)
    trainer.actor = StepActor(events)
    groups = [Group(prompt_index=i, prompt_ids=[1, 2, 3], responses=[[4, 5], [6], [7, 8], [9]],
                    rewards=[1.0, -1.0, 1.0, -1.0], correct=[True, False, True, False],
                    finish_reasons=["stop"] * 4) for i in range(2)]

    def rollout(step):
        events.log.append(("trainer", "rollout"))
        return groups, {"rollout/reward_mean": 0.0}, None

    trainer.batches = SyncBatchSource(rollout, trainer.engines, is_rank0=True)
    metrics = trainer.train_one_step()
    log = events.log
    assert log[0] == ("engines", "to_generation", "0") and log[1] == ("trainer", "rollout")
    assert log[2] == ("engines", "to_training")
    assert log[-2] == ("engines", "to_generation", "1") and trainer.step == 1
    assert log[-1] == ("engines", "health_metrics")  # after the push, which replaces failed engines
    assert ("actor", "train_step") in log[3:-2]
    assert {"colocate/engine_release_s", "timing/weight_sync_s", "timing/step_s",
            "rollout/engine_restarts"} <= set(metrics)
    assert not any(k for k in vars(trainer) if "awake" in k or "in_memory" in k)


def test_clients_and_transports_implement_their_protocols():
    """Every member the Protocols name is defined on the classes the registries hand out (no __getattr__)."""
    from megatron_dapo.engines.protocols import RolloutEngine, WeightTransport
    from megatron_dapo.engines.client import SyncEngineClient
    from megatron_dapo.engines.vllm_client import SyncVLLMClient

    def members(proto):
        return {n for n in vars(proto) if not n.startswith("_")} | set(proto.__annotations__)

    for cls in (SyncEngineClient, SyncVLLMClient):
        assert "__getattr__" not in vars(cls)
        assert not [n for n in members(RolloutEngine) if not hasattr(cls, n)], cls
    for cls in TRANSPORTS.values():
        assert not [n for n in members(WeightTransport) | {"build", "check_available"} if not hasattr(cls, n)], cls
