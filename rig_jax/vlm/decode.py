"""Jitted decoding and teacher-forced scoring for Qwen2.5-VL, as pure functions.

`generate` = one prefill over the left-padded prompt (images included) that fills a
fixed-size KV cache, then a `lax.while_loop` of single-token steps over that cache (it exits
early once every row has emitted a stop token). Shapes are static: the cache holds
`prompt_len + max_new_tokens` slots.

Log-probs (float32). Every sampled token gets two:
- `logprobs`: log softmax(logits) at temperature 1 -- the model's own distribution;
- `policy_logprobs`: log softmax(logits / temperature) -- the distribution the token was
  drawn from (before top-k / top-p truncation, which the GRPO default leaves off).
GRPO's `pi_old` is the sampling policy, so the Actor trainer uses `policy_logprobs` and
`score(..., temperature=tau)` with the same `tau` for `pi_theta` and `pi_ref`. With
greedy decoding `policy_logprobs` uses the given temperature too (nothing is sampled).

Positions: decoding step k after a prompt of n real tokens uses M-RoPE position
`n + k + rope_delta` on all three axes (transformers' rule; `rope_deltas` comes from
`rig_jax.vlm.processor.mrope_position_ids`).

Batch dict: `input_ids`, `attention_mask` (B, L); `position_ids` (3, B, L); `rope_deltas` (B,);
optional `pixel_values` (N, patch_dim) with `image_grid_thw` (host numpy) or a precomputed
`vision` = `vision_inputs(image_grid_thw, ...)` -- `processor.prepare_batch`'s output works as is.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import RigError
from rig_jax.models.qwen2_5_vl.lm import init_cache
from rig_jax.models.qwen2_5_vl.model import Qwen25VL
from rig_jax.models.qwen2_5_vl.vision import vision_inputs

Batch = Mapping[str, Any]


def _model_inputs(batch: Batch, model: Qwen25VL) -> dict[str, Any]:
    """The arrays the jitted functions take; `vision` is derived from `image_grid_thw` on the
    host when the batch (e.g. `processor.prepare_batch`'s) does not carry it."""
    out = {"input_ids": jnp.asarray(batch["input_ids"], jnp.int32),
           "attention_mask": jnp.asarray(batch["attention_mask"], jnp.int32),
           "position_ids": jnp.asarray(batch["position_ids"], jnp.int32),
           "rope_deltas": jnp.asarray(batch["rope_deltas"], jnp.int32).reshape(-1)}
    if batch.get("pixel_values") is not None:
        out["pixel_values"] = jnp.asarray(batch["pixel_values"])
        vision = batch.get("vision")
        if vision is None:
            if model.config.vision is None or batch.get("image_grid_thw") is None:
                raise RigError("batch: pixel_values without image_grid_thw (or a text-only model)")
            vision = vision_inputs(np.asarray(batch["image_grid_thw"]), model.config.vision,
                                   num_patches=out["pixel_values"].shape[0])
        out["vision"] = {k: jnp.asarray(v) for k, v in vision.items()}
    return out


def _next_positions(batch: Batch, step: jax.Array | int, length: int = 1) -> jax.Array:
    """(3, B, length) positions of the tokens that follow the prompt, from step `step` on."""
    start = jnp.sum(batch["attention_mask"], axis=-1) + batch["rope_deltas"] + step  # (B,)
    pos = start[:, None] + jnp.arange(length)[None, :]
    return jnp.broadcast_to(pos[None], (3, *pos.shape)).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | float) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (k = 0, p = 1: off).
    The most likely token always survives."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # the smallest kept logit is the threshold
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, neg, logits)


