"""Qwen2.5-VL: the vision tower's features scattered into the decoder's token embeddings.

`Qwen25VL.__call__` is one forward pass: embed tokens, run the vision tower on the packed
`pixel_values` (with the host-side index arrays of `vision_inputs`), replace the embeddings
of the image-placeholder tokens by the image features in order, run the decoder with the
given 3-D M-RoPE `position_ids` (rig_jax/vlm/processor.py computes them), and project to
float32 logits. The same call serves prefill and decoding steps through an explicit cache.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.models.layers import cpu_matmul, flat_tokens_on_cpu
from rig_jax.models.qwen2_5_vl.lm import Cache, TextConfig, TextModel
from rig_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTransformer, vision_inputs


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The whole model. `vision=None` is a text-only decoder (no vision params). Read from a
    transformers `config.json` by `rig_jax.weights.qwen2_5_vl.qwen_vl_config_from_hf`."""
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """Replaces the embeddings at image-token positions (row-major over the batch) by the
    feature rows in order, as transformers' `masked_scatter` does. Surplus feature rows
    (padding) are ignored."""
    b, length, dim = embeds.shape
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    gathered = features.astype(embeds.dtype)[index]
    return jnp.where(flat[:, None], gathered, embeds.reshape(-1, dim)).reshape(b, length, dim)


class Qwen25VL(nn.Module):
    """Qwen2_5_VLForConditionalGeneration in Linen.

    Params: `visual/...` (absent when `config.vision` is None), `language_model/...`, and
    `lm_head/kernel` unless the embeddings are tied.
    """
    config: Qwen25VLConfig
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if self.config.vision is not None:
            self.visual = VisionTransformer(self.config.vision, name="visual", **kw)
        self.language_model = TextModel(self.config.text, name="language_model", **kw)
        if not self.config.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
                (self.config.text.hidden_size, self.config.text.vocab_size), self.param_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits (the products accumulate in float32 even under bf16 compute, so
        log-probs for GRPO ratios are not rounded to bf16)."""
        if self.config.tie_word_embeddings:
            return self.language_model.attend(hidden)
        if flat_tokens_on_cpu(hidden):
            # 2-D on one CPU device: XLA then forms lm_head's gradient from the logits'
            # cotangent as it lies (with (B, L, D) it wrote that cotangent transposed first),
            # through YNNPACK (`cpu_matmul`)
            flat = cpu_matmul(hidden.reshape(-1, hidden.shape[-1]).astype(self.dtype),
                              self.lm_head.astype(self.dtype), jnp.float32)
            return flat.reshape(*hidden.shape[:-1], flat.shape[-1])
        return jnp.einsum("bld,dv->blv", hidden.astype(self.dtype), self.lm_head.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 pixel_values: jax.Array | None = None, vision: Mapping[str, jax.Array] | None = None,
                 cache: Cache | None = None, logits_slice: tuple[int, int] | None = None,
                 image_mask: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """input_ids (B, L), position_ids (3, B, L), attention_mask (B, L) (left padding),
        optional pixel_values (N, patch_dim) with `vision` = `vision_inputs(image_grid_thw)`,
        optional cache. `logits_slice=(start, length)` computes logits only for those
        positions (the vocabulary projection dominates memory for long inputs). `image_mask`
        (B, L) marks the positions that take image features (default: the image token id).

        Returns (logits float32 (B, L or length, vocab), updated cache or None)."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None:
            if self.config.vision is None:
                raise ConfigError("Qwen25VL: pixel_values given to a text-only model (config.vision is None)")
            features = self.visual(pixel_values, vision)
            if image_mask is None:
                image_mask = input_ids == self.config.image_token_id
            embeds = scatter_image_features(embeds, image_mask, features)
        hidden, cache = self.language_model(embeds, position_ids, attention_mask, cache)
        if logits_slice is not None:
            start, length = logits_slice
            hidden = hidden[:, start:start + length]
        return self.logits(hidden), cache


def dummy_inputs(config: Qwen25VLConfig, batch: int = 1, length: int = 8) -> dict[str, Any]:
    """Small inputs that touch every param (for `init` / `jax.eval_shape`)."""
    out: dict[str, Any] = {
        "input_ids": jnp.zeros((batch, length), jnp.int32),
        "position_ids": jnp.zeros((3, batch, length), jnp.int32),
        "attention_mask": jnp.ones((batch, length), jnp.int32),
    }
    if config.vision is not None:
        m = config.vision.spatial_merge_size
        grid = np.array([[1, m, m]])
        out["pixel_values"] = jnp.zeros((m * m, config.vision.patch_dim), jnp.float32)
        out["vision"] = {k: jnp.asarray(v) for k, v in vision_inputs(grid, config.vision).items()}
    return out
