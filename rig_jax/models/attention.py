"""Scaled dot-product attention for every model.

GPUs get cuDNN flash attention (bf16/fp16, unmasked calls) through
`jax.nn.dot_product_attention`; other GPU/TPU calls take its XLA path. On CPUs the same
maths is written out for XLA's CPU backend, which runs `jax.nn.dot_product_attention`'s
(batch, length, heads, dim) contractions 7-8x slower than torch's SDPA at 1,024 tokens:

- unmasked calls (the U-Net's and the VAE's) take `_blocked_attention`, flash-attention
  style: one head at a time (`lax.map` over batch x heads, because XLA:CPU's batched dots
  are several times slower than the same matmuls one by one), query blocks whose logits fit
  the L2 cache, a log-sum-exp saved instead of the (length x length) probabilities, and a
  custom VJP that recomputes each block's probabilities. The train step's attention
  backward went from 3.5x to ~1.5x torch's (SDPA's flash kernel) at 1,024 tokens.
- masked, biased or causal calls (CLIP, the VLM) take two einsums in (batch, heads, length,
  dim) layout.

All paths compute softmax in float32 and mask with the same large negative number, so they
agree to rounding.
"""
from __future__ import annotations

import functools

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


# Query rows per block: the (rows x kv_len) float32 logits and their gradient stay within
# about 1 MiB (half an L2 cache), never fewer than 64 rows.
_BLOCK_BYTES = 1 << 20
_MIN_BLOCK_ROWS = 64


def _row_blocks(q_len: int, kv_len: int) -> list[tuple[int, int]]:
    rows = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (4 * kv_len))
    return [(a, min(a + rows, q_len)) for a in range(0, q_len, rows)]


def _head_forward(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """One head, float32 `(q_len, d)`, `(kv_len, d)`: (softmax(q k^T scale) v, log-sum-exp)."""
    outs, lses = [], []
    for a, b in _row_blocks(q.shape[0], k.shape[0]):
        logits = (q[a:b] @ k.T) * scale
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        outs.append((e @ v) / total)
        lses.append(top + jnp.log(total))
    return jnp.concatenate(outs), jnp.concatenate(lses)


def _head_backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                   g: jax.Array, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one head from its saved output and log-sum-exp: each block's
    probabilities recomputed, dS = P * (dP - rowsum(g * out)). dK and dV are accumulated
    transposed ((d, kv_len): contracting over the block's rows on the left is XLA:CPU's fast
    form) and turned once at the end."""
    row_dot = jnp.sum(g * out, axis=-1, keepdims=True)
    dq, dk_t, dv_t = [], jnp.zeros(k.shape[::-1], k.dtype), jnp.zeros(v.shape[::-1], v.dtype)
    for a, b in _row_blocks(q.shape[0], k.shape[0]):
        probs = jnp.exp((q[a:b] @ k.T) * scale - lse[a:b])
        dv_t = dv_t + g[a:b].T @ probs
        d_logits = probs * (g[a:b] @ v.T - row_dot[a:b]) * scale
        dq.append(d_logits @ k)
        dk_t = dk_t + q[a:b].T @ d_logits
    return jnp.concatenate(dq), dk_t.T, dv_t.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Unmasked attention over float32 `(batch * heads, length, head_dim)` arrays."""
    return _blocked_forward(q, k, v, scale)[0]


def _blocked_forward(q: jax.Array, k: jax.Array, v: jax.Array, scale: float
                     ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = jax.lax.map(lambda a: _head_forward(*a, scale), (q, k, v))
    return out, (q, k, v, out, lse)


def _blocked_backward(scale: float, residuals: tuple[jax.Array, ...], g: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jax.lax.map(lambda a: _head_backward(*a, scale), (*residuals, g))


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def _unmasked_cpu_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                            scale: float | None) -> jax.Array:
    """`(batch, length, heads, dim)` in and out; heads of grouped-query calls repeated."""
    b, q_len, heads, head_dim = query.shape
    groups = heads // key.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale

    def per_head(x: jax.Array, repeat: int = 1) -> jax.Array:
        x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * heads, x.shape[1], head_dim)

    out = _blocked_attention(per_head(query), per_head(key, groups), per_head(value, groups), float(scale))
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
        if bias is None and mask is None and not is_causal:
            return _unmasked_cpu_attention(query, key, value, scale).astype(out_dtype)
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
