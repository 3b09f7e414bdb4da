"""The PyTorch side of each bench: what a user would otherwise run, on the same saved weights.

diffusers' `UNet2DConditionModel` with `DDIMScheduler` (StableDiffusionPipeline's guided loop)
and `DDIMInverseScheduler`; transformers' `generate`; torch autograd on the same losses as
rig_jax (written out here in torch, term by term as rig_jax/rl/losses.py). Each builder returns
`(run, outputs, info)`: `run()` is the timed call, `outputs(result)` the arrays compared with
rig_jax's (NHWC), computed outside the timed call."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from rig_jax.bench.models import SD_SCHEDULER

TorchTask = tuple[Callable[[], Any], Callable[[Any], dict[str, np.ndarray]], dict[str, Any]]


def _torch(spec: dict[str, Any]) -> Any:
    import torch
    torch.set_num_threads(spec["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier bench in this worker
        pass
    return torch


def _device(spec: dict[str, Any]) -> str:
    return "cuda" if spec["device"] == "gpu" else "cpu"


def _dtype(spec: dict[str, Any]) -> Any:
    import torch
    if spec["dtype"] == "fp32":
        return torch.float32
    return torch.float16 if spec["device"] == "gpu" and spec["bench"] in ("sampler", "inversion") \
        else torch.bfloat16


def _sync(spec: dict[str, Any]) -> None:
    if spec["device"] == "gpu":
        import torch
        torch.cuda.synchronize()


def _nchw(torch: Any, a: np.ndarray, device: str, dtype: Any = None) -> Any:
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -4 if a.ndim == 5 else 1)))
    return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)


def _nhwc(x: Any) -> np.ndarray:
    return np.moveaxis(x.float().cpu().numpy(), 1 if x.ndim == 4 else 2, -1)


def _unet(spec: dict[str, Any], train: bool) -> tuple[Any, dict[str, Any]]:
    import diffusers
    unet = diffusers.UNet2DConditionModel.from_pretrained(spec["folder"])
    unet = unet.to(_device(spec)) if train else unet.to(device=_device(spec), dtype=_dtype(spec))
    unet = unet.train() if train else unet.eval()
    attn = type(next(iter(unet.attn_processors.values()))).__name__
    return unet, {"diffusers": diffusers.__version__, "attn_processor": attn}


def _training(spec: dict[str, Any], model: Any, loss_fn: Callable[[], Any], info: dict[str, Any]
              ) -> TorchTask:
    """The timed call of a training bench: zero_grad, the loss, backward (with `forward_only`:
    the loss alone under no_grad, the split that says where a step's time goes)."""
    import torch

    def run() -> Any:
        if spec.get("forward_only"):
            with torch.no_grad():
                loss = loss_fn()
        else:
            model.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
        _sync(spec)
        return loss.detach()

    def outputs(loss: Any) -> dict[str, np.ndarray]:
        if spec.get("forward_only"):
            return {"loss": np.asarray(float(loss))}
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()
                             if p.grad is not None))
        return {"loss": np.asarray(float(loss)), "grad_norm": np.asarray(norm)}

    return run, outputs, info


def sampler(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    from diffusers import DDIMScheduler
    torch = _torch(spec)
    unet, info = _unet(spec, train=False)
    dev, dt = _device(spec), _dtype(spec)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    x_t = _nchw(torch, data["latents"], dev)
    cond, uncond = (torch.from_numpy(data[k]).to(dev, dt) for k in ("cond", "uncond"))
    context = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    w = spec["guidance"]

    def run() -> Any:  # StableDiffusionPipeline's denoising loop
        with torch.inference_mode():
            scheduler.set_timesteps(spec["steps"])
            x = x_t
            for t in scheduler.timesteps:
                eps = unet(torch.cat([x] * 2).to(dt), t, encoder_hidden_states=context, return_dict=False)[0]
                eps_u, eps_c = eps.float().chunk(2)
                x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0, return_dict=False)[0]
        _sync(spec)
        return x

    return run, lambda x: {"latents": _nhwc(x)}, info


def inversion(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    torch = _torch(spec)
    unet, info = _unet(spec, train=False)
    dev, dt = _device(spec), _dtype(spec)
    scheduler = DDIMInverseScheduler.from_config(DDIMScheduler(**SD_SCHEDULER).config)
    clean = _nchw(torch, data["clean"], dev)
    cond = torch.from_numpy(data["cond"]).to(dev, dt)

    def run() -> Any:
        with torch.inference_mode():
            scheduler.set_timesteps(spec["steps"])
            x = clean
            for t in scheduler.timesteps:
                eps = unet(x.to(dt), t, encoder_hidden_states=cond, return_dict=False)[0]
                x = scheduler.step(eps.float(), t, x, return_dict=False)[0]
        _sync(spec)
        return x

    return run, lambda x: {"latents": _nhwc(x)}, info


def _qwen(spec: dict[str, Any], train: bool) -> tuple[Any, dict[str, Any]]:
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch = _torch(spec)
    dtype = torch.float32 if train or spec["dtype"] == "fp32" else torch.bfloat16
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype).to(_device(spec))
    hf = hf.train() if train else hf.eval()
    return hf, {"transformers": transformers.__version__, "attn": hf.config._attn_implementation}


