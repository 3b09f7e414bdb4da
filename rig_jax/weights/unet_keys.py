"""diffusers `unet/` folders <-> Flax U-Net params, through an explicit key table.

The table is generated from the resolved block structure of a `UNetConfig` (the same
`BlockSpec`s the module is built from), one entry per Flax param, so a checkpoint that
does not fit the config fails on the first missing, surplus or mis-shaped key.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rig_jax.models.unet import BlockSpec, UNet2DConditionModel, UNetConfig, example_inputs
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    CONV1X1_TO_LINEAR,
    CONV2D,
    IDENTITY,
    LINEAR,
    Entry,
    FlaxPath,
    KeyTable,
    Transform,
    check_param_tree,
    convert_to_flax,
    convert_to_torch,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class _TableBuilder:
    def __init__(self) -> None:
        self.table: dict[FlaxPath, Entry] = {}

    def add(self, flax_path: str, torch_key: str, transform: Transform = IDENTITY) -> None:
        self.table[tuple(flax_path.split("/"))] = Entry(torch_key, transform)

    def conv(self, flax: str, torch: str) -> None:
        self.add(f"{flax}/kernel", f"{torch}.weight", CONV2D)
        self.add(f"{flax}/bias", f"{torch}.bias")

    def dense(self, flax: str, torch: str, bias: bool = True, transform: Transform = LINEAR) -> None:
        self.add(f"{flax}/kernel", f"{torch}.weight", transform)
        if bias:
            self.add(f"{flax}/bias", f"{torch}.bias")

    def norm(self, flax: str, torch: str) -> None:
        self.add(f"{flax}/scale", f"{torch}.weight")
        self.add(f"{flax}/bias", f"{torch}.bias")

    def resnet(self, flax: str, torch: str, in_channels: int, out_channels: int) -> None:
        self.norm(f"{flax}/norm1", f"{torch}.norm1")
        self.conv(f"{flax}/conv1", f"{torch}.conv1")
        self.dense(f"{flax}/time_emb_proj", f"{torch}.time_emb_proj")
        self.norm(f"{flax}/norm2", f"{torch}.norm2")
        self.conv(f"{flax}/conv2", f"{torch}.conv2")
        if in_channels != out_channels:
            self.conv(f"{flax}/conv_shortcut", f"{torch}.conv_shortcut")

    def transformer(self, flax: str, torch: str, layers: int, linear_projection: bool) -> None:
        projection = LINEAR if linear_projection else CONV1X1_TO_LINEAR
        self.norm(f"{flax}/norm", f"{torch}.norm")
        self.dense(f"{flax}/proj_in", f"{torch}.proj_in", transform=projection)
        for k in range(layers):
            f, t = f"{flax}/transformer_blocks_{k}", f"{torch}.transformer_blocks.{k}"
            for n in ("norm1", "norm2", "norm3"):
                self.norm(f"{f}/{n}", f"{t}.{n}")
            for a in ("attn1", "attn2"):
                for p in ("to_q", "to_k", "to_v"):
                    self.dense(f"{f}/{a}/{p}", f"{t}.{a}.{p}", bias=False)
                self.dense(f"{f}/{a}/to_out_0", f"{t}.{a}.to_out.0")
            self.dense(f"{f}/ff/net_0_proj", f"{t}.ff.net.0.proj")
            self.dense(f"{f}/ff/net_2", f"{t}.ff.net.2")
        self.dense(f"{flax}/proj_out", f"{torch}.proj_out", transform=projection)

    def block(self, flax: str, torch: str, spec: BlockSpec, config: UNetConfig, resampler: str) -> None:
        for j, cin in enumerate(spec.resnet_in_channels):
            self.resnet(f"{flax}/resnets_{j}", f"{torch}.resnets.{j}", cin, spec.out_channels)
        for j in range(spec.num_attentions):
            self.transformer(f"{flax}/attentions_{j}", f"{torch}.attentions.{j}", spec.transformer_layers,
                             config.use_linear_projection)
        if spec.resample:
            self.conv(f"{flax}/{resampler}_0/conv", f"{torch}.{resampler}.0.conv")


def unet_key_table(config: UNetConfig) -> KeyTable:
    """Flax param path -> diffusers state-dict key (and layout transform), for `config`."""
    b = _TableBuilder()
    b.conv("conv_in", "conv_in")
    b.dense("time_embedding/linear_1", "time_embedding.linear_1")
    b.dense("time_embedding/linear_2", "time_embedding.linear_2")
    for i, spec in enumerate(config.down_block_specs()):
        b.block(f"down_blocks_{i}", f"down_blocks.{i}", spec, config, "downsamplers")
    b.block("mid_block", "mid_block", config.mid_block_spec(), config, "")
    for i, spec in enumerate(config.up_block_specs()):
        b.block(f"up_blocks_{i}", f"up_blocks.{i}", spec, config, "upsamplers")
    b.norm("conv_norm_out", "conv_norm_out")
    b.conv("conv_out", "conv_out")
    return b.table


def abstract_unet_params(module: UNet2DConditionModel) -> Any:
    """The unboxed param tree of `module` as ShapeDtypeStructs (nothing is computed)."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module.config))
    return nn.meta.unbox(boxed["params"])


def read_unet_config(folder: str) -> tuple[dict[str, Any], UNetConfig]:
    """`(raw config.json dict, parsed UNetConfig)` of a diffusers `unet/` folder; the raw
    dict is what `save_unet` writes back, so unknown-to-us metadata survives a round trip."""
    path = os.path.join(folder, CONFIG_NAME)
    raw = read_json(path)
    return raw, UNetConfig.from_diffusers(raw, source=path)


def load_unet(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              gradient_checkpointing: bool = False
              ) -> tuple[UNetConfig, UNet2DConditionModel, dict[str, Any]]:
    """Reads a diffusers `unet/` folder (config.json + safetensors, sharded or not).

    Returns `(config, module, params)`: `module` computes in `dtype`; `params` is a plain
    (unboxed) tree of host arrays in `param_dtype`. Strict: a missing, surplus or
    mis-shaped tensor is a WeightsError naming the key, an unsupported config field a
    ConfigError naming the field.
    """
    _, config = read_unet_config(folder)
    if gradient_checkpointing:
        config = dataclasses.replace(config, gradient_checkpointing=True)
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype)
    expected = abstract_unet_params(module)
    state = load_safetensors_folder(folder)
    params = convert_to_flax(state, unet_key_table(config), expected, source=folder)
    return config, module, params


def save_unet(folder: str, config_dict: Mapping[str, Any] | UNetConfig, params: Mapping[str, Any]) -> None:
    """Writes `params` as a diffusers `unet/` folder (config.json +
    diffusion_pytorch_model.safetensors, float32) that `UNet2DConditionModel.from_pretrained`
    loads. `config_dict` is the diffusers config (e.g. the one read by `read_unet_config`)
    or a UNetConfig; the params must match it exactly (WeightsError naming the param)."""
    if isinstance(config_dict, UNetConfig):
        config, raw = config_dict, config_dict.to_diffusers()
    else:
        raw = dict(config_dict)
        config = UNetConfig.from_diffusers(raw, source=f"{folder} (config to save)")
    raw.setdefault("_class_name", "UNet2DConditionModel")
    check_param_tree(params, abstract_unet_params(UNet2DConditionModel(config)), folder)
    tensors = convert_to_torch(params, unet_key_table(config))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(tensors, os.path.join(folder, WEIGHTS_NAME))
    write_json(raw, os.path.join(folder, CONFIG_NAME))
