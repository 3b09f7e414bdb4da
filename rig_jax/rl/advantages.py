"""Group-relative advantages (method.md, Reflection-GRPO), computed on the host in float64.

Rewards arrive flat, shape `(B*G,)`, with rows `i*G .. i*G+G-1` forming the group of prompt `i`.
A group whose rewards are all equal carries no learning signal: its advantages are exactly 0
(not `0 / eps` noise from float rounding of the mean) and it is counted in `zero_std_fraction`.

Config fields: `rl.advantage` (estimator name), `rl.group_size`, `rl.advantage_clip`,
`rl.advantage_eps`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from rig_jax.errors import ConfigError, RigError
from rig_jax.rl.registry import ADVANTAGES


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    clip: float = 5.0   # advantages are clipped to [-clip, clip]
    eps: float = 1e-4   # added to the group std before dividing

    def __post_init__(self):
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"rl.advantage_clip: must be a finite number > 0, got {self.clip}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"rl.advantage_eps: must be a finite number >= 0, got {self.eps}")


def _grouped(rewards: Any, group_size: int) -> np.ndarray:
    """Rewards as a checked float64 array of shape (num_groups, group_size)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 2:
        raise ConfigError(f"rl.group_size: must be an integer >= 2, got {group_size!r}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise RigError(f"rewards: expected a flat (B*G,) array, got shape {r.shape}")
    if r.size == 0 or r.size % group_size:
        raise ConfigError(f"rl.group_size: {r.size} rewards are not a whole, non-zero number "
                          f"of groups of {group_size}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise RigError(f"rewards: non-finite values at rows {bad.tolist()}")
    return r.reshape(-1, group_size)


def _zero_std(groups: np.ndarray) -> np.ndarray:
    """(num_groups,) bool: every reward of the group is exactly equal."""
    return np.all(groups == groups[:, :1], axis=1)


def group_stats(rewards: np.ndarray, group_size: int) -> dict[str, float]:
    """Reward statistics to log each step: how much signal the groups carry."""
    groups = _grouped(rewards, group_size)
    zero = _zero_std(groups)
    return {
        "reward_mean": float(groups.mean()),
        "reward_std": float(groups.std(axis=1).mean()),
        "zero_std_fraction": float(zero.mean()),
        "zero_std_groups": float(zero.sum()),
        "num_groups": float(groups.shape[0]),
    }


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: np.ndarray, group_size: int, settings: AdvantageSettings) -> np.ndarray:
    """`clip((R - mean_g) / (std_g + eps), -clip, clip)` with the population std (ddof=0)."""
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    adv = centred / (groups.std(axis=1, keepdims=True) + settings.eps)
    adv = np.where(_zero_std(groups)[:, None], 0.0, adv)
    return np.clip(adv, -settings.clip, settings.clip).reshape(-1)


@ADVANTAGES.register("mean_centred")
def mean_centred_advantages(rewards: np.ndarray, group_size: int, settings: AdvantageSettings) -> np.ndarray:
    """`clip(R - mean_g)` without the std division (Dr. GRPO: no bias toward low-variance groups)."""
    groups = _grouped(rewards, group_size)
    adv = groups - groups.mean(axis=1, keepdims=True)
    adv = np.where(_zero_std(groups)[:, None], 0.0, adv)
    return np.clip(adv, -settings.clip, settings.clip).reshape(-1)


def compute_advantages(name: str, rewards: np.ndarray, group_size: int,
                       settings: AdvantageSettings) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages by estimator name (field `rl.advantage`) and the step's reward statistics."""
    estimator = ADVANTAGES.get(name, "rl.advantage")
    stats = group_stats(rewards, group_size)
    adv = np.asarray(estimator(rewards, group_size, settings), dtype=np.float64)
    if adv.shape != (len(rewards),):
        raise RigError(f"rl.advantage: estimator {name!r} returned shape {adv.shape} "
                       f"for {len(rewards)} rewards")
    stats["advantage_abs_mean"] = float(np.abs(adv).mean())
    return adv, stats
