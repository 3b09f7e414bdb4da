"""DDIM schedule, step, policy log-prob and inverse step against diffusers' schedulers."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from rig_jax.diffusion.schedulers import (
    DDIMSchedule,
    add_noise,
    ddim_inverse_step,
    ddim_step,
    ddim_step_with_logprob,
    gaussian_log_prob,
)
from rig_jax.errors import ConfigError, RigError
from tests.helpers import rel_err

BETA_SCHEDULES = [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SHAPE = (2, 4, 8, 8)

# SD 1.5's scheduler_config.json (a PNDMScheduler that SD pipelines swap for DDIM).
SD15_PNDM = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def _pair(config: dict) -> tuple[DDIMSchedule, DDIMScheduler]:
    return DDIMSchedule.from_diffusers_config(config, "test"), DDIMScheduler.from_config(config)


@jax.jit
def _jit_step(schedule, model_output, t, prev_t, sample, eta, noise):
    return ddim_step(schedule, model_output, t, prev_t, sample, eta, noise=noise)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(spacing, steps, offset):
    schedule, reference = _pair({"timestep_spacing": spacing, "steps_offset": offset})
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps(steps), reference.timesteps.numpy())
    assert schedule.timesteps(steps).dtype == np.int32


@pytest.mark.parametrize("betas", BETA_SCHEDULES, ids=lambda b: b["beta_schedule"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_arrays_equal_diffusers(betas, zero_snr):
    schedule, reference = _pair({**betas, "rescale_betas_zero_snr": zero_snr, "set_alpha_to_one": False})
    # Zero-SNR betas are differences of float32 cumulative products: cancellation turns 1-ulp
    # differences in linspace into ~1e-3 relative ones on the tiny early betas, in torch as here.
    np.testing.assert_allclose(schedule.betas, reference.betas.numpy(), rtol=2e-6,
                               atol=5e-6 if zero_snr else 1e-9)
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5,
                               atol=1e-8)
    final = float(reference.final_alpha_cumprod)
    assert float(schedule.final_alpha_cumprod) == pytest.approx(final, rel=1e-6)
    assert schedule.alphas_cumprod.dtype == jnp.float32


def test_sd15_pndm_config_reads_like_ddim_from_config():
    schedule, reference = _pair(SD15_PNDM)
    assert (schedule.steps_offset, schedule.set_alpha_to_one, schedule.clip_sample) == (1, False, False)
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5)
    reference.set_timesteps(50)
    np.testing.assert_array_equal(schedule.timesteps(50), reference.timesteps.numpy())
    # Fields DDIM never reads (PNDM's skip_prk_steps) are ignored, missing ones take DDIM defaults.
    assert DDIMSchedule.from_diffusers_config({}, "x").clip_sample is True


@pytest.mark.parametrize("field,value", [
    ("beta_schedule", "exp"), ("prediction_type", "flow_prediction"), ("timestep_spacing", "karras"),
    ("thresholding", True), ("num_train_timesteps", 0), ("steps_offset", -1), ("trained_betas", [0.1, 0.2]),
    ("_class_name", "FlowMatchEulerDiscreteScheduler"), ("beta_start", "small"),
])
def test_unsupported_fields_raise_config_error_naming_them(field, value):
    with pytest.raises(ConfigError) as err:
        DDIMSchedule.from_diffusers_config({field: value}, "unet/../scheduler/scheduler_config.json")
    message = str(err.value)
    assert "\n" not in message and "scheduler_config.json" in message
    assert field in message or (field == "trained_betas" and "trained_betas" in message)


def test_schedule_is_a_pytree_with_static_settings():
    schedule = DDIMSchedule.from_diffusers_config(SD15_PNDM, "x")
    leaves, treedef = jax.tree_util.tree_flatten(schedule)
    assert len(leaves) == 3 and all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert jax.tree_util.tree_unflatten(treedef, leaves).steps_offset == 1
    with pytest.raises(ConfigError):
        schedule.timesteps(0)


@pytest.mark.parametrize("betas,spacing,prediction",
                         list(itertools.product(BETA_SCHEDULES, SPACINGS, PREDICTIONS)),
                         ids=lambda v: v["beta_schedule"] if isinstance(v, dict) else v)
def test_ddim_step_equals_diffusers(betas, spacing, prediction):
    steps = 10
    config = {**betas, "timestep_spacing": spacing, "prediction_type": prediction, "clip_sample": True,
              "clip_sample_range": 1.5, "steps_offset": 1, "set_alpha_to_one": spacing != "leading"}
    schedule, reference = _pair(config)
    reference.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    previous = schedule.previous_timesteps(steps)
    for i, t in enumerate(reference.timesteps.tolist()):
        model_output = torch.randn(SHAPE, generator=gen)
        sample = torch.randn(SHAPE, generator=gen) * 1.5
        noise = torch.randn(SHAPE, generator=gen)
        for eta in (0.0, 0.7):
            want = reference.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
            got = _jit_step(schedule, jnp.asarray(model_output.numpy()), t, previous[i],
                            jnp.asarray(sample.numpy()), eta, jnp.asarray(noise.numpy()))
            assert got.dtype == jnp.float32
            assert rel_err(got, want.numpy()) < 2e-5, (i, t, eta)
    # A Python eta of 0 needs no noise and is the eta = 0 result.
    got = ddim_step(schedule, jnp.asarray(model_output.numpy()), t, previous[-1], jnp.asarray(sample.numpy()))
    want = reference.step(model_output, t, sample, eta=0.0).prev_sample
    assert rel_err(got, want.numpy()) < 2e-5


def test_ddim_step_needs_noise_source_when_stochastic():
    schedule = DDIMSchedule.from_diffusers_config({}, "x")
    x = jnp.ones(SHAPE)
    with pytest.raises(RigError):
        ddim_step(schedule, x, 500, 400, x, eta=1.0)
    with pytest.raises(RigError):
        ddim_step(schedule, x, 500, 400, x, eta=1.0, noise=x[:1])
    drawn = ddim_step(schedule, x, 500, 400, x, eta=1.0, rng=jax.random.key(3))
    explicit = ddim_step(schedule, x, 500, 400, x, eta=1.0,
                         noise=jax.random.normal(jax.random.key(3), SHAPE, jnp.float32))
    np.testing.assert_array_equal(drawn, explicit)


def _numpy_log_prob(value, mean, std):
    value, mean = np.asarray(value, np.float64), np.asarray(mean, np.float64)
    std = np.broadcast_to(np.asarray(std, np.float64), mean.shape)
    density = -((value - mean) ** 2) / (2 * std ** 2) - np.log(std) - 0.5 * math.log(2 * math.pi)
    return density.reshape(density.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("eta", [1.0, 0.5])   # 0 < eta < 1 tells eta^2 from eta
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_log_prob_equals_gaussian_density_and_torch_normal(prediction, eta):
    config = {**SD15_PNDM, "_class_name": "DDIMScheduler", "prediction_type": prediction}
    schedule, reference = _pair(config)
    reference.set_timesteps(10)
    previous = schedule.previous_timesteps(10)
    rng = np.random.default_rng(1)
    for i, t in enumerate(reference.timesteps.tolist()):
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        sample = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        prev, log_prob, mean, std = ddim_step_with_logprob(schedule, model_output, t, previous[i], sample,
                                                           eta=eta, noise=noise)
        want = reference.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), eta=eta,
                              variance_noise=torch.from_numpy(noise)).prev_sample
        assert rel_err(prev, want.numpy()) < 2e-5
        # the policy's std is diffusers' eta * sqrt(variance) (its std_dev_t)
        want_std = eta * float(reference._get_variance(t, int(previous[i]))) ** 0.5
        np.testing.assert_allclose(np.max(std), want_std, rtol=1e-5)
        assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == jnp.float32
        np.testing.assert_allclose(log_prob, _numpy_log_prob(prev, mean, std), rtol=1e-5, atol=1e-5)
        normal = torch.distributions.Normal(torch.from_numpy(np.array(mean)),
                                            torch.from_numpy(np.broadcast_to(np.asarray(std), SHAPE).copy()))
        torch_lp = normal.log_prob(torch.from_numpy(np.array(prev))).mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(log_prob, torch_lp, rtol=1e-5, atol=1e-5)
        # Scoring the sampled action gives the same log-prob as sampling it.
        _, scored, _, _ = ddim_step_with_logprob(schedule, model_output, t, previous[i], sample, eta=eta,
                                                 prev_sample=prev)
        np.testing.assert_allclose(scored, log_prob, rtol=1e-6, atol=1e-6)
        # Scoring a different action gives a lower density than the mean itself.
        _, at_mean, _, _ = ddim_step_with_logprob(schedule, model_output, t, previous[i], sample, eta=eta,
                                                  prev_sample=mean)
        assert np.all(np.asarray(at_mean) > np.asarray(log_prob))


def test_log_prob_per_example_timesteps_match_scalar_calls():
    schedule = DDIMSchedule.from_diffusers_config(SD15_PNDM, "x")
    rng = np.random.default_rng(2)
    model_output, sample, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    t, prev_t = np.array([981, 401], np.int32), np.array([961, 381], np.int32)
    prev, log_prob, _, std = ddim_step_with_logprob(schedule, model_output, t, prev_t, sample, noise=noise)
    assert std.shape == (2, 1, 1, 1)
    for b in range(2):
        one = ddim_step_with_logprob(schedule, model_output[b:b + 1], t[b], prev_t[b], sample[b:b + 1],
                                     noise=noise[b:b + 1])
        np.testing.assert_allclose(prev[b:b + 1], one[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(log_prob[b], one[1][0], rtol=1e-6, atol=1e-6)


def test_last_step_zero_std_gives_finite_log_prob_and_gradients():
    # set_alpha_to_one: the last step lands on alpha_bar = 1, so sigma = 0 exactly.
    schedule = DDIMSchedule.from_diffusers_config({"set_alpha_to_one": True, "clip_sample": False}, "x")
    rng = np.random.default_rng(3)
    model_output, sample, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    prev, log_prob, mean, std = ddim_step_with_logprob(schedule, model_output, 1, -19, sample, noise=noise)
    assert float(np.max(std)) == 0.0
    np.testing.assert_array_equal(log_prob, np.zeros(2, np.float32))
    np.testing.assert_array_equal(prev, mean)

    def score(output):
        return ddim_step_with_logprob(schedule, output, 1, -19, sample, prev_sample=prev + 0.1)[1].sum()

    value, grad = jax.value_and_grad(score)(jnp.asarray(model_output))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # At a small but usable std the density stays finite and exact.
    tiny = gaussian_log_prob(jnp.full(SHAPE, 1e-3), jnp.zeros(SHAPE), jnp.float32(1e-5))
    np.testing.assert_allclose(tiny, _numpy_log_prob(np.full(SHAPE, 1e-3), np.zeros(SHAPE), 1e-5), rtol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inverse_step_equals_diffusers_ddim_inverse(prediction, spacing):
    config = {**SD15_PNDM, "prediction_type": prediction, "timestep_spacing": spacing}
    schedule = DDIMSchedule.from_diffusers_config(config, "x")
    reference = DDIMInverseScheduler.from_config(config)
    steps = 10
    reference.set_timesteps(steps)
    ratio = 1000 // steps
    rng = np.random.default_rng(4)
    for t in reference.timesteps.tolist():
        model_output, sample = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
        want = reference.step(torch.from_numpy(model_output), t, torch.from_numpy(sample)).prev_sample
        got = ddim_inverse_step(schedule, model_output, min(t - ratio, 999), t, sample)
        assert rel_err(got, want.numpy()) < 2e-5, t


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_inverse_step_undoes_deterministic_step(prediction):
    schedule = DDIMSchedule.from_diffusers_config({**SD15_PNDM, "prediction_type": prediction}, "x")
    rng = np.random.default_rng(5)
    x_t = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    # Express the same epsilon as each prediction type's output at both levels.
    alpha = np.asarray(schedule.alphas_cumprod)
    x0 = (x_t - np.sqrt(1 - alpha[501]) * eps) / np.sqrt(alpha[501])
    x_prev = np.asarray(ddim_step(schedule, _as_prediction(prediction, x0, eps, alpha[501]), 501, 481, x_t))
    back = ddim_inverse_step(schedule, _as_prediction(prediction, x0, eps, alpha[481]), 481, 501, x_prev)
    assert rel_err(back, x_t) < 1e-4


def _as_prediction(prediction, x0, eps, alpha):
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    return np.sqrt(alpha) * eps - np.sqrt(1 - alpha) * x0


def test_add_noise_equals_diffusers():
    schedule, reference = _pair(SD15_PNDM)
    rng = np.random.default_rng(6)
    original, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = np.array([999, 17], np.int64)
    want = reference.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.from_numpy(t))
    assert rel_err(add_noise(schedule, original, noise, t.astype(np.int32)), want.numpy()) < 1e-6
    per_example = add_noise(schedule, original, noise, np.array([17, 17], np.int32))
    np.testing.assert_array_equal(add_noise(schedule, original, noise, 17), per_example)
