"""The Stable Diffusion 1.x / 2.x U-Net (diffusers' `UNet2DConditionModel` layout), NHWC.

Usage (what the samplers call):

    model = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    eps = model.apply({"params": params}, sample, timesteps, encoder_hidden_states)

- `sample`: `(batch, height, width, in_channels)` latents (NHWC; diffusers is NCHW).
- `timesteps`: `(batch,)` or a scalar (broadcast over the batch); ints or floats.
- `encoder_hidden_states`: `(batch, length, cross_attention_dim)` text embeddings.
- returns `(batch, height, width, out_channels)` in `dtype`: the network output
  (epsilon or v, whichever the checkpoint was trained for: that is the scheduler's business).

The module mirrors diffusers block for block, so a checkpoint maps onto it by an explicit
key table (rig_jax/weights/unet_keys.py); param names follow the diffusers names
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel` <->
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`). 1x1 projections
(`proj_in`/`proj_out`) are Dense layers whichever way the checkpoint stores them, so SD1
(1x1 conv) and SD2 (linear) checkpoints give the same param tree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError
from rig_jax.models.attention import dot_product_attention
from rig_jax.models.layers import (
    IMAGE_NAMES,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    dense,
    layer_norm,
)

TOKEN_NAMES = ("batch", "length", "channels")
TRANSFORMER_GROUPNORM_EPS = 1e-6  # diffusers' Transformer2DModel hard-codes it
TRANSFORMER_LAYERNORM_EPS = 1e-5  # the U-Net never passes norm_eps to its transformers
FF_MULT = 4

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

# Every argument of diffusers' UNet2DConditionModel.__init__, with its default there.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": MID_BLOCK_TYPE,
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Fields whose only supported value is diffusers' default (SDXL / Kandinsky / LCM /
# upscaler features, training-time dropout). A different value is a ConfigError.
_FIXED_FIELDS = (
    "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "num_attention_heads", "dual_cross_attention", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift", "time_embedding_type",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
    "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim", "attention_type",
    "class_embeddings_concat", "mid_block_type",
)
_FIXED_REASONS = {
    "num_attention_heads": "diffusers' UNet2DConditionModel itself refuses it; SD configs give the "
                           "head count as attention_head_dim",
    "mid_block_type": f"only {MID_BLOCK_TYPE} is built",
}
# Fields diffusers reads only for block types we do not build (Simple*/ResnetDownsample*):
# any value gives the same network here.
_INERT_FIELDS = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
                 "mid_block_only_cross_attention", "addition_embed_type_num_heads")


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _as_int(value: Any, field: str, source: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, f"field {field} must be an integer >= {minimum}, got {value!r}")
    return value


def _as_bool(value: Any, field: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, f"field {field} must be true or false, got {value!r}")
    return value


def _as_number(value: Any, field: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, f"field {field} must be a number, got {value!r}")
    return float(value)


def _per_block(value: Any, field: str, source: str, n: int) -> tuple[int, ...]:
    """An int or a list of `n` ints (diffusers' per-down-block fields)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise _fail(source, f"field {field} has {len(value)} entries for {n} down blocks")
        return tuple(_as_int(v, field, source) for v in value)
    return (_as_int(value, field, source),) * n


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One down, mid or up block, resolved from the config (channels, heads, resampling).

    `resnet_in_channels[j]` is the input width of resnet j, skip connection included, so the
    module and the key table agree on where 1x1 shortcut convolutions exist.
    """
    cross_attention: bool
    out_channels: int
    resnet_in_channels: tuple[int, ...]
    num_heads: int
    transformer_layers: int
    resample: bool  # downsample after a down block, upsample after an up block

    @property
    def num_attentions(self) -> int:
        if not self.cross_attention:
            return 0
        return len(self.resnet_in_channels) - 1 if self.is_mid else len(self.resnet_in_channels)

    @property
    def is_mid(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.out_channels // self.num_heads


@dataclasses.dataclass(frozen=True)
class MidBlockSpec(BlockSpec):
    @property
    def is_mid(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture of a UNet2DConditionModel (defaults: SD 1.5's).

    `attention_heads` is the number of attention heads per down block. diffusers' config
    calls it `attention_head_dim` (a historical misnomer: with `num_attention_heads` unset,
    which diffusers requires, `attention_head_dim` is the head count and the head width is
    `channels // heads`); `from_diffusers` translates. `gradient_checkpointing` is ours:
    it rematerialises each resnet and transformer block in the backward pass.
    """
    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[str, ...] = DIFFUSERS_DEFAULTS["down_block_types"]
    up_block_types: tuple[str, ...] = DIFFUSERS_DEFAULTS["up_block_types"]
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types", "layers_per_block",
                      "transformer_layers_per_block", "attention_heads"):
            if len(getattr(self, field)) != n:
                raise ConfigError(f"UNetConfig: field {field} has {len(getattr(self, field))} entries "
                                  f"for {n} blocks (block_out_channels)")
        for kind, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for t in getattr(self, kind):
                if t not in allowed:
                    raise ConfigError(f"UNetConfig: field {kind} has unsupported block {t!r}; "
                                      f"expected one of {allowed}")
        for c, heads in zip(self.block_out_channels, self.attention_heads, strict=True):
            if c % self.norm_num_groups:
                raise ConfigError(f"UNetConfig: field norm_num_groups={self.norm_num_groups} does not "
                                  f"divide block_out_channels entry {c}")
            if c // heads < 1:
                raise ConfigError(f"UNetConfig: field attention_head_dim gives {heads} heads for "
                                  f"{c} channels")

    # ---- parsing and export of diffusers' config.json --------------------------------

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], source: str = "config") -> UNetConfig:
        """Parses a diffusers UNet2DConditionModel config dict; `source` names the file.

        A field this implementation does not build with a non-default value (SDXL's
        `addition_embed_type`, `class_embed_type`, `time_cond_proj_dim`, ...) or a field
        diffusers does not have is a ConfigError naming it. Keys starting with `_` are
        diffusers metadata (`_class_name`, `_diffusers_version`, `_name_or_path`, ...), and the
        `_INERT_FIELDS` are accepted with any value (diffusers reads them only for block
        types this U-Net does not have).
        """
        if not isinstance(d, Mapping):
            raise _fail(source, f"expected a JSON object, got {type(d).__name__}")
        class_name = d.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise _fail(source, f"field _class_name is {class_name!r}; only UNet2DConditionModel "
                                "is supported")
        unknown = sorted(k for k in d if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
        if unknown:
            raise _fail(source, f"unknown field {unknown[0]} for UNet2DConditionModel")
        full = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}

        for field in _FIXED_FIELDS:
            default = DIFFUSERS_DEFAULTS[field]
            if full[field] != default or type(full[field]) is not type(default):
                reason = _FIXED_REASONS.get(field, "not supported by this implementation")
                raise _fail(source, f"unsupported field {field}={full[field]!r} (only {default!r}: "
                                    f"{reason})")

        channels = full["block_out_channels"]
        if not isinstance(channels, (list, tuple)) or not channels:
            raise _fail(source, f"field block_out_channels must be a non-empty list, got {channels!r}")
        channels = tuple(_as_int(c, "block_out_channels", source) for c in channels)
        n = len(channels)

        def block_types(field: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
            value = full[field]
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise _fail(source, f"field {field} must list {n} block types (one per "
                                    f"block_out_channels entry), got {value!r}")
            out = []
            for t in value:
                t = t[len("UNetRes"):] if isinstance(t, str) and t.startswith("UNetRes") else t
                if t not in allowed:
                    raise _fail(source, f"unsupported field {field} entry {t!r} (expected one of {allowed})")
                out.append(t)
            return tuple(out)

        down_types = block_types("down_block_types", DOWN_BLOCK_TYPES)
        up_types = block_types("up_block_types", UP_BLOCK_TYPES)

        only_cross = full["only_cross_attention"]
        flags = only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]
        if any(f is not False for f in flags):
            raise _fail(source, f"unsupported field only_cross_attention={only_cross!r} (only false)")
        if full["dropout"] != 0:
            raise _fail(source, f"unsupported field dropout={full['dropout']!r} (only 0: dropout is not "
                                "implemented)")
        if full["act_fn"] not in ("silu", "swish"):
            raise _fail(source, f"unsupported field act_fn={full['act_fn']!r} (only silu)")
        cross_dim = full["cross_attention_dim"]
        if isinstance(cross_dim, (list, tuple)):
            raise _fail(source, f"unsupported field cross_attention_dim={cross_dim!r} (one int for all "
                                "blocks)")
        groups = full["norm_num_groups"]
        if groups is None:
            raise _fail(source, "unsupported field norm_num_groups=None (GroupNorm is required)")
        sample_size = full["sample_size"]
        if isinstance(sample_size, (list, tuple)):
            sample_size = tuple(_as_int(s, "sample_size", source) for s in sample_size)
            if len(sample_size) != 2:
                raise _fail(source, f"field sample_size must be an int or [height, width], got "
                                    f"{full['sample_size']!r}")
        elif sample_size is not None:
            sample_size = _as_int(sample_size, "sample_size", source)
        scale = _as_number(full["mid_block_scale_factor"], "mid_block_scale_factor", source)
        if scale <= 0:
            raise _fail(source, f"field mid_block_scale_factor must be > 0, got {scale!r}")
        eps = _as_number(full["norm_eps"], "norm_eps", source)
        if eps <= 0:
            raise _fail(source, f"field norm_eps must be > 0, got {eps!r}")

        try:
            return cls(
                sample_size=sample_size,
                in_channels=_as_int(full["in_channels"], "in_channels", source),
                out_channels=_as_int(full["out_channels"], "out_channels", source),
                center_input_sample=_as_bool(full["center_input_sample"], "center_input_sample", source),
                flip_sin_to_cos=_as_bool(full["flip_sin_to_cos"], "flip_sin_to_cos", source),
                freq_shift=_as_number(full["freq_shift"], "freq_shift", source),
                down_block_types=down_types,
                up_block_types=up_types,
                block_out_channels=channels,
                layers_per_block=_per_block(full["layers_per_block"], "layers_per_block", source, n),
                downsample_padding=_as_int(full["downsample_padding"], "downsample_padding", source, 0),
                mid_block_scale_factor=scale,
                norm_num_groups=_as_int(groups, "norm_num_groups", source),
                norm_eps=eps,
                cross_attention_dim=_as_int(cross_dim, "cross_attention_dim", source),
                transformer_layers_per_block=_per_block(full["transformer_layers_per_block"],
                                                        "transformer_layers_per_block", source, n),
                attention_heads=_per_block(full["attention_head_dim"], "attention_head_dim", source, n),
                use_linear_projection=_as_bool(full["use_linear_projection"], "use_linear_projection",
                                               source),
                upcast_attention=_as_bool(full["upcast_attention"], "upcast_attention", source),
            )
        except ConfigError as e:
            raise _fail(source, str(e).removeprefix("UNetConfig: ")) from None

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict of this architecture (for `save_unet` and tests)."""
        size = self.sample_size
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": list(size) if isinstance(size, tuple) else size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": MID_BLOCK_TYPE,
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": list(self.layers_per_block),
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "attention_head_dim": list(self.attention_heads),
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
        }

    # ---- the resolved block structure (shared by the module and the key table) ------

    def down_block_specs(self) -> tuple[BlockSpec, ...]:
        specs = []
        prev = self.block_out_channels[0]
        last = len(self.block_out_channels) - 1
        for i, (kind, out) in enumerate(zip(self.down_block_types, self.block_out_channels, strict=True)):
            n = self.layers_per_block[i]
            specs.append(BlockSpec(
                cross_attention=kind == "CrossAttnDownBlock2D", out_channels=out,
                resnet_in_channels=(prev,) + (out,) * (n - 1), num_heads=self.attention_heads[i],
                transformer_layers=self.transformer_layers_per_block[i], resample=i != last))
            prev = out
        return tuple(specs)

    def mid_block_spec(self) -> MidBlockSpec:
        c = self.block_out_channels[-1]
        return MidBlockSpec(cross_attention=True, out_channels=c, resnet_in_channels=(c, c),
                            num_heads=self.attention_heads[-1],
                            transformer_layers=self.transformer_layers_per_block[-1], resample=False)

    def skip_channels(self) -> list[int]:
        """Widths of the skip connections the down path pushes, in push order."""
        skips = [self.block_out_channels[0]]
        for spec in self.down_block_specs():
            skips += [spec.out_channels] * (len(spec.resnet_in_channels) + int(spec.resample))
        return skips

    def up_block_specs(self) -> tuple[BlockSpec, ...]:
        skips = self.skip_channels()
        specs = []
        prev = self.block_out_channels[-1]
        n = len(self.block_out_channels)
        for i, kind in enumerate(self.up_block_types):
            r = n - 1 - i  # the matching down block
            out = self.block_out_channels[r]
            ins = []
            for j in range(self.layers_per_block[r] + 1):
                ins.append((prev if j == 0 else out) + skips.pop())
            specs.append(BlockSpec(
                cross_attention=kind == "CrossAttnUpBlock2D", out_channels=out,
                resnet_in_channels=tuple(ins), num_heads=self.attention_heads[r],
                transformer_layers=self.transformer_layers_per_block[r], resample=i != n - 1))
            prev = out
        if skips:
            raise ConfigError(f"UNetConfig: layers_per_block {self.layers_per_block} leaves "
                              f"{len(skips)} skip connections unused")
        return tuple(specs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ---- U-Net-only layers (those shared with the VAE are in rig_jax/models/layers.py) -----


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' sinusoidal `get_timestep_embedding`, in float32: `(batch,)` -> `(batch, dim)`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (`to_q`, `to_k`, `to_v`, `to_out_0`)."""
    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        b, lq, dim = x.shape
        lk = context.shape[1]
        q = dense(inner, ("embed", "heads"), "to_q", use_bias=False, **kw)(x)
        k = dense(inner, ("embed", "heads"), "to_k", use_bias=False, **kw)(context)
        v = dense(inner, ("embed", "heads"), "to_v", use_bias=False, **kw)(context)
        out = dot_product_attention(q.reshape(b, lq, self.num_heads, self.head_dim),
                                    k.reshape(b, lk, self.num_heads, self.head_dim),
                                    v.reshape(b, lk, self.num_heads, self.head_dim), upcast=self.upcast)
        return dense(dim, ("heads", "embed"), "to_out_0", **kw)(out.reshape(b, lq, inner))


