"""The DAPO algorithm (arXiv 2503.14476) in pure torch: advantages, losses, reward shaping,
dynamic sampling, presets and the train-batch builder.  No Megatron, no I/O, no logging."""
from .advantages import NonFiniteAdvantageError, compute_group_advantages
from .dynamic_sampling import (DynamicSampler, DynamicSamplingExhausted, Group, PendingGroup, StaleReset,
                               reset_stale_samples)
from .corrections import (
    SEQ_IS_MODES,
    RolloutCorrection,
    geometric_seq_is_mask,
    icepop_token_mask,
    product_seq_is_mask,
    rollout_correction_keep_mask,
    rollout_correction_weights,
    truncated_is_weights,
)
from .policy_loss import (
    KL_PENALTY_KINDS,
    LOSS_AGG_MODES,
    agg_loss,
    compute_decoupled_policy_loss,
    compute_policy_loss,
    entropy_from_logits,
    kl_penalty,
)
from .presets import (
    ABLATION_SWITCHES,
    AlgorithmSwitches,
    PRESETS,
    SWITCH_KEYS,
    TABLE1_ABLATION,
    resolve_preset,
    table1_config,
)
from .reward_shaping import filter_groups, overlong_filter_mask, soft_overlong_penalty
from .train_batch import build_train_batch, flatten_groups, logprob_mismatch_parts

__all__ = [
    "ABLATION_SWITCHES",
    "AlgorithmSwitches",
    "DynamicSampler",
    "DynamicSamplingExhausted",
    "Group",
    "KL_PENALTY_KINDS",
    "LOSS_AGG_MODES",
    "SEQ_IS_MODES",
    "NonFiniteAdvantageError",
    "PendingGroup",
    "StaleReset",
    "reset_stale_samples",
    "PRESETS",
    "RolloutCorrection",
    "SWITCH_KEYS",
    "TABLE1_ABLATION",
    "agg_loss",
    "build_train_batch",
    "compute_decoupled_policy_loss",
    "compute_group_advantages",
    "compute_policy_loss",
    "entropy_from_logits",
    "filter_groups",
    "flatten_groups",
    "geometric_seq_is_mask",
    "icepop_token_mask",
    "kl_penalty",
    "logprob_mismatch_parts",
    "overlong_filter_mask",
    "resolve_preset",
    "product_seq_is_mask",
    "rollout_correction_keep_mask",
    "rollout_correction_weights",
    "soft_overlong_penalty",
    "table1_config",
    "truncated_is_weights",
]
