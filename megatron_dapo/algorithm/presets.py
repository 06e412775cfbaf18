"""Algorithm presets: DAPO and the GRPO baseline, plus the switches of the DAPO ablation.

Switches (fields of :class:`AlgorithmSwitches`, the resolved config)
--------------------------------------------------------------------
=========================  ==========================================================================
``clip_ratio_low``         epsilon_low of the decoupled clip (DAPO eq. 10)
``clip_ratio_high``        epsilon_high ("Clip-Higher", Sec. 3.1)
``clip_ratio_c``           dual-clip constant (> 1) or None (off in both presets)
``loss_agg_mode``          ``token-mean`` (DAPO eq. 12, "Token-Level Policy Gradient Loss", Sec. 3.3)
                           or ``seq-mean-token-mean`` (GRPO eq. 6) or ``seq-mean-token-sum``
``soft_overlong_punishment``  add DAPO eq. 13 to the reward (Sec. 3.4)
``max_response_length``    L_max of eq. 13 (= generation limit; paper: 16384 expected + 4096 cache)
``overlong_buffer_length`` L_cache of eq. 13 (paper: 4096)
``overlong_penalty_factor`` multiplier of eq. 13 (paper: 1.0)
``overlong_filtering``     mask truncated samples out of the loss ("Overlong Filtering", Sec. 3.4)
``dynamic_sampling``       keep only groups with 0 < #correct < G (DAPO eq. 11, Sec. 3.2)
``kl_loss``                add ``kl_loss_coef * agg(kl_penalty(logprobs, ref_logprobs, kl_loss_type))``
``kl_loss_coef``           beta
``kl_loss_type``           ``k1`` / ``k2`` / ``k3`` (see :func:`~.policy_loss.kl_penalty`)
``norm_adv_by_std``        divide group-centred rewards by the group std (False = Dr. GRPO)
=========================  ==========================================================================

Ablation switches (accepted by :func:`resolve_preset` in ``overrides``)
-----------------------------------------------------------------------
Table 1's vocabulary for the rows below; a run's config (``algorithm.*``) takes the concrete switches only
(``clip_ratio_high``, ``loss_agg_mode``), one key per value.

* ``clip_higher``: True -> ``clip_ratio_high = 0.28``; False -> ``0.2`` (``clip_ratio_low`` stays 0.2).
* ``token_level_loss``: True -> ``loss_agg_mode = "token-mean"``; False -> ``"seq-mean-token-mean"``.

Choice about KL in ``grpo``
---------------------------
GRPO as written in the DAPO paper's Sec. 2.2 (eq. 6) contains a ``-beta * D_KL(pi_theta || pi_ref)``
term. This recipe runs no reference model (DAPO removes the KL term, Sec. 2.3), so the ``grpo`` preset
here is eq. 6 *without* the KL term: ``kl_loss=False``. ``kl_loss_coef = 0.001`` with the k3
("low_var_kl") estimator, the common verl GRPO setting, is kept as the beta a caller with a reference
policy gets from ``overrides={"kl_loss": True}`` (the pure loss functions support it); the trainer's
config validation refuses ``algorithm.kl_loss=true``. Table 1 has no "remove KL" row, so the increments
it reports are attributed to the listed techniques only; we read it as run without KL throughout, which
:data:`TABLE1_ABLATION` states explicitly in its first row.

DAPO paper Table 1 (Qwen2.5-32B, AIME 2024 avg@32) as configurations
--------------------------------------------------------------------
Rows are cumulative, as printed in the paper; each is ``resolve_preset("grpo", overrides)``:

====================================  ======  ====================================================
Row                                   AIME24  overrides on top of ``grpo``
====================================  ======  ====================================================
Naive GRPO                            30      kl_loss=False, kl_loss_coef=0.0
+ Overlong Filtering                  36      ... + overlong_filtering=True
+ Clip-Higher                         38      ... + clip_higher=True
+ Soft Overlong Punishment            41      ... + soft_overlong_punishment=True
+ Token-level Loss                    42      ... + token_level_loss=True
+ Dynamic Sampling (DAPO)             50      ... + dynamic_sampling=True
====================================  ======  ====================================================

The last row equals the ``dapo`` preset except for ``overlong_filtering``: the ``dapo`` preset
follows the released DAPO recipe, which relies on soft overlong punishment alone (truncated samples
keep their gradient and receive the -1 length penalty) rather than also masking them.
Use :func:`table1_config` to get a row's config by index or name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .policy_loss import KL_PENALTY_KINDS, LOSS_AGG_MODES

__all__ = [
    "AlgorithmSwitches",
    "PRESETS",
    "SWITCH_KEYS",
    "ABLATION_SWITCHES",
    "TABLE1_ABLATION",
    "resolve_preset",
    "table1_config",
]

@dataclass(frozen=True)
class AlgorithmSwitches:
    """The resolved algorithm switches (one immutable value per run); see the table in the module docstring.

    Built by :func:`resolve_preset` (validated there); :meth:`as_dict` gives the plain mapping and
    ``dataclasses.replace`` a modified copy (unvalidated: pass the result through :func:`resolve_preset`
    when the new values come from a user).

    ``max_response_length`` and ``overlong_buffer_length`` (``L_max`` / ``L_cache`` of eq. 13) are the
    paper's values in the presets; a run's config always supplies its own (they depend on the model's
    generation budget, not on the algorithm), see :meth:`megatron_dapo.config.DAPOConfig.resolved_algorithm`.
    """

    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: Optional[float]
    loss_agg_mode: str
    soft_overlong_punishment: bool
    max_response_length: int
    overlong_buffer_length: int
    overlong_penalty_factor: float
    overlong_filtering: bool
    dynamic_sampling: bool
    kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    norm_adv_by_std: bool

    def as_dict(self) -> dict[str, Any]:
        """``{switch name: value}`` for every field (a fresh dict)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, AlgorithmSwitches] = {
    "dapo": AlgorithmSwitches(
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=None,
        loss_agg_mode="token-mean",
        soft_overlong_punishment=True,
        max_response_length=20480,
        overlong_buffer_length=4096,
        overlong_penalty_factor=1.0,
        overlong_filtering=False,
        dynamic_sampling=True,
        kl_loss=False,
        kl_loss_coef=0.0,
        kl_loss_type="k3",
        norm_adv_by_std=True,
    ),
    "grpo": AlgorithmSwitches(
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        clip_ratio_c=None,
        loss_agg_mode="seq-mean-token-mean",
        soft_overlong_punishment=False,
        max_response_length=20480,
        overlong_buffer_length=4096,
        overlong_penalty_factor=1.0,
        overlong_filtering=False,
        dynamic_sampling=False,
        kl_loss=False,  # no reference model in this recipe (module docstring, "Choice about KL")
        kl_loss_coef=0.001,
        kl_loss_type="k3",
        norm_adv_by_std=True,
    ),
}

