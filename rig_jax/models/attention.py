"""Scaled dot-product attention for every model.

GPUs get cuDNN flash attention (bf16/fp16, unmasked calls) through
`jax.nn.dot_product_attention`; other GPU/TPU calls take its XLA path. On CPUs the same
maths is written out for XLA's CPU backend, which runs `jax.nn.dot_product_attention`'s
(batch, length, heads, dim) contractions 7-8x slower than torch's SDPA at 1,024 tokens:

- unmasked calls (the U-Net's and the VAE's) take `_blocked_attention`, flash-attention
  style: one head at a time (`lax.map` over batch x heads, because XLA:CPU's batched dots
  are several times slower than the same matmuls one by one), query blocks whose logits fit
  the L2 cache, a log-sum-exp saved instead of the (length x length) probabilities, and a
  custom VJP that recomputes each block's probabilities, working the blocks transposed so
  that no product needs a transposed left operand. Fwd+bwd at 1,024 tokens went from 3.5x
  to ~1.35x torch's (SDPA's flash kernel), at 256 tokens ~1.1x.
- masked, biased or causal calls (CLIP, the VLM) take two einsums in (batch, heads, length,
  dim) layout.

All paths compute softmax in float32 and mask with the same large negative number, so they
agree to rounding.
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
    return _heads_major_core(query, key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3), bias, mask,
                             is_causal, scale)


def _heads_major_core(query: jax.Array, k_t: jax.Array, v: jax.Array, bias: jax.Array | None,
                      mask: jax.Array | None, is_causal: bool, scale: float | None) -> jax.Array:
    """`_batched_matmul_attention` with keys already `(batch, kv_heads, dim, kv_len)` and
    values `(batch, kv_heads, kv_len, dim)`."""
    b, q_len, heads, head_dim = query.shape
    kv_heads, kv_len = k_t.shape[1], k_t.shape[3]
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    q = query.reshape(b, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    logits = jnp.einsum("bhgqd,bhdk->bhgqk", q, k_t, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, heads, q_len, kv_len) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((q_len, kv_len), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.reshape(b, kv_heads, groups, q_len, kv_len), v)
    return out.reshape(b, heads, q_len, head_dim).transpose(0, 2, 1, 3)


# Query rows per block: the (rows x kv_len) float32 logits stay within 1 MiB (half an L2
# cache), a head is cut into at least two blocks, and no block has fewer than 64 rows
# (measured at the U-Net's 256 and 1,024 tokens: 128 and 256 rows).
_BLOCK_BYTES = 1 << 20
_MIN_BLOCK_ROWS = 64


def _row_blocks(q_len: int, kv_len: int) -> list[tuple[int, int]]:
    rows = max(_MIN_BLOCK_ROWS, min(_BLOCK_BYTES // (4 * kv_len), -(-q_len // 2)))
    return [(a, min(a + rows, q_len)) for a in range(0, q_len, rows)]


# Without a VJP (sampling, inversion) the blocks may hold 2 MiB of logits, and attention over
# a shorter key sequence (cross-attention) takes a head in one block: measured at batch 8,
# self-attention at 1,024 tokens 25.0 -> 23.9 ms (512 rows), cross-attention 1,024 x 77
# 3.6 -> 3.3 ms. Self-attention at 256 tokens keeps two blocks (one was 14% slower).
_INFERENCE_BLOCK_BYTES = 2 << 20


def _inference_row_blocks(q_len: int, kv_len: int) -> list[tuple[int, int]]:
    at_most = q_len if kv_len < q_len else -(-q_len // 2)
    rows = max(_MIN_BLOCK_ROWS, min(_INFERENCE_BLOCK_BYTES // (4 * kv_len), at_most))
    return [(a, min(a + rows, q_len)) for a in range(0, q_len, rows)]


def _head_forward(q: jax.Array, k: jax.Array, v: jax.Array, inference: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """One head, float32 `(q_len, d)` (already scaled), `(kv_len, d)`: (softmax(q k^T) v,
    log-sum-exp `(q_len,)`)."""
    outs, lses = [], []
    blocks = _inference_row_blocks if inference else _row_blocks
    for a, b in blocks(q.shape[0], k.shape[0]):
        logits = q[a:b] @ k.T
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        outs.append((e @ v) / total)
        lses.append((top + jnp.log(total))[:, 0])
    return jnp.concatenate(outs), jnp.concatenate(lses)


def _head_backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                   g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one head from its saved output and log-sum-exp, each query block's
    probabilities recomputed, dS = P * (dP - rowsum(g * out)). The blocks are worked
    transposed, (kv_len, rows): then every product is a plain or right-transposed matmul
    (dV += P^T g and dK += dS^T q need no transposed left operand), the forms XLA:CPU runs
    fastest; with the (rows, kv_len) layout the two left-transposed products made the
    backward ~15-40% slower. dQ is formed per block as (dS^T^T k)^T and joined transposed:
    XLA folds that into one k^T dS^T product, measurably faster than dS k."""
    row_dot = jnp.sum(g * out, axis=-1)
    dq_t, dk, dv = [], None, None
    for a, b in _row_blocks(q.shape[0], k.shape[0]):
        probs_t = jnp.exp(k @ q[a:b].T - lse[None, a:b])
        d_logits_t = probs_t * (v @ g[a:b].T - row_dot[None, a:b])
        dv_b, dk_b = probs_t @ g[a:b], d_logits_t @ q[a:b]
        dv = dv_b if dv is None else dv + dv_b
        dk = dk_b if dk is None else dk + dk_b
        dq_t.append((d_logits_t.T @ k).T)
    return jnp.concatenate(dq_t, axis=1).T, dk, dv


@jax.custom_vjp
def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention over float32 `(batch * heads, length, head_dim)` arrays, the
    softmax scale already applied to `q`."""
    return jax.lax.map(lambda a: _head_forward(*a, inference=True)[0], (q, k, v))


def _blocked_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = jax.lax.map(lambda a: _head_forward(*a), (q, k, v))
    return out, (q, k, v, out, lse)


def _blocked_backward(residuals: tuple[jax.Array, ...], g: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jax.lax.map(lambda a: _head_backward(*a), (*residuals, g))


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def _unmasked_cpu_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                            scale: float | None) -> jax.Array:
    """`(batch, length, heads, dim)` in and out; heads of grouped-query calls repeated. The
    scale multiplies the queries once (autodiff scales their gradient), not every logit."""
    b, q_len, heads, head_dim = query.shape
    groups = heads // key.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale

    def per_head(x: jax.Array, repeat: int = 1) -> jax.Array:
        x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
        return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * heads, x.shape[1], head_dim)

    q = per_head(query) * jnp.float32(scale)
    out = _blocked_attention(q, per_head(key, groups), per_head(value, groups))
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


def heads_major_attention(query: jax.Array, key_t: jax.Array, value: jax.Array, mask: jax.Array | None
                          ) -> jax.Array:
    """Masked attention of `(batch, q_len, heads, dim)` queries over keys stored
    `(batch, kv_heads, dim, kv_len)` and values `(batch, kv_heads, kv_len, dim)` (a KV cache's
    layout), on every backend; output `(batch, q_len, heads, dim)`. Both dots (q K^T, P V)
    then read the cache as it lies: XLA:CPU copied slot-major or row-major keys transposed on
    every decoding step. The maths are `_batched_matmul_attention`'s (float32 logits and
    softmax, the same masked value)."""
    return _heads_major_core(query, key_t, value, None, mask, False, None).astype(query.dtype)
