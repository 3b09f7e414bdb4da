"""The rig_jax side of each bench: the library's own entry points on the saved weights.

Each builder returns a `JaxTask`: the jitted function and its (device-placed) arguments, which
the worker lowers and compiles ahead of time (compile time apart), how to turn a result into
numpy arrays for the parity check (outside the timed call), and the model FLOPs of one call
(rig_jax/bench/flops.py: per model call, times the calls)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.bench.flops import call_flops
from rig_jax.bench.models import SD_SCHEDULER


@dataclasses.dataclass
class JaxTask:
    fn: Callable[..., Any] | None                    # jitted (None: `call` is timed as it is)
    args: tuple[Any, ...]
    outputs: Callable[[Any], dict[str, np.ndarray]]  # result -> arrays compared with the peer's
    flops: Callable[[], float]                       # model FLOPs of one call (0: not counted)
    info: dict[str, Any]
    call: Callable[[], Any] | None = None            # a host-side composite (the loop), compiled on first use


def compute_dtype(spec: dict[str, Any]) -> Any:
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[spec["dtype"]]


def _schedule() -> Any:
    from rig_jax.diffusion import DDIMSchedule
    return DDIMSchedule.from_diffusers_config({"_class_name": "DDIMScheduler", **SD_SCHEDULER})


def _unet(spec: dict[str, Any], train: bool) -> tuple[Any, Any, Callable[..., Any]]:
    """(module, params, denoise): inference weights in the compute dtype, training weights
    float32 (the compute dtype applies to activations)."""
    from rig_jax.weights.unet import load_unet
    dtype = compute_dtype(spec)
    _, module, params = load_unet(spec["folder"], dtype=dtype)
    if not train:
        params = jax.tree.map(lambda p: p.astype(dtype), params)

    def denoise(p: Any, x: jax.Array, t: jax.Array, ctx: jax.Array) -> jax.Array:
        return module.apply({"params": p}, x, t, ctx)

    return module, jax.device_put(params), denoise


def _tree_norm(tree: Any) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(tree))))


def _loss_outputs(result: Any) -> dict[str, np.ndarray]:
    loss, grads = result
    return {"loss": np.asarray(float(loss)), "grad_norm": np.asarray(_tree_norm(grads))}


def _training(spec: dict[str, Any], loss: Callable[..., jax.Array], args: tuple[Any, ...]) -> JaxTask:
    """A training bench's task: `jit(value_and_grad(loss))` in the params (the first argument),
    or with `forward_only` the loss alone (the split that says where a step's time goes)."""
    if spec.get("forward_only"):
        return JaxTask(jax.jit(loss), args, lambda r: {"loss": np.asarray(float(r))},
                       lambda: call_flops(loss, *args), {})
    grad = jax.value_and_grad(loss)
    return JaxTask(jax.jit(grad), args, _loss_outputs, lambda: call_flops(grad, *args), {})


def sampler(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """Guided DDIM (`diffusion.sample`, one scan; CFG halves in one batch) from noise latents,
    with the U-Net marked `sharing_sample` as the Diffuser's (`rig.diffuser.unet_denoiser`):
    the layers before the first cross-attention run once for both halves. The MFU count is
    the plain CFG pair's."""
    from rig_jax.diffusion import sample
    from rig_jax.diffusion.sampler import sharing_sample
    _, params, denoise = _unet(spec, train=False)
    dtype, schedule, steps = compute_dtype(spec), _schedule(), spec["steps"]
    shared = sharing_sample(denoise)
    fn = jax.jit(lambda p, x, c, u: sample(shared, p, x, c, u, schedule, steps, spec["guidance"]))
    lat, cond = jnp.asarray(data["latents"]), jnp.asarray(data["cond"], dtype)
    uncond = jnp.asarray(data["uncond"], dtype)

    def flops() -> float:
        x2 = jnp.concatenate([lat, lat]).astype(dtype)
        ctx = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
        return steps * call_flops(denoise, params, x2, jnp.full((x2.shape[0],), 500, jnp.int32), ctx)

    return JaxTask(fn, (params, lat, cond, uncond), lambda r: {"latents": np.asarray(r)}, flops, {})


def inversion(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """DDIM inversion without guidance (`diffusion.ddim_invert`), the Editor's first half."""
    from rig_jax.diffusion import ddim_invert
    _, params, denoise = _unet(spec, train=False)
    dtype, schedule, steps = compute_dtype(spec), _schedule(), spec["steps"]
    fn = jax.jit(lambda p, x, c: ddim_invert(denoise, p, x, c, None, schedule, steps).latents)
    clean, cond = jnp.asarray(data["clean"]), jnp.asarray(data["cond"], dtype)

    def flops() -> float:
        t = jnp.full((clean.shape[0],), 500, jnp.int32)
        return steps * call_flops(denoise, params, clean.astype(dtype), t, cond)

    return JaxTask(fn, (params, clean, cond), lambda r: {"latents": np.asarray(r)}, flops, {})


def _qwen(spec: dict[str, Any], train: bool) -> tuple[Any, Any, Any]:
    from rig_jax.weights.qwen2_5_vl import load_qwen_vl
    dtype = compute_dtype(spec)
    config, module, params = load_qwen_vl(spec["folder"], dtype=dtype,
                                          param_dtype=jnp.float32 if train else dtype)
    return config, module, jax.device_put(params)


def _prompts(config: Any, ids: np.ndarray) -> dict[str, jax.Array]:
    """Text-only prompts (no padding) with Qwen2.5-VL's 3-axis positions."""
    from rig_jax.vlm.processor import mrope_position_ids
    ids = ids.astype(np.int32)
    mask = np.ones_like(ids)
    pos, deltas = mrope_position_ids(ids, None, mask, config.image_token_id, config.vision_start_token_id,
                                     config.vision.spatial_merge_size if config.vision else 2)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "position_ids": jnp.asarray(pos, jnp.int32), "rope_deltas": jnp.asarray(deltas, jnp.int32)}


def decode(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """Greedy `vlm.decode.generate` (prefill, then a while_loop over the KV cache), no stop token."""
    from rig_jax.vlm.decode import generate, score
    config, module, params = _qwen(spec, train=False)
    batch, new = _prompts(config, data["ids"]), spec["new_tokens"]
    fn = jax.jit(lambda p, b, k: generate(module, p, b, k, new, greedy=True)["tokens"])

    def flops() -> float:  # a teacher-forced pass over prompt + new - 1 tokens, logits at the new ones
        completions = jnp.zeros((batch["input_ids"].shape[0], max(new - 1, 1)), jnp.int32)
        return call_flops(lambda p, b, c: score(module, p, b, c), params, batch, completions)

    return JaxTask(fn, (params, batch, jax.random.PRNGKey(0)), lambda r: {"tokens": np.asarray(r)}, flops, {})


def actor_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """Stage 1's gradient: token GRPO loss (`rl.losses.token_grpo_loss`, clip + k3 KL) of
    teacher-forced completion log-probs (`vlm.decode.score`), value and grad in the params."""
    from rig_jax.rl.losses import TokenLossSettings, token_grpo_loss
    from rig_jax.vlm.decode import score
    config, module, params = _qwen(spec, train=True)
    batch = _prompts(config, data["ids"])
    settings = TokenLossSettings()
    arrays = tuple(jnp.asarray(data[k], jnp.int32 if k == "completions" else jnp.float32)
                   for k in ("completions", "mask", "old_logp", "ref_logp", "advantages"))

    def loss(p: Any, b: Any, completions: jax.Array, mask: jax.Array, old: jax.Array, ref: jax.Array,
             adv: jax.Array) -> jax.Array:
        logp = score(module, p, b, completions, 1.0, mask)
        return token_grpo_loss(logp, old, ref, mask, adv, settings)[0]

    return _training(spec, loss, (params, batch, *arrays))


def editor_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """Stage 2's gradient: the diffusion PPO loss (`rl.losses.diffusion_ppo_loss`, clip + KL to
    the reference mean) of the guided DDIM policy (eta 1) at N x K trained steps."""
    from rig_jax.diffusion import combine_guidance, gaussian_log_prob
    from rig_jax.diffusion.schedulers import ddim_mean
    from rig_jax.rl.losses import DiffusionLossSettings, diffusion_ppo_loss
    _, params, denoise = _unet(spec, train=True)
    dtype, schedule, settings, w = compute_dtype(spec), _schedule(), DiffusionLossSettings(), spec["guidance"]
    names = ("latents", "next_latents", "ref_mean", "t", "prev_t", "old_logp", "advantages", "cond", "uncond")
    arrays = tuple(jnp.asarray(data[k], jnp.int32 if k in ("t", "prev_t") else jnp.float32) for k in names)

    def loss(p: Any, x: jax.Array, nxt: jax.Array, ref: jax.Array, t: jax.Array, prev_t: jax.Array,
             old: jax.Array, adv: jax.Array, cond: jax.Array, uncond: jax.Array) -> jax.Array:
        n, k = old.shape
        flat = lambda a: a.reshape((n * k, *a.shape[2:]))
        x, nxt, ref, t, prev_t = flat(x), flat(nxt), flat(ref), flat(t), flat(prev_t)
        cond = jnp.repeat(cond, k, axis=0).astype(dtype)
        uncond = jnp.broadcast_to(uncond, cond.shape).astype(dtype)
        both = denoise(p, jnp.concatenate([x, x]).astype(dtype), jnp.concatenate([t, t]),
                       jnp.concatenate([uncond, cond])).astype(jnp.float32)
        mean, std = ddim_mean(schedule, combine_guidance(both[:n * k], both[n * k:], w), t, prev_t, x, 1.0)
        logp = gaussian_log_prob(nxt, mean, std).reshape(n, k)
        std_row = jnp.broadcast_to(std, mean.shape).reshape(n * k, -1)[:, 0].reshape(n, k)
        dist = jnp.mean(jnp.square(mean - ref), axis=tuple(range(1, mean.ndim))).reshape(n, k)
        return diffusion_ppo_loss(logp, old, adv, jnp.ones((n, k)), dist, std_row, settings)[0]

    return _training(spec, loss, (params, *arrays))


def train_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> JaxTask:
    """The U-Net's pretraining gradient: epsilon MSE at random timesteps."""
    _, params, denoise = _unet(spec, train=True)
    dtype = compute_dtype(spec)
    args = (params, *(jnp.asarray(data[k]) for k in ("clean", "noise", "alpha_bar")),
            jnp.asarray(data["t"], jnp.int32), jnp.asarray(data["cond"]))

    def loss(p: Any, clean: jax.Array, noise: jax.Array, alpha_bar: jax.Array, t: jax.Array,
             context: jax.Array) -> jax.Array:
        ab = alpha_bar[:, None, None, None]
        noisy = jnp.sqrt(ab) * clean + jnp.sqrt(1 - ab) * noise
        pred = denoise(p, noisy.astype(dtype), t, context.astype(dtype)).astype(jnp.float32)
        return jnp.mean((pred - noise) ** 2)

    return _training(spec, loss, args)


BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], JaxTask]] = {
    "sampler": sampler, "inversion": inversion, "decode": decode, "actor-step": actor_step,
    "editor-step": editor_step, "train-step": train_step}


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "num_devices": jax.device_count(), "jax": jax.__version__}


def device_peak_mib() -> float | None:
    """Peak device memory of the first device (None on CPU, whose figure is the RSS)."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if stats and "peak_bytes_in_use" in stats else None
