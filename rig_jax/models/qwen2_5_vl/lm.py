"""The Qwen2 decoder of Qwen2.5-VL with M-RoPE and an explicit fixed-size KV cache.

The cache is a plain pytree (`init_cache`): per layer, keys `(batch, kv_heads, head_dim,
max_len)` and values `(batch, kv_heads, max_len, head_dim)`, a per-slot validity mask
`(batch, max_len)` and the next free slot. One buffer per layer, heads first, keys stored
transposed: a step writes its token into each layer's buffers in place and both of its dots
(q K^T, P V) read them as they lie. A stacked `(layers, ...)` array was sliced and written
back whole, and slot-major keys and values were transposed for every step's dots: together
~40% of a small decoder's step on CPU. Prompts are left-padded, so slot `s` is
the same step for every row; a query at slot `q` attends to slot `k` iff `k <= q` and slot
`k` holds a real token. That makes prefill and each decoding step the same pure function of
`(params, cache, tokens)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError
from rig_jax.models.attention import dot_product_attention, heads_major_attention
from rig_jax.models.layers import (
    RMSNorm,
    activation,
    apply_rotary,
    cpu_matmul,
    dense,
    flat_tokens_on_cpu,
    silu_gate,
)

Cache = dict[str, jax.Array]

# Logical axis names of the cache leaves (for shardings of a cache that crosses a jit boundary).
# ("k" and "v" are tuples with one such leaf per layer.)
CACHE_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("batch", "kv_heads", "head_dim", "kv_length"),
    "v": ("batch", "kv_heads", "kv_length", "head_dim"),
    "valid": ("batch", "kv_length"),
    "index": (),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The architecture of the Qwen2 decoder (HF `text_config`)."""
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, source: str) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {self.num_attention_heads} is not divisible "
                              f"by num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(f"{source}: mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                              f"{self.head_dim // 2}")
        activation(self.hidden_act, source)


def init_cache(config: TextConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> Cache:
    """An empty cache: no valid slot, next slot 0."""
    keys = (batch, config.num_key_value_heads, config.head_dim, max_len)
    values = (batch, config.num_key_value_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    return {"k": tuple(jnp.zeros(keys, dtype) for _ in layers),
            "v": tuple(jnp.zeros(values, dtype) for _ in layers),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def mrope(position_ids: jax.Array, config: TextConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(3, B, L) positions -> cos, sin (B, L, head_dim).

    Frequency band i of `mrope_section` takes its angle from axis i % 3 (temporal, height,
    width); the bands are laid out as in transformers' `recomposition_frequencies`.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, dim/2)
    axis_of_band = jnp.concatenate([jnp.full((n,), i % 3, jnp.int32)
                                    for i, n in enumerate(config.mrope_section)])
    picked = jnp.where(axis_of_band == 0, freqs[0], jnp.where(axis_of_band == 1, freqs[1], freqs[2]))
    angles = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def attention_mask(kv_valid: jax.Array, q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
    """(B, 1, Lq, Lk) boolean: causal in slot order, real keys only. Each query also sees
    itself, so a padding query never has an empty row (its output is unused)."""
    causal = k_slots[None, :] <= q_slots[:, None]
    self_slot = k_slots[None, :] == q_slots[:, None]
    return (kv_valid[:, None, None, :] & causal[None, None]) | self_slot[None, None]


class TextAttention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 layer_cache: tuple[jax.Array, jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        b, length, _ = x.shape
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q = dense(cfg.num_attention_heads * cfg.head_dim, ("embed", "heads"), "q_proj", **kw)(x)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"), "k_proj", **kw)(x)
        v = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"), "v_proj", **kw)(x)
        q = q.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = apply_rotary(q, c, s)
        k = apply_rotary(k, c, s)
        new_cache = None
        if layer_cache is None:
            out = dot_product_attention(q, k, v, mask=mask)
        else:
            cache_k, cache_v, index = layer_cache
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 3, 1).astype(cache_k.dtype),
                                                   (0, 0, 0, index))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype),
                                                   (0, 0, index, 0))
            new_cache = (cache_k, cache_v)
            out = heads_major_attention(q, cache_k.astype(self.dtype), cache_v.astype(self.dtype), mask)
        out = dense(cfg.hidden_size, ("heads", "embed"), "o_proj", use_bias=False, **kw)(
            out.reshape(b, length, cfg.num_attention_heads * cfg.head_dim))
        return out, new_cache


class TextMLP(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", use_bias=False, **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj", use_bias=False, **kw)(x)
        hidden = silu_gate(gate, up) if cfg.hidden_act == "silu" else activation(cfg.hidden_act)(gate) * up
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj", use_bias=False, **kw)(hidden)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 layer_cache: tuple[jax.Array, jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        eps = self.config.rms_norm_eps
        h, new_cache = TextAttention(self.config, name="self_attn", **kw)(
            RMSNorm(eps, name="input_layernorm", **kw)(x), cos, sin, mask, layer_cache)
        x = x + h
        x = x + TextMLP(self.config, name="mlp", **kw)(RMSNorm(eps, name="post_attention_layernorm", **kw)(x))
        return x, new_cache


class TextModel(nn.Module):
    """Token embeddings, decoder layers, final norm (HF `model.language_model`)."""
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            **kw)
        self.layers = [DecoderLayer(cfg, name=f"layers_{i}", **kw) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection: float32 logits against the token embeddings."""
        table = self.embed_tokens.embedding.astype(self.dtype)
        if flat_tokens_on_cpu(hidden):  # 2-D, as `Qwen25VL.logits`
            flat = cpu_matmul(hidden.reshape(-1, hidden.shape[-1]).astype(self.dtype), table.T, jnp.float32)
            return flat.reshape(*hidden.shape[:-1], flat.shape[-1])
        return jnp.einsum("bld,vd->blv", hidden.astype(self.dtype), table,
                          preferred_element_type=jnp.float32)

    def __call__(self, embeds: jax.Array, position_ids: jax.Array, token_mask: jax.Array,
                 cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        """embeds (B, L, D), position_ids (3, B, L), token_mask (B, L) (1 = real token) ->
        final hidden states (B, L, D) and the updated cache (None without one).

        With a cache, the L tokens occupy slots `cache["index"] ...` and attend to every earlier
        valid slot; without one, they attend causally among themselves."""
        length = embeds.shape[1]
        cos, sin = mrope(position_ids, self.config, self.dtype)
        token_mask = token_mask.astype(bool)
        if cache is None:
            slots = jnp.arange(length)
            mask = attention_mask(token_mask, slots, slots)
        else:
            index = cache["index"]
            valid = jax.lax.dynamic_update_slice(cache["valid"], token_mask, (0, index))
            mask = attention_mask(valid, index + jnp.arange(length), jnp.arange(valid.shape[1]))
            new_k, new_v = list(cache["k"]), list(cache["v"])
        x = embeds.astype(self.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (new_k[i], new_v[i], index)
            x, updated = layer(x, cos, sin, mask, layer_cache)
            if updated is not None:
                new_k[i], new_v[i] = updated
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, {"k": tuple(new_k), "v": tuple(new_v), "valid": valid, "index": index + length}
