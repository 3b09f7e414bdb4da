"""The train state: everything a step reads and writes, one pytree, checkpointed whole.

Params are float32 master weights (the compute dtype is the step's business). `rng` is a raw
uint32 key, so orbax stores it like any array. `ema_params` is None when EMA is off; its
decay is warm-up corrected (`min(decay, (1 + n) / (10 + n))`, n = updates so far), because
a plain 0.999 average still holds the first steps' weights a thousand steps later.
`bad_steps` counts consecutive non-finite steps (reset by a good one), `skipped` all of them.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any
    bad_steps: jax.Array
    skipped: jax.Array


def create_state(params: Any, optimizer: optax.GradientTransformation, seed: int | jax.Array,
                 use_ema: bool) -> TrainState:
    """A step-0 state (traceable: run it under jit with out_shardings to place it)."""
    rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng,
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        bad_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


def ema_decay(updates: jax.Array, max_decay: float) -> jax.Array:
    n = updates.astype(jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + n) / (10.0 + n))


def update_ema(ema: Any, params: Any, updates: jax.Array, max_decay: float) -> Any:
    decay = ema_decay(updates, max_decay)
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
