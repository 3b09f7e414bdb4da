"""Layers the models share: convolution, GroupNorm, ResNet and resampling for the U-Net and
the VAE (NHWC); dense, RMSNorm, rotary helpers and activations for the transformers.

Both networks are built by diffusers from the same pieces (`ResnetBlock2D`, `Downsample2D`,
`Upsample2D`); one implementation keeps their numerics, their sharding names and their
diffusers param names (which the key tables in rig_jax/weights rely on) in step. Where
diffusers configures the pieces differently per model (GroupNorm eps, downsample padding,
the time embedding), the difference is a parameter here and each caller passes its value.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from rig_jax.errors import ConfigError

CONV_NAMES = (None, None, "conv_in", "conv_out")
_NHWC = ("NHWC", "HWIO", "NHWC")
IMAGE_NAMES = ("batch", "height", "width", "channels")


def flat_tokens_on_cpu(x: jax.Array) -> bool:
    """Whether a matmul over `x`'s last axis should see `x` as 2-D `(tokens, features)`: on a
    single CPU device XLA then computes the weight gradient `x^T g` as one dot of the two
    arrays as they are, where with `(batch, length, features)` it first copies `g` transposed,
    fused into its producer as a strided loop (flattening: U-Net train step ~10% faster)."""
    return x.ndim > 2 and single_cpu()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_matmul(x: jax.Array, kernel: jax.Array, out_dtype: Any = None) -> jax.Array:
    """`x @ kernel` of a 2-D `x` (`out_dtype`: the product's accumulation and result type, as
    `preferred_element_type`), whose kernel gradient XLA:CPU runs through YNNPACK.

    Autodiff writes the kernel's gradient `x^T g` as a dot contracting both operands over their
    first axis (the tokens); XLA:CPU sends that form to its generic dot (Eigen), not YNNPACK.
    The backward here first copies the narrower of `x` and `g` transposed into its own buffer
    (the barriers keep XLA from folding a transpose back into the dot), so the product is a plain
    one: `x^T g` when the layer widens, `(g^T x)^T` when it does not. Measured on one AMD EPYC
    core, kernel gradient with `x` an elementwise product as in the models (ms, autodiff's form
    -> this): 1024 tokens 256 -> 1024 12.2 -> 7.6, 1024 -> 256 11.1 -> 7.8, 256 -> 2048 24.2 -> 14.0;
    4096 tokens 256 -> 64 4.4 -> 3.4, 64 -> 512 4.5 -> 4.9 (the one loss seen)."""
    return jnp.dot(x, kernel, preferred_element_type=out_dtype)


def _cpu_matmul_forward(x: jax.Array, kernel: jax.Array, out_dtype: Any
                        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return cpu_matmul(x, kernel, out_dtype), (x, kernel)


def _cpu_matmul_backward(out_dtype: Any, residuals: tuple[jax.Array, jax.Array], g: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    barrier = jax.lax.optimization_barrier
    dx = jnp.dot(g, kernel.T.astype(g.dtype)).astype(x.dtype)
    if kernel.shape[1] > kernel.shape[0]:
        dkernel = jnp.dot(barrier(x.T).astype(g.dtype), g)
    else:
        dkernel = barrier(jnp.dot(barrier(g.T), x.astype(g.dtype))).T
    return dx, dkernel.astype(kernel.dtype)


cpu_matmul.defvjp(_cpu_matmul_forward, _cpu_matmul_backward)


def single_cpu() -> bool:
    """Whether this program runs on one CPU device (the case the CPU forms here are for)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