#: Every concrete switch a resolved config holds.
SWITCH_KEYS = tuple(f.name for f in dataclasses.fields(AlgorithmSwitches))

#: Ablation booleans -> the concrete switch values they stand for.
ABLATION_SWITCHES: dict[str, dict[bool, dict[str, Any]]] = {
    "clip_higher": {True: {"clip_ratio_high": 0.28}, False: {"clip_ratio_high": 0.2}},
    "token_level_loss": {
        True: {"loss_agg_mode": "token-mean"},
        False: {"loss_agg_mode": "seq-mean-token-mean"},
    },
}

_BOOL_KEYS = ("soft_overlong_punishment", "overlong_filtering", "dynamic_sampling", "kl_loss", "norm_adv_by_std")


def _table1() -> tuple[dict[str, Any], ...]:
    steps = [
        ("Naive GRPO", 30, {"kl_loss": False, "kl_loss_coef": 0.0}),
        ("+ Overlong Filtering", 36, {"overlong_filtering": True}),
        ("+ Clip-Higher", 38, {"clip_higher": True}),
        ("+ Soft Overlong Punishment", 41, {"soft_overlong_punishment": True}),
        ("+ Token-level Loss", 42, {"token_level_loss": True}),
        ("+ Dynamic Sampling (DAPO)", 50, {"dynamic_sampling": True}),
    ]
    rows, acc = [], {}
    for name, score, delta in steps:
        acc = {**acc, **delta}
        rows.append({"row": name, "aime24_avg32": score, "base": "grpo", "overrides": dict(acc)})
    return tuple(rows)


#: Table 1 of arXiv 2503.14476: ``{"row", "aime24_avg32", "base", "overrides"}`` per row.
TABLE1_ABLATION: tuple[dict[str, Any], ...] = _table1()


