"""The Inverse Diffuser E (Image Editor) of docs/method.md, on images.

`I_{k+1} = E(I_k, e_k, P)`: VAE-encode `I_k` (posterior mean), invert with deterministic
DDIM under the embedding of `P` up to t_s = strength * T (`EditSettings.inversion`,
optionally Null-text tuning of the unconditional embedding), re-denoise from t_s under
the embedding of `P + ". " + e_k` with `EditSettings.sampler` (eta > 0: the stage-2
Gaussian policy, noise from `rng`), and decode. The latent-space work is
`rig_jax.diffusion.edit_latents`; this module adds the text and the VAE around it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rig_jax.diffusion.edit import edit_latents
from rig_jax.diffusion.settings import EditSettings
from rig_jax.errors import ConfigError, RigError
from rig_jax.rig.diffuser import (
    UNCONDITIONAL_PROMPT,
    as_texts,
    check_images,
    images_to_latents,
    latents_to_images,
    text_embeddings,
    tokenize,
    unet_denoiser,
)
from rig_jax.weights.diffusers_pipeline import SDPipeline

EDIT_SEPARATOR = ". "


def edit_condition_text(prompt: str, edit_prompt: str) -> str:
    """The text the re-denoising is conditioned on: `P + ". " + e_k` (method.md)."""
    return prompt + EDIT_SEPARATOR + edit_prompt


def _edit_core(pipe: SDPipeline, settings: EditSettings, params: Any, images: jax.Array,
               prompt_ids: jax.Array, prompt_mask: jax.Array, edit_ids: jax.Array, edit_mask: jax.Array,
               uncond_ids: jax.Array, uncond_mask: jax.Array, rng: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]:
    text = params["text_encoder"]
    prompt_cond = text_embeddings(pipe, text, prompt_ids, prompt_mask)
    edit_cond = text_embeddings(pipe, text, edit_ids, edit_mask)
    uncond = text_embeddings(pipe, text, uncond_ids, uncond_mask)   # (1, L, D), broadcast by the sampler
    latents = images_to_latents(pipe, params["vae"], images, None)
    edited = edit_latents(unet_denoiser(pipe), params["unet"], latents, prompt_cond, edit_cond, uncond,
                          pipe.schedule, settings, rng=rng)
    return latents_to_images(pipe, params["vae"], edited), edited


def edit(pipe: SDPipeline, params: Any, images: jax.Array, edit_prompts: str | Sequence[str],
         prompts: str | Sequence[str], settings: EditSettings, rng: jax.Array | None = None,
         return_latents: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Edited images float32 NHWC in [0, 1], one per input image.

    `images` (B, H, W, 3) in [0, 1]; `prompts` P and `edit_prompts` e_k, one each per image
    (a single string is used for every image). `settings.strength` in [0, 1]: 0 returns the
    VAE round trip of the input, 1 regenerates from the fully inverted noise. `eta > 0` needs
    `rng`. `return_latents=True` also returns the edited scaled latents. One program is
    compiled per pipeline, settings and input shape.
    """
    if not isinstance(settings, EditSettings):
        raise ConfigError(f"edit: settings must be an EditSettings, got {type(settings).__name__}")
    check_images(pipe, images)
    batch = images.shape[0]

    def per_image(texts: str | Sequence[str], name: str) -> list[str]:
        texts = as_texts(texts, name)
        if len(texts) == 1:
            texts = texts * batch
        if len(texts) != batch:
            raise RigError(f"{name}: {len(texts)} texts for {batch} images")
        return texts

    prompts = per_image(prompts, "prompts")
    edit_prompts = per_image(edit_prompts, "edit_prompts")
    stochastic = settings.sampler.eta > 0
    if stochastic and rng is None:
        raise RigError("edit: eta > 0 needs `rng` for the per-step noise")
    prompt_ids, prompt_mask = tokenize(pipe, prompts)
    edit_texts = [edit_condition_text(p, e) for p, e in zip(prompts, edit_prompts, strict=True)]
    edit_ids, edit_mask = tokenize(pipe, edit_texts)
    uncond_ids, uncond_mask = tokenize(pipe, [UNCONDITIONAL_PROMPT])
    run = pipe.cached(("edit", settings), lambda: jax.jit(functools.partial(_edit_core, pipe, settings)))
    edited, latents = run(params, jnp.asarray(images, jnp.float32), prompt_ids, prompt_mask, edit_ids,
                          edit_mask, uncond_ids, uncond_mask, rng if stochastic else None)
    return (edited, latents) if return_latents else edited
