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
                    uncond: jax.Array | None, schedule: DDIMSchedule, num_steps: int, strength: float,
                    guidance_scale: float | jax.Array, inversion_guidance: float | jax.Array = 1.0,
                    null_text: bool = False, null_text_inner_steps: int = 10,
                    null_text_learning_rate: float = 1e-2, fixed_point_iterations: int = 0,
                    guidance_rescale: float | jax.Array = 0.0) -> EditStart:
    """The deterministic half of an edit: DDIM inversion to t_s under the prompt, plus the
    optional Null-text tuning of the unconditional embedding (under the prompt, at the edit
    guidance `guidance_scale`, so a replay with the prompt would reconstruct the input).
    `fixed_point_iterations > 0` refines each inversion step (see `ddim_invert`).

    Stage-2 rollouts call this once per prompt and re-denoise the same start G times.
    """
    start_step = edit_start_step(num_steps, strength)
    inversion = ddim_invert(denoise_fn, params, latents, prompt_cond, uncond, schedule, num_steps,
                            guidance_scale=inversion_guidance, start_step=start_step,
                            fixed_point_iterations=fixed_point_iterations)
    if not null_text or start_step == num_steps:
        return EditStart(inversion.latents, uncond)
    if uncond is None:
        raise ConfigError("null_text=True needs an unconditional embedding (uncond)")
    tuned = null_text_invert(denoise_fn, params, inversion.trajectory, prompt_cond, uncond, schedule,
                             num_steps, guidance_scale=guidance_scale, start_step=start_step,
                             num_inner_steps=null_text_inner_steps, learning_rate=null_text_learning_rate,
                             guidance_rescale=guidance_rescale)
    return EditStart(inversion.latents, tuned.uncond_embeddings)


def denoise_edit(denoise_fn: DenoiseFn, params: Any, start: EditStart, edit_cond: jax.Array,
                 schedule: DDIMSchedule, num_steps: int, strength: float, guidance_scale: float | jax.Array,
                 eta: float | jax.Array = 0.0, rng: jax.Array | None = None, return_trajectory: bool = False,
                 guidance_rescale: float | jax.Array = 0.0) -> jax.Array | tuple[jax.Array, Trajectory]:
    """The generative half of an edit: guided DDIM from t_s under the edit embedding (eta > 0 is
    the stage-2 Gaussian policy; `return_trajectory` records its steps)."""
    return sample(denoise_fn, params, start.latents, edit_cond, start.uncond, schedule, num_steps,
                  guidance_scale, guidance_rescale=guidance_rescale, eta=eta, rng=rng,
                  return_trajectory=return_trajectory, start_step=edit_start_step(num_steps, strength))


def edit_latents(denoise_fn: DenoiseFn, params: Any, latents: jax.Array, prompt_cond: jax.Array,
                 edit_cond: jax.Array, uncond: jax.Array | None, schedule: DDIMSchedule, num_steps: int,
                 strength: float, guidance_scale: float | jax.Array,
                 inversion_guidance: float | jax.Array = 1.0, eta: float | jax.Array = 0.0,
                 rng: jax.Array | None = None, null_text: bool = False, return_trajectory: bool = False,
                 null_text_inner_steps: int = 10, null_text_learning_rate: float = 1e-2,
                 fixed_point_iterations: int = 0, guidance_rescale: float | jax.Array = 0.0
                 ) -> jax.Array | tuple[jax.Array, Trajectory]:
    """I_{k+1} latents from I_k latents: invert under `prompt_cond` (guidance
    `inversion_guidance`) to t_s, then denoise under `edit_cond` (guidance `guidance_scale`).

    `num_steps`, `strength` and the loop counts are static (they fix the scan lengths); jit
    with `static_argnames=("num_steps", "strength", "null_text", "return_trajectory",
    "null_text_inner_steps", "fixed_point_iterations")` and the denoiser bound by
    `functools.partial`.
    """
    start = invert_for_edit(denoise_fn, params, latents, prompt_cond, uncond, schedule, num_steps, strength,
                            guidance_scale, inversion_guidance=inversion_guidance, null_text=null_text,
                            null_text_inner_steps=null_text_inner_steps,
                            null_text_learning_rate=null_text_learning_rate,
                            fixed_point_iterations=fixed_point_iterations, guidance_rescale=guidance_rescale)
    return denoise_edit(denoise_fn, params, start, edit_cond, schedule, num_steps, strength, guidance_scale,
                        eta=eta, rng=rng, return_trajectory=return_trajectory,
                        guidance_rescale=guidance_rescale)
