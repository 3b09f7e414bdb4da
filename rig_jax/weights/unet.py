"""diffusers `unet/` folders <-> the Flax U-Net: config reader, key table, load, save.

The config reader knows every argument of diffusers' `UNet2DConditionModel.__init__`: each is
parsed, fixed to its default, or refused with a ConfigError naming field and file (SDXL's
`addition_embed_type`, `class_embed_type`, ...). diffusers' `attention_head_dim` is really the
head count (with `num_attention_heads` unset), stored as `UNetConfig.attention_heads`.

The key table is generated from the resolved block structure of a `UNetConfig` (the same
`BlockSpec`s the module is built from), one entry per Flax param, so a checkpoint that
does not fit the config fails on the first missing, surplus or mis-shaped key.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rig_jax.errors import ConfigError
from rig_jax.models.unet import (
    DOWN_BLOCK_TYPES,
    MID_BLOCK_TYPE,
    UP_BLOCK_TYPES,
    BlockSpec,
    UNet2DConditionModel,
    UNetConfig,
    example_inputs,
)
from rig_jax.parallel.rules import LogicalRules, unbox_abstract
from rig_jax.weights.fields import FieldReader
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    CONV1X1_TO_LINEAR,
    LINEAR,
    KeyTable,
    KeyTableBuilder,
    check_param_tree,
    convert_to_flax,
    convert_to_torch,
)
from rig_jax.weights.placement import boxed_params, placer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Every argument of diffusers' UNet2DConditionModel.__init__, with its default there.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": MID_BLOCK_TYPE,
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# rig_jax's own fields (diffusers stores them in config.json and ignores them, with a warning).
RIG_FIELDS: dict[str, Any] = {"coordinate_channels": 0}

# Fields whose only supported value is diffusers' default (SDXL / Kandinsky / LCM /
# upscaler features, training-time dropout). A different value is a ConfigError.
_FIXED_FIELDS = (
    "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "num_attention_heads", "dual_cross_attention", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift", "time_embedding_type",
    "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
    "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim", "attention_type",
    "class_embeddings_concat", "mid_block_type",
)
_FIXED_REASONS = {
    "num_attention_heads": "diffusers' UNet2DConditionModel itself refuses it; SD configs give the "
                           "head count as attention_head_dim",
    "mid_block_type": f"only {MID_BLOCK_TYPE} is built",
}
# Fields diffusers reads only for block types we do not build (Simple*/ResnetDownsample*):
# any value gives the same network here.
_INERT_FIELDS = ("resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
                 "mid_block_only_cross_attention", "addition_embed_type_num_heads")


# ---- config.json ------------------------------------------------------------------


def _per_block(fields: FieldReader, field: str, n: int) -> tuple[int, ...]:
    """An int or a list of `n` ints (diffusers' per-down-block fields)."""
    value = fields.raw(field)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise fields.fail(f"field {field} has {len(value)} entries for {n} down blocks")
        return tuple(fields.as_integer(field, v) for v in value)
    return (fields.integer(field),) * n


def _block_types(fields: FieldReader, field: str, n: int, allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = fields.raw(field)
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise fields.fail(f"field {field} must list {n} block types (one per block_out_channels entry), "
                          f"got {value!r}")
    out = []
    for t in value:
        t = t[len("UNetRes"):] if isinstance(t, str) and t.startswith("UNetRes") else t
        if t not in allowed:
            raise fields.fail(f"unsupported field {field} entry {t!r} (expected one of {allowed})")
        out.append(t)
    return tuple(out)


def _sample_size(fields: FieldReader) -> int | tuple[int, int] | None:
    value = fields.raw("sample_size")
    if isinstance(value, (list, tuple)):
        size = tuple(fields.as_integer("sample_size", s) for s in value)
        if len(size) != 2:
            raise fields.fail(f"field sample_size must be an int or [height, width], got {value!r}")
        return size
    return None if value is None else fields.integer("sample_size")


def unet_config_from_diffusers(d: Mapping[str, Any], source: str = "config") -> UNetConfig:
    """Parses a diffusers UNet2DConditionModel config dict; `source` names the file.

    A field this implementation does not build with a non-default value (SDXL's
    `addition_embed_type`, `class_embed_type`, `time_cond_proj_dim`, ...) or a field
    diffusers does not have is a ConfigError naming it. Keys starting with `_` are
    diffusers metadata (`_class_name`, `_diffusers_version`, `_name_or_path`, ...), and the
    `_INERT_FIELDS` are accepted with any value (diffusers reads them only for block
    types this U-Net does not have).
    """
    known = {**DIFFUSERS_DEFAULTS, **RIG_FIELDS}
    fields = FieldReader(d, source, known)
    class_name = fields.raw("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise fields.fail(f"field _class_name is {class_name!r}; only UNet2DConditionModel is supported")
    fields.refuse_unknown(known, "UNet2DConditionModel", ignored=lambda k: k.startswith("_"))
    for field in _FIXED_FIELDS:
        fields.fixed(field, _FIXED_REASONS.get(field, "not supported by this implementation"))

    channels = fields.raw("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels:
        raise fields.fail(f"field block_out_channels must be a non-empty list, got {channels!r}")
    channels = fields.integers("block_out_channels")
    n = len(channels)
    down_types = _block_types(fields, "down_block_types", n, DOWN_BLOCK_TYPES)
    up_types = _block_types(fields, "up_block_types", n, UP_BLOCK_TYPES)

    only_cross = fields.raw("only_cross_attention")
    flags = only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]
    if any(f is not False for f in flags):
        raise fields.fail(f"unsupported field only_cross_attention={only_cross!r} (only false)")
    if fields.raw("dropout") != 0:
        raise fields.fail(f"unsupported field dropout={fields.raw('dropout')!r} (only 0: dropout is not "
                          "implemented)")
    if fields.raw("act_fn") not in ("silu", "swish"):
        raise fields.fail(f"unsupported field act_fn={fields.raw('act_fn')!r} (only silu)")
    cross_dim = fields.raw("cross_attention_dim")
    if isinstance(cross_dim, (list, tuple)):
        raise fields.fail(f"unsupported field cross_attention_dim={cross_dim!r} (one int for all blocks)")
    if fields.raw("norm_num_groups") is None:
        raise fields.fail("unsupported field norm_num_groups=None (GroupNorm is required)")
    try:
        return UNetConfig(
            sample_size=_sample_size(fields),
            in_channels=fields.integer("in_channels"),
            out_channels=fields.integer("out_channels"),
            center_input_sample=fields.boolean("center_input_sample"),
            flip_sin_to_cos=fields.boolean("flip_sin_to_cos"),
            freq_shift=fields.number("freq_shift"),
            down_block_types=down_types,
            up_block_types=up_types,
            block_out_channels=channels,
            layers_per_block=_per_block(fields, "layers_per_block", n),
            downsample_padding=fields.integer("downsample_padding", minimum=0),
            mid_block_scale_factor=fields.number("mid_block_scale_factor", positive=True),
            norm_num_groups=fields.integer("norm_num_groups"),
            norm_eps=fields.number("norm_eps", positive=True),
            cross_attention_dim=fields.integer("cross_attention_dim"),
            transformer_layers_per_block=_per_block(fields, "transformer_layers_per_block", n),
            attention_heads=_per_block(fields, "attention_head_dim", n),
            use_linear_projection=fields.boolean("use_linear_projection"),
            upcast_attention=fields.boolean("upcast_attention"),
            coordinate_channels=fields.integer("coordinate_channels", minimum=0),
        )
    except ConfigError as e:
        message = str(e)
        if message.startswith(f"{source}: "):
            raise
        raise fields.fail(message.removeprefix("UNetConfig: ")) from None


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The diffusers config dict of this architecture (for `save_unet` and tests)."""
    size = config.sample_size
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": list(size) if isinstance(size, tuple) else size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": config.center_input_sample,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "down_block_types": list(config.down_block_types),
        "mid_block_type": MID_BLOCK_TYPE,
        "up_block_types": list(config.up_block_types),
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": list(config.layers_per_block),
        "downsample_padding": config.downsample_padding,
        "mid_block_scale_factor": config.mid_block_scale_factor,
        "act_fn": "silu",
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "cross_attention_dim": config.cross_attention_dim,
        "transformer_layers_per_block": list(config.transformer_layers_per_block),
        "attention_head_dim": list(config.attention_heads),
        "use_linear_projection": config.use_linear_projection,
        "upcast_attention": config.upcast_attention,
        **({"coordinate_channels": config.coordinate_channels} if config.coordinate_channels else {}),
    }


def read_unet_config(folder: str) -> tuple[dict[str, Any], UNetConfig]:
    """`(raw config.json dict, parsed UNetConfig)` of a diffusers `unet/` folder; the raw
    dict is what `save_unet` writes back, so unknown-to-us metadata survives a round trip."""
    path = os.path.join(folder, CONFIG_NAME)
    raw = read_json(path)
    return raw, unet_config_from_diffusers(raw, source=path)


# ---- key table --------------------------------------------------------------------


def _transformer(b: KeyTableBuilder, flax: str, key: str, layers: int, linear_projection: bool) -> None:
    projection = LINEAR if linear_projection else CONV1X1_TO_LINEAR
    b.norm(f"{flax}/norm", f"{key}.norm")
    b.dense(f"{flax}/proj_in", f"{key}.proj_in", transform=projection)
    for k in range(layers):
        f, t = f"{flax}/transformer_blocks_{k}", f"{key}.transformer_blocks.{k}"
        for n in ("norm1", "norm2", "norm3"):
            b.norm(f"{f}/{n}", f"{t}.{n}")
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v"):
                b.dense(f"{f}/{a}/{p}", f"{t}.{a}.{p}", bias=False)
            b.dense(f"{f}/{a}/to_out_0", f"{t}.{a}.to_out.0")
        b.dense(f"{f}/ff/net_0_proj", f"{t}.ff.net.0.proj")
        b.dense(f"{f}/ff/net_2", f"{t}.ff.net.2")
    b.dense(f"{flax}/proj_out", f"{key}.proj_out", transform=projection)


def _block(b: KeyTableBuilder, flax: str, key: str, spec: BlockSpec, config: UNetConfig,
           resampler: str) -> None:
    for j, cin in enumerate(spec.resnet_in_channels):
        b.resnet2d(f"{flax}/resnets_{j}", f"{key}.resnets.{j}", shortcut=cin != spec.out_channels,
                   time_embedding=True)
    for j in range(spec.num_attentions):
        _transformer(b, f"{flax}/attentions_{j}", f"{key}.attentions.{j}", spec.transformer_layers,
                     config.use_linear_projection)
    if spec.resample:
        b.conv(f"{flax}/{resampler}_0/conv", f"{key}.{resampler}.0.conv")


def unet_key_table(config: UNetConfig) -> KeyTable:
    """Flax param path -> diffusers state-dict key (and layout transform), for `config`."""
    b = KeyTableBuilder()
    b.conv("conv_in", "conv_in")
    b.dense("time_embedding/linear_1", "time_embedding.linear_1")
    b.dense("time_embedding/linear_2", "time_embedding.linear_2")
    for i, spec in enumerate(config.down_block_specs()):
        _block(b, f"down_blocks_{i}", f"down_blocks.{i}", spec, config, "downsamplers")
    _block(b, "mid_block", "mid_block", config.mid_block_spec(), config, "")
    for i, spec in enumerate(config.up_block_specs()):
        _block(b, f"up_blocks_{i}", f"up_blocks.{i}", spec, config, "upsamplers")
    b.norm("conv_norm_out", "conv_norm_out")
    b.conv("conv_out", "conv_out")
    return b.build()


# ---- load / save ------------------------------------------------------------------


def unet_boxed_params(module: UNet2DConditionModel) -> Any:
    """The abstract boxed `params` of `module` (shapes, dtypes, logical axis names)."""
    return boxed_params(module.init, jax.random.key(0), *example_inputs(module.config))


def unet_abstract_params(module: UNet2DConditionModel) -> Any:
    """The unboxed param tree of `module` as ShapeDtypeStructs (nothing is computed)."""
    return unbox_abstract(unet_boxed_params(module))


def load_unet(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              gradient_checkpointing: bool = False, *, mesh: Mesh | None = None,
              rules: LogicalRules | None = None) -> tuple[UNetConfig, UNet2DConditionModel, dict[str, Any]]:
    """Reads a diffusers `unet/` folder (config.json + safetensors, sharded or not).

    Returns `(config, module, params)`: `module` computes in `dtype`; `params` is a plain
    (unboxed) tree in `param_dtype`: host arrays without `mesh`, else global arrays placed
    leaf by leaf with the shardings `rules` give (None: the active `nn.logical_axis_rules`,
    else the defaults). Strict: a missing, surplus or mis-shaped tensor is a WeightsError
    naming the key, an unsupported config field a ConfigError naming the field.
    """
    _, config = read_unet_config(folder)
    if gradient_checkpointing:
        config = dataclasses.replace(config, gradient_checkpointing=True)
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype)
    boxed = unet_boxed_params(module)
    state = load_safetensors_folder(folder)
    params = convert_to_flax(state, unet_key_table(config), unbox_abstract(boxed), source=folder,
                             place=placer(boxed, mesh, rules))
    return config, module, params


def save_unet(folder: str, config_dict: Mapping[str, Any] | UNetConfig, params: Mapping[str, Any]) -> None:
    """Writes `params` as a diffusers `unet/` folder (config.json +
    diffusion_pytorch_model.safetensors, float32) that `UNet2DConditionModel.from_pretrained`
    loads. `config_dict` is the diffusers config (e.g. the one read by `read_unet_config`)
    or a UNetConfig; the params must match it exactly (WeightsError naming the param)."""
    if isinstance(config_dict, UNetConfig):
        config, raw = config_dict, unet_config_to_diffusers(config_dict)
    else:
        raw = dict(config_dict)
        config = unet_config_from_diffusers(raw, source=f"{folder} (config to save)")
    raw.setdefault("_class_name", "UNet2DConditionModel")
    check_param_tree(params, unet_abstract_params(UNet2DConditionModel(config)), folder)
    tensors = convert_to_torch(params, unet_key_table(config))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(tensors, os.path.join(folder, WEIGHTS_NAME))
    write_json(raw, os.path.join(folder, CONFIG_NAME))
