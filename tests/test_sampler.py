"""Scan sampler with CFG against diffusers' DDIMScheduler loop (stand-in denoiser and real tiny U-Net)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rig_jax.diffusion import ddim_step_with_logprob, guided_model_output, sample
from rig_jax.diffusion.sampler import shares_sample, sharing_sample
from rig_jax.errors import ConfigError, RigError
from tests.diffusion_helpers import (
    CONTEXT_DIM,
    CONTEXT_LEN,
    LATENT_SHAPE,
    SD_SCHEDULER,
    diffusers_loop,
    jax_model_fn,
    jitted_sample,
    torch_unet_fn,
)
from tests.helpers import rel_err

# The fixtures stand_in, tiny_unet, schedule and inputs (seeded by INPUTS_SEED) are in tests/conftest.py.
INPUTS_SEED = 0


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


@pytest.mark.parametrize("eta", [1.0, 0.5])   # 0 < eta < 1 tells eta^2 from eta
def test_stochastic_trajectory_equals_diffusers_and_rescores(stand_in, inputs, schedule, eta):
    denoise_fn, params = stand_in
    latents, cond, uncond = inputs
    rng = jax.random.key(7)
    final, trajectory = jitted_sample(denoise_fn)(params, latents, cond, uncond, schedule, num_steps=8,
                                                  guidance_scale=5.0, eta=eta, rng=rng,
                                                  return_trajectory=True)
    # The sampler draws step i's variance noise from split(rng, steps)[i].
    noises = [jax.random.normal(key, LATENT_SHAPE, jnp.float32) for key in jax.random.split(rng, 8)]
    want = diffusers_loop(jax_model_fn(denoise_fn, params), latents, cond, uncond, SD_SCHEDULER, 8, 5.0,
                          eta=eta, noises=noises)
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
        _, log_prob, _, _ = ddim_step_with_logprob(schedule, output, t, prev_t, x_t, eta=eta,
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


def test_shared_sample_unet_gives_the_same_images(tiny_unet, inputs, schedule):
    """The U-Net marked `sharing_sample` gets the latents once (batch 2) with the four
    interleaved contexts, and guided DDIM lands where the concatenated (uncond, cond) batch
    does, to float tolerance (the U-Net outputs differ by ~1e-7 from XLA's batch-dependent
    blocking, and guidance 7.5 amplifies that over the steps); an unmarked denoiser keeps the
    concatenated call."""
    _, denoise_fn, params = tiny_unet
    latents, cond, uncond = inputs
    seen = []

    def spy(p, x, t, ctx):
        seen.append((x.shape[0], t.shape[0], ctx.shape[0]))
        return denoise_fn(p, x, t, ctx)

    shared = sharing_sample(spy)
    assert shares_sample(shared) and not shares_sample(spy)
    got = jitted_sample(shared)(params, latents, cond, uncond, schedule, num_steps=4, guidance_scale=7.5)
    want = jitted_sample(spy)(params, latents, cond, uncond, schedule, num_steps=4, guidance_scale=7.5)
    assert seen == [(2, 2, 4), (4, 4, 4)]
    error = rel_err(got, want)
    assert error <= 1e-5, error
    assert rel_err(got, latents) > 0.1
