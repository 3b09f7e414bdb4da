"""The Diffuser D of docs/method.md: prompt -> image with a Stable Diffusion pipeline.

Pure functions of `(pipe, params, inputs, rng)`. Tokenisation is host-side (the CLIP
tokenizer is Python); everything after it runs in jitted functions that are built once
per pipeline and compiled once per input shape (`pipe.cached`). Images are float32 NHWC
in [0, 1]; latents are NHWC and already multiplied by the VAE's `scaling_factor`, the
space the U-Net works in, as diffusers' pipelines keep them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.diffusion.sampler import DenoiseFn, sample, sharing_sample
from rig_jax.diffusion.settings import SamplerSettings
from rig_jax.errors import ConfigError, RigError
from rig_jax.models.clip_text import CLIPTextModel
from rig_jax.models.vae import AutoencoderKL, sample_latent
from rig_jax.weights.diffusers_pipeline import SDPipeline

# The unconditional ("negative") prompt of classifier-free guidance, as diffusers uses by default.
UNCONDITIONAL_PROMPT = ""


# ----------------------------------------------------------------------------- text

def as_texts(texts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{name}: expected a non-empty list of strings")
    return texts


def tokenize(pipe: SDPipeline, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (B, max_length), int32: padded to the tokenizer's
    model_max_length and truncated, exactly as diffusers' `encode_prompt` tokenises."""
    encoded = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.max_length, truncation=True,
                             return_tensors="np")
    return (np.asarray(encoded["input_ids"], np.int32), np.asarray(encoded["attention_mask"], np.int32))


def text_embeddings(pipe: SDPipeline, text_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """CLIP conditioning of token ids (traceable). The mask reaches the encoder only when its
    config asks for it (`use_attention_mask`), as in diffusers."""
    mask = mask if pipe.text_config.use_attention_mask else None
    return pipe.text_encoder.apply({"params": text_params}, ids, mask, layer=pipe.text_layer,
                                   method=CLIPTextModel.encode)


def encode_prompts(pipe: SDPipeline, params: Any, texts: str | Sequence[str]) -> jax.Array:
    """(B, max_length, D) text embeddings of `texts` (the empty prompt is the unconditional one)."""
    ids, mask = tokenize(pipe, as_texts(texts, "texts"))
    run = pipe.cached("encode_prompts", lambda: jax.jit(functools.partial(text_embeddings, pipe)))
    return run(params["text_encoder"], ids, mask)


# ----------------------------------------------------------------------------- images <-> latents

def _decode_unclipped(pipe: SDPipeline, vae_params: Any, latents: jax.Array) -> jax.Array:
    z = jnp.asarray(latents, jnp.float32) / pipe.vae_config.scaling_factor
    return pipe.vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode)


def _to_unit_range(decoded: jax.Array) -> jax.Array:
    return jnp.clip(decoded / 2.0 + 0.5, 0.0, 1.0)


def latents_to_images(pipe: SDPipeline, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents -> float32 images in [0, 1] (traceable): undo `scaling_factor`, decode,
    map [-1, 1] to [0, 1] and clip, as diffusers' image processor does."""
    return _to_unit_range(_decode_unclipped(pipe, vae_params, latents))


def images_to_latents(pipe: SDPipeline, vae_params: Any, images: jax.Array, rng: jax.Array | None
                      ) -> jax.Array:
    """Images in [0, 1] -> scaled latents (traceable): the posterior mean, or a draw when `rng`."""
    x = jnp.asarray(images, jnp.float32) * 2.0 - 1.0
    mean, logvar = pipe.vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode)
    z = mean if rng is None else sample_latent(mean, logvar, rng)
    return z.astype(jnp.float32) * pipe.vae_config.scaling_factor


def check_images(pipe: SDPipeline, images: Any, name: str = "images") -> None:
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != pipe.vae_config.in_channels:
        raise RigError(f"{name}: expected shape (batch, height, width, {pipe.vae_config.in_channels}), "
                       f"got {shape}")


def check_latents(pipe: SDPipeline, latents: Any, name: str = "latents") -> None:
    shape = tuple(np.shape(latents))
    if len(shape) != 4 or shape[-1] != pipe.latent_channels:
        raise RigError(f"{name}: expected shape (batch, height, width, {pipe.latent_channels}), got {shape}")


