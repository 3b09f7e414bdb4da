"""AutoencoderKL weights: the diffusers key table, loading and saving.

A diffusers VAE folder holds `config.json` and `diffusion_pytorch_model.safetensors`
(or shards with an index). Old diffusers saves name the mid-block attention
`query/key/value/proj_attn` instead of `to_q/to_k/to_v/to_out.0`; both are read.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.vae import AutoencoderKL, VAEConfig, init_params
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    CONV2D,
    IDENTITY,
    LINEAR,
    Entry,
    FlaxPath,
    KeyTable,
    convert_to_flax,
    convert_to_torch,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

_ATTENTION_NAMES = {
    "current": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out.0"},
    "deprecated": {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"},
}


def _add_conv(table: dict[FlaxPath, Entry], path: FlaxPath, key: str) -> None:
    table[path + ("kernel",)] = Entry(f"{key}.weight", CONV2D)
    table[path + ("bias",)] = Entry(f"{key}.bias", IDENTITY)


def _add_norm(table: dict[FlaxPath, Entry], path: FlaxPath, key: str) -> None:
    table[path + ("scale",)] = Entry(f"{key}.weight", IDENTITY)
    table[path + ("bias",)] = Entry(f"{key}.bias", IDENTITY)


def _add_resnet(table: dict[FlaxPath, Entry], path: FlaxPath, key: str, shortcut: bool) -> None:
    _add_norm(table, path + ("norm1",), f"{key}.norm1")
    _add_conv(table, path + ("conv1",), f"{key}.conv1")
    _add_norm(table, path + ("norm2",), f"{key}.norm2")
    _add_conv(table, path + ("conv2",), f"{key}.conv2")
    if shortcut:
        _add_conv(table, path + ("conv_shortcut",), f"{key}.conv_shortcut")


def _add_mid_block(table: dict[FlaxPath, Entry], path: FlaxPath, key: str, attention_names: str) -> None:
    _add_resnet(table, path + ("resnets_0",), f"{key}.resnets.0", shortcut=False)
    _add_resnet(table, path + ("resnets_1",), f"{key}.resnets.1", shortcut=False)
    attn, attn_key = path + ("attentions_0",), f"{key}.attentions.0"
    _add_norm(table, attn + ("group_norm",), f"{attn_key}.group_norm")
    for flax_name, torch_name in _ATTENTION_NAMES[attention_names].items():
        table[attn + (flax_name, "kernel")] = Entry(f"{attn_key}.{torch_name}.weight", LINEAR)
        table[attn + (flax_name, "bias")] = Entry(f"{attn_key}.{torch_name}.bias", IDENTITY)


def vae_key_table(config: VAEConfig, attention_names: str = "current") -> KeyTable:
    """Flax param path -> diffusers key for every weight of `AutoencoderKL(config)`.

    `attention_names` is "current" (`to_q`, ...) or "deprecated" (`query`, ...).
    """
    if attention_names not in _ATTENTION_NAMES:
        raise ConfigError(f"attention_names: expected one of {sorted(_ATTENTION_NAMES)}, "
                          f"got {attention_names!r}")
    table: dict[FlaxPath, Entry] = {}
    channels = config.block_out_channels
    # encoder
    _add_conv(table, ("encoder", "conv_in"), "encoder.conv_in")
    in_ch = channels[0]
    for i, out_ch in enumerate(channels):
        for j in range(config.layers_per_block):
            _add_resnet(table, ("encoder", f"down_blocks_{i}", f"resnets_{j}"),
                        f"encoder.down_blocks.{i}.resnets.{j}", shortcut=in_ch != out_ch)
            in_ch = out_ch
        if i < len(channels) - 1:
            _add_conv(table, ("encoder", f"down_blocks_{i}", "downsamplers_0", "conv"),
                      f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _add_mid_block(table, ("encoder", "mid_block"), "encoder.mid_block", attention_names)
    _add_norm(table, ("encoder", "conv_norm_out"), "encoder.conv_norm_out")
    _add_conv(table, ("encoder", "conv_out"), "encoder.conv_out")
    # decoder
    reversed_channels = tuple(reversed(channels))
    _add_conv(table, ("decoder", "conv_in"), "decoder.conv_in")
    _add_mid_block(table, ("decoder", "mid_block"), "decoder.mid_block", attention_names)
    in_ch = reversed_channels[0]
    for i, out_ch in enumerate(reversed_channels):
        for j in range(config.layers_per_block + 1):
            _add_resnet(table, ("decoder", f"up_blocks_{i}", f"resnets_{j}"),
                        f"decoder.up_blocks.{i}.resnets.{j}", shortcut=in_ch != out_ch)
            in_ch = out_ch
        if i < len(reversed_channels) - 1:
            _add_conv(table, ("decoder", f"up_blocks_{i}", "upsamplers_0", "conv"),
                      f"decoder.up_blocks.{i}.upsamplers.0.conv")
    _add_norm(table, ("decoder", "conv_norm_out"), "decoder.conv_norm_out")
    _add_conv(table, ("decoder", "conv_out"), "decoder.conv_out")
    if config.use_quant_conv:
        _add_conv(table, ("quant_conv",), "quant_conv")
    if config.use_post_quant_conv:
        _add_conv(table, ("post_quant_conv",), "post_quant_conv")
    return table


def vae_abstract_params(module: AutoencoderKL) -> Any:
    """Shapes and dtypes of the unboxed `params` collection, without computing it."""
    boxed = jax.eval_shape(lambda rng: init_params(module, rng), jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed)["params"]


def load_vae(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
             ) -> tuple[VAEConfig, AutoencoderKL, dict[str, Any]]:
    """Reads a diffusers AutoencoderKL folder: `(config, module, params)`.

    `params` is the plain `params` collection (numpy arrays in `param_dtype`): apply with
    `module.apply({"params": params}, x, method=module.encode)`. `dtype` is the compute dtype.
    """
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    config_path = os.path.join(folder, CONFIG_NAME)
    config = VAEConfig.from_diffusers(read_json(config_path), source=config_path)
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    deprecated = any(k.endswith("attentions.0.query.weight") for k in state)
    table = vae_key_table(config, "deprecated" if deprecated else "current")
    params = convert_to_flax(state, table, vae_abstract_params(module), source=folder)
    return config, module, params


def save_vae(folder: str, config_dict: Mapping[str, Any] | VAEConfig, params: Mapping[str, Any]) -> None:
    """Writes `params` (the `params` collection) as a diffusers AutoencoderKL folder that
    `diffusers.AutoencoderKL.from_pretrained` reads (float32 weights)."""
    if isinstance(config_dict, VAEConfig):
        config, out_config = config_dict, config_dict.to_diffusers()
    else:
        config = VAEConfig.from_diffusers(config_dict, source=f"{folder}/{CONFIG_NAME}")
        out_config = {"_class_name": "AutoencoderKL", **dict(config_dict)}
    if set(params) == {"params"}:
        params = params["params"]
    table = vae_key_table(config)
    state = convert_to_torch(params, table, source=folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
    write_json(out_config, os.path.join(folder, CONFIG_NAME))
