"""The optimizer every job trains with, built from one frozen settings object.

optax AdamW behind global-norm clipping, a learning rate that warms up linearly and then
stays constant or follows a cosine, and optional gradient accumulation (`optax.MultiSteps`:
the update is applied every `accumulate_steps` calls, with the mean of their gradients).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import optax

from rig_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float
    warmup_steps: int = 0
    schedule: str = "constant"          # constant | cosine (after the warm-up)
    decay_steps: int = 0                # cosine: steps from the end of the warm-up to the floor
    final_lr_fraction: float = 0.0      # cosine floor, as a fraction of learning_rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 0.0              # 0: no clipping
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"optimizer.learning_rate: {self.learning_rate} must be > 0")
        if self.accumulate_steps < 1 or self.warmup_steps < 0:
            raise ConfigError("optimizer.accumulate_steps must be >= 1 and optimizer.warmup_steps >= 0")
        if self.schedule == "cosine" and self.decay_steps <= 0:
            raise ConfigError("optimizer.decay_steps: a cosine schedule needs decay_steps > 0")

    @classmethod
    def from_config(cls, section: Any) -> OptimizerSettings:
        """One step from a config section (a ConfigDict or mapping) whose keys are the fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(section)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"optimizer: unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})")
        return cls(**values)


def learning_rate_schedule(s: OptimizerSettings) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, s.learning_rate, max(s.warmup_steps, 1))
    if s.schedule == "constant":
        after = optax.constant_schedule(s.learning_rate)
    else:
        after = optax.cosine_decay_schedule(s.learning_rate, s.decay_steps, alpha=s.final_lr_fraction)
    if s.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [s.warmup_steps])


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    chain = []
    if s.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(s.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps,
                             weight_decay=s.weight_decay))
    tx = optax.chain(*chain)
    if s.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=s.accumulate_steps)
    return tx
