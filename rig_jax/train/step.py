"""One jitted train step for any loss: `(state, frozen, batch) -> (state, metrics)`.

`loss_fn(params, frozen, batch, rng) -> (loss, aux)` sees the params cast to the compute
dtype (the float32 masters in the state receive the gradients). `frozen` holds what a job
uses but does not train (a VAE, a reference policy). A loss or gradient norm that is not
finite skips the update (params, optimizer state and EMA stay as they were), increments
`bad_steps` and `skipped`; a finite step resets `bad_steps`. The host loop decides when too
many in a row end the run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rig_jax.errors import ConfigError
from rig_jax.train.state import TrainState, update_ema

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """`config.step`: the dtype the loss sees the params in, and the EMA decay (0: none);
    checked here so a bad value is one line naming the field, not a numpy error in the step."""

    compute_dtype: str = "float32"      # float32 | bfloat16 | float16
    ema_decay: float = 0.0              # 0: no EMA params
    # > 1: the batch's rows split into this many parts, unrolled in the one step, their gradients
    # averaged (gradient accumulation inside one step: less live memory per U-Net call)
    micro_batches: int = 1

    def __post_init__(self) -> None:
        m = self.micro_batches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"step.micro_batches: must be an integer >= 1, got {m!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"step.compute_dtype: {self.compute_dtype!r} is not one of "
                              f"{', '.join(COMPUTE_DTYPES)}")
        decay = self.ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ConfigError(f"step.ema_decay: must be a number in [0, 1), got {decay!r}")


def cast_floating(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, tree)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def split_rows(batch: Any, parts: int) -> Any:
    """Each leaf (N, ...) -> (parts, N / parts, ...), part i holding rows i, i + parts, ...:
    strided, so a part of a batch sharded over its rows draws on every shard."""
    def split(x: Any) -> Any:
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % parts:
            raise ConfigError(f"step.micro_batches: {parts} does not divide the rows of a batch entry of "
                              f"shape {tuple(x.shape)}")
        return jnp.swapaxes(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, settings: StepSettings,
                    learning_rate: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step (jit it with `jit_train_step`). Metrics: loss, grad_norm, finite,
    bad_steps, skipped, lr (when `learning_rate` is given) and the loss's own aux scalars."""
    dtype = jnp.dtype(settings.compute_dtype)

    def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)

        def compute_loss(params: Any, rows: Any, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
            loss, aux = loss_fn(cast_floating(params, dtype), frozen, rows, key)
            return loss.astype(jnp.float32), aux

        gradient = jax.value_and_grad(compute_loss, has_aux=True)
        parts = settings.micro_batches
        if parts == 1:
            (loss, aux), grads = gradient(state.params, batch, step_rng)
        else:
            # each part's loss weighted alike, as optax.MultiSteps weights its calls: the whole
            # batch's gradient when the loss is a mean over rows (equal valid rows per part)
            split = split_rows(batch, parts)
            total = None
            for index in range(parts):       # unrolled: XLA:CPU ran a scan of U-Net gradients 15x slower
                rows = jax.tree.map(lambda x, i=index: x[i], split)
                part = gradient(state.params, rows, jax.random.fold_in(step_rng, index))
                part = (part[0][0], part[0][1], part[1])
                total = part if total is None else jax.tree.map(jnp.add, total, part)
            loss, aux, grads = jax.tree.map(lambda x: x / parts, total)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            updated = update_ema(ema, params, state.step - state.skipped, settings.ema_decay)
            ema = _select(finite, updated, ema)
        new_state = state.replace(
            step=state.step + 1, rng=rng,
            params=_select(finite, params, state.params),
            opt_state=_select(finite, opt_state, state.opt_state),
            ema_params=ema,
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32),
            skipped=(state.skipped + (~finite).astype(jnp.int32)).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
                   "bad_steps": new_state.bad_steps, "skipped": new_state.skipped,
                   **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}
        if learning_rate is not None:
            metrics["lr"] = jnp.asarray(learning_rate(state.step - state.skipped), jnp.float32)
        return new_state, metrics

    return step
