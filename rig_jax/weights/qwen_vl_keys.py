"""Qwen2.5-VL weights: key tables for both Hugging Face layouts, loading and saving.

Two layouts exist for `Qwen2_5_VLForConditionalGeneration`:
- "hf5" (transformers >= 5 module names): `model.language_model.*`, `model.visual.*`, `lm_head.*`;
- "legacy" (hub checkpoints, and what transformers 5.24 still writes): `model.*` for the
  decoder, `visual.*`, `lm_head.*`.
`load_qwen_vl` detects which one a folder holds; conversion is strict either way.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs
from rig_jax.models.qwen2_5_vl.vision import VisionConfig
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    IDENTITY,
    LINEAR,
    Entry,
    FlaxPath,
    KeyTable,
    Transform,
    convert_to_flax,
    convert_to_torch,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAYOUTS = {
    "hf5": {"lm": "model.language_model.", "visual": "model.visual."},
    "legacy": {"lm": "model.", "visual": "visual."},
}


def _patch_embed_transform(vision: VisionConfig) -> Transform:
    """Conv3d weight (E, C, T, p, p) with kernel = stride <-> Dense kernel (C*T*p*p, E)."""
    shape = (vision.hidden_size, vision.in_channels, vision.temporal_patch_size,
             vision.patch_size, vision.patch_size)
    return Transform("conv3d_patch_to_linear",
                     lambda x: x.reshape(x.shape[0], -1).T,
                     lambda x: x.T.reshape(shape))


def _linear(table: dict[FlaxPath, Entry], path: FlaxPath, key: str, bias: bool) -> None:
    table[path + ("kernel",)] = Entry(f"{key}.weight", LINEAR)
    if bias:
        table[path + ("bias",)] = Entry(f"{key}.bias", IDENTITY)


def qwen_vl_key_table(config: Qwen25VLConfig, layout: str = "legacy") -> KeyTable:
    """Flax param path -> HF key for every weight of `Qwen25VL(config)`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
    lm, visual = LAYOUTS[layout]["lm"], LAYOUTS[layout]["visual"]
    table: dict[FlaxPath, Entry] = {}
    text = config.text
    base: FlaxPath = ("language_model",)
    table[base + ("embed_tokens", "embedding")] = Entry(f"{lm}embed_tokens.weight")
    for i in range(text.num_hidden_layers):
        path, key = base + (f"layers_{i}",), f"{lm}layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            _linear(table, path + ("self_attn", proj), f"{key}.self_attn.{proj}", bias=True)
        _linear(table, path + ("self_attn", "o_proj"), f"{key}.self_attn.o_proj", bias=False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            _linear(table, path + ("mlp", proj), f"{key}.mlp.{proj}", bias=False)
        table[path + ("input_layernorm", "scale")] = Entry(f"{key}.input_layernorm.weight")
        table[path + ("post_attention_layernorm", "scale")] = Entry(f"{key}.post_attention_layernorm.weight")
    table[base + ("norm", "scale")] = Entry(f"{lm}norm.weight")
    if not config.tie_word_embeddings:
        table[("lm_head",)] = Entry("lm_head.weight", LINEAR)
    vision = config.vision
    if vision is not None:
        base = ("visual",)
        table[base + ("patch_embed", "kernel")] = Entry(f"{visual}patch_embed.proj.weight",
                                                         _patch_embed_transform(vision))
        for i in range(vision.depth):
            path, key = base + (f"blocks_{i}",), f"{visual}blocks.{i}"
            table[path + ("norm1", "scale")] = Entry(f"{key}.norm1.weight")
            table[path + ("norm2", "scale")] = Entry(f"{key}.norm2.weight")
            _linear(table, path + ("attn", "qkv"), f"{key}.attn.qkv", bias=True)
            _linear(table, path + ("attn", "proj"), f"{key}.attn.proj", bias=True)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                _linear(table, path + ("mlp", proj), f"{key}.mlp.{proj}", bias=True)
        table[base + ("merger", "ln_q", "scale")] = Entry(f"{visual}merger.ln_q.weight")
        _linear(table, base + ("merger", "mlp_0"), f"{visual}merger.mlp.0", bias=True)
        _linear(table, base + ("merger", "mlp_2"), f"{visual}merger.mlp.2", bias=True)
    return table


def detect_layout(keys: Any, source: str) -> str:
    """"hf5" if the decoder lives under `model.language_model.`, "legacy" if under `model.`."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "hf5"
    if any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys):
        return "legacy"
    raise WeightsError(f"{source}: no Qwen2.5-VL decoder keys (neither model.language_model.* "
                       "nor model.layers.*)")


def qwen_vl_boxed_params(module: Qwen25VL) -> Any:
    """The abstract boxed `params` collection (logical axis names attached), no compute."""
    inputs = dummy_inputs(module.config)
    return jax.eval_shape(lambda rng: module.init(rng, **inputs), jax.random.PRNGKey(0))["params"]


def qwen_vl_abstract_params(module: Qwen25VL) -> Any:
    return nn.meta.unbox(qwen_vl_boxed_params(module))


def load_config(folder: str) -> Qwen25VLConfig:
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    path = os.path.join(folder, CONFIG_NAME)
    return Qwen25VLConfig.from_hf(read_json(path), source=path)


def load_qwen_vl(folder: str, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32,
                 shardings: Any = None) -> tuple[Qwen25VLConfig, Qwen25VL, dict[str, Any]]:
    """Reads a local HF Qwen2.5-VL folder: `(config, module, params)`.

    `params` is the plain `params` collection in `param_dtype` (numpy, or placed with
    `shardings`, a matching tree of shardings); `dtype` is the compute dtype. Apply with
    `module.apply({"params": params}, ...)`. With tied embeddings a stored `lm_head.weight`
    (some exports keep the duplicate) is ignored.
    """
    config = load_config(folder)
    module = Qwen25VL(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    table = qwen_vl_key_table(config, detect_layout(state, folder))
    ignore = (lambda k: k == "lm_head.weight") if config.tie_word_embeddings else (lambda k: False)
    params = convert_to_flax(state, table, qwen_vl_abstract_params(module), source=folder, ignore=ignore)
    if shardings is not None:
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
    return config, module, params


def save_qwen_vl(folder: str, config_json: Mapping[str, Any], params: Mapping[str, Any],
                 layout: str = "legacy") -> None:
    """Writes `params` as an HF folder (float32 weights) with `config_json` as config.json;
    transformers' `from_pretrained` reads both layouts."""
    config = Qwen25VLConfig.from_hf(config_json, source=f"{folder}/{CONFIG_NAME}")
    state = convert_to_torch(params, qwen_vl_key_table(config, layout))
    save_safetensors({k: np.asarray(v) for k, v in state.items()}, os.path.join(folder, WEIGHTS_NAME))
    write_json(dict(config_json), os.path.join(folder, CONFIG_NAME))
