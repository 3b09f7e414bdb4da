"""Scan sampler with CFG against diffusers' DDIMScheduler loop (stand-in denoiser and real tiny U-Net)."""
import functools

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from rig_jax.diffusion import DDIMSchedule, ddim_step_with_logprob, guided_model_output, sample
from rig_jax.errors import ConfigError, RigError
from rig_jax.weights.unet_keys import load_unet

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


@pytest.fixture(scope="module")
def stand_in():
    module = StandInDenoiser()
    x = jnp.zeros(LATENT_SHAPE)
    context = jnp.zeros((2, CONTEXT_LEN, CONTEXT_DIM))
    params = module.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32), context)
    return (lambda p, x, t, ctx: module.apply(p, x, t, ctx)), params


def make_tiny_unet(folder: str):
    """(torch U-Net, JAX denoise_fn, params): a random diffusers U-Net saved with save_pretrained
    and read back through rig_jax's loader."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    reference.save_pretrained(folder)
    _, module, params = load_unet(folder)
    return reference, (lambda p, x, t, ctx: module.apply({"params": p}, x, t, ctx)), params


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    return make_tiny_unet(str(tmp_path_factory.mktemp("tiny_unet")))


def torch_unet_fn(unet):
    """The diffusers U-Net as the reference loop's model (NHWC in and out, like ours)."""
    def model_fn(x, t, context):
        with torch.no_grad():
            out = unet(x.permute(0, 3, 1, 2), t, encoder_hidden_states=context).sample
        return out.permute(0, 2, 3, 1)
    return model_fn


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    cond = rng.standard_normal((2, CONTEXT_LEN, CONTEXT_DIM)).astype(np.float32)
    uncond = rng.standard_normal((1, CONTEXT_LEN, CONTEXT_DIM)).astype(np.float32)
    return latents, cond, uncond


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


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def schedule():
    return DDIMSchedule.from_diffusers_config(SD_SCHEDULER, "test")


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_guided_sampling_equals_diffusers_loop(stand_in, inputs, schedule, guidance_rescale):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    got = jitted_sample(denoise_fn)(params, latents, cond, uncond, schedule, num_steps=10,
                                    guidance_scale=7.5, guidance_rescale=guidance_rescale)
    want = diffusers_loop(jax_model_fn(denoise_fn, params), latents, cond, uncond, SD_SCHEDULER, 10, 7.5,
                          guidance_rescale=guidance_rescale)
    assert got.dtype == jnp.float32 and got.shape == LATENT_SHAPE
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, latents) > 0.1   # it did something


