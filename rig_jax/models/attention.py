"""Scaled dot-product attention for every model, through `jax.nn.dot_product_attention`.

GPUs get cuDNN flash attention (bf16/fp16, unmasked calls); other platforms, dtypes and
masked calls use the XLA path, which is exact in float32 and is what the parity tests check.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _implementation(dtype: jnp.dtype) -> str | None:
    if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None  # let XLA choose


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
