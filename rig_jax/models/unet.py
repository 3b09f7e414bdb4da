"""The Stable Diffusion 1.x / 2.x U-Net (diffusers' `UNet2DConditionModel` layout), NHWC.

Usage (what the samplers call):

    model = UNet2DConditionModel(config, dtype=jnp.bfloat16)
    eps = model.apply({"params": params}, sample, timesteps, encoder_hidden_states)

- `sample`: `(batch, height, width, in_channels)` latents (NHWC; diffusers is NCHW).
- `timesteps`: `(batch,)` or a scalar (broadcast over the batch); ints or floats.
- `encoder_hidden_states`: `(batch, length, cross_attention_dim)` text embeddings.
- returns `(batch, height, width, out_channels)` in `dtype`: the network output
  (epsilon or v, whichever the checkpoint was trained for: that is the scheduler's business).

Shared sample (classifier-free guidance): `encoder_hidden_states` may hold k contexts per
sample, `(k * batch, length, dim)` example-major (row `i * k + j` is context j of sample i),
with `sample` and `timesteps` at `batch`. Everything before the first cross-attention
(conv_in, the time embedding, the first ResNet block(s), the first transformer block's
self-attention and its query projection) sees the same input for the k contexts, so it runs
once at `batch`; the activations are repeated to `k * batch` there (`widen_batch`) and the
output is `(k * batch, ...)`, equal to the call on the sample repeated k times. Example-major
order keeps the repeat local to each device when the batch is sharded.

The module mirrors diffusers block for block, so a checkpoint maps onto it by an explicit
key table (rig_jax/weights/unet.py, which also reads diffusers' config.json); param names
follow the diffusers names
(`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel` <->
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`). 1x1 projections
(`proj_in`/`proj_out`) are Dense layers whichever way the checkpoint stores them, so SD1
(1x1 conv) and SD2 (linear) checkpoints give the same param tree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from rig_jax.errors import ConfigError, RigError
from rig_jax.models.attention import dot_product_attention
from rig_jax.models.layers import (
    IMAGE_NAMES,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    cpu_matmul,
    dense,
    flat_tokens_on_cpu,
    layer_norm,
    single_cpu,
)

TOKEN_NAMES = ("batch", "length", "channels")
TRANSFORMER_GROUPNORM_EPS = 1e-6  # diffusers' Transformer2DModel hard-codes it
TRANSFORMER_LAYERNORM_EPS = 1e-5  # the U-Net never passes norm_eps to its transformers
FF_MULT = 4

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"


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
    `channels // heads`); `rig_jax.weights.unet.unet_config_from_diffusers` translates.
    `gradient_checkpointing` is ours: it rematerialises each resnet and transformer block in
    the backward pass. `coordinate_channels` (0 or 2) is ours too (CoordConv): the last two of
    conv_in's `in_channels` inputs are fixed x and y ramps the module appends itself, so the
    network knows where in the latent it is and can place objects by the words (zero padding
    alone tells a convolution little about absolute position). Callers pass
    `latent_channels = in_channels - coordinate_channels` channels; diffusers loads the folder
    as an `in_channels`-wide U-Net whose caller appends `coordinate_ramps` (as its inpainting
    U-Nets take mask channels).
    """
    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
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
    coordinate_channels: int = 0

    def __post_init__(self) -> None:
        if self.coordinate_channels not in (0, 2) or self.latent_channels < 1:
            raise ConfigError(f"UNetConfig: field coordinate_channels={self.coordinate_channels} must be "
                              f"0 or 2 and leave a latent channel of in_channels={self.in_channels}")
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

    @property
    def latent_channels(self) -> int:
        """Channels of the latents a caller passes (conv_in's width less the coordinate ramps)."""
        return self.in_channels - self.coordinate_channels

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