class Dense(nn.Dense):
    """`nn.Dense` (same params); on a single CPU device the input is flattened to 2-D
    (`flat_tokens_on_cpu`) and multiplied by `cpu_matmul`, whose kernel gradient takes XLA:CPU's
    fast path."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not single_cpu() or inputs.ndim < 2 or self.precision is not None \
                or self.dot_general is not None or self.dot_general_cls is not None:
            return super().__call__(inputs)
        flat = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.param("kernel", self.kernel_init, (flat.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        flat, kernel, bias = self.promote_dtype(flat, kernel, bias, dtype=self.dtype)
        out = cpu_matmul(flat, kernel)
        if bias is not None:
            out = out + bias[None, :]
        return out.reshape(*inputs.shape[:-1], out.shape[-1])


def dense(features: int, names: tuple[str | None, str | None], name: str | None, dtype: Any,
          param_dtype: Any, use_bias: bool = True,
          kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()) -> nn.Dense:
    """A Dense layer whose kernel carries the logical axis `names` (in, out) and bias `names[-1]`.
    Every model's dense layers come from here (U-Net, VAE, CLIP, the VLM)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
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


def _group_mean(per_channel: jax.Array, groups: int) -> jax.Array:
    """Mean over the channels of each group of `(..., channels)`, broadcast back per channel."""
    grouped = per_channel.reshape(per_channel.shape[:-1] + (groups, -1))
    means = grouped.mean(-1, keepdims=True)
    return jnp.broadcast_to(means, grouped.shape).reshape(per_channel.shape)


def _group_stats(x32: jax.Array, groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Per-sample, per-channel (broadcastable) mean and 1/std of float32 `x32`'s groups:
    E[(x - mean)^2] like PyTorch. The statistics reduce over the spatial axes per channel
    first, then over the channels of a group: the same sums, but XLA's CPU backend runs two
    small reductions 2x faster than one over a (..., groups, channels/group) reshape."""
    spatial = tuple(range(1, x32.ndim - 1))
    mean = _group_mean(x32.mean(spatial, keepdims=True), groups)
    var = _group_mean(jnp.square(x32 - mean).mean(spatial, keepdims=True), groups)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_cpu(x32: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
                    silu: bool) -> jax.Array:
    return _group_norm_cpu_forward(x32, scale, bias, groups, epsilon, silu)[0]


def _group_norm_cpu_forward(x32: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
                            silu: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    mean, inv = _group_stats(x32, groups, epsilon)
    y = (x32 - mean) * (inv * scale) + bias
    return (nn.silu(y) if silu else y), (x32, mean, inv, scale, bias)


def _group_norm_cpu_backward(groups: int, epsilon: float, silu: bool, residuals: tuple[jax.Array, ...],
                             g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The analytic gradient from the saved input and statistics: x_hat (and the SiLU's
    input) recomputed, dx = inv * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)) per
    group, with dx_hat = g * scale. Only two reductions over the activation, the per-sample,
    per-channel sums of g and g * x_hat; the scale, bias and group means all derive from them."""
    x32, mean, inv, scale, bias = residuals
    x_hat = (x32 - mean) * inv
    if silu:
        y = x_hat * scale + bias
        sig = jax.nn.sigmoid(y)
        g = g * sig * (1 + y * (1 - sig))
    spatial = tuple(range(1, x32.ndim - 1))
    sum_g, sum_g_x_hat = g.sum(spatial, keepdims=True), (g * x_hat).sum(spatial, keepdims=True)
    n = np.prod([x32.shape[a] for a in spatial])
    m1 = _group_mean(sum_g * scale, groups) / n
    m2 = _group_mean(sum_g_x_hat * scale, groups) / n
    dx = inv * (g * scale - m1 - x_hat * m2)
    batch_and_spatial = (0,) + spatial
    return dx, jnp.sum(sum_g_x_hat, batch_and_spatial), jnp.sum(sum_g, batch_and_spatial)


_group_norm_cpu.defvjp(_group_norm_cpu_forward, _group_norm_cpu_backward)



def norm_scale(module: nn.Module, channels: int) -> jax.Array:
    """A norm's per-channel scale (ones, logical axis `norm`), in the module's param dtype."""
    return module.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        (channels,), module.param_dtype)


