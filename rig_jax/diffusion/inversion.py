"""DDIM inversion and Null-text inversion (Mokady et al. 2023), each one `lax.scan`.

Inversion walks the denoising schedule backwards: the step that `sample` takes from
`t` to `t_prev` is undone by `ddim_inverse_step(t_prev -> t)` with the model evaluated
at `t` on the lower-noise latent (the usual approximation, as diffusers'
`DDIMInverseScheduler` and prompt-to-prompt's `ddim_loop`). Null-text inversion then
tunes, per step, the unconditional embedding so that a guided DDIM step from the
current latent lands on the inversion trajectory: replaying those embeddings through
`sample(..., uncond=per_step)` reconstructs the input under strong guidance.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rig_jax.diffusion.sampler import (
    DenoiseFn,
    call_denoiser,
    combine_guidance,
    guided_model_output,
    match_batch,
    step_timesteps,
)
from rig_jax.diffusion.schedulers import DDIMSchedule, ddim_inverse_step, ddim_step
from rig_jax.errors import ConfigError, RigError


class Inversion(NamedTuple):
    """A DDIM inversion: the noisiest latent and the whole path that led there."""

    latents: jax.Array      # (B, ...) the latent at timesteps[start_step], where `sample` resumes
    trajectory: jax.Array   # (S + 1, B, ...) from the input (clean end) up to `latents`, float32
    timesteps: jax.Array    # (S + 1,) the level of each trajectory entry (first: negative = clean end)


class NullText(NamedTuple):
    """Per-step unconditional embeddings from Null-text optimisation, in denoising order."""

    uncond_embeddings: jax.Array  # (S, B, L, D): pass as `uncond` to `sample(..., start_step)`
    losses: jax.Array             # (S, B) reconstruction MSE at each step's last inner iteration
    inner_steps: jax.Array        # (S,) Adam iterations run at each step (early stop may cut them)


def _check_count(value: int, name: str) -> None:
    """Loop counts are static Python ints (they fix loop structure inside jit)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def ddim_invert(denoise_fn: DenoiseFn, params: Any, latents: jax.Array, cond: jax.Array,
                uncond: jax.Array | None, schedule: DDIMSchedule, num_steps: int,
                guidance_scale: float | jax.Array = 1.0, start_step: int = 0,
                guidance_rescale: float | jax.Array = 0.0, fixed_point_iterations: int = 0) -> Inversion:
    """Deterministic DDIM inversion of clean `latents` up to `timesteps(num_steps)[start_step]`.

    `start_step = 0` inverts the whole schedule (pure-noise end); a later step stops at an
    intermediate timestep, the one `sample(..., start_step=start_step)` starts from. The
    default guidance 1 uses the conditional prediction alone (the Null-text recipe).

    `fixed_point_iterations = 0` is plain DDIM inversion (diffusers, prompt-to-prompt): the
    model sees the lower-noise latent. Each extra iteration re-evaluates the model on the
    current estimate of the higher-noise latent and redoes the step, converging to the x_t
    whose deterministic `sample` step lands exactly on x_{t-1} (fixed-point inversion, as
    in AIDI / ReNoise); it costs one more model call per step and iteration.
    """
    _check_count(fixed_point_iterations, "fixed_point_iterations")
    timesteps, prev_timesteps = step_timesteps(schedule, num_steps, start_step)
    up_to = jnp.asarray(timesteps[::-1])
    up_from = jnp.asarray(prev_timesteps[::-1])

    def body(x: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        t_from, t_to = xs
        def invert_from(at: jax.Array) -> jax.Array:
            output = guided_model_output(denoise_fn, params, at, t_to, cond, uncond, guidance_scale,
                                         guidance_rescale)
            return ddim_inverse_step(schedule, output, t_from, t_to, x)

        nxt = invert_from(x)
        if fixed_point_iterations:
            nxt = jax.lax.fori_loop(0, fixed_point_iterations, lambda _, estimate: invert_from(estimate), nxt)
        return nxt, nxt

    start = jnp.asarray(latents, jnp.float32)
    final, path = jax.lax.scan(body, start, (up_from, up_to), length=len(timesteps))
    trajectory = jnp.concatenate([start[None], path])
    levels = jnp.concatenate([up_from[:1], up_to]) if len(timesteps) else jnp.zeros((1,), jnp.int32)
    return Inversion(final, trajectory, levels)


def null_text_invert(denoise_fn: DenoiseFn, params: Any, trajectory: jax.Array, cond: jax.Array,
                     uncond: jax.Array, schedule: DDIMSchedule, num_steps: int,
                     guidance_scale: float | jax.Array = 7.5, start_step: int = 0,
                     num_inner_steps: int = 10, learning_rate: float = 1e-2,
                     early_stop_epsilon: float = 1e-5, early_stop_slope: float = 2e-5,
                     guidance_rescale: float | jax.Array = 0.0) -> NullText:
    """Null-text optimisation along an inversion `trajectory` (from `ddim_invert`, same
    `num_steps` / `start_step`).

    Step i (denoising order) starts from the previous step's embedding, runs at most
    `num_inner_steps` Adam iterations at learning rate `learning_rate * (1 - i / (2 S))`
    (prompt-to-prompt's `1e-2 * (1 - i / 100)` at S = 50 steps) on the MSE between the
    guided DDIM step from the current latent and the trajectory's next latent, and stops
    early once that loss is below `early_stop_epsilon + i * early_stop_slope` (both as the
    paper's code). The current latent then advances with the tuned embedding, so the
    errors a replay makes are the ones optimised here. Each example of the batch is
    optimised independently (its own loss, gradient and early stop).
    """
    _check_count(num_inner_steps, "num_inner_steps")
    timesteps, prev_timesteps = step_timesteps(schedule, num_steps, start_step)
    steps = len(timesteps)
    if trajectory.shape[0] != steps + 1:
        raise RigError(f"trajectory holds {trajectory.shape[0]} latents, expected {steps + 1} "
                       f"for num_steps={num_steps}, start_step={start_step}")
    trajectory = jnp.asarray(trajectory, jnp.float32)
    batch = trajectory.shape[1]
    cond = match_batch(cond, batch, "cond")
    uncond = jnp.asarray(match_batch(uncond, batch, "uncond"), jnp.float32)   # Adam state in float32
    targets = trajectory[::-1][1:]          # the latent each denoising step must land on
    sample_axes = tuple(range(1, trajectory.ndim - 1))

    def outer(carry: tuple[jax.Array, jax.Array], xs: dict[str, jax.Array]):
        x, embedding = carry
        t, prev_t, target, index = xs["t"], xs["prev_t"], xs["target"], xs["index"]
        cond_output = jax.lax.stop_gradient(call_denoiser(denoise_fn, params, x, t, cond))

        def per_example_loss(emb: jax.Array) -> tuple[jax.Array, jax.Array]:
            uncond_output = call_denoiser(denoise_fn, params, x, t, emb)
            guided = combine_guidance(uncond_output, cond_output, guidance_scale, guidance_rescale)
            reconstructed = ddim_step(schedule, guided, t, prev_t, x)
            losses = jnp.mean((reconstructed - target) ** 2, axis=sample_axes)
            return jnp.sum(losses), losses   # the sum keeps each example's gradient its own

        learning_rate_now = learning_rate * (1.0 - index / (2.0 * max(steps, 1)))
        optimizer = optax.adam(learning_rate_now)
        threshold = early_stop_epsilon + index * early_stop_slope

        def keep_going(state):
            iteration, _, _, done, _ = state
            return (iteration < num_inner_steps) & ~jnp.all(done)

        def adam_iteration(state):
            iteration, emb, opt_state, done, last_losses = state
            (_, losses), grads = jax.value_and_grad(per_example_loss, has_aux=True)(emb)
            updates, opt_state = optimizer.update(grads, opt_state, emb)
            active = ~done
            emb = jnp.where(active[:, None, None], optax.apply_updates(emb, updates), emb)
            last_losses = jnp.where(active, losses, last_losses)
            return iteration + 1, emb, opt_state, done | (losses < threshold), last_losses

        state = (jnp.zeros((), jnp.int32), embedding, optimizer.init(embedding),
                 jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
        iterations, embedding, _, _, last_losses = jax.lax.while_loop(keep_going, adam_iteration, state)
        embedding = jax.lax.stop_gradient(embedding)
        uncond_output = call_denoiser(denoise_fn, params, x, t, embedding)
        guided = combine_guidance(uncond_output, cond_output, guidance_scale, guidance_rescale)
        x = ddim_step(schedule, guided, t, prev_t, x)
        return (x, embedding), (embedding, last_losses, iterations)

    xs = {
        "t": jnp.asarray(timesteps),
        "prev_t": jnp.asarray(prev_timesteps),
        "target": targets,
        "index": jnp.arange(steps, dtype=jnp.float32),
    }
    _, (embeddings, losses, iterations) = jax.lax.scan(outer, (trajectory[-1], uncond), xs, length=steps)
    return NullText(embeddings, losses, iterations)