def widen_batch(a: jax.Array, batch: int) -> jax.Array:
    """`a` at batch B -> `batch` = k * B, each row repeated k times in place (row i -> rows
    i*k .. i*k + k-1): the shared-sample repeat, which a batch-sharded array does on each device
    without moving rows between devices. An array already at `batch` is returned as is."""
    if a.shape[0] == batch:
        return a
    # A broadcast on a new axis after the batch, then a reshape that merges the two: the batch
    # stays the major axis, so each device's rows stay its own (jnp.repeat is a gather, which
    # the SPMD partitioner answers with an all-gather of the whole array).
    k = batch // a.shape[0]
    return jnp.broadcast_to(a[:, None], (a.shape[0], k, *a.shape[1:])).reshape(batch, *a.shape[1:])


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
    """Multi-head attention with diffusers' names (`to_q`, `to_k`, `to_v`, `to_out_0`).

    A `context` at k times the batch of `x` (a shared sample, see the module docstring)
    projects the queries once and repeats them: the output is at the context's batch."""
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
        _, lq, dim = x.shape
        b, lk = context.shape[:2]
        q = widen_batch(dense(inner, ("embed", "heads"), "to_q", use_bias=False, **kw)(x), b)
        k = dense(inner, ("embed", "heads"), "to_k", use_bias=False, **kw)(context)
        v = dense(inner, ("embed", "heads"), "to_v", use_bias=False, **kw)(context)
        out = dot_product_attention(q.reshape(b, lq, self.num_heads, self.head_dim),
                                    k.reshape(b, lk, self.num_heads, self.head_dim),
                                    v.reshape(b, lk, self.num_heads, self.head_dim), upcast=self.upcast)
        return dense(dim, ("heads", "embed"), "to_out_0", **kw)(out.reshape(b, lq, inner))