def test_stochastic_trajectory_equals_diffusers_and_rescores(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    rng = jax.random.key(7)
    final, trajectory = jitted_sample(denoise_fn)(params, latents, cond, uncond, schedule, num_steps=8,
                                                  guidance_scale=5.0, eta=1.0, rng=rng,
                                                  return_trajectory=True)
    # The sampler draws step i's variance noise from split(rng, steps)[i].
    noises = [jax.random.normal(key, LATENT_SHAPE, jnp.float32) for key in jax.random.split(rng, 8)]
    want = diffusers_loop(jax_model_fn(denoise_fn, params), latents, cond, uncond, SD_SCHEDULER, 8, 5.0,
                          eta=1.0, noises=noises)
    assert rel_err(final, want) < 1e-5
    assert trajectory.latents.shape == (8, *LATENT_SHAPE) and trajectory.log_probs.shape == (8, 2)
    np.testing.assert_array_equal(trajectory.latents[0], latents)
    np.testing.assert_array_equal(trajectory.latents[1:], trajectory.next_latents[:-1])
    np.testing.assert_array_equal(trajectory.next_latents[-1], final)
    np.testing.assert_array_equal(trajectory.timesteps, schedule.timesteps(8))
    assert np.all(np.isfinite(trajectory.log_probs))
    # Re-scoring each stored action with the same parameters reproduces log p_old (the PPO ratio is 1).
    for i in range(8):
        x_t, t, prev_t = trajectory.latents[i], trajectory.timesteps[i], trajectory.prev_timesteps[i]
        output = guided_model_output(denoise_fn, params, x_t, t, cond, uncond, 5.0)
        _, log_prob, _, _ = ddim_step_with_logprob(schedule, output, t, prev_t, x_t, eta=1.0,
                                                   prev_sample=trajectory.next_latents[i])
        np.testing.assert_allclose(log_prob, trajectory.log_probs[i], rtol=1e-4, atol=1e-4)


def test_per_step_uncond_replays_each_embedding(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    run = jitted_sample(denoise_fn)
    repeated = np.repeat(uncond[None], 6, axis=0)
    replayed = run(params, latents, cond, repeated, schedule, num_steps=6, guidance_scale=3.0)
    shared = run(params, latents, cond, uncond, schedule, num_steps=6, guidance_scale=3.0)
    np.testing.assert_allclose(replayed, shared, rtol=1e-6, atol=1e-6)
    per_step = np.random.default_rng(1).standard_normal((6, 2, CONTEXT_LEN, CONTEXT_DIM)).astype(np.float32)
    got = run(params, latents, cond, per_step, schedule, num_steps=6, guidance_scale=3.0)
    want = diffusers_loop(jax_model_fn(denoise_fn, params), latents, cond, None, SD_SCHEDULER, 6, 3.0,
                          per_step_uncond=per_step)
    assert rel_err(got, want) < 1e-5
    with pytest.raises(RigError):
        run(params, latents, cond, per_step[:5], schedule, num_steps=6, guidance_scale=3.0)


def test_start_step_resumes_an_interrupted_run(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    run = jitted_sample(denoise_fn)
    final, trajectory = run(params, latents, cond, uncond, schedule, num_steps=10, guidance_scale=4.0,
                            return_trajectory=True)
    resumed, tail = run(params, trajectory.latents[4], cond, uncond, schedule, num_steps=10,
                        guidance_scale=4.0, start_step=4, return_trajectory=True)
    np.testing.assert_allclose(resumed, final, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tail.timesteps, schedule.timesteps(10)[4:])
    untouched = run(params, latents, cond, uncond, schedule, num_steps=10, guidance_scale=4.0, start_step=10)
    np.testing.assert_array_equal(untouched, latents)
    with pytest.raises(ConfigError):
        run(params, latents, cond, uncond, schedule, num_steps=10, guidance_scale=4.0, start_step=11)


def test_guidance_one_runs_the_conditional_half_only(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    calls = []

    def counting(p, x, t, ctx):
        calls.append(x.shape[0])
        return denoise_fn(p, x, t, ctx)

    cond_only = sample(counting, params, latents, cond, uncond, schedule, 3, guidance_scale=1.0)
    assert calls == [2]     # traced once inside the scan, on the conditional batch alone
    no_uncond = sample(denoise_fn, params, latents, cond, None, schedule, 3, guidance_scale=7.5)
    guided = sample(denoise_fn, params, latents, cond, uncond, schedule, 3, guidance_scale=jnp.float32(1.0))
    np.testing.assert_allclose(cond_only, no_uncond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cond_only, guided, rtol=1e-5, atol=1e-5)
    with pytest.raises(RigError):
        sample(denoise_fn, params, latents, cond, uncond, schedule, 3, guidance_scale=2.0, eta=1.0)


def test_sampler_jits_once_for_new_inputs(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    run = jax.jit(functools.partial(sample, denoise_fn), static_argnames=("num_steps",))
    first = run(params, latents, cond, uncond, schedule, num_steps=4, guidance_scale=7.5)
    second = run(params, latents * 0.5, cond, uncond, schedule, num_steps=4, guidance_scale=2.0)
    assert run._cache_size() == 1
    assert not np.allclose(first, second)


def test_unet_guided_ddim_equals_diffusers_pipeline_loop(tiny_unet, inputs, schedule):
    """Acceptance: 10-step DDIM at guidance 7.5 with a real (tiny, random) U-Net vs diffusers."""
    unet, denoise_fn, params = tiny_unet
    latents, cond, uncond = inputs
    got = jitted_sample(denoise_fn)(params, latents, cond, uncond, schedule, num_steps=10, guidance_scale=7.5)
    want = diffusers_loop(torch_unet_fn(unet), latents, cond, uncond, SD_SCHEDULER, 10, 7.5)
    error = rel_err(got, want)
    assert error <= 1e-4, error
    assert rel_err(got, latents) > 0.1


def test_bfloat16_model_output_keeps_float32_scheduler_math(stand_in, inputs, schedule):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs

    def bf16_denoiser(p, x, t, ctx):
        return denoise_fn(p, x.astype(jnp.bfloat16), t, ctx.astype(jnp.bfloat16)).astype(jnp.bfloat16)

    final, trajectory = sample(bf16_denoiser, params, latents, cond, uncond, schedule, 4, guidance_scale=7.5,
                               eta=1.0, rng=jax.random.key(0), return_trajectory=True)
    assert final.dtype == jnp.float32 and trajectory.latents.dtype == jnp.float32
    assert trajectory.log_probs.dtype == jnp.float32 and np.all(np.isfinite(trajectory.log_probs))
    reference = sample(denoise_fn, params, latents, cond, uncond, schedule, 4, guidance_scale=7.5, eta=1.0,
                       rng=jax.random.key(0))
    assert rel_err(final, reference) < 0.1   # bf16 model, same float32 chain
