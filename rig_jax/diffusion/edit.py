"""The Inverse Diffuser (Image Editor) in latent space, as docs/method.md fixes it.

Invert the current image's latents with deterministic DDIM under the prompt embedding
up to t_s = strength * T, then denoise from t_s under the edit embedding with guidance.
Steps are counted like diffusers' img2img: `int(strength * num_steps)` of the
`num_steps` schedule run, the last ones; strength 1 regenerates from the inverted noise,
strength 0 returns the input. The VAE / text-encoder wrapper lives above this module.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

from rig_jax.diffusion.inversion import ddim_invert, null_text_invert
from rig_jax.diffusion.sampler import DenoiseFn, Trajectory, sample
from rig_jax.diffusion.schedulers import DDIMSchedule
from rig_jax.diffusion.settings import EditSettings
from rig_jax.errors import ConfigError


class EditStart(NamedTuple):
    """Where an edit's denoising begins: the inverted latent at t_s, and the unconditional
    embedding to guide with (per-step (S, B, L, D) after null-text, else as given)."""

    latents: jax.Array
    uncond: jax.Array | None


def edit_start_step(num_steps: int, strength: float) -> int:
    """Index into `timesteps(num_steps)` where the edit resumes (diffusers img2img's t_start)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be a number in [0, 1], got {strength!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    init_steps = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_steps, 0)


def invert_for_edit(denoise_fn: DenoiseFn, params: Any, latents: jax.Array, prompt_cond: jax.Array,
                    uncond: jax.Array | None, schedule: DDIMSchedule, settings: EditSettings) -> EditStart:
    """The deterministic half of an edit: DDIM inversion to t_s under the prompt, plus the
    optional Null-text tuning of the unconditional embedding (under the prompt, at the edit
    guidance `settings.sampler.guidance_scale`, so a replay with the prompt would reconstruct
    the input). `settings.inversion.fixed_point_iterations > 0` refines each inversion step.

    Stage-2 rollouts call this once per prompt and re-denoise the same start G times.
    """
    sampler, null_text = settings.sampler, settings.null_text
    start_step = edit_start_step(sampler.num_steps, settings.strength)
    inversion = ddim_invert(denoise_fn, params, latents, prompt_cond, uncond, schedule, sampler.num_steps,
                            guidance_scale=settings.inversion.guidance_scale, start_step=start_step,
                            fixed_point_iterations=settings.inversion.fixed_point_iterations)
    if not null_text.enabled or start_step == sampler.num_steps:
        return EditStart(inversion.latents, uncond)
    if uncond is None:
        raise ConfigError("null_text.enabled needs an unconditional embedding (uncond)")
    tuned = null_text_invert(denoise_fn, params, inversion.trajectory, prompt_cond, uncond, schedule,
                             sampler.num_steps, guidance_scale=sampler.guidance_scale, start_step=start_step,
                             num_inner_steps=null_text.inner_steps, learning_rate=null_text.learning_rate,
                             early_stop_epsilon=null_text.early_stop_epsilon,
                             early_stop_slope=null_text.early_stop_slope,
                             guidance_rescale=sampler.guidance_rescale)
    return EditStart(inversion.latents, tuned.uncond_embeddings)


def denoise_edit(denoise_fn: DenoiseFn, params: Any, start: EditStart, edit_cond: jax.Array,
                 schedule: DDIMSchedule, settings: EditSettings, rng: jax.Array | None = None,
                 return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, Trajectory]:
    """The generative half of an edit: guided DDIM from t_s under the edit embedding (eta > 0 is
    the stage-2 Gaussian policy; `return_trajectory` records its steps)."""
    sampler = settings.sampler
    return sample(denoise_fn, params, start.latents, edit_cond, start.uncond, schedule, sampler.num_steps,
                  sampler.guidance_scale, guidance_rescale=sampler.guidance_rescale, eta=sampler.eta, rng=rng,
                  return_trajectory=return_trajectory,
                  start_step=edit_start_step(sampler.num_steps, settings.strength))


def edit_latents(denoise_fn: DenoiseFn, params: Any, latents: jax.Array, prompt_cond: jax.Array,
                 edit_cond: jax.Array, uncond: jax.Array | None, schedule: DDIMSchedule,
                 settings: EditSettings, rng: jax.Array | None = None, return_trajectory: bool = False
                 ) -> jax.Array | tuple[jax.Array, Trajectory]:
    """I_{k+1} latents from I_k latents: invert under `prompt_cond` (guidance
    `settings.inversion.guidance_scale`) to t_s, then denoise under `edit_cond` (guidance
    `settings.sampler.guidance_scale`).

    `settings` fixes the scan lengths and loop counts: jit with
    `static_argnames=("settings", "return_trajectory")` and the denoiser bound by
    `functools.partial`.
    """
    start = invert_for_edit(denoise_fn, params, latents, prompt_cond, uncond, schedule, settings)
    return denoise_edit(denoise_fn, params, start, edit_cond, schedule, settings, rng=rng,
                        return_trajectory=return_trajectory)
