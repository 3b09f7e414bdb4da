"""AutoencoderKL (the Stable Diffusion 1.x / 2.x VAE) in the diffusers layout, NHWC.

The module mirrors diffusers' `AutoencoderKL` block for block so that a checkpoint maps
onto it by a flat key table (rig_jax/weights/vae.py) and the outputs match the
PyTorch reference to float32 rounding. Param names follow the diffusers names
(`encoder/down_blocks_0/resnets_1/conv1/kernel` <-> `encoder.down_blocks.0.resnets.1.conv1.weight`).

Latent scaling (`scaling_factor`) is left to the caller, as in diffusers: `encode` gives
the unscaled posterior and `decode` takes unscaled latents.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.models.attention import dot_product_attention
from rig_jax.models.layers import CONV_NAMES as CONV_NAMES  # re-exported: tests check param names with it
from rig_jax.models.layers import (
    IMAGE_NAMES,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    dense,
)

NORM_EPS = 1e-6            # diffusers hard-codes eps=1e-6 for every VAE norm
DOWNSAMPLE_PADDING = 0     # diffusers' Encoder builds Downsample2D(padding=0): pad right/bottom by 1
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture of an AutoencoderKL (read from a diffusers `config.json` by
    `rig_jax.weights.vae.vae_config_from_diffusers`)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return ("DownEncoderBlock2D",) * len(self.block_out_channels)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------- blocks
# The layers themselves (conv, GroupNorm, ResnetBlock2D, resamplers) are shared with the
# U-Net in rig_jax/models/layers.py; the VAE's choices are NORM_EPS everywhere, no time
# embedding, and DOWNSAMPLE_PADDING.


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: group norm, then one head over all H*W positions
    (head width = channels), output projection and residual."""
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(self.groups, NORM_EPS, self.dtype, self.param_dtype, name="group_norm")(x)
        h = h.reshape(batch, height * width, channels)
        q, k, v = (dense(channels, ("embed", "heads"), name, self.dtype, self.param_dtype)(h)
                   for name in ("to_q", "to_k", "to_v"))
        heads = lambda t: t.reshape(batch, height * width, 1, channels)
        out = dot_product_attention(heads(q), heads(k), heads(v))
        out = out.reshape(batch, height * width, channels)
        out = dense(channels, ("heads", "embed"), "to_out_0", self.dtype, self.param_dtype)(out)
        return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""
    channels: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = ResnetBlock2D(self.channels, self.groups, NORM_EPS, name="resnets_0", **kw)(x)
        x = SpatialSelfAttention(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, NORM_EPS, name="resnets_1", **kw)(x)


class CoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D (`resample="down"`: resnets, then a stride-2
    `downsamplers_0`) or UpDecoderBlock2D (`resample="up"`: resnets, then a 2x
    `upsamplers_0`); `resample=None` for the last block, which keeps its resolution."""
    out_channels: int
    num_layers: int
    groups: int
    resample: Literal["down", "up"] | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, NORM_EPS, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, DOWNSAMPLE_PADDING, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return nn.with_logical_constraint(x, IMAGE_NAMES)


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (before quant_conv)."""
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        channels = cfg.block_out_channels
        x = conv2d(channels[0], 3, "conv_in", dt, pdt)(x)
        for i, out_ch in enumerate(channels):
            x = CoderBlock(out_ch, cfg.layers_per_block, cfg.norm_num_groups,
                           "down" if i < len(channels) - 1 else None, dt, pdt, name=f"down_blocks_{i}")(x)
        x = MidBlock(channels[-1], cfg.norm_num_groups, dt, pdt, name="mid_block")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, pdt, name="conv_norm_out")(x))
        return conv2d(2 * cfg.latent_channels, 3, "conv_out", dt, pdt)(x)


class Decoder(nn.Module):
    """Latents (after post_quant_conv) -> image."""
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv2d(channels[0], 3, "conv_in", dt, pdt)(z)
        x = MidBlock(channels[0], cfg.norm_num_groups, dt, pdt, name="mid_block")(x)
        for i, out_ch in enumerate(channels):
            x = CoderBlock(out_ch, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           "up" if i < len(channels) - 1 else None, dt, pdt, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, pdt, name="conv_norm_out")(x))
        return conv2d(cfg.out_channels, 3, "conv_out", dt, pdt)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. `encode` gives the posterior `(mean, logvar)`, `decode` the image.

    Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels and
    `downsample_factor` fewer pixels per side. Outputs are float32 whatever `dtype` is,
    because the scheduler math that consumes latents runs in float32.
    Calling the module runs encode then decode of the mean (used for `init`).
    """
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.param_dtype)
        self.decoder = Decoder(cfg, self.dtype, self.param_dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv2d(2 * cfg.latent_channels, 1, None, self.dtype, self.param_dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv2d(cfg.latent_channels, 1, None, self.dtype, self.param_dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels),
        logvar clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels), float32."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * noise."""
    noise = jax.random.normal(rng, mean.shape, dtype=jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


def init_params(module: AutoencoderKL, rng: jax.Array, image_size: int = 0) -> Any:
    """Random (boxed, logically partitioned) params: `module.init` on a small dummy image.

    Unbox with `nn.meta.unbox` for a plain tree; the `params` collection is what `apply` takes.
    """
    side = image_size or module.config.downsample_factor * 2
    dummy = jnp.zeros((1, side, side, module.config.in_channels), jnp.float32)
    return module.init(rng, dummy)