def decode_latents(pipe: SDPipeline, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, C) -> images float32 NHWC in [0, 1]."""
    check_latents(pipe, latents)
    run = pipe.cached("decode_latents", lambda: jax.jit(functools.partial(latents_to_images, pipe)))
    return run(params["vae"], latents)


def encode_images(pipe: SDPipeline, params: Any, images: jax.Array, rng: jax.Array | None = None
                  ) -> jax.Array:
    """Images float NHWC in [0, 1] -> scaled latents: the posterior mean, or a sample with `rng`."""
    check_images(pipe, images)
    run = pipe.cached("encode_images", lambda: jax.jit(functools.partial(images_to_latents, pipe)))
    return run(params["vae"], images, rng)


# ----------------------------------------------------------------------------- generation

def unet_denoiser(pipe: SDPipeline) -> DenoiseFn:
    """`denoise_fn(unet_params, x, t, context)` for the samplers, marked `sharing_sample`: under
    guidance they pass the latents once with both contexts and the U-Net runs the layers before
    its first cross-attention at the unguided batch (rig_jax/models/unet.py)."""
    def denoise(unet_params: Any, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return pipe.unet.apply({"params": unet_params}, x, t, context)
    return sharing_sample(denoise)


# What `generate(check_finite=True)` checks, in pipeline order: the first non-finite stage is the
# one at fault (NaN weights or an overflowing dtype there), every later one inherits it.
FINITE_STAGES = ("the initial latents", "the text encoder's embeddings", "the U-Net's denoised latents",
                 "the VAE decoder's images")


def _all_finite(*arrays: jax.Array | None) -> jax.Array:
    flags = [jnp.isfinite(a).all() for a in arrays if a is not None]
    return jnp.stack(flags).all()


def _generate_core(pipe: SDPipeline, settings: SamplerSettings, check_finite: bool, params: Any,
                   ids: jax.Array, mask: jax.Array, uncond_ids: jax.Array | None,
                   uncond_mask: jax.Array | None, latents: jax.Array, rng: jax.Array | None
                   ) -> tuple[jax.Array, ...]:
    cond = text_embeddings(pipe, params["text_encoder"], ids, mask)
    uncond = None if uncond_ids is None else text_embeddings(pipe, params["text_encoder"], uncond_ids,
                                                            uncond_mask)
    final = sample(unet_denoiser(pipe), params["unet"], latents, cond, uncond, pipe.schedule,
                   settings.num_steps, settings.guidance_scale, guidance_rescale=settings.guidance_rescale,
                   eta=settings.eta, rng=rng)
    decoded = _decode_unclipped(pipe, params["vae"], final)
    images = _to_unit_range(decoded)   # clipping would hide an Inf, so `decoded` is what is checked
    if not check_finite:
        return images, final
    finite = jnp.stack([_all_finite(latents), _all_finite(cond, uncond), _all_finite(final),
                        _all_finite(decoded)])
    return images, final, finite


class NonFiniteError(RigError):
    """A stage of the pipeline produced NaN or Inf: the result would be a wrong (black) image."""


def raise_if_not_finite(finite: Any, where: str = "generate") -> None:
    """A NonFiniteError naming the first stage of `FINITE_STAGES` whose output holds NaN or Inf
    (`finite`: one flag per stage, as `generate(check_finite=True)` computes them)."""
    flags = np.asarray(finite)
    if flags.all():
        return
    stage = FINITE_STAGES[int(np.argmin(flags))]
    cause = ("the starting noise holds NaN/Inf" if stage == FINITE_STAGES[0] else
             "its weights hold NaN/Inf, or the compute dtype overflows")
    raise NonFiniteError(f"{where}: {stage} are not finite ({cause}); no image was written")


def latent_shape(pipe: SDPipeline, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
    """(B, h, w, C) of the initial noise for images of `height` x `width` pixels."""
    default_h, default_w = pipe.default_size
    height, width = height or default_h, width or default_w
    factor = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            raise ConfigError(f"{name}: must be a positive multiple of the VAE factor {factor}, "
                              f"got {value!r}")
    return batch, height // factor, width // factor, pipe.latent_channels


def generate(pipe: SDPipeline, params: Any, prompts: str | Sequence[str], settings: SamplerSettings,
             rng: jax.Array | None = None, init_latents: jax.Array | None = None, height: int | None = None,
             width: int | None = None, return_latents: bool = False, check_finite: bool = False
             ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """I_0 = D(P): guided DDIM text-to-image, images float32 NHWC in [0, 1].

    The starting noise is `init_latents` (B, h, w, C) when given (exact reproduction; it is
    used as is, DDIM's initial noise sigma being 1), else drawn from `rng`. With `settings.eta
    > 0` the per-step noise comes from `rng` too. A guidance scale of 1 skips the
    unconditional half. `return_latents=True` also returns the final scaled latents.
    `check_finite=True` reduces each stage's output to one flag on the device (fetched once per
    call) and raises a NonFiniteError naming the first stage that holds NaN or Inf, so NaN weights or
    noise never come back as a black image. One program is compiled per pipeline, settings and
    input shape. Put `params` on the devices
    once (the loaders place them) before calling in a loop: host arrays are copied per call.
    """
    prompts = as_texts(prompts, "prompts")
    if not isinstance(settings, SamplerSettings):
        raise ConfigError(f"generate: settings must be a SamplerSettings, got {type(settings).__name__}")
    noise_rng = step_rng = None
    if rng is not None:
        noise_rng, step_rng = jax.random.split(rng)
    if init_latents is None:
        if rng is None:
            raise RigError("generate: pass `rng` or `init_latents`")
        latents = jax.random.normal(noise_rng, latent_shape(pipe, len(prompts), height, width), jnp.float32)
    else:
        check_latents(pipe, init_latents, "init_latents")
        if np.shape(init_latents)[0] != len(prompts):
            raise RigError(f"init_latents: batch {np.shape(init_latents)[0]} differs from "
                           f"{len(prompts)} prompts")
        latents = jnp.asarray(init_latents, jnp.float32)
    if settings.eta > 0 and step_rng is None:
        raise RigError("generate: eta > 0 needs `rng` for the per-step noise")
    ids, mask = tokenize(pipe, prompts)
    guided = settings.guidance_scale != 1.0
    uncond_ids, uncond_mask = tokenize(pipe, [UNCONDITIONAL_PROMPT]) if guided else (None, None)
    check_finite = bool(check_finite)
    run = pipe.cached(("generate", settings, check_finite), lambda: jax.jit(
        functools.partial(_generate_core, pipe, settings, check_finite)))
    images, final, *finite = run(params, ids, mask, uncond_ids, uncond_mask, latents,
                                 step_rng if settings.eta > 0 else None)
    if check_finite:
        raise_if_not_finite(finite[0])
    return (images, final) if return_latents else images