class FeedForward(nn.Module):
    """GEGLU feed-forward (`net_0_proj` -> value * gelu(gate) -> `net_2`)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        dim = x.shape[-1]
        inner = dim * FF_MULT
        h = dense(2 * inner, ("embed", "mlp"), "net_0_proj", **kw)(x)
        value, gate = h[..., :inner], h[..., inner:]
        h = value * nn.gelu(gate, approximate=False)
        return dense(dim, ("mlp", "embed"), "net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = {"num_heads": self.num_heads, "head_dim": self.head_dim, "upcast": self.upcast, **kw}
        norm = lambda name: layer_norm(TRANSFORMER_LAYERNORM_EPS, name, **kw)
        x = x + Attention(name="attn1", **attn)(norm("norm1")(x))
        x = x + Attention(name="attn2", **attn)(norm("norm2")(x), context)
        x = x + FeedForward(name="ff", **kw)(norm("norm3")(x))
        return nn.with_logical_constraint(x, TOKEN_NAMES)


class Transformer2DModel(nn.Module):
    """GroupNorm, `proj_in`, transformer blocks over the H*W tokens, `proj_out`, residual."""
    num_heads: int
    head_dim: int
    num_layers: int
    groups: int
    upcast: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        tokens = GroupNorm(self.groups, TRANSFORMER_GROUPNORM_EPS, name="norm", **kw)(x)
        tokens = dense(inner, ("conv_in", "conv_out"), "proj_in", **kw)(tokens.reshape(b, h * w, c))
        tokens = nn.with_logical_constraint(tokens, TOKEN_NAMES)
        for i in range(self.num_layers):
            tokens = BasicTransformerBlock(self.num_heads, self.head_dim, self.upcast,
                                           name=f"transformer_blocks_{i}", **kw)(tokens, context)
        tokens = dense(c, ("conv_in", "conv_out"), "proj_out", **kw)(tokens)
        return nn.with_logical_constraint(tokens.reshape(b, h, w, c) + x.astype(self.dtype), IMAGE_NAMES)


# Gradient checkpointing: the same modules (same param names), rematerialised in backward.
_RematResnetBlock2D = nn.remat(ResnetBlock2D)
_RematTransformer2DModel = nn.remat(Transformer2DModel)


def _block_classes(config: UNetConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    if config.gradient_checkpointing:
        return _RematResnetBlock2D, _RematTransformer2DModel
    return ResnetBlock2D, Transformer2DModel


class _Block(nn.Module):
    """A down, mid or up block as described by a BlockSpec."""
    config: UNetConfig
    spec: BlockSpec
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _resnet(self, j: int) -> nn.Module:
        resnet_cls, _ = _block_classes(self.config)
        scale = self.config.mid_block_scale_factor if self.spec.is_mid else 1.0
        return resnet_cls(self.spec.out_channels, self.config.norm_num_groups, self.config.norm_eps, scale,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{j}")

    def _attention(self, j: int) -> nn.Module:
        _, transformer_cls = _block_classes(self.config)
        return transformer_cls(self.spec.num_heads, self.spec.head_dim, self.spec.transformer_layers,
                               self.config.norm_num_groups, self.config.upcast_attention,
                               dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{j}")


class DownBlock(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
                 ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(len(self.spec.resnet_in_channels)):
            x = self._resnet(j)(x, temb)
            if self.spec.cross_attention:
                x = self._attention(j)(x, context)
            skips.append(x)
        if self.spec.resample:
            x = Downsample2D(self.spec.out_channels, self.config.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self._resnet(0)(x, temb)
        for j in range(self.spec.num_attentions):
            x = self._attention(j)(x, context)
            x = self._resnet(j + 1)(x, temb)
        return x


class UpBlock(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_to: tuple[int, int] | None) -> jax.Array:
        for j, skip in enumerate(skips):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self._resnet(j)(x, temb)
            if self.spec.cross_attention:
                x = self._attention(j)(x, context)
        if self.spec.resample:
            x = Upsample2D(self.spec.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_to)
        return x


class UNet2DConditionModel(nn.Module):
    """`apply({"params": p}, sample (B,H,W,C), timesteps (B,) or (), context (B,L,D))`
    -> `(B,H,W,C_out)`; see the module docstring."""
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch = sample.shape[0]
        x = nn.with_logical_constraint(sample.astype(self.dtype), IMAGE_NAMES)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)

        c0 = cfg.block_out_channels[0]
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        emb = _TimestepEmbedding(4 * c0, name="time_embedding", **kw)(t_emb)

        x = conv2d(c0, 3, "conv_in", **kw)(x)
        skips = [x]
        for i, spec in enumerate(cfg.down_block_specs()):
            x, block_skips = DownBlock(cfg, spec, name=f"down_blocks_{i}", **kw)(x, emb, context)
            skips += block_skips
        x = MidBlock(cfg, cfg.mid_block_spec(), name="mid_block", **kw)(x, emb, context)
        for i, spec in enumerate(cfg.up_block_specs()):
            n = len(spec.resnet_in_channels)
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            upsample_to = tuple(skips[-1].shape[1:3]) if spec.resample else None
            x = UpBlock(cfg, spec, name=f"up_blocks_{i}", **kw)(x, block_skips, emb, context, upsample_to)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv2d(cfg.out_channels, 3, "conv_out", **kw)(x)
        return nn.with_logical_constraint(x, IMAGE_NAMES)


class _TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: `linear_1` -> SiLU -> `linear_2`."""
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.silu(dense(self.features, ("embed", "mlp"), "linear_1", **kw)(t_emb))
        return dense(self.features, ("mlp", "embed"), "linear_2", **kw)(h)


def example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None, length: int = 1
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero inputs of the right shapes, e.g. for `jax.eval_shape(model.init, rng, *inputs)`."""
    if size is None:
        size = 2 * config.downsample_factor
    return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, length, config.cross_attention_dim), jnp.float32))
