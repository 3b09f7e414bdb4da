"""DDIM as pure float32 functions of a schedule pytree.

The schedule holds only arrays (betas, cumulative alphas) and static settings, so it can
cross `jax.jit` boundaries and every step is a function of `(schedule, t, prev_t, ...)`:
the sampler, the inversion, null-text optimisation and the stage-2 policy (a Gaussian
step with a log-density) all share the same arithmetic. Numbers follow diffusers'
`DDIMScheduler` / `DDIMInverseScheduler`, which the tests use as the oracle.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rig_jax.errors import ConfigError, RigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Below this standard deviation a step is treated as deterministic by the log-density
# (see `ddim_step_with_logprob`): float32 squares of smaller values approach the
# subnormal range, where (x - mean)^2 / std^2 overflows.
MIN_POLICY_STD = 1e-6

# DDIMScheduler.__init__ defaults: a field missing from a scheduler_config.json takes these,
# exactly as `DDIMScheduler.from_config(other_config)` does.
_DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


@struct.dataclass
class DDIMSchedule:
    """Noise schedule arrays (float32 leaves) plus static DDIM settings (treedef metadata)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    timestep_spacing: str = struct.field(pytree_node=False, default="leading")
    steps_offset: int = struct.field(pytree_node=False, default=0)
    set_alpha_to_one: bool = struct.field(pytree_node=False, default=True)
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
    thresholding: bool = struct.field(pytree_node=False, default=False)
    rescale_betas_zero_snr: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any], source: str = "scheduler_config.json"
                              ) -> DDIMSchedule:
        """Builds the schedule from a diffusers scheduler JSON (DDIM, PNDM, Euler, ... of SD).

        Only the fields every SD scheduler shares are read; a value DDIM cannot honour raises
        `ConfigError` naming `source` and the field, instead of silently sampling differently.
        Which `_class_name`s are sampled with DDIM (and which with a warning) is the rule of
        `check_scheduler_class`.
        """
        return schedule_from_diffusers_config(d, source)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The denoising timesteps (descending, int32), as `DDIMScheduler.set_timesteps`."""
        return ddim_timesteps(self, num_inference_steps)

    def previous_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The timestep each denoising step lands on, as `DDIMScheduler.step` computes it.

        diffusers uses `t - num_train_timesteps // num_inference_steps` for every spacing
        (negative means "past the end": `final_alpha_cumprod`); we keep that rule so a
        pipeline replays bit-for-bit, although for `linspace` (and `trailing` with a step
        count that does not divide T) it is not the next entry of `timesteps`.
        """
        return self.timesteps(num_inference_steps) - self.num_train_timesteps // num_inference_steps


def _field(d: Mapping[str, Any], name: str) -> Any:
    value = d.get(name)
    return _DDIM_DEFAULTS[name] if value is None else value


