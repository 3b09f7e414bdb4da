"""Guided DDIM sampling as one `jax.lax.scan` over the timesteps.

`denoise_fn(params, x, t, context) -> model_output` is any conditional denoiser (a U-Net
apply); `t` reaches it as an int32 (batch,) array. Classifier-free guidance runs the
unconditional and conditional halves in ONE call on the concatenated batch
`(uncond, cond)`, as diffusers' pipelines do; a denoiser marked by `sharing_sample` (the
U-Net's, `rig.diffuser.unet_denoiser`) instead takes the latents once with both contexts
and runs the layers before its first cross-attention at the unguided batch. Scheduler math
and log-probs are float32 whatever dtype the model computes in. `num_steps` (and `start_step`) must be static.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.diffusion.schedulers import DDIMSchedule, ddim_step, ddim_step_with_logprob
from rig_jax.errors import ConfigError, RigError

DenoiseFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
SHARES_SAMPLE = "shares_sample"   # the attribute `sharing_sample` sets on a denoiser


def sharing_sample(denoise_fn: DenoiseFn) -> DenoiseFn:
    """`denoise_fn` marked as taking a shared sample: `x` and `t` at batch B with `context` at
    2 B, example-major (row 2 i is example i's unconditional context, row 2 i + 1 its
    conditional one), returning the 2 B outputs in that order, as the U-Net does
    (rig_jax/models/unet.py). Guided sampling then hands it the latents once instead of
    concatenating two copies, so the layers before the first cross-attention run once."""
    def denoise(params: Any, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return denoise_fn(params, x, t, context)
    setattr(denoise, SHARES_SAMPLE, True)
    return denoise


def shares_sample(denoise_fn: DenoiseFn) -> bool:
    """Whether `denoise_fn` was marked by `sharing_sample`."""
    return getattr(denoise_fn, SHARES_SAMPLE, False) is True


class Trajectory(NamedTuple):
    """Per-step record of a rollout, stacked on a leading step axis (what stage-2 GRPO replays)."""

    latents: jax.Array         # (S, B, ...) x_t, the model input of each step
    next_latents: jax.Array    # (S, B, ...) x_{t-1}, the step's action
    log_probs: jax.Array       # (S, B) float32 element-averaged log-density of next_latents
    timesteps: jax.Array       # (S,) int32 t
    prev_timesteps: jax.Array  # (S,) int32 t-1 as DDIMScheduler.step computes it (negative: the end)


def _is_static(value: Any, target: float) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and float(value) == target


def match_batch(context: jax.Array, batch: int, name: str) -> jax.Array:
    """Broadcasts a (1, L, D) embedding to the batch; any other mismatch is the caller's error."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return jnp.broadcast_to(context, (batch, *context.shape[1:]))
    raise RigError(f"{name} has batch {context.shape[0]}, latents have batch {batch}")