def gelu_erf(x: jax.Array) -> jax.Array:
    """PyTorch's exact GELU, `x / 2 * (1 + erf(x / sqrt 2))`, in the input dtype. jax's
    `nn.gelu(approximate=False)` goes through erfc, several times slower on XLA:CPU (forward
    and backward); the two differ by ~1e-6 absolute at most, and this is torch's formula."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


@jax.custom_vjp
def _geglu_saving_inputs(value: jax.Array, gate: jax.Array) -> jax.Array:
    return value * gelu_erf(gate)


def _geglu_forward(value: jax.Array, gate: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return value * gelu_erf(gate), (value, gate)


def _geglu_backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    value, gate = residuals
    cdf = 0.5 * (1 + jax.lax.erf(gate * jnp.asarray(2 ** -0.5, gate.dtype)))
    pdf = jnp.exp(-0.5 * gate * gate) * jnp.asarray((2 * math.pi) ** -0.5, gate.dtype)
    return g * gate * cdf, g * value * (cdf + gate * pdf)


_geglu_saving_inputs.defvjp(_geglu_forward, _geglu_backward)


def geglu(value: jax.Array, gate: jax.Array) -> jax.Array:
    """`value * gelu_erf(gate)`. On CPU with a hand-written VJP that saves only the two inputs
    and recomputes the erf and the Gaussian density in the backward; autodiff of the erf
    formula saves more activation-sized arrays, and every byte of XLA:CPU's temp buffer is
    paged in afresh each step (the train step's buffer 492 -> 462 MiB, ~1% faster)."""
    if jax.default_backend() == "cpu":
        return _geglu_saving_inputs(value, gate)
    return value * gelu_erf(gate)


class _GegluProj(nn.Module):
    """diffusers' GEGLU `proj` (`net_0_proj`, one Dense to 2 x inner, split into value and
    gate) computed as two matmuls on the kernel's halves. The params are the Dense's (same
    names, shapes, init and logical axes); the backward then never concatenates the halves'
    gradients at activation size, a pad + add + transpose of (tokens, 2 x inner) that cost
    XLA:CPU more than the matmuls themselves."""
    inner: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                   ("embed", "mlp")),
                            (x.shape[-1], 2 * self.inner), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                          (2 * self.inner,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        lead, half = x.shape[:-1], self.inner
        if flat_tokens_on_cpu(x):
            x = x.reshape(-1, x.shape[-1])
        if single_cpu() and x.ndim == 2:
            value, gate = cpu_matmul(x, kernel[:, :half]), cpu_matmul(x, kernel[:, half:])
            value, gate = value + bias[:half], gate + bias[half:]
        else:
            value, gate = x @ kernel[:, :half] + bias[:half], x @ kernel[:, half:] + bias[half:]
        return value.reshape(*lead, half), gate.reshape(*lead, half)


class FeedForward(nn.Module):
    """GEGLU feed-forward (`net_0_proj` -> value * gelu(gate) -> `net_2`)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        dim = x.shape[-1]
        value, gate = _GegluProj(dim * FF_MULT, name="net_0_proj", **kw)(x)
        return dense(dim, ("mlp", "embed"), "net_2", **kw)(geglu(value, gate))


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
        cross = Attention(name="attn2", **attn)(norm("norm2")(x), context)   # at the context's batch
        x = widen_batch(x, cross.shape[0]) + cross
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
        b = tokens.shape[0]   # the context's batch once a block has attended to it
        return nn.with_logical_constraint(tokens.reshape(b, h, w, c) + widen_batch(x, b).astype(self.dtype),
                                          IMAGE_NAMES)


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
            x = self._resnet(j)(x, widen_batch(temb, x.shape[0]))
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
        x = self._resnet(0)(x, widen_batch(temb, x.shape[0]))
        for j in range(self.spec.num_attentions):
            x = self._attention(j)(x, context)
            x = self._resnet(j + 1)(x, widen_batch(temb, x.shape[0]))
        return x


class UpBlock(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_to: tuple[int, int] | None) -> jax.Array:
        for j, skip in enumerate(skips):
            x = jnp.concatenate([x, widen_batch(skip, x.shape[0]).astype(x.dtype)], axis=-1)
            x = self._resnet(j)(x, widen_batch(temb, x.shape[0]))
            if self.spec.cross_attention:
                x = self._attention(j)(x, context)
        if self.spec.resample:
            x = Upsample2D(self.spec.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_to)
        return x


class UNet2DConditionModel(nn.Module):
    """`apply({"params": p}, sample (B,H,W,C), timesteps (B,) or (), context (B,L,D))`
    -> `(B,H,W,C_out)`; a context of (k B, L, D) shares the sample among k contexts and
    returns (k B, H, W, C_out); see the module docstring."""
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch, context_batch = sample.shape[0], encoder_hidden_states.shape[0]
        if context_batch < batch or context_batch % batch:
            raise RigError(f"UNet2DConditionModel: encoder_hidden_states has batch {context_batch}, "
                           f"expected a multiple of the sample's batch {batch}")
        if sample.shape[-1] != cfg.latent_channels:
            raise RigError(f"UNet2DConditionModel: sample has {sample.shape[-1]} channels, expected "
                           f"{cfg.latent_channels} (in_channels {cfg.in_channels} less "
                           f"{cfg.coordinate_channels} coordinate channels)")
        x = nn.with_logical_constraint(sample.astype(self.dtype), IMAGE_NAMES)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        if cfg.coordinate_channels:
            ramps = coordinate_ramps(x.shape[1], x.shape[2]).astype(self.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(ramps, (*x.shape[:3], 2))], axis=-1)
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
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", silu=True, **kw)(x)
        x = conv2d(cfg.out_channels, 3, "conv_out", **kw)(x)
        return nn.with_logical_constraint(widen_batch(x, context_batch), IMAGE_NAMES)  # (no cross-attention)


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


def coordinate_ramps(height: int, width: int) -> jax.Array:
    """(1, height, width, 2): x then y of each latent pixel's centre, from -1 to 1 (left/top)."""
    x = (2.0 * jnp.arange(width) + 1.0) / width - 1.0
    y = (2.0 * jnp.arange(height) + 1.0) / height - 1.0
    return jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)[None].astype(jnp.float32)


def example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None, length: int = 1
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero inputs of the right shapes, e.g. for `jax.eval_shape(model.init, rng, *inputs)`."""
    if size is None:
        size = 2 * config.downsample_factor
    return (jnp.zeros((batch, size, size, config.latent_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, length, config.cross_attention_dim), jnp.float32))