def _betas_for_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 (improved-DDPM cosine) schedule, in float64 then float32."""

    def alpha_bar(time: float) -> float:
        return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    root = np.sqrt(alphas_cumprod)
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    alphas_bar = root ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


# The only sampler implemented. A config without `_class_name` is read as DDIM's fields.
DDIM_CLASSES = ("DDIMScheduler", "DDIMInverseScheduler")
# Discrete DDPM-family schedulers of SD checkpoints: they are built from the same betas
# (beta_start / beta_end / beta_schedule / trained_betas over num_train_timesteps) and the same
# prediction_type as DDIM, so DDIM on that config samples the model it was trained for; only
# the update rule differs. They are accepted with a warning that DDIM is used instead.
DDIM_COMPATIBLE_CLASSES = (
    "PNDMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler",
)
# Options of those classes that replace the noise levels the model is sampled at by another
# spacing (Karras, exponential, beta, Lu lambdas, flow sigmas): DDIM would ignore them.
SIGMA_SPACING_FIELDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                        "use_flow_sigmas")
# Known schedulers DDIM cannot stand in for, and why.
REFUSED_CLASSES = {
    "LCMScheduler": "a latent-consistency model is sampled with its own few-step consistency rule",
    "TCDScheduler": "a trajectory-consistency model is sampled with its own consistency rule",
    "DPMSolverSDEScheduler": "it samples a stochastic differential equation with Brownian-tree noise",
    "ScoreSdeVeScheduler": "a variance-exploding score model has no DDPM betas",
    "EDMEulerScheduler": "an EDM model is parameterised by sigmas, not DDPM betas",
    "EDMDPMSolverMultistepScheduler": "an EDM model is parameterised by sigmas, not DDPM betas",
}


def check_scheduler_class(d: Mapping[str, Any], source: str) -> str:
    """The rule for which scheduler configs DDIM samples, returning the class name.

    - DDIMScheduler / DDIMInverseScheduler (or no `_class_name`): read as they are, silently.
    - A class of DDIM_COMPATIBLE_CLASSES: its config shares DDIM's betas and prediction type,
      so DDIM is used instead, with one `warning:` line on stderr naming the class and why;
      unless it asks for another sigma spacing (`use_karras_sigmas`, ...), which DDIM cannot
      follow: then a ConfigError.
    - Any other class (LCM, DPM-SDE, flow matching, EDM, an unknown name): a ConfigError, never
      DDIM in disguise.
    """
    class_name = d.get("_class_name")
    if class_name is None or class_name in DDIM_CLASSES:
        return "DDIMScheduler" if class_name is None else class_name
    if not isinstance(class_name, str):
        raise ConfigError(f"{source}: _class_name must be a string, got {class_name!r}")
    if "Flow" in class_name:
        raise ConfigError(f"{source}: _class_name {class_name!r} is a flow-matching scheduler, "
                          "DDIM needs betas")
    if class_name in REFUSED_CLASSES:
        raise ConfigError(f"{source}: _class_name {class_name!r} is not implemented and DDIM cannot stand "
                          f"in for it: {REFUSED_CLASSES[class_name]}")
    if class_name not in DDIM_COMPATIBLE_CLASSES:
        raise ConfigError(f"{source}: _class_name {class_name!r} is not a scheduler rig_jax knows (DDIM "
                          f"samples {', '.join(DDIM_CLASSES + DDIM_COMPATIBLE_CLASSES)})")
    spacing = [f for f in SIGMA_SPACING_FIELDS if d.get(f)]
    if spacing:
        raise ConfigError(f"{source}: {class_name} with {spacing[0]}=true is not implemented: DDIM "
                          "cannot follow that sigma spacing (set it to false to sample with DDIM)")
    print(f"warning: {source}: {class_name} is not implemented; sampling with DDIM instead, on the same "
          f"betas ({d.get('beta_schedule', _DDIM_DEFAULTS['beta_schedule'])}) and prediction type "
          f"({d.get('prediction_type') or _DDIM_DEFAULTS['prediction_type']})", file=sys.stderr)
    return class_name


def schedule_from_diffusers_config(d: Mapping[str, Any], source: str = "scheduler_config.json"
                                   ) -> DDIMSchedule:
    """See `DDIMSchedule.from_diffusers_config`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    check_scheduler_class(d, source)
    if d.get("thresholding"):
        raise ConfigError(f"{source}: thresholding=true (dynamic thresholding) is not supported")

    num_train = _field(d, "num_train_timesteps")
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 2:
        raise ConfigError(f"{source}: num_train_timesteps must be an integer >= 2, got {num_train!r}")
    steps_offset = _field(d, "steps_offset")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ConfigError(f"{source}: steps_offset must be a non-negative integer, got {steps_offset!r}")
    prediction_type = _field(d, "prediction_type")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{source}: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    spacing = _field(d, "timestep_spacing")
    if spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(f"{source}: timestep_spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
    try:
        beta_start = float(_field(d, "beta_start"))
        beta_end = float(_field(d, "beta_end"))
        clip_range = float(_field(d, "clip_sample_range"))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source}: beta_start / beta_end / clip_sample_range must be numbers ({err})") from None

    trained = d.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
        if betas.shape != (num_train,):
            raise ConfigError(f"{source}: trained_betas has shape {betas.shape}, expected ({num_train},)")
    else:
        schedule = _field(d, "beta_schedule")
        if schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train, dtype=np.float64).astype(np.float32)
        elif schedule == "scaled_linear":
            betas = (np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train, dtype=np.float64)
                     .astype(np.float32) ** 2)
        elif schedule == "squaredcos_cap_v2":
            betas = _betas_for_cosine(num_train)
        else:
            raise ConfigError(f"{source}: beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}")
    if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas > 1):
        raise ConfigError(f"{source}: betas (beta_start, beta_end or trained_betas) must lie in [0, 1]")

    zero_snr = bool(_field(d, "rescale_betas_zero_snr"))
    if zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
    set_alpha_to_one = bool(_field(d, "set_alpha_to_one"))
    final = np.float32(1.0) if set_alpha_to_one else alphas_cumprod[0]
    return DDIMSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        num_train_timesteps=num_train,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=bool(_field(d, "clip_sample")),
        clip_sample_range=clip_range,
        thresholding=False,
        rescale_betas_zero_snr=zero_snr,
    )