def _validate(cfg: Mapping[str, Any]) -> None:
    for key in _BOOL_KEYS:
        if not isinstance(cfg[key], bool):
            raise ValueError(f"switch {key!r} must be a bool, got {cfg[key]!r}")
    lo, hi = cfg["clip_ratio_low"], cfg["clip_ratio_high"]
    if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not 0 <= lo < 1:
        raise ValueError(f"switch 'clip_ratio_low' must be a number in [0, 1), got {lo!r}")
    if isinstance(hi, bool) or not isinstance(hi, (int, float)) or not (hi >= 0 and math.isfinite(hi)):
        raise ValueError(f"switch 'clip_ratio_high' must be a finite number >= 0, got {hi!r}")
    c = cfg["clip_ratio_c"]
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1):
        raise ValueError(f"switch 'clip_ratio_c' must be None or a number > 1, got {c!r}")
    if cfg["loss_agg_mode"] not in LOSS_AGG_MODES:
        raise ValueError(
            f"switch 'loss_agg_mode' has unknown mode {cfg['loss_agg_mode']!r}; expected one of {list(LOSS_AGG_MODES)}"
        )
    if cfg["kl_loss_type"] not in KL_PENALTY_KINDS:
        raise ValueError(
            f"switch 'kl_loss_type' has unknown kind {cfg['kl_loss_type']!r}; expected one of {sorted(KL_PENALTY_KINDS)}"
        )
    coef = cfg["kl_loss_coef"]
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"switch 'kl_loss_coef' must be a finite number >= 0, got {coef!r}")
    lmax, lcache = cfg["max_response_length"], cfg["overlong_buffer_length"]
    for key, val in (("max_response_length", lmax), ("overlong_buffer_length", lcache)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"switch {key!r} must be a positive int, got {val!r}")
    if lcache > lmax:
        raise ValueError(
            f"switch 'overlong_buffer_length' ({lcache}) must not exceed 'max_response_length' ({lmax})"
        )
    pf = cfg["overlong_penalty_factor"]
    if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not (pf >= 0 and math.isfinite(pf)):
        raise ValueError(f"switch 'overlong_penalty_factor' must be a finite number >= 0, got {pf!r}")


def resolve_preset(name: str, overrides: Optional[Mapping[str, Any]] = None) -> AlgorithmSwitches:
    """The algorithm switches of preset ``name`` updated with ``overrides``.

    ``overrides`` may hold any key of :data:`SWITCH_KEYS` and the ablation booleans of
    :data:`ABLATION_SWITCHES` (``clip_higher``, ``token_level_loss``), which are translated into
    their concrete values first; an explicit concrete key that contradicts an ablation boolean in
    the same ``overrides`` is an error.  The result is validated.

    Raises:
        ValueError: unknown preset (names the known ones), unknown override key (named),
            contradictory overrides, or an invalid value (the switch is named).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[name].as_dict()
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in SWITCH_KEYS and k not in ABLATION_SWITCHES]
    if unknown:
        raise ValueError(
            f"unknown algorithm switch(es) {unknown}; expected keys from {list(SWITCH_KEYS)} "
            f"or ablation switches {list(ABLATION_SWITCHES)}"
        )
    implied: dict[str, tuple[str, Any]] = {}
    for abl, mapping in ABLATION_SWITCHES.items():
        if abl not in overrides:
            continue
        flag = overrides[abl]
        if not isinstance(flag, bool):
            raise ValueError(f"ablation switch {abl!r} must be a bool, got {flag!r}")
        for key, val in mapping[flag].items():
            implied[key] = (abl, val)
            cfg[key] = val
    for key, val in overrides.items():
        if key in ABLATION_SWITCHES:
            continue
        if key in implied and implied[key][1] != val:
            abl, implied_val = implied[key]
            raise ValueError(
                f"override {key}={val!r} contradicts {abl}={overrides[abl]!r} (which implies {key}={implied_val!r})"
            )
        cfg[key] = val
    _validate(cfg)
    return AlgorithmSwitches(**cfg)


def table1_config(row: Union[int, str], overrides: Optional[Mapping[str, Any]] = None) -> AlgorithmSwitches:
    """Config of one row of :data:`TABLE1_ABLATION` (by 0-based index or row name).

    Extra ``overrides`` are applied on top of the row's own overrides.

    Raises:
        ValueError: unknown row name or index out of range.
    """
    if isinstance(row, int) and not isinstance(row, bool):
        if not 0 <= row < len(TABLE1_ABLATION):
            raise ValueError(f"Table 1 row index {row} out of range [0, {len(TABLE1_ABLATION)})")
        entry = TABLE1_ABLATION[row]
    else:
        matches = [r for r in TABLE1_ABLATION if r["row"] == row]
        if not matches:
            raise ValueError(
                f"unknown Table 1 row {row!r}; expected one of {[r['row'] for r in TABLE1_ABLATION]}"
            )
        entry = matches[0]
    merged = {**entry["overrides"], **dict(overrides or {})}
    return resolve_preset(entry["base"], merged)
