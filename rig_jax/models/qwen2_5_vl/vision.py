"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary ViT with window attention, 2x2 merger.

The tower works on the *packed* patch sequence the HF processor returns: every image's
patches concatenated, each patch `C * temporal_patch * patch * patch` values, grouped so the
`merge x merge` patches of one merged token are consecutive. Everything that depends only on
the image grids (`image_grid_thw`) is computed on the host by `vision_inputs` as index and
segment arrays, so the jitted tower has static shapes: attention over the packed sequence
is restricted by block-diagonal boolean masks built from segment ids (HF's `cu_seqlens`).
Param names follow the HF names (`blocks_0/attn/qkv/kernel` <-> `visual.blocks.0.attn.qkv.weight`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError, DataError
from rig_jax.models.attention import dot_product_attention
from rig_jax.models.layers import RMSNorm, activation, apply_rotary, dense

VISION_NORM_EPS = 1e-6  # transformers hard-codes eps=1e-6 for every vision norm

@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The architecture of the Qwen2.5-VL vision tower (HF `vision_config`)."""
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 4
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    def validate(self, source: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{source}: vision_config.hidden_size {self.hidden_size} is not divisible "
                              f"by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"{source}: vision head dim {self.head_dim} must be divisible by 4 "
                              "(2-D rotary embedding)")
        if self.window_size // self.spatial_merge_size // self.patch_size < 1:
            raise ConfigError(f"{source}: vision_config.window_size {self.window_size} is smaller than one "
                              "merged patch")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"{source}: vision_config.fullatt_block_indexes {bad} outside depth "
                              f"{self.depth}")
        activation(self.hidden_act, source)


# ---------------------------------------------------------------- host-side grid bookkeeping

def _grid_rows(image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge: int) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if np.any(grid < 1) or np.any(grid[:, 1:] % merge):
        raise DataError(f"image_grid_thw {grid.tolist()}: heights and widths must be positive multiples "
                        f"of spatial_merge_size {merge}")
    return grid


def vision_inputs(image_grid_thw: np.ndarray | Sequence[Sequence[int]], config: VisionConfig,
                  num_patches: int | None = None) -> dict[str, np.ndarray]:
    """Index arrays that let the jitted tower reproduce transformers' window attention.

    Mirrors `get_vision_position_ids`, `get_vision_window_index` and the `cu_seqlens` of
    transformers: merged tokens are reordered window by window (`unit_order`), attention
    runs on that order, and `unit_restore` undoes it after the merger. Segment ids replace
    `cu_seqlens`: two patches attend to each other iff their ids are equal.

    `num_patches` pads the sequence to a fixed length (a multiple of merge**2) so different
    grids share one compiled shape; padding patches form their own segment and their merged
    outputs come last, where no image token reads them.
    """
    merge, unit = config.spatial_merge_size, config.merge_unit
    grid = _grid_rows(image_grid_thw, merge)
    window = config.window_size // merge // config.patch_size  # in merged tokens
    rope_rows, unit_order, window_lengths, frame_lengths = [], [], [], []
    offset = 0
    for t, h, w in grid.tolist():
        # rotary (row, column) of every patch, in the processor's merge-block order
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).ravel()
        cols = cols.reshape(block).transpose(0, 2, 1, 3).ravel()
        rope_rows.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        # windows of `window x window` merged tokens, rows then columns, per frame
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // window), -(-gw // window)
        for f in range(t):
            for i in range(nh):
                for j in range(nw):
                    cell = index[f, i * window:(i + 1) * window, j * window:(j + 1) * window].ravel()
                    unit_order.append(cell + offset)
                    window_lengths.append(cell.size * unit)
        frame_lengths.extend([h * w] * t)
        offset += t * gh * gw
    total = offset * unit
    padded = total if num_patches is None else int(num_patches)
    if padded < total or padded % unit:
        raise DataError(f"num_patches {padded}: must be a multiple of {unit} and at least the {total} "
                        f"patches of image_grid_thw")
    pad_units = (padded - total) // unit
    order = np.concatenate(unit_order + [np.arange(offset, offset + pad_units)]).astype(np.int32)
    rope = np.concatenate(rope_rows + [np.zeros((padded - total, 2), np.int64)])
    # rotary positions travel with their patches through the window reordering
    patch_order = (order[:, None] * unit + np.arange(unit)[None, :]).ravel()

    def segments(lengths: list[int]) -> np.ndarray:
        ids = np.repeat(np.arange(len(lengths)), lengths)
        return np.concatenate([ids, np.full(padded - total, len(lengths))]).astype(np.int32)

    return {
        "unit_order": order,
        "unit_restore": np.argsort(order).astype(np.int32),
        "rope_positions": rope[patch_order].astype(np.int32),
        "full_segments": segments(frame_lengths),
        "window_segments": segments(window_lengths),
    }


def num_merged_tokens(image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge: int) -> int:
    grid = _grid_rows(image_grid_thw, merge)
    return int(np.sum(np.prod(grid, axis=-1)) // merge ** 2)


# ---------------------------------------------------------------- modules

def vision_rotary(rope_positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(N, 2) integer (row, column) -> cos, sin of shape (N, head_dim): a quarter of the
    frequencies rotate with the row, a quarter with the column, the pattern repeated twice."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = rope_positions.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim // 4)
    freqs = freqs.reshape(freqs.shape[0], -1)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        n = x.shape[0]
        qkv = dense(3 * cfg.hidden_size, ("embed", "heads"), "qkv", self.dtype, self.param_dtype)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, cfg.num_heads, cfg.head_dim), 1, 0)
        # rotary in float32, as the reference does
        c, s = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q.astype(jnp.float32), c, s).astype(self.dtype)
        k = apply_rotary(k.astype(jnp.float32), c, s).astype(self.dtype)
        out = dot_product_attention(q[None], k[None], v[None], mask=mask[None, None])[0]
        return dense(cfg.hidden_size, ("heads", "embed"), "proj", self.dtype, self.param_dtype)(
            out.reshape(n, cfg.hidden_size))


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = activation(cfg.hidden_act)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj", **kw)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj", **kw)(act(gate) * up)


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = x + VisionAttention(self.config, name="attn", **kw)(
            RMSNorm(VISION_NORM_EPS, name="norm1", **kw)(x), cos, sin, mask)
        return x + VisionMLP(self.config, name="mlp", **kw)(RMSNorm(VISION_NORM_EPS, name="norm2", **kw)(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then the merge x merge neighbours concatenated through a GELU MLP."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width = cfg.hidden_size * cfg.merge_unit
        x = RMSNorm(VISION_NORM_EPS, self.dtype, self.param_dtype, name="ln_q")(x).reshape(-1, width)
        x = dense(width, ("embed", "mlp"), "mlp_0", self.dtype, self.param_dtype)(x)
        x = nn.gelu(x, approximate=False)
        return dense(cfg.out_hidden_size, ("mlp", "embed"), "mlp_2", self.dtype, self.param_dtype)(x)


class VisionTransformer(nn.Module):
    """Packed patches (N, patch_dim) -> merged image features (N / merge**2, out_hidden_size),
    in the processor's order (the image tokens' order in the prompt)."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, inputs: Mapping[str, jax.Array]) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        n = pixel_values.shape[0]
        # the Conv3d with kernel = stride is a Dense on the flattened (C, T, p, p) patch
        x = dense(cfg.hidden_size, (None, "embed"), "patch_embed", use_bias=False, **kw)(
            pixel_values.astype(self.dtype))
        x = x.reshape(n // cfg.merge_unit, cfg.merge_unit, -1)[inputs["unit_order"]].reshape(n, -1)
        cos, sin = vision_rotary(inputs["rope_positions"], cfg.head_dim, cfg.rope_theta)
        full = inputs["full_segments"]
        windows = inputs["window_segments"]
        full_mask = full[:, None] == full[None, :]
        window_mask = windows[:, None] == windows[None, :]
        for i in range(cfg.depth):
            mask = full_mask if i in cfg.fullatt_block_indexes else window_mask
            x = VisionBlock(cfg, name=f"blocks_{i}", **kw)(x, cos, sin, mask)
        merged = PatchMerger(cfg, name="merger", **kw)(x)
        return merged[inputs["unit_restore"]]
