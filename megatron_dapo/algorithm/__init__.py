"""The DAPO algorithm (arXiv 2503.14476) in pure torch: advantages, losses, reward shaping,
dynamic sampling and presets.  No Megatron, no I/O, no logging."""
from .advantages import NonFiniteAdvantageError, compute_group_advantages
from .dynamic_sampling import DynamicSampler, DynamicSamplingExhausted, Group
from .policy_loss import (
    KL_PENALTY_KINDS,
    LOSS_AGG_MODES,
    agg_loss,
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

__all__ = [
    "ABLATION_SWITCHES",
    "AlgorithmSwitches",
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
    "compute_group_advantages",
    "compute_policy_loss",
    "entropy_from_logits",
    "filter_groups",
    "kl_penalty",
    "overlong_filter_mask",
    "resolve_preset",
    "soft_overlong_penalty",
    "table1_config",
]
