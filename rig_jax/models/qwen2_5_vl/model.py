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
from rig_jax.models.qwen2_5_vl.lm import Cache, TextConfig, TextModel
from rig_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTransformer, vision_inputs

# Fields that describe training, serving or provenance and do not change the forward pass.
_METADATA = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "initializer_range", "use_cache", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "_attn_implementation", "_attn_implementation_autoset",
    "vision_token_id", "max_window_layers", "sliding_window", "chunk_size_feed_forward",
    "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
}
_TOKEN_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id"}
_TEXT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act",
    "rope_parameters", "rope_scaling", "rope_theta", "use_sliding_window", "layer_types",
    "tie_word_embeddings", "head_dim",
}
_TOP_FIELDS = {"text_config", "vision_config", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"}
_VISION_FIELDS = {
    "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
    "in_chans", "patch_size", "spatial_patch_size", "temporal_patch_size", "spatial_merge_size",
    "window_size", "fullatt_block_indexes", "tokens_per_second", "hidden_act", "rope_parameters",
    "rope_theta",
}


def _int(d: Mapping[str, Any], field: str, source: str, minimum: int = 1) -> int:
    value = d[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: field {field} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(d: Mapping[str, Any], field: str, source: str) -> float:
    value = d[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{source}: field {field} must be a positive number, got {value!r}")
    return float(value)


def _unknown(d: Mapping[str, Any], known: set[str], source: str, where: str) -> None:
    extra = sorted(k for k in d if k not in known and k not in _METADATA and k not in _TOKEN_FIELDS)
    if extra:
        raise ConfigError(f"{source}: unsupported field {where}{extra[0]}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _token_ids(value: Any, field: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{source}: field {field} must be token ids, got {value!r}")
    return tuple(values)


def _text_config(d: Mapping[str, Any], top: Mapping[str, Any], source: str) -> TextConfig:
    if d is not top:  # the flat form's fields are checked with the top level
        _unknown(d, _TEXT_FIELDS, source, "text_config.")
    if d.get("use_sliding_window"):
        raise ConfigError(f"{source}: field use_sliding_window=true is not supported")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{source}: field layer_types holds {sorted(set(layer_types))}; only "
                          "full_attention is supported")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or top.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default/mrope only)")
    theta = rope.pop("rope_theta", d.get("rope_theta", top.get("rope_theta", 1000000.0)))
    section = rope.pop("mrope_section", None)
    if rope:
        raise ConfigError(f"{source}: unsupported rope parameter {sorted(rope)[0]}")
    if section is None:
        raise ConfigError(f"{source}: field rope_parameters.mrope_section is missing")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
        if field not in d:
            raise ConfigError(f"{source}: field {field} is missing")
    heads = _int(d, "num_attention_heads", source)
    kv_heads = heads if d.get("num_key_value_heads") is None else _int(d, "num_key_value_heads", source)
    cfg = TextConfig(
        vocab_size=_int(d, "vocab_size", source),
        hidden_size=_int(d, "hidden_size", source),
        intermediate_size=_int(d, "intermediate_size", source),
        num_hidden_layers=_int(d, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=_float(d, "rms_norm_eps", source) if "rms_norm_eps" in d else 1e-6,
        rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in section),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        hidden_act=str(d.get("hidden_act", "silu")),
    )
    if d.get("head_dim") not in (None, cfg.head_dim):
        raise ConfigError(f"{source}: field head_dim {d['head_dim']} differs from hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}, which is not supported")
    cfg.validate(source)
    return cfg


def _vision_config(d: Mapping[str, Any], source: str) -> VisionConfig:
    _unknown(d, _VISION_FIELDS, source, "vision_config.")
    for field in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        if field not in d:
            raise ConfigError(f"{source}: field vision_config.{field} is missing")
    rope = dict(d.get("rope_parameters") or {})
    rope_type = rope.pop("rope_type", "axial")
    if rope_type not in ("axial", "default"):
        raise ConfigError(f"{source}: vision rope type {rope_type!r} is not supported")
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if rope:
        raise ConfigError(f"{source}: unsupported vision rope parameter {sorted(rope)[0]}")
    defaults = VisionConfig()
    patch = int(d.get("patch_size", defaults.patch_size))
    if d.get("spatial_patch_size") not in (None, patch):
        raise ConfigError(f"{source}: field vision_config.spatial_patch_size differs from patch_size")
    cfg = VisionConfig(
        depth=_int(d, "depth", source),
        hidden_size=_int(d, "hidden_size", source),
        intermediate_size=_int(d, "intermediate_size", source),
        num_heads=_int(d, "num_heads", source),
        out_hidden_size=_int(d, "out_hidden_size", source),
        in_channels=int(d.get("in_channels", d.get("in_chans", defaults.in_channels))),
        patch_size=patch,
        temporal_patch_size=int(d.get("temporal_patch_size", defaults.temporal_patch_size)),
        spatial_merge_size=int(d.get("spatial_merge_size", defaults.spatial_merge_size)),
        window_size=int(d.get("window_size", defaults.window_size)),
        fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes",
                                                           defaults.fullatt_block_indexes)),
        tokens_per_second=int(d.get("tokens_per_second", defaults.tokens_per_second)),
        rope_theta=float(theta),
        hidden_act=str(d.get("hidden_act", defaults.hidden_act)),
    )
    cfg.validate(source)
    return cfg


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The whole model. `vision=None` is a text-only decoder (no vision params)."""
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

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], source: str = "config.json") -> Qwen25VLConfig:
        """Reads a transformers `config.json` dict, the nested (transformers >= 5) or the flat
        (hub, transformers 4) form. Unsupported fields raise ConfigError naming them."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        if d.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
            raise ConfigError(f"{source}: field model_type is {d['model_type']!r}, expected 'qwen2_5_vl'")
        nested = isinstance(d.get("text_config"), Mapping)
        text_d: Mapping[str, Any] = d["text_config"] if nested else d
        known_top = _TOP_FIELDS | ({"rope_scaling", "rope_theta"} if nested else _TEXT_FIELDS)
        _unknown(d, known_top, source, "")
        text = _text_config(text_d, d, source)
        if not isinstance(d.get("vision_config"), Mapping):
            raise ConfigError(f"{source}: field vision_config is missing")
        vision = _vision_config(d["vision_config"], source)
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(f"{source}: vision_config.out_hidden_size {vision.out_hidden_size} differs "
                              f"from the text hidden_size {text.hidden_size}")
        tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
        tokens = {k: text_d.get(k, d.get(k)) for k in _TOKEN_FIELDS}
        bos = _token_ids(tokens["bos_token_id"], "bos_token_id", source)
        pad = _token_ids(tokens["pad_token_id"], "pad_token_id", source)
        ids = {}
        for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if field in d:
                ids[field] = _int(d, field, source, minimum=0)
        return cls(text=text, vision=vision, tie_word_embeddings=tie,
                   bos_token_id=bos[0] if bos else None,
                   eos_token_ids=_token_ids(tokens["eos_token_id"], "eos_token_id", source),
                   pad_token_id=pad[0] if pad else None, **ids)


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
