"""Policy-gradient losses of Reflection-GRPO (method.md, stages 1 and 2), traceable and in float32.

Both losses take the masked-out entries' inputs through `jnp.where` before any `exp` or
division, so padding (even -inf log-probs) and sigma_t == 0 steps add nothing to the value and
nothing but zeros to the gradient; every masked mean divides by max(count, 1), so an
all-masked batch gives a loss of 0 with a zero gradient rather than NaN.

Config fields: `rl.clip_epsilon`, `rl.kl_beta`, `rl.aggregation` (stage 1);
`rl.clip_range`, `rl.kl_beta` (stage 2).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError
from rig_jax.rl.registry import LOSSES

AGGREGATIONS = ("token", "sequence")


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"rl.kl_beta: must be a finite number >= 0, got {beta}")


@dataclasses.dataclass(frozen=True)
class TokenLossSettings:
    clip_epsilon: float = 0.2
    kl_beta: float = 0.04
    # "token": sum over all valid tokens / their count (DAPO);
    # "sequence": mean over sequences of each sequence's token mean (DeepSeekMath GRPO).
    aggregation: str = "token"

    def __post_init__(self):
        if not (0 < self.clip_epsilon < 1):
            raise ConfigError(f"rl.clip_epsilon: must be in (0, 1), got {self.clip_epsilon}")
        _check_beta(self.kl_beta)
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"rl.aggregation: unknown aggregation {self.aggregation!r} "
                              f"(known: {', '.join(AGGREGATIONS)})")


@dataclasses.dataclass(frozen=True)
class DiffusionLossSettings:
    clip_range: float = 1e-4
    kl_beta: float = 0.01

    def __post_init__(self):
        if not (0 < self.clip_range < 1):
            raise ConfigError(f"rl.clip_range: must be in (0, 1), got {self.clip_range}")
        _check_beta(self.kl_beta)


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `x` over `valid` entries; 0 when none is valid."""
    total = jnp.sum(jnp.where(valid, x, 0.0))
    return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def _check_shapes(name: str, advantages: jax.Array, **arrays: jax.Array | None) -> None:
    """Shapes are static under jit, so a mismatch is caught at trace time."""
    shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"{name}: expected equal (N, T) shapes, got {shapes}")
    if jnp.shape(advantages) != first[:1]:
        raise ValueError(f"{name}: advantages shape {jnp.shape(advantages)}, expected {first[:1]}")


def _ratio_metrics(log_ratio: jax.Array, ratio: jax.Array, valid: jax.Array,
                   clip: float) -> dict[str, jax.Array]:
    return {
        "clip_fraction": _masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), valid),
        "approx_kl": 0.5 * _masked_mean(jnp.square(log_ratio), valid),
        "ratio_mean": _masked_mean(ratio, valid),
    }


@LOSSES.register("grpo_token")
def token_grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                    mask: jax.Array, advantages: jax.Array,
                    settings: TokenLossSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped token-level GRPO loss plus `beta * k3` KL to the reference policy.

    logp / old_logp / ref_logp: (N, T) log-probs of the sampled tokens (ref_logp None: no KL);
    mask: (N, T), 1 on the tokens being trained; advantages: (N,), one per sequence.
    Metrics are token means over valid tokens, except `policy_loss`, which uses the
    configured aggregation (so it is the loss without its KL term).
    """
    _check_shapes("token_grpo_loss", advantages, logp=logp, old_logp=old_logp,
                  ref_logp=ref_logp, mask=mask)
    valid = _f32(mask) > 0
    logp = _f32(logp)
    log_ratio = jnp.where(valid, logp - _f32(old_logp), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = _f32(advantages)[:, None]
    eps = settings.clip_epsilon
    policy = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * adv)
    if ref_logp is None:
        k3 = jnp.zeros_like(policy)
    else:
        ref_minus = jnp.where(valid, _f32(ref_logp) - logp, 0.0)
        k3 = jnp.exp(ref_minus) - ref_minus - 1.0

    if settings.aggregation == "token":
        aggregate = lambda x: _masked_mean(x, valid)
    else:
        def aggregate(x: jax.Array) -> jax.Array:
            count = jnp.sum(valid.astype(jnp.float32), axis=1)
            seq_mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1) / jnp.maximum(count, 1.0)
            return _masked_mean(seq_mean, count > 0)   # sequences with no valid token are left out

    policy_loss = aggregate(policy)
    loss = aggregate(policy + settings.kl_beta * k3)
    metrics = _ratio_metrics(log_ratio, ratio, valid, eps)
    metrics.update(kl=_masked_mean(k3, valid), policy_loss=policy_loss)
    return loss, metrics


@LOSSES.register("ppo_diffusion")
def diffusion_ppo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                       mean_sq_dist: jax.Array | None, std: jax.Array,
                       settings: DiffusionLossSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip per denoising step plus `beta * |mu_theta - mu_ref|^2 / (2 sigma_t^2)`.

    logp / old_logp: (N, K) Gaussian log-probs (averaged over latent elements) of the K trained
    steps; mask: (N, K); mean_sq_dist: (N, K) element-mean |mu_theta - mu_ref|^2, or None (no
    KL); std: (N, K) sigma_t. Steps with std == 0 are deterministic, have no density ratio
    and are dropped from the loss and every metric. Loss and metrics are means over valid steps.
    """
    _check_shapes("diffusion_ppo_loss", advantages, logp=logp, old_logp=old_logp, mask=mask,
                  mean_sq_dist=mean_sq_dist, std=std)
    std = _f32(std)
    valid = (_f32(mask) > 0) & (std > 0)
    log_ratio = jnp.where(valid, _f32(logp) - _f32(old_logp), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = _f32(advantages)[:, None]
    c = settings.clip_range
    policy = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - c, 1.0 + c))
    if mean_sq_dist is None:
        kl = jnp.zeros_like(policy)
    else:
        safe_std = jnp.where(valid, std, 1.0)
        kl = jnp.where(valid, _f32(mean_sq_dist), 0.0) / (2.0 * jnp.square(safe_std))

    loss = _masked_mean(policy + settings.kl_beta * kl, valid)
    metrics = _ratio_metrics(log_ratio, ratio, valid, c)
    metrics.update(kl=_masked_mean(kl, valid), policy_loss=_masked_mean(policy, valid))
    return loss, metrics
