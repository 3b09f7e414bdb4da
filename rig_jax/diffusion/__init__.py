"""DDIM scheduling, guided scan sampling, DDIM / null-text inversion and the latent editor."""
from rig_jax.diffusion.edit import EditStart, denoise_edit, edit_latents, edit_start_step, invert_for_edit
from rig_jax.diffusion.inversion import Inversion, NullText, ddim_invert, null_text_invert
from rig_jax.diffusion.sampler import (
    Trajectory,
    combine_guidance,
    guided_model_output,
    rescale_noise_cfg,
    sample,
)
from rig_jax.diffusion.schedulers import (
    DDIMSchedule,
    add_noise,
    ddim_inverse_step,
    ddim_step,
    ddim_step_with_logprob,
    ddim_timesteps,
    gaussian_log_prob,
)
from rig_jax.diffusion.settings import EditSettings, InversionSettings, NullTextSettings, SamplerSettings

__all__ = [
    "DDIMSchedule",
    "EditSettings",
    "EditStart",
    "Inversion",
    "InversionSettings",
    "NullText",
    "NullTextSettings",
    "SamplerSettings",
    "Trajectory",
    "add_noise",
    "combine_guidance",
    "ddim_inverse_step",
    "ddim_invert",
    "ddim_step",
    "ddim_step_with_logprob",
    "ddim_timesteps",
    "denoise_edit",
    "edit_latents",
    "edit_start_step",
    "gaussian_log_prob",
    "guided_model_output",
    "invert_for_edit",
    "null_text_invert",
    "rescale_noise_cfg",
    "sample",
]
