"""Stand-ins shared by several test modules: an actor that serves HF tensors (:class:`HFActor`), an engine client
that records the calls weight sync makes (:class:`RecordingClient`), and the event log, engine set and actor of the
trainer-loop tests (:class:`Events`, :class:`FakeEngineSet`, :class:`StepActor`)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_dapo.models import mapping
from megatron_dapo.models.hf_config import spec_from_hf_config


class HFActor:
    """Stands in for MegatronActor: HF tensors of a checkpoint, scaled by ``scale`` (a 'training step')."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.hf_path = Path(path)
        self.spec = spec_from_hf_config(path)
        self.rank = self.dp_rank = 0
        self.tensors = load_file(str(Path(path) / "model.safetensors"))
        self.scale = 1.0
        self.drop: set[str] = set()

    def iter_hf_tensors(self, dtype=None):
        for name in mapping.hf_names(self.spec):
            if name in self.drop:
                continue
            t = self.tensors[name] * self.scale
            yield name, (t if dtype is None else t.to(dtype))


class RecordingClient:
    """The SyncEngineClient methods WeightSync uses, recording calls; ``versions`` decides the answer."""

    def __init__(self, urls=("http://e0:1", "http://e1:2")):
        self.control_urls = list(urls)
        self.api_key = None
        self.calls: list[tuple] = []
        self.version_override: dict[str, str] = {}
        self.version = "default"

    def abort_all(self):
        self.calls.append(("abort_all",))

    def flush_cache(self):
        self.calls.append(("flush_cache",))

    def update_weights_from_disk(self, path, weight_version=None):
        files = sorted(os.listdir(path))
        self.calls.append(("update_weights_from_disk", path, weight_version, files))
        self.version = weight_version

    def get_weight_version(self):
        self.calls.append(("get_weight_version",))
        return {u: self.version_override.get(u, self.version) for u in self.control_urls}

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tuple(tags)))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))


class Events:
    """One ordered log shared by the fake actor, the fake engines and the fake weight sync."""


    def __init__(self):
        self.log: list[tuple] = []


class FakeEngineSet:
    """Records the transitions the trainer asks for (EngineSet's interface)."""


    def __init__(self, events: Events):
        self.events = events
        self.client = object()


    def to_generation(self, weight_version):
        self.events.log.append(("engines", "to_generation", weight_version))
        return {"timing/weight_sync_s": 0.0}


    def to_training(self):
        self.events.log.append(("engines", "to_training"))
        return {"colocate/engine_release_s": 0.0}


    def recover(self):
        self.events.log.append(("engines", "recover"))
        return False  # nothing was replaced: the failure stands

    def health_metrics(self):
        self.events.log.append(("engines", "health_metrics"))
        return {"rollout/engine_restarts": 0.0}


class StepActor:
    """What train_one_step uses of the actor: its DP coordinates (the batch dispatcher), compute_logprobs and
    train_step on this DP rank's share (``local=True``), last_nonfinite."""


    dp_rank, dp_size = 0, 1


    def __init__(self, events: Events):
        self.events = events
        self.last_nonfinite = None


    def compute_logprobs(self, batch, temperature=1.0, local=False):
        assert local, "the trainer hands the actor this DP rank's rows"
        self.events.log.append(("actor", "compute_logprobs"))
        lp = torch.full(batch.input_ids.shape, -0.5)
        return lp, torch.zeros_like(lp)


    def train_step(self, batch, loss, *, global_num_tokens=None, global_num_seqs=None, local=False):
        assert local and global_num_tokens >= 1 and global_num_seqs >= 1
        self.events.log.append(("actor", "train_step"))
        return {"pg_loss": 0.25, "grad_norm": 1.0}