def decode(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    torch = _torch(spec)
    hf, info = _qwen(spec, train=False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.from_numpy(data["ids"]).to(_device(spec))
    mask, new = torch.ones_like(ids), spec["new_tokens"]

    def run() -> Any:
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        _sync(spec)
        return out[:, ids.shape[1]:]

    return run, lambda out: {"tokens": out.cpu().numpy().astype(np.int32)}, info


def actor_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    """rl.losses.token_grpo_loss (token aggregation, eps 0.2, beta 0.04) on HF's log-probs."""
    torch = _torch(spec)
    hf, info = _qwen(spec, train=True)
    dev = _device(spec)
    ids, comps = (torch.from_numpy(data[k]).to(dev) for k in ("ids", "completions"))
    mask, old, ref, adv = (torch.from_numpy(data[k]).to(dev)
                           for k in ("mask", "old_logp", "ref_logp", "advantages"))
    full = torch.cat([ids, comps], dim=1)
    attention = torch.ones_like(full)
    c = comps.shape[1]
    valid = mask > 0
    eps, beta = 0.2, 0.04

    def loss_fn() -> Any:
        logits = hf(input_ids=full, attention_mask=attention, logits_to_keep=c + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, comps[..., None])[..., 0]
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        log_ratio = torch.where(valid, logp - old, torch.zeros_like(logp))
        ratio = torch.exp(log_ratio)
        a = adv[:, None]
        policy = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
        ref_minus = torch.where(valid, ref - logp, torch.zeros_like(logp))
        k3 = torch.exp(ref_minus) - ref_minus - 1
        total = torch.where(valid, policy + beta * k3, torch.zeros_like(logp)).sum()
        return total / valid.float().sum().clamp(min=1)

    return _training(spec, hf, loss_fn, info)


def editor_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    """rl.losses.diffusion_ppo_loss (clip 1e-4, beta 0.01) of the guided DDIM policy, eta 1."""
    from diffusers import DDIMScheduler
    torch = _torch(spec)
    unet, info = _unet(spec, train=True)
    dev, w, clip, beta = _device(spec), spec["guidance"], 1e-4, 0.01
    alphas = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod.to(dev)
    n, k = data["old_logp"].shape
    flat = lambda a: torch.from_numpy(a.reshape((n * k, *a.shape[2:]))).to(dev)
    x, nxt, ref = (flat(np.ascontiguousarray(np.moveaxis(data[key], -1, 2))) for key in
                   ("latents", "next_latents", "ref_mean"))
    t, prev_t = flat(data["t"]), flat(data["prev_t"])
    old, adv = torch.from_numpy(data["old_logp"]).to(dev), torch.from_numpy(data["advantages"]).to(dev)
    cond = torch.from_numpy(np.repeat(data["cond"], k, axis=0)).to(dev)
    context = torch.cat([torch.from_numpy(data["uncond"]).to(dev).expand(n * k, -1, -1), cond])
    view = lambda v: v.view(-1, 1, 1, 1)
    a_t, a_prev = view(alphas[t].float()), view(alphas[prev_t].float())
    std = torch.sqrt(((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0))

    def loss_fn() -> Any:
        both = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=context, return_dict=False)[0]
        eps_u, eps_c = both.chunk(2)
        eps = eps_u + w * (eps_c - eps_u)
        x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
        mean = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - std ** 2).clamp(min=0)) * eps
        density = -((nxt - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        logp = density.mean(dim=(1, 2, 3)).view(n, k)
        ratio = torch.exp(logp - old)
        a = adv[:, None]
        policy = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
        kl = ((mean - ref) ** 2).mean(dim=(1, 2, 3)).view(n, k) / (2 * std.view(n, k) ** 2)
        return (policy + beta * kl).mean()

    return _training(spec, unet, loss_fn, info)


def train_step(spec: dict[str, Any], data: dict[str, np.ndarray]) -> TorchTask:
    torch = _torch(spec)
    unet, info = _unet(spec, train=True)
    dev = _device(spec)
    clean, noise = (_nchw(torch, data[k], dev) for k in ("clean", "noise"))
    ab = torch.from_numpy(data["alpha_bar"]).to(dev).view(-1, 1, 1, 1)
    t, cond = torch.from_numpy(data["t"]).to(dev), torch.from_numpy(data["cond"]).to(dev)

    def loss_fn() -> Any:
        noisy = ab.sqrt() * clean + (1 - ab).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred, noise)

    return _training(spec, unet, loss_fn, info)


BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], TorchTask]] = {
    "sampler": sampler, "inversion": inversion, "decode": decode, "actor-step": actor_step,
    "editor-step": editor_step, "train-step": train_step}


def device_info(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    name = torch.cuda.get_device_name() if spec["device"] == "gpu" else "cpu"
    return {"torch": torch.__version__, "torch_device": name, "torch_threads": torch.get_num_threads()}


def device_peak_mib(spec: dict[str, Any]) -> float | None:
    if spec["device"] != "gpu":
        return None
    import torch
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
