"""The interfaces between the trainer, the weight sync and the rollout engines (``typing.Protocol``).

- :class:`PolicyActor`: what the trainer and the weight sync use of
  :class:`~megatron_dapo.actor.megatron_actor.MegatronActor` (tests pass small fakes).
- :class:`RolloutEngine`: the blocking engine client over all engines
  (:class:`~megatron_dapo.engines.client.SyncEngineClient` for the CPU engine and SGLang,
  :class:`~megatron_dapo.engines.vllm_client.SyncVLLMClient` for vLLM), as the engine set, the weight sync
  and the rollout use it.
- :class:`WeightTransport`: one way of moving bucketed weights into the engines
  (:mod:`megatron_dapo.sync.transports`: ``disk``, ``distributed``, ``tensor``).

Which implementation is used is chosen once from a registry keyed by the config's ``Literal`` value:
``rollout.backend`` -> :data:`megatron_dapo.engines.engine_set.BACKENDS`, ``weight_sync.transport`` ->
:data:`megatron_dapo.sync.transports.TRANSPORTS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Protocol, Sequence

import torch

RolloutBackendName = Literal["cpu", "sglang", "vllm"]
"""``rollout.backend``."""
WeightTransportName = Literal["disk", "distributed", "tensor"]
"""``weight_sync.transport``."""

Bucket = list[tuple[str, torch.Tensor]]
"""One bucket of ``(hf_name, tensor)`` pairs (:func:`megatron_dapo.sync.bucketing.iter_buckets_with_last`)."""


class PolicyActor(Protocol):
    """The policy being trained, as seen by the trainer, the engine set and the weight sync.

    Attributes:
        spec: the model's :class:`~megatron_dapo.models.hf_config.ModelSpec` (``vocab_size``,
            ``tie_word_embeddings``, the HF parameter names via :func:`megatron_dapo.models.mapping.hf_names`);
            ``None`` in weight-sync test doubles (no name check; ties read from ``hf_path``).
        hf_path: the HF checkpoint directory the actor was built from (config files for ``disk`` syncs;
            ``None``: none).
        rank: global rank of this process.
        dp_rank: data-parallel rank; rank 0 of its DP group yields the full tensor stream.
        offload_metrics: ``memory/actor_*`` / ``timing/actor_*`` of the last offload / onload.
    """

    spec: Any
    hf_path: Optional[Path]
    rank: int
    dp_rank: int

    @property
    def offload_metrics(self) -> dict[str, float]: ...

    def compute_logprobs(self, batch: Any, temperature: float = 1.0,
                         local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropy)``, each ``[B, T]`` float32 aligned with ``batch.input_ids`` (collective).
        ``local``: ``batch`` is this data-parallel rank's own (no split over DP ranks)."""
        ...

    def train_step(self, batch: Any, loss: Any) -> dict[str, float]:
        """One optimizer update on ``batch``; returns the unprefixed loss metrics (collective)."""
        ...

    def iter_hf_tensors(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF parameter as ``(hf_name, full tensor)`` in ``dtype`` (collective generator; DP rank 0
        receives every tensor, other DP ranks none)."""
        ...

    def offload(self) -> dict[str, float]:
        """Move the actor's GPU state to host memory (colocated engines generate meanwhile)."""
        ...

    def onload(self) -> dict[str, float]:
        """Bring the state back for training."""
        ...


class RolloutEngine(Protocol):
    """The blocking client over every rollout engine (control calls go to each engine in ``control_urls``).

    Raises (every method): :class:`~megatron_dapo.engines.transport.EngineError` naming the engine when a
    call fails after the client's retries.
    """

    control_urls: list[str]
    api_key: Optional[str]

    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict, **kwargs: Any) -> list: ...

    def score(self, sequences: Sequence[Sequence[int]], start_lens: int | Sequence[int] = 0, *,
              temperature: float = 1.0) -> list[list[Optional[float]]]:
        """Per-token logprobs of ``sequences`` from ``start_lens`` on (no sampling)."""
        ...

    def abort_all(self) -> Any:
        """Abort every in-flight request on every engine."""
        ...

    def flush_cache(self) -> Any: ...

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> Any:
        """Free the engines' GPU memory (weights and KV cache; ``tags`` selects a part)."""
        ...

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> Any:
        """Re-allocate ``tags`` (``["weights"]``, ``["kv_cache"]``; ``None`` = all)."""
        ...

    def update_weights_from_disk(self, path: str, weight_version: Optional[str] = None) -> Any: ...

    def get_weight_version(self) -> dict[str, str]:
        """``{engine url: weight version}``."""
        ...

    def close(self) -> None: ...


class EngineRotation(Protocol):
    """Which engines take requests: the part of the engine client that
    :class:`~megatron_dapo.engines.engine_set.EngineSet`'s health keeping drives (both engine clients have it).
    An engine marked down gets no generation request and no control call; a warming one gets control calls
    (the weight push of a replacement) but no generation."""

    requests_resubmitted: int
    """Generation requests resent to another engine so far."""

    def mark_down(self, url: str, cause: str) -> int:
        """Out of rotation; its running generation requests are resent elsewhere (returns how many)."""
        ...

    def mark_warming(self, url: str) -> None: ...

    def mark_up(self, url: str) -> None: ...


class WeightTransport(Protocol):
    """Moves one sync's buckets into the engines (rank 0)."""

    def send(self, buckets: Iterator[tuple[Bucket, bool]], weight_version: str) -> None:
        """Consume ``(bucket, is_last)`` pairs and load them into every engine as ``weight_version``.

        Raises:
            WeightSyncError / EngineError: an engine refused or a transfer failed.
        """
        ...

    def reset(self) -> None:
        """An engine was replaced: rebuild whatever spans the engines (the ``distributed`` update group) at the
        next :meth:`send`."""
        ...

    def close(self) -> None:
        """Release what the transport holds (update groups, temporary files); idempotent."""
        ...
