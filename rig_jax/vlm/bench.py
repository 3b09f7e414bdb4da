"""Decoding throughput of the Qwen2 decoder (text-only, random weights), for tools/benchmark.py."""
from __future__ import annotations

import statistics
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.models.qwen2_5_vl.lm import TextConfig
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs
from rig_jax.parallel import DEFAULT_RULES, activation_sharding, init_sharded, make_mesh
from rig_jax.vlm.decode import generate

# Decoder shapes by name: (TextConfig, tied embeddings).
SHAPES: dict[str, tuple[TextConfig, bool]] = {
    "tiny": (TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)), False),
    "qwen2-1.5b": (TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2), True),
    "qwen2.5-vl-3b": (TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2), True),
    "qwen2.5-vl-7b": (TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4), False),
}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16,
          "bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def benchmark_decode(shape: str, batch: int = 8, prompt_len: int = 128, new_tokens: int = 128,
                     dtype: str = "bfloat16", repeats: int = 3, greedy: bool = False,
                     mesh_shape: Sequence[int] = (1, -1, 1)) -> dict[str, Any]:
    """Tokens/s of prefill + `new_tokens` sampled decoding steps (no early stop) for a
    random-weight decoder of the named shape, params (in `dtype`) initialised sharded under
    jit on a mesh over all devices. Times are medians of `repeats` runs after a warm-up.

    The returned dict leaves out the shape and the device (the caller's JSON line names them)."""
    if shape not in SHAPES:
        raise ConfigError(f"benchmark shape {shape!r}: expected one of {sorted(SHAPES)}")
    if dtype not in DTYPES:
        raise ConfigError(f"benchmark dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if min(batch, prompt_len, new_tokens, repeats) < 1:
        raise ConfigError("benchmark: batch, prompt_len, new_tokens and repeats must be >= 1")
    text, tied = SHAPES[shape]
    config = Qwen25VLConfig(text=text, vision=None, tie_word_embeddings=tied)
    module = Qwen25VL(config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    mesh = make_mesh(types.SimpleNamespace(shape=tuple(mesh_shape)))
    inputs = dummy_inputs(config)
    params, _ = init_sharded(lambda rng: module.init(rng, **inputs)["params"], mesh, DEFAULT_RULES,
                             jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def place(x: np.ndarray, names: tuple[str | None, ...]) -> jax.Array:
        return jax.device_put(x, activation_sharding(mesh, DEFAULT_RULES, names, x.shape))

    ids = np.random.default_rng(0).integers(0, text.vocab_size, (batch, prompt_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (3, batch, prompt_len)).copy()
    prompts = {"input_ids": place(ids, ("batch", None)),
               "attention_mask": place(np.ones_like(ids), ("batch", None)),
               "position_ids": place(positions, (None, "batch", None)),
               "rope_deltas": place(np.zeros((batch,), np.int32), ("batch",))}
    rng = jax.random.PRNGKey(1)

    def run(steps: int) -> Any:
        return generate(module, params, prompts, rng, steps, temperature=1.0, greedy=greedy)

    compile_s = _timed(lambda: run(new_tokens))
    _timed(lambda: run(1))
    total = statistics.median(_timed(lambda: run(new_tokens)) for _ in range(repeats))
    prefill = statistics.median(_timed(lambda: run(1)) for _ in range(repeats))
    decode_s = max(total - prefill, 1e-9)
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": dtype,
        "greedy": greedy, "params": n_params, "mesh_shape": list(mesh.devices.shape),
        "repeats": repeats, "compile_s": round(compile_s, 3),
        "prefill_s": round(prefill, 5), "total_s": round(total, 5),
        "tokens_per_s": round(batch * new_tokens / total, 2),
        "decode_tokens_per_s": round(batch * max(new_tokens - 1, 0) / decode_s, 2),
        "prefill_tokens_per_s": round(batch * prompt_len / prefill, 2),
    }