def ddim_timesteps(schedule: DDIMSchedule, num_inference_steps: int) -> np.ndarray:
    """Descending int32 timesteps for `num_inference_steps`, as diffusers' DDIMScheduler."""
    total = schedule.num_train_timesteps
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= total:
        raise ConfigError(
            f"num_inference_steps must be an integer in [1, {total}], got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if schedule.timestep_spacing == "linspace":
        steps = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ratio = total // n
        steps = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        ratio = total / n
        steps = np.round(np.arange(total, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ConfigError(f"timestep_spacing {schedule.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return steps.astype(np.int32)


def _per_sample(value: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a scalar or per-example (B,) value so it broadcasts against a (B, ...) sample."""
    value = jnp.asarray(value, jnp.float32)
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim == 1 else value


def _alpha_at(schedule: DDIMSchedule, t: jax.Array, ndim: int) -> jax.Array:
    """alpha_bar at timestep t; a negative t (past the last step) reads final_alpha_cumprod."""
    t = jnp.asarray(t, jnp.int32)
    safe = jnp.clip(t, 0, schedule.num_train_timesteps - 1)
    alpha = jnp.where(t >= 0, schedule.alphas_cumprod[safe], schedule.final_alpha_cumprod)
    return _per_sample(alpha, ndim)


def _split_prediction(schedule: DDIMSchedule, model_output: jax.Array, sample: jax.Array,
                      alpha_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(predicted x0, predicted epsilon) from the model output, clipping x0 like diffusers."""
    beta_t = 1.0 - alpha_t
    if schedule.prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(beta_t) * model_output) / jnp.sqrt(alpha_t)
        eps = model_output
    elif schedule.prediction_type == "sample":
        x0 = model_output
        eps = (sample - jnp.sqrt(alpha_t) * x0) / jnp.sqrt(beta_t)
    elif schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample
    else:
        raise ConfigError(f"prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}")
    if schedule.clip_sample:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def ddim_std(schedule: DDIMSchedule, t: jax.Array, prev_t: jax.Array, eta: float | jax.Array,
             ndim: int = 0) -> jax.Array:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) in float32."""
    alpha_t = _alpha_at(schedule, t, ndim)
    alpha_prev = _alpha_at(schedule, prev_t, ndim)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    return jnp.asarray(eta, jnp.float32) * jnp.sqrt(jnp.maximum(variance, 0.0))


def ddim_mean(schedule: DDIMSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              sample: jax.Array, eta: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
    """The DDIM posterior mean of x_{prev_t} and its std (broadcastable to the sample), float32."""
    model_output = jnp.asarray(model_output, jnp.float32)
    sample = jnp.asarray(sample, jnp.float32)
    ndim = sample.ndim
    alpha_t = _alpha_at(schedule, t, ndim)
    alpha_prev = _alpha_at(schedule, prev_t, ndim)
    x0, eps = _split_prediction(schedule, model_output, sample, alpha_t)
    std = ddim_std(schedule, t, prev_t, eta, ndim)
    # Clamped at 0: rounding can push 1 - a_prev - std^2 a hair below zero when eta = 1.
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_prev - std ** 2, 0.0)) * eps
    return jnp.sqrt(alpha_prev) * x0 + direction, std


def _variance_noise(shape: tuple[int, ...], noise: jax.Array | None, rng: jax.Array | None) -> jax.Array:
    if noise is not None and rng is not None:
        raise RigError("ddim step: pass either `noise` or `rng`, not both")
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise RigError(f"ddim step: noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return jnp.asarray(noise, jnp.float32)
    if rng is None:
        raise RigError("ddim step: eta > 0 needs `noise` or `rng`")
    return jax.random.normal(rng, shape, jnp.float32)


def _is_static_zero(eta: Any) -> bool:
    return isinstance(eta, (int, float, np.floating, np.integer)) and float(eta) == 0.0


def ddim_step(schedule: DDIMSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              sample: jax.Array, eta: float | jax.Array = 0.0, noise: jax.Array | None = None,
              rng: jax.Array | None = None) -> jax.Array:
    """One DDIM step x_t -> x_{prev_t} (float32), equal to `DDIMScheduler.step(...).prev_sample`.

    `t`/`prev_t` are scalars or per-example (B,) int arrays; a negative `prev_t` means the
    final step. With eta > 0 the variance noise is `noise` (as diffusers' `variance_noise`)
    or drawn from `rng`.
    """
    mean, std = ddim_mean(schedule, model_output, t, prev_t, sample, eta)
    if _is_static_zero(eta):
        return mean
    return mean + std * _variance_noise(mean.shape, noise, rng)


def gaussian_log_prob(value: jax.Array, mean: jax.Array, std: jax.Array,
                      min_std: float = MIN_POLICY_STD) -> jax.Array:
    """Per-example log N(value; mean, std^2) averaged over non-batch elements, float32.

    Elements whose std is below `min_std` are point masses, not a stochastic policy: they
    contribute 0 (so a PPO ratio of 1 and no gradient), instead of the inf/NaN of dividing
    by a zero variance. The safe-std `where` keeps gradients finite too.
    """
    value = jnp.asarray(value, jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), mean.shape)
    stochastic = std >= min_std
    safe_std = jnp.where(stochastic, std, 1.0)
    density = (-((value - mean) ** 2) / (2.0 * safe_std ** 2) - jnp.log(safe_std)
               - 0.5 * jnp.log(2.0 * jnp.pi))
    density = jnp.where(stochastic, density, 0.0)
    return jnp.mean(density, axis=tuple(range(1, density.ndim)))


def ddim_step_with_logprob(schedule: DDIMSchedule, model_output: jax.Array, t: jax.Array,
                           prev_t: jax.Array, sample: jax.Array, eta: float | jax.Array = 1.0,
                           noise: jax.Array | None = None, rng: jax.Array | None = None,
                           prev_sample: jax.Array | None = None, min_std: float = MIN_POLICY_STD
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The stage-2 Gaussian policy step: `(prev_sample, log_prob, mean, std)`.

    Samples `prev_sample ~ N(mean, std^2)` (as `ddim_step`), or scores the `prev_sample`
    given (a rollout's action under new parameters). `log_prob` has shape (B,): the
    element-averaged log-density (see `gaussian_log_prob` for the std -> 0 guard, which
    covers the last step when `final_alpha_cumprod` is 1). `std` broadcasts to the sample.
    """
    mean, std = ddim_mean(schedule, model_output, t, prev_t, sample, eta)
    if prev_sample is None:
        if _is_static_zero(eta):
            prev_sample = mean
        else:
            prev_sample = mean + std * _variance_noise(mean.shape, noise, rng)
    else:
        prev_sample = jnp.asarray(prev_sample, jnp.float32)
    log_prob = gaussian_log_prob(jax.lax.stop_gradient(prev_sample), mean, std, min_std)
    return prev_sample, log_prob, mean, std


def ddim_inverse_step(schedule: DDIMSchedule, model_output: jax.Array, t: jax.Array, next_t: jax.Array,
                      sample: jax.Array) -> jax.Array:
    """Deterministic DDIM step up the noise ladder, x_t -> x_{next_t} (float32).

    The exact inverse of an eta = 0 `ddim_step(next_t -> t)` when the model output is the
    same; a negative `t` means the clean end (`final_alpha_cumprod`). Inversion evaluates
    the model at `next_t` on x_t, as diffusers' `DDIMInverseScheduler` and Null-text do.
    """
    model_output = jnp.asarray(model_output, jnp.float32)
    sample = jnp.asarray(sample, jnp.float32)
    alpha_t = _alpha_at(schedule, t, sample.ndim)
    alpha_next = _alpha_at(schedule, next_t, sample.ndim)
    x0, eps = _split_prediction(schedule, model_output, sample, alpha_t)
    return jnp.sqrt(alpha_next) * x0 + jnp.sqrt(1.0 - alpha_next) * eps


def add_noise(schedule: DDIMSchedule, original: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, float32."""
    original = jnp.asarray(original, jnp.float32)
    alpha_t = _alpha_at(schedule, t, original.ndim)
    return jnp.sqrt(alpha_t) * original + jnp.sqrt(1.0 - alpha_t) * jnp.asarray(noise, jnp.float32)