def _pick(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array,
          greedy: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, V) float32 logits -> token, log p at temperature 1, log p at `temperature`."""
    scaled = logits / temperature
    if greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        token = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
    token = token.astype(jnp.int32)
    raw = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    policy = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, raw, policy


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy",
                                             "stop_token_ids", "pad_id"))
def _generate(model: Qwen25VL, params: Any, batch: dict[str, Any], rng: jax.Array, temperature: jax.Array,
              top_p: jax.Array, *, max_new_tokens: int, top_k: int, greedy: bool,
              stop_token_ids: tuple[int, ...], pad_id: int) -> dict[str, jax.Array]:
    b, prompt_len = batch["input_ids"].shape
    cache = init_cache(model.config.text, b, prompt_len + max_new_tokens, model.dtype)
    logits, cache = model.apply(
        {"params": params}, batch["input_ids"], batch["position_ids"], batch["attention_mask"],
        batch.get("pixel_values"), batch.get("vision"), cache, logits_slice=(prompt_len - 1, 1))
    stops = jnp.asarray(stop_token_ids or (-1,), jnp.int32)

    def record(state: dict[str, Any], step: jax.Array, logits: jax.Array) -> dict[str, Any]:
        token, raw, policy = _pick(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p, greedy)
        live = ~state["done"]
        token = jnp.where(live, token, pad_id)
        state = dict(state)
        state["tokens"] = state["tokens"].at[:, step].set(token)
        state["logprobs"] = state["logprobs"].at[:, step].set(jnp.where(live, raw, 0.0))
        state["policy_logprobs"] = state["policy_logprobs"].at[:, step].set(jnp.where(live, policy, 0.0))
        state["valid"] = state["valid"].at[:, step].set(live)
        state["done"] = state["done"] | (live & jnp.any(token[:, None] == stops[None, :], axis=-1))
        state["step"] = step + 1
        return state

    state = {
        "tokens": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        "logprobs": jnp.zeros((b, max_new_tokens), jnp.float32),
        "policy_logprobs": jnp.zeros((b, max_new_tokens), jnp.float32),
        "valid": jnp.zeros((b, max_new_tokens), bool),
        "done": jnp.zeros((b,), bool),
        "step": jnp.zeros((), jnp.int32),
        "cache": cache,
    }
    state = record(state, jnp.zeros((), jnp.int32), logits[:, 0])

    def cond(state: dict[str, Any]) -> jax.Array:
        return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def body(state: dict[str, Any]) -> dict[str, Any]:
        step = state["step"]
        previous = jax.lax.dynamic_slice_in_dim(state["tokens"], step - 1, 1, axis=1)
        logits, cache = model.apply(
            {"params": params}, previous, _next_positions(batch, step - 1), jnp.ones((b, 1), jnp.int32),
            cache=state["cache"])
        return record({**state, "cache": cache}, step, logits[:, 0])

    state = jax.lax.while_loop(cond, body, state)
    return {k: state[k] for k in ("tokens", "logprobs", "policy_logprobs", "valid")}


def generate(model: Qwen25VL, params: Any, batch: Batch, rng: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             stop_token_ids: Sequence[int] = (), pad_id: int = 0) -> dict[str, jax.Array]:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt of `batch`.

    Returns `tokens` (B, max_new_tokens) int32 (pad_id after a stop), `logprobs` and
    `policy_logprobs` (B, max_new_tokens) float32 (0 where invalid; see the module doc), and
    `valid` (B, max_new_tokens) bool: True up to and including the first stop token.
    `params` is the plain `params` collection. Compiled once per shape and static option.
    """
    if max_new_tokens < 1:
        raise RigError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise RigError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise RigError(f"generate: need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    temperature = 1.0 if temperature <= 0 else temperature
    return _generate(model, params, _model_inputs(batch, model), rng, jnp.float32(temperature),
                     jnp.float32(top_p), max_new_tokens=int(max_new_tokens), top_k=int(top_k),
                     greedy=bool(greedy),
                     stop_token_ids=tuple(int(t) for t in stop_token_ids), pad_id=int(pad_id))


@jax.custom_vjp
def _taken_log_probs(z: jax.Array, tokens: jax.Array) -> jax.Array:
    return _taken_log_probs_forward(z, tokens)[0]


def _taken_log_probs_forward(z: jax.Array, tokens: jax.Array
                             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    top = jnp.max(z, axis=-1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(z - top), axis=-1, keepdims=True))
    taken = jnp.take_along_axis(z, tokens[..., None], axis=-1)
    return (taken - lse)[..., 0], (z, tokens, lse)


def _taken_log_probs_backward(residuals: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
                              ) -> tuple[jax.Array, None]:
    z, tokens, lse = residuals
    hit = jnp.arange(z.shape[-1], dtype=tokens.dtype) == tokens[..., None]
    return g[..., None] * (hit.astype(z.dtype) - jnp.exp(z - lse)), None


_taken_log_probs.defvjp(_taken_log_probs_forward, _taken_log_probs_backward)


def taken_log_probs(z: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(z)[..., token] for each token, float32 (..., V) -> (...). The VJP forms
    dz = g * (onehot - softmax) in one elementwise pass from the saved z and log-sum-exp;
    autodiff of log_softmax + take_along_axis built a zero array, scattered into it and
    normalised in separate passes over the (B, C, V) cotangent."""
    return _taken_log_probs(z, tokens.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model: Qwen25VL, params: Any, batch: dict[str, Any], completions: jax.Array,
           temperature: jax.Array) -> jax.Array:
    b, prompt_len = batch["input_ids"].shape
    length = completions.shape[1]
    input_ids = jnp.concatenate([batch["input_ids"], completions], axis=1)
    mask = jnp.concatenate([batch["attention_mask"], jnp.ones((b, length), jnp.int32)], axis=1)
    positions = jnp.concatenate([batch["position_ids"], _next_positions(batch, 0, length)], axis=2)
    # a sampled token that happens to equal the image token id is text, not an image slot
    image_mask = jnp.concatenate([batch["input_ids"] == model.config.image_token_id,
                                  jnp.zeros((b, length), bool)], axis=1)
    logits, _ = model.apply({"params": params}, input_ids, positions, mask, batch.get("pixel_values"),
                            batch.get("vision"), logits_slice=(prompt_len - 1, length), image_mask=image_mask)
    return taken_log_probs(logits / temperature, completions)


def score(model: Qwen25VL, params: Any, batch: Batch, completions: Any, temperature: float = 1.0,
          completion_mask: Any = None) -> jax.Array:
    """Teacher-forced log-probs (B, C) float32 of `completions` (B, C) after the prompts of `batch`,
    under softmax(logits / temperature): `pi_theta` and `pi_ref` for GRPO ratios and the KL.

    Differentiable in `params`. Tokens after a stop (pad) do not change earlier log-probs
    (causal attention); `completion_mask` (e.g. `generate`'s `valid`) zeroes them.
    """
    if temperature <= 0:
        raise RigError(f"score: temperature must be > 0, got {temperature}")
    logp = _score(model, params, _model_inputs(batch, model), jnp.asarray(completions, jnp.int32),
                  jnp.float32(temperature))
    if completion_mask is not None:
        logp = jnp.where(jnp.asarray(completion_mask, bool), logp, 0.0)
    return logp