def rescale_noise_cfg(guided: jax.Array, cond_output: jax.Array, guidance_rescale: float | jax.Array
                      ) -> jax.Array:
    """diffusers' `rescale_noise_cfg` (Lin et al. 2023, 3.4): match the guided output's std to the
    conditional output's, per example, then blend by `guidance_rescale`. torch's std is the
    unbiased one (ddof=1), kept here for parity."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_output, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def combine_guidance(uncond_output: jax.Array, cond_output: jax.Array, guidance_scale: float | jax.Array,
                     guidance_rescale: float | jax.Array = 0.0) -> jax.Array:
    """CFG: uncond + w (cond - uncond), then optional rescale; float32."""
    uncond_output = jnp.asarray(uncond_output, jnp.float32)
    cond_output = jnp.asarray(cond_output, jnp.float32)
    guided = uncond_output + guidance_scale * (cond_output - uncond_output)
    if _is_static(guidance_rescale, 0.0):
        return guided
    return rescale_noise_cfg(guided, cond_output, guidance_rescale)


def call_denoiser(denoise_fn: DenoiseFn, params: Any, x: jax.Array, t: jax.Array, context: jax.Array
                  ) -> jax.Array:
    """One model call with `t` as an int32 (batch,) array; the output comes back as float32."""
    t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    out = denoise_fn(params, x, t_batch, context)
    if out.shape != x.shape:
        raise RigError(f"denoise_fn returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    return jnp.asarray(out, jnp.float32)


def guided_model_output(denoise_fn: DenoiseFn, params: Any, x: jax.Array, t: jax.Array, cond: jax.Array,
                        uncond: jax.Array | None, guidance_scale: float | jax.Array,
                        guidance_rescale: float | jax.Array = 0.0) -> jax.Array:
    """The guided model output at (x, t) in float32.

    Without `uncond`, or at a static guidance of exactly 1 (where CFG equals the conditional
    output), only the conditional half runs; otherwise one call on the (uncond, cond) batch,
    with `x` once and the contexts interleaved for a `sharing_sample` denoiser.
    """
    batch = x.shape[0]
    cond = match_batch(cond, batch, "cond")
    if uncond is None or _is_static(guidance_scale, 1.0):
        return call_denoiser(denoise_fn, params, x, t, cond)
    uncond = match_batch(uncond, batch, "uncond")
    if shares_sample(denoise_fn):
        context = jnp.stack([uncond, cond], axis=1).reshape(2 * batch, *cond.shape[1:])
        out = denoise_fn(params, x, jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,)), context)
        if out.shape != (2 * batch, *x.shape[1:]):
            raise RigError(f"denoise_fn returned shape {tuple(out.shape)} for a shared input "
                           f"{tuple(x.shape)} with {2 * batch} contexts")
        pairs = jnp.asarray(out, jnp.float32).reshape(batch, 2, *x.shape[1:])
        return combine_guidance(pairs[:, 0], pairs[:, 1], guidance_scale, guidance_rescale)
    both = call_denoiser(denoise_fn, params, jnp.concatenate([x, x]), t, jnp.concatenate([uncond, cond]))
    uncond_output, cond_output = both[:batch], both[batch:]
    return combine_guidance(uncond_output, cond_output, guidance_scale, guidance_rescale)


def step_timesteps(schedule: DDIMSchedule, num_steps: int, start_step: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_prev) of the denoising steps `start_step ..`, host-side int32 constants."""
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
            or not 0 <= start_step <= num_steps:
        raise ConfigError(f"start_step must be an integer in [0, {num_steps}], got {start_step!r}")
    return schedule.timesteps(num_steps)[start_step:], schedule.previous_timesteps(num_steps)[start_step:]


def sample(denoise_fn: DenoiseFn, params: Any, latents: jax.Array, cond: jax.Array,
           uncond: jax.Array | None, schedule: DDIMSchedule, num_steps: int,
           guidance_scale: float | jax.Array, guidance_rescale: float | jax.Array = 0.0,
           eta: float | jax.Array = 0.0, rng: jax.Array | None = None, return_trajectory: bool = False,
           start_step: int = 0) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Guided DDIM sampling from `latents` at `timesteps[start_step]` down to the clean end.

    `start_step = 0` is text-to-image from pure noise; a later start resumes from an
    intermediate timestep (the editor denoises from t_s, the end of an inversion).
    `uncond` is (B|1, L, D), or (S, B|1, L, D) with one embedding per step run (S =
    num_steps - start_step) to replay a null-text inversion. With eta > 0 each step draws
    its variance noise from `rng`. Returns the final float32 latents, and with
    `return_trajectory=True` also the per-step `Trajectory`.
    """
    timesteps, prev_timesteps = step_timesteps(schedule, num_steps, start_step)
    steps = len(timesteps)
    per_step_uncond = uncond is not None and uncond.ndim == cond.ndim + 1
    if per_step_uncond and uncond.shape[0] != steps:
        raise RigError(f"uncond holds {uncond.shape[0]} per-step embeddings, the sampler runs {steps} steps")
    stochastic = not _is_static(eta, 0.0)
    if stochastic and rng is None:
        raise RigError("sample: eta > 0 needs an `rng`")

    def body(x: jax.Array, xs: dict[str, Any]) -> tuple[jax.Array, Any]:
        step_uncond = xs["uncond"] if per_step_uncond else uncond
        output = guided_model_output(denoise_fn, params, x, xs["t"], cond, step_uncond, guidance_scale,
                                     guidance_rescale)
        if return_trajectory:
            nxt, log_prob, _, _ = ddim_step_with_logprob(schedule, output, xs["t"], xs["prev_t"], x, eta,
                                                         rng=xs["key"])
            return nxt, (x, nxt, log_prob)
        return ddim_step(schedule, output, xs["t"], xs["prev_t"], x, eta, rng=xs["key"]), None

    xs = {
        "t": jnp.asarray(timesteps),
        "prev_t": jnp.asarray(prev_timesteps),
        "key": jax.random.split(rng, steps) if stochastic else None,
        "uncond": uncond if per_step_uncond else None,
    }
    final, record = jax.lax.scan(body, jnp.asarray(latents, jnp.float32), xs, length=steps)
    if not return_trajectory:
        return final
    x_t, x_prev, log_probs = record
    return final, Trajectory(x_t, x_prev, log_probs, jnp.asarray(timesteps), jnp.asarray(prev_timesteps))
