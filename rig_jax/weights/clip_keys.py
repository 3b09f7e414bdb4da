"""CLIP text encoder weights: key table, loading (both key layouts) and saving.

transformers < 5.6 and every real Stable Diffusion checkpoint store `CLIPTextModel` under
a `text_model.` level (`text_model.encoder.layers.0...`); transformers >= 5.6 saves it
flat (`encoder.layers.0...`). `load_clip_text` detects which is present. The
`embeddings.position_ids` buffer some saves carry is ignored.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, init_params
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    IDENTITY,
    LINEAR,
    Entry,
    FlaxPath,
    KeyTable,
    convert_to_flax,
    convert_to_torch,
)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LAYOUT_PREFIXES = {"text_model": "text_model.", "flat": ""}


def clip_key_table(config: CLIPTextConfig, prefix: str = "text_model.") -> KeyTable:
    """Flax param path -> transformers key for every weight of `CLIPTextModel(config)`.

    `prefix` is "text_model." (old layout, SD checkpoints) or "" (transformers >= 5.6).
    """
    table: dict[FlaxPath, Entry] = {
        ("embeddings", "token_embedding", "embedding"): Entry(f"{prefix}embeddings.token_embedding.weight"),
        ("embeddings", "position_embedding", "embedding"):
            Entry(f"{prefix}embeddings.position_embedding.weight"),
        ("final_layer_norm", "scale"): Entry(f"{prefix}final_layer_norm.weight"),
        ("final_layer_norm", "bias"): Entry(f"{prefix}final_layer_norm.bias"),
    }
    for i in range(config.num_hidden_layers):
        path, key = ("encoder", f"layers_{i}"), f"{prefix}encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            table[path + (norm, "scale")] = Entry(f"{key}.{norm}.weight", IDENTITY)
            table[path + (norm, "bias")] = Entry(f"{key}.{norm}.bias", IDENTITY)
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
                           ("mlp", ("fc1", "fc2"))):
            for name in names:
                table[path + (sub, name, "kernel")] = Entry(f"{key}.{sub}.{name}.weight", LINEAR)
                table[path + (sub, name, "bias")] = Entry(f"{key}.{sub}.{name}.bias", IDENTITY)
    return table


def clip_abstract_params(module: CLIPTextModel) -> Any:
    """Shapes and dtypes of the unboxed `params` collection, without computing it."""
    boxed = jax.eval_shape(lambda rng: init_params(module, rng, length=1), jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed)["params"]


def detect_layout(keys: Any, source: str) -> str:
    """"text_model" when the checkpoint nests the model under `text_model.`, else "flat"."""
    keys = list(keys)
    if any(k.startswith("text_model.") for k in keys):
        return "text_model"
    if any(k.startswith(("encoder.", "embeddings.")) for k in keys):
        return "flat"
    raise WeightsError(f"{source}: no CLIP text encoder keys "
                       "(expected text_model.* or encoder.* / embeddings.*)")


def _ignored(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def load_clip_text(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                   ) -> tuple[CLIPTextConfig, CLIPTextModel, dict[str, Any]]:
    """Reads a transformers CLIPTextModel folder (either key layout): `(config, module, params)`.

    `params` is the plain `params` collection in `param_dtype`: apply with
    `module.apply({"params": params}, ids)`. `dtype` is the compute dtype.
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    config_path = os.path.join(folder, CONFIG_NAME)
    config = CLIPTextConfig.from_hf(read_json(config_path), source=config_path)
    module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    layout = detect_layout(state.keys(), folder)
    table = clip_key_table(config, LAYOUT_PREFIXES[layout])
    params = convert_to_flax(state, table, clip_abstract_params(module), source=folder, ignore=_ignored)
    return config, module, params


def save_clip_text(folder: str, config_dict: Mapping[str, Any] | CLIPTextConfig, params: Mapping[str, Any],
                   layout: str = "text_model") -> None:
    """Writes `params` as a transformers CLIPTextModel folder (float32 weights).

    `layout="text_model"` writes the nested names real SD checkpoints use (read by every
    transformers version); `"flat"` writes the transformers >= 5.6 names.
    """
    if layout not in LAYOUT_PREFIXES:
        raise ConfigError(f"layout: expected one of {sorted(LAYOUT_PREFIXES)}, got {layout!r}")
    if isinstance(config_dict, CLIPTextConfig):
        config, out_config = config_dict, config_dict.to_hf()
    else:
        config = CLIPTextConfig.from_hf(config_dict, source=f"{folder}/{CONFIG_NAME}")
        out_config = dict(config_dict)
        out_config.setdefault("model_type", "clip_text_model")
        out_config.setdefault("architectures", ["CLIPTextModel"])
    if set(params) == {"params"}:
        params = params["params"]
    table = clip_key_table(config, LAYOUT_PREFIXES[layout])
    state = convert_to_torch(params, table, source=folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
    write_json(out_config, os.path.join(folder, CONFIG_NAME))
