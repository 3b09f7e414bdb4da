"""Scaled dot-product attention for every model.

GPUs get cuDNN flash attention (bf16/fp16, unmasked calls) through
`jax.nn.dot_product_attention`; other GPU/TPU calls take its XLA path. On CPUs the same
maths is written as two einsums in (batch, heads, length, dim) layout: XLA's CPU backend runs
`jax.nn.dot_product_attention`'s (batch, length, heads, dim) contractions 7-8x slower than
torch's SDPA at 1,024 tokens, and the transposed layout turns both products into plain
batched matmuls. Both paths compute softmax in float32 and mask with the same large negative
number, so they agree to rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _implementation(dtype: jnp.dtype) -> str | None:
    if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None  # let XLA choose


def _batched_matmul_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                              bias: jax.Array | None, mask: jax.Array | None, is_causal: bool,
                              scale: float | None) -> jax.Array:
    """`jax.nn.dot_product_attention`'s XLA maths (float32 logits and softmax, causal mask
    aligned top-left, masked logits at -0.7 * float32 max) with heads moved before length."""
    b, q_len, heads, head_dim = query.shape
    kv_heads, kv_len = key.shape[2], key.shape[1]
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    q = query.reshape(b, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k = key.transpose(0, 2, 1, 3)    # (b, kv_heads, kv_len, d)
    v = value.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, heads, q_len, kv_len) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((q_len, kv_len), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.reshape(b, kv_heads, groups, q_len, kv_len), v)
    return out.reshape(b, heads, q_len, head_dim).transpose(0, 2, 1, 3)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          bias: jax.Array | None = None, mask: jax.Array | None = None,
                          is_causal: bool = False, scale: float | None = None,
                          upcast: bool = False) -> jax.Array:
    """Attention over `(batch, length, heads, head_dim)` arrays.

    `key`/`value` may have fewer heads than `query` (grouped-query attention).
    `mask` is boolean, broadcastable to `(batch, heads, q_len, kv_len)`, True = attend.
    `upcast` computes in float32 (diffusers' `upcast_attention`) and casts back.
    """
    out_dtype = query.dtype
    if upcast:
        query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
        bias = None if bias is None else bias.astype(jnp.float32)
    if jax.default_backend() == "cpu":
        out = _batched_matmul_attention(query, key, value, bias, mask, is_causal, scale)
        return out.astype(out_dtype)
    implementation = _implementation(query.dtype)
    # cuDNN only where it is known to take the call (no mask/bias: the U-Net's and CLIP's
    # attention); masked calls (VLM windows, KV caches) could be refused at compile time,
    # outside this function's reach, so they stay on XLA.
    # Head widths: SD's 40/80/160 were seen to work (field notes); the VAE's single 512-wide
    # head is past what cuDNN's fused kernels take.
    if implementation == "cudnn" and (bias is not None or mask is not None or query.shape[-1] % 8 != 0
                                      or query.shape[-1] > 256):
        implementation = None
    try:
        out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                           is_causal=is_causal, scale=scale,
                                           implementation=implementation)
    except Exception:  # cuDNN refuses some shapes; XLA takes them all
        if implementation is None:
            raise
        out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                           is_causal=is_causal, scale=scale)
    return out.astype(out_dtype)
