"""The DAPO algorithm (arXiv 2503.14476) in pure torch: advantages, losses, reward shaping,
dynamic sampling and presets.  No Megatron, no I/O, no logging."""
from .advantages import NonFiniteAdvantageError, compute_group_advantages
from .dynamic_sampling import DynamicSampler, DynamicSamplingExhausted, Group
from .policy_loss import (
    KL_PENALTY_KINDS,
    LOSS_AGG_MODES,
    agg_loss,
    compute_decoupled_policy_loss,
    compute_policy_loss,
    entropy_from_logits,
    geometric_seq_is_mask,
    icepop_token_mask,
    kl_penalty,
    rollout_correction_weights,
    truncated_is_weights,
)
from .presets import (
    ABLATION_SWITCHES,
    PRESETS,
    SWITCH_KEYS,
    TABLE1_ABLATION,
    resolve_preset,
    table1_config,
)
from .reward_shaping import filter_groups, overlong_filter_mask, soft_overlong_penalty

__all__ = [
    "ABLATION_SWITCHES",
    "DynamicSampler",
    "DynamicSamplingExhausted",
    "Group",
    "KL_PENALTY_KINDS",
    "LOSS_AGG_MODES",
    "NonFiniteAdvantageError",
    "PRESETS",
    "SWITCH_KEYS",
    "TABLE1_ABLATION",
    "agg_loss",
    "compute_decoupled_policy_loss",
    "compute_group_advantages",
    "compute_policy_loss",
    "entropy_from_logits",
    "filter_groups",
    "geometric_seq_is_mask",
    "icepop_token_mask",
    "kl_penalty",
    "overlong_filter_mask",
    "resolve_preset",
    "rollout_correction_weights",
    "soft_overlong_penalty",
    "table1_config",
    "truncated_is_weights",
]