def norm_affine(module: nn.Module, channels: int) -> tuple[jax.Array, jax.Array]:
    """A norm's per-channel scale and bias (zeros), both on logical axis `norm`."""
    scale = norm_scale(module, channels)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                        (channels,), module.param_dtype)
    return scale, bias

class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or NLC) with float32 statistics (E[(x - mean)^2], like PyTorch),
    written out so that XLA fuses it with the SiLU that usually follows (`silu=True` applies
    it here). `epsilon` has no default: diffusers uses 1e-6 in some places and the config's
    `norm_eps` in others.

    On CPU the backward is written by hand (`_group_norm_cpu`): it saves the input and the
    per-group statistics and recomputes x_hat (and the SiLU) where autodiff of the formula
    saves the centred input, the normalised output and the SiLU's intermediates, activation-
    sized arrays written in the forward and read back (XLA:CPU pages its temp buffer in
    afresh every step; the U-Net train step's buffer 463 -> 441 MiB, ~1% faster).
    """
    num_groups: int
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    silu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = norm_affine(self, c)
        x32, scale, bias = x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32)
        if jax.default_backend() == "cpu":
            y = _group_norm_cpu(x32, scale, bias, self.num_groups, self.epsilon, self.silu)
            return y.astype(self.dtype)
        mean, inv = _group_stats(x32, self.num_groups, self.epsilon)
        y = (x32 - mean) * (inv * scale) + bias
        return (nn.silu(y) if self.silu else y).astype(self.dtype)


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
        h = GroupNorm(self.groups, self.eps, name="norm1", silu=True, **kw)(x)
        h = conv2d(self.out_channels, 3, "conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "conv_out"), "time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, name="norm2", silu=True, **kw)(h)
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


def _subpixel_kernels(kernel: jax.Array) -> list[list[jax.Array]]:
    """The 3x3 `kernel` seen from the source pixels of a 2x nearest upsampling: output rows of
    parity 0 read source rows (-1, 0) with kernel rows (0, 1 + 2), parity 1 rows (0, +1) with
    (0 + 1, 2); the same for columns. `[row parity][column parity]` -> `(2, 2, in, out)`."""
    def halves(k: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
        k0, k1, k2 = (jnp.take(k, i, axis) for i in range(3))
        return jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)
    return [list(halves(rows, 1)) for rows in halves(kernel, 0)]


class _UpsampleConv(nn.Module):
    """The 3x3 `conv` of Upsample2D (nn.Conv's params, names and init), applied to the 2x
    nearest upsampling of its input. On CPU it runs as four 2x2 convolutions of the
    un-upsampled input, one per output phase, interleaved: the same sums (kernel taps that
    read the same source pixel added first), 2.25x fewer multiplies, and no backward through
    the resize; fwd+bwd at 16->32 px, 128 ch: 43 -> 15 ms (torch 26 ms)."""
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_NAMES)
        kernel = self.param("kernel", kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        conv = lambda v, k, pad: jax.lax.conv_general_dilated(v, k, (1, 1), pad, dimension_numbers=_NHWC)
        b, h, w, _ = x.shape
        if size != (2 * h, 2 * w) or jax.default_backend() != "cpu":
            return conv(nearest_resize(x, size), kernel, ((1, 1), (1, 1))) + bias
        kernels, pads = _subpixel_kernels(kernel), ((1, 0), (0, 1))
        phases = [jnp.stack([conv(x, kernels[i][j], (pads[i], pads[j])) for j in range(2)], axis=3)
                  for i in range(2)]  # (b, h, w, 2, out) per row parity
        return jnp.stack(phases, axis=2).reshape(b, 2 * h, 2 * w, self.features) + bias


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
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = _UpsampleConv(self.channels, self.dtype, self.param_dtype, name="conv")(x, size)
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


@jax.custom_vjp
def _silu_gate_cpu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def _silu_gate_cpu_forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jax.nn.silu(gate) * up, (gate, up)


def _silu_gate_cpu_backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    s = jax.nn.sigmoid(gate)
    return g * up * s * (1 + gate * (1 - s)), g * gate * s


_silu_gate_cpu.defvjp(_silu_gate_cpu_forward, _silu_gate_cpu_backward)


def silu_gate(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's product silu(gate) * up. On CPU with a hand-written VJP (one sigmoid, both
    cotangents from one pass over the saved gate and up): autodiff of `silu` left XLA:CPU
    several elementwise passes over the (tokens x intermediate) arrays, like GEGLU's."""
    if jax.default_backend() == "cpu":
        return _silu_gate_cpu(gate, up)
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def _rms_norm_cpu(x32: jax.Array, scale: jax.Array, eps: jax.Array) -> jax.Array:
    return _rms_norm_cpu_forward(x32, scale, eps)[0]


def _rms_norm_cpu_forward(x32: jax.Array, scale: jax.Array, eps: jax.Array
                          ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * inv * scale, (x32, inv, scale)


def _rms_norm_cpu_backward(residuals: tuple[jax.Array, ...], g: jax.Array
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    x32, inv, scale = residuals
    x_hat = x32 * inv
    d_x_hat = g * scale
    dx = inv * (d_x_hat - x_hat * jnp.mean(d_x_hat * x_hat, axis=-1, keepdims=True))
    return dx, jnp.sum(g * x_hat, tuple(range(x32.ndim - 1))), jnp.zeros((), jnp.float32)


_rms_norm_cpu.defvjp(_rms_norm_cpu_forward, _rms_norm_cpu_backward)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, statistics in float32 (Qwen's RMSNorm, also T5's). In float32 on
    CPU with a hand-written VJP (saves the input and 1/rms, one reduction in the backward)."""
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = norm_scale(self, x.shape[-1])
        if jax.default_backend() == "cpu" and self.dtype == jnp.float32 and x.dtype == jnp.float32:
            return _rms_norm_cpu(x, scale.astype(jnp.float32), jnp.float32(self.eps))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x32: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    return _layer_norm_cpu_forward(x32, scale, bias, epsilon)[0]


def _layer_norm_cpu_forward(x32: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                            ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    mean = x32.mean(-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + epsilon)
    return (x32 - mean) * inv * scale + bias, (x32, mean, inv, scale)


def _layer_norm_cpu_backward(epsilon: float, residuals: tuple[jax.Array, ...], g: jax.Array
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    x32, mean, inv, scale = residuals
    x_hat = (x32 - mean) * inv
    d_x_hat = g * scale
    dx = inv * (d_x_hat - d_x_hat.mean(-1, keepdims=True) - x_hat * (d_x_hat * x_hat).mean(-1, keepdims=True))
    lead = tuple(range(x32.ndim - 1))
    return dx, jnp.sum(g * x_hat, lead), jnp.sum(g, lead)


_layer_norm_cpu.defvjp(_layer_norm_cpu_forward, _layer_norm_cpu_backward)


class _CpuLayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (same params, init and logical names, E[(x - mean)^2]
    variance, float32 statistics) with a hand-written VJP that saves the input and the
    statistics and recomputes x_hat, like `GroupNorm` on CPU (fewer activation-sized
    residuals in XLA:CPU's per-step temp buffer)."""
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale, bias = norm_affine(self, c)
        y = _layer_norm_cpu(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                            self.epsilon)
        return y.astype(self.dtype)


def layer_norm(epsilon: float, name: str | None, dtype: Any, param_dtype: Any) -> nn.Module:
    """PyTorch's LayerNorm (E[(x - mean)^2] variance) with logically named scale and bias:
    `nn.LayerNorm`, or on CPU `_CpuLayerNorm` (same params)."""
    if jax.default_backend() == "cpu":
        return _CpuLayerNorm(epsilon, dtype, param_dtype, name=name)
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))
