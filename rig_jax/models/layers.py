"""Layers the models share: convolution, GroupNorm, ResNet and resampling for the U-Net and
the VAE (NHWC); dense, RMSNorm, rotary helpers and activations for the transformers.

Both networks are built by diffusers from the same pieces (`ResnetBlock2D`, `Downsample2D`,
`Upsample2D`); one implementation keeps their numerics, their sharding names and their
diffusers param names (which the key tables in rig_jax/weights rely on) in step. Where
diffusers configures the pieces differently per model (GroupNorm eps, downsample padding,
the time embedding), the difference is a parameter here and each caller passes its value.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError

CONV_NAMES = (None, None, "conv_in", "conv_out")
IMAGE_NAMES = ("batch", "height", "width", "channels")


def dense(features: int, names: tuple[str | None, str | None], name: str | None, dtype: Any,
          param_dtype: Any, use_bias: bool = True,
          kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()) -> nn.Dense:
    """A Dense layer whose kernel carries the logical axis `names` (in, out) and bias `names[-1]`.
    Every model's dense layers come from here (U-Net, VAE, CLIP, the VLM)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]))


def conv2d(features: int, kernel: int, name: str | None, dtype: Any, param_dtype: Any, stride: int = 1,
           padding: Any = None) -> nn.Conv:
    """A square convolution with PyTorch's symmetric `kernel // 2` padding unless `padding` is given."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_NAMES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or NLC) with float32 statistics (E[(x - mean)^2], like PyTorch),
    written out so that XLA fuses it with the SiLU that usually follows. `epsilon` has no
    default: diffusers uses 1e-6 in some places and the config's `norm_eps` in others."""
    num_groups: int
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (c,), self.param_dtype)
        # Statistics reduce over the spatial axes per channel first, then over the channels of a
        # group: the same E[(x - mean)^2], but XLA's CPU backend runs two small reductions 2x
        # faster than one over a (..., groups, channels/group) reshape.
        x32 = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))

        def group_mean(per_channel: jax.Array) -> jax.Array:
            grouped = per_channel.reshape(per_channel.shape[:-1] + (self.num_groups, -1))
            means = grouped.mean(-1, keepdims=True)
            return jnp.broadcast_to(means, grouped.shape).reshape(per_channel.shape)

        centred = x32 - group_mean(x32.mean(spatial, keepdims=True))
        var = group_mean(jnp.square(centred).mean(spatial, keepdims=True))
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        return (centred * inv + bias.astype(jnp.float32)).astype(self.dtype)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's `F.interpolate(mode="nearest")` to `size` (NHWC); a plain repeat for x2."""
    b, h, w, c = x.shape
    if size == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n_in - 1)

    return x[:, index(h, size[0])][:, :, index(w, size[1])]


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default"): GroupNorm-SiLU-conv twice,
    the projected time embedding added in between, a 1x1 `conv_shortcut` when the width
    changes, and the sum divided by `output_scale_factor`.

    Called without `temb` it is diffusers' block with `temb_channels=None` (the VAE's): no
    `time_emb_proj` param is created.
    """
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv2d(self.out_channels, 3, "conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "conv_out"), "time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv2d(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, "conv_shortcut", **kw)(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return nn.with_logical_constraint(out, IMAGE_NAMES)


class Downsample2D(nn.Module):
    """diffusers' Downsample2D with a conv: a stride-2 3x3 `conv`.

    `padding` is diffusers' `padding` argument: p > 0 pads p on every side; 0 pads only the
    right and bottom by 1 (the VAE always passes 0; the U-Net passes `downsample_padding`,
    1 in every SD config).
    """
    channels: int
    padding: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        padding = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        x = conv2d(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=padding)(x)
        return nn.with_logical_constraint(x, IMAGE_NAMES)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D with a conv: nearest-neighbour resize, then a 3x3 `conv`.

    The resize is 2x unless `size` is given (the U-Net passes its skip connection's size,
    which differs from 2x when a side was odd on the way down).
    """
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        x = conv2d(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)
        return nn.with_logical_constraint(x, IMAGE_NAMES)


# ---- what the transformers share (CLIP, the Qwen2.5-VL decoder and vision tower) ----------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def activation(name: str, source: str = "config") -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (`hidden_act`, `act_fn`); an unknown name is a
    ConfigError naming `source`, so a model never runs with a silently substituted one."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {name!r} is not supported (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """x / rms(x) * scale, statistics in float32 (Qwen's RMSNorm, also T5's)."""
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1) on the last axis: the rotation half of rotary embeddings."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary position embedding `x * cos + rotate_half(x) * sin` (cos/sin broadcast to x)."""
    return x * cos + rotate_half(x) * sin


def layer_norm(epsilon: float, name: str | None, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    """PyTorch's LayerNorm (E[(x - mean)^2] variance) with logically named scale and bias."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))
