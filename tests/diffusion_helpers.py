"""Shared pieces of the diffusion tests: the stand-in denoiser, the tiny U-Net, diffusers'
reference loop and the comparison helpers."""
import functools

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from configs import common
from rig_jax.diffusion import EditSettings, SamplerSettings, sample
from rig_jax.weights.unet import load_unet

LATENT_SHAPE = (2, 8, 8, 4)     # NHWC
CONTEXT_LEN, CONTEXT_DIM = 5, 16
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "steps_offset": 1, "clip_sample": False,
}
# A tiny SD-1 layout U-Net (cross-attention on the 8x8 level, context width 16).
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8)


class StandInDenoiser(nn.Module):
    """A small conditional conv net: time embedding, pooled cross-attention to the context."""
    features: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        half = self.features // 2
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
        angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
        t_emb = nn.Dense(self.features)(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1))
        h = nn.Conv(self.features, (3, 3))(x)
        keys = nn.Dense(self.features)(context)
        scores = jnp.einsum("bf,blf->bl", h.mean(axis=(1, 2)), keys) / jnp.sqrt(self.features)
        attended = jnp.einsum("bl,blf->bf", jax.nn.softmax(scores), nn.Dense(self.features)(context))
        h = nn.silu(h + t_emb[:, None, None] + attended[:, None, None])
        h = nn.silu(nn.Conv(self.features, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def make_stand_in():
    """(denoise_fn, params) of the stand-in denoiser, initialised at key 0."""
    module = StandInDenoiser()
    params = module.init(jax.random.key(0), jnp.zeros(LATENT_SHAPE), jnp.zeros(2, jnp.int32),
                         jnp.zeros((2, CONTEXT_LEN, CONTEXT_DIM)))
    return (lambda p, x, t, ctx: module.apply(p, x, t, ctx)), params


def make_inputs(seed: int):
    """(latents, cond, uncond): a batch of 2 NHWC latents, their contexts and one uncond context."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, CONTEXT_LEN, CONTEXT_DIM)).astype(np.float32)
    uncond = rng.standard_normal((1, CONTEXT_LEN, CONTEXT_DIM)).astype(np.float32)
    return latents, cond, uncond


def make_tiny_unet(folder: str):
    """(torch U-Net, JAX denoise_fn, params): a random diffusers U-Net saved with save_pretrained
    and read back through rig_jax's loader."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    reference.save_pretrained(folder)
    _, module, params = load_unet(folder)
    return reference, (lambda p, x, t, ctx: module.apply({"params": p}, x, t, ctx)), params


def torch_unet_fn(unet):
    """The diffusers U-Net as the reference loop's model (NHWC in and out, like ours)."""
    def model_fn(x, t, context):
        with torch.no_grad():
            out = unet(x.permute(0, 3, 1, 2), t, encoder_hidden_states=context).sample
        return out.permute(0, 2, 3, 1)
    return model_fn


def sampler_settings(**fields) -> SamplerSettings:
    """configs/common.py's sampler section with `fields` replaced (num_steps, guidance_scale, ...)."""
    section = common.sampler()
    section.update(fields)
    return SamplerSettings.from_config(section)


# The editor's former keyword names -> their config fields.
_EDIT_FIELDS = {
    "strength": "strength", "num_steps": "sampler.num_steps", "guidance_scale": "sampler.guidance_scale",
    "eta": "sampler.eta", "guidance_rescale": "sampler.guidance_rescale",
    "inversion_guidance": "inversion.guidance_scale",
    "fixed_point_iterations": "inversion.fixed_point_iterations",
    "null_text": "null_text.enabled", "null_text_inner_steps": "null_text.inner_steps",
    "null_text_learning_rate": "null_text.learning_rate"}


def edit_settings(**fields) -> EditSettings:
    """configs/common.py's editor section with `fields` (the editor's keyword names) replaced."""
    section = common.editor()
    for name, value in fields.items():
        *parents, leaf = _EDIT_FIELDS[name].split(".")
        node = section
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return EditSettings.from_config(section)


@functools.cache
def jitted_sample(denoise_fn):
    """One jit per denoiser; num_steps / start_step / eta / return_trajectory are static."""
    return jax.jit(functools.partial(sample, denoise_fn),
                   static_argnames=("num_steps", "start_step", "eta", "return_trajectory"))


def diffusers_loop(model_fn, latents, cond, uncond, config, num_steps, guidance_scale, guidance_rescale=0.0,
                   eta=0.0, noises=None, per_step_uncond=None):
    """The SD pipeline's denoising loop in torch: CFG on a concatenated batch, scheduler.step."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(np.array(latents))
    cond = torch.from_numpy(np.array(cond))
    batch = x.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        step_uncond = uncond if per_step_uncond is None else per_step_uncond[i]
        step_uncond = torch.from_numpy(np.array(step_uncond)).expand(batch, -1, -1)
        out = model_fn(torch.cat([x, x]), t, torch.cat([step_uncond, cond]))
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=guidance_rescale)
        noise = None if noises is None else torch.from_numpy(np.array(noises[i]))
        x = scheduler.step(guided, t, x, eta=eta, variance_noise=noise).prev_sample
    return x.numpy()


def jax_model_fn(denoise_fn, params):
    """A torch-facing view of a JAX denoiser (the reference loop calls it step by step)."""
    call = jax.jit(denoise_fn)

    def model_fn(x, t, context):
        t_batch = np.full((x.shape[0],), int(t), np.int32)
        return torch.from_numpy(np.array(call(params, x.numpy(), t_batch, context.numpy())))
    return model_fn
