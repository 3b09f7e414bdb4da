"""diffusers AutoencoderKL folders <-> the Flax VAE: config reader, key table, load, save.

A diffusers VAE folder holds `config.json` and `diffusion_pytorch_model.safetensors`
(or shards with an index). Old diffusers saves name the mid-block attention
`query/key/value/proj_attn` instead of `to_q/to_k/to_v/to_out.0`; both are read.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.vae import AutoencoderKL, VAEConfig, init_params
from rig_jax.parallel.rules import LogicalRules, unbox_abstract
from rig_jax.weights.fields import FieldReader
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import KeyTable, KeyTableBuilder, convert_to_flax, convert_to_torch
from rig_jax.weights.placement import boxed_params, placer

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# Fields of the diffusers AutoencoderKL config, with the defaults diffusers uses.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


# ---- config.json ------------------------------------------------------------------


def _sample_size(fields: FieldReader) -> int | tuple[int, int]:
    value = fields.raw("sample_size")
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) for s in value):
        return int(value[0]), int(value[1])
    if isinstance(value, bool) or not isinstance(value, int):
        raise fields.fail(f"field sample_size must be an integer or [height, width], got {value!r}")
    return value


def vae_config_from_diffusers(d: Mapping[str, Any], source: str = "config") -> VAEConfig:
    """Parses a diffusers AutoencoderKL config dict; `source` names the file in errors.

    Every field the network depends on is checked: a value this implementation does not
    build (another block type, activation, a latent shift) is a ConfigError naming the
    field, and so is a field diffusers' AutoencoderKL does not have. Keys starting with
    `_` are diffusers metadata (`_class_name`, `_diffusers_version`, ...).
    """
    fields = FieldReader(d, source, _DEFAULTS)
    class_name = fields.raw("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise fields.fail(f"field _class_name is {class_name!r}; only AutoencoderKL is supported")
    fields.refuse_unknown(_DEFAULTS, "AutoencoderKL", ignored=lambda k: k.startswith("_"))
    channels = fields.integers("block_out_channels")
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = fields.raw(field)
        if not isinstance(types, (list, tuple)) or len(types) != len(channels):
            raise fields.fail(f"field {field} must list one block per block_out_channels entry "
                              f"({len(channels)}), got {types!r}")
        if any(t != block for t in types):
            raise fields.fail(f"field {field} = {list(types)!r}; only {block} is supported")
    if fields.raw("act_fn") not in ("silu", "swish"):
        raise fields.fail(f"field act_fn = {fields.raw('act_fn')!r}; only silu is supported")
    if fields.raw("shift_factor") not in (None, 0, 0.0):
        raise fields.fail(f"field shift_factor = {fields.raw('shift_factor')!r}; only null or 0 is supported")
    for field in ("latents_mean", "latents_std"):
        if fields.raw(field) is not None:
            raise fields.fail(f"field {field} is set; per-channel latent statistics are not supported "
                              "(only null)")
    if not fields.boolean("mid_block_add_attention"):
        raise fields.fail("field mid_block_add_attention = false is not supported")
    groups = fields.integer("norm_num_groups")
    bad = [c for c in channels if c % groups]
    if bad:
        raise fields.fail(f"field norm_num_groups = {groups} does not divide block_out_channels entry "
                          f"{bad[0]}")
    return VAEConfig(
        in_channels=fields.integer("in_channels"),
        out_channels=fields.integer("out_channels"),
        block_out_channels=channels,
        layers_per_block=fields.integer("layers_per_block"),
        latent_channels=fields.integer("latent_channels"),
        norm_num_groups=groups,
        sample_size=_sample_size(fields),
        scaling_factor=fields.number("scaling_factor", positive=True),
        shift_factor=None if fields.raw("shift_factor") is None else 0.0,
        force_upcast=fields.boolean("force_upcast"),
        use_quant_conv=fields.boolean("use_quant_conv"),
        use_post_quant_conv=fields.boolean("use_post_quant_conv"),
        mid_block_add_attention=True,
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """The diffusers `config.json` content for this architecture."""
    sample_size = list(config.sample_size) if isinstance(config.sample_size, tuple) else config.sample_size
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": list(config.down_block_types),
        "up_block_types": list(config.up_block_types),
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": config.force_upcast,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


def read_vae_config(folder: str) -> tuple[dict[str, Any], VAEConfig]:
    """`(raw config.json dict, parsed VAEConfig)` of a diffusers AutoencoderKL folder."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    path = os.path.join(folder, CONFIG_NAME)
    raw = read_json(path)
    return raw, vae_config_from_diffusers(raw, source=path)


# ---- key table --------------------------------------------------------------------

_ATTENTION_NAMES = {
    "current": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out.0"},
    "deprecated": {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"},
}


def _mid_block(b: KeyTableBuilder, flax: str, key: str, attention_names: str) -> None:
    b.resnet2d(f"{flax}/resnets_0", f"{key}.resnets.0", shortcut=False, time_embedding=False)
    b.resnet2d(f"{flax}/resnets_1", f"{key}.resnets.1", shortcut=False, time_embedding=False)
    b.norm(f"{flax}/attentions_0/group_norm", f"{key}.attentions.0.group_norm")
    for flax_name, torch_name in _ATTENTION_NAMES[attention_names].items():
        b.dense(f"{flax}/attentions_0/{flax_name}", f"{key}.attentions.0.{torch_name}")


def vae_key_table(config: VAEConfig, attention_names: str = "current") -> KeyTable:
    """Flax param path -> diffusers key for every weight of `AutoencoderKL(config)`.

    `attention_names` is "current" (`to_q`, ...) or "deprecated" (`query`, ...).
    """
    if attention_names not in _ATTENTION_NAMES:
        raise ConfigError(f"attention_names: expected one of {sorted(_ATTENTION_NAMES)}, "
                          f"got {attention_names!r}")
    b = KeyTableBuilder()
    channels = config.block_out_channels
    b.conv("encoder/conv_in", "encoder.conv_in")
    in_ch = channels[0]
    for i, out_ch in enumerate(channels):
        for j in range(config.layers_per_block):
            b.resnet2d(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                       shortcut=in_ch != out_ch, time_embedding=False)
            in_ch = out_ch
        if i < len(channels) - 1:
            b.conv(f"encoder/down_blocks_{i}/downsamplers_0/conv",
                   f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _mid_block(b, "encoder/mid_block", "encoder.mid_block", attention_names)
    b.norm("encoder/conv_norm_out", "encoder.conv_norm_out")
    b.conv("encoder/conv_out", "encoder.conv_out")
    reversed_channels = tuple(reversed(channels))
    b.conv("decoder/conv_in", "decoder.conv_in")
    _mid_block(b, "decoder/mid_block", "decoder.mid_block", attention_names)
    in_ch = reversed_channels[0]
    for i, out_ch in enumerate(reversed_channels):
        for j in range(config.layers_per_block + 1):
            b.resnet2d(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                       shortcut=in_ch != out_ch, time_embedding=False)
            in_ch = out_ch
        if i < len(reversed_channels) - 1:
            b.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    b.norm("decoder/conv_norm_out", "decoder.conv_norm_out")
    b.conv("decoder/conv_out", "decoder.conv_out")
    if config.use_quant_conv:
        b.conv("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        b.conv("post_quant_conv", "post_quant_conv")
    return b.build()


# ---- load / save ------------------------------------------------------------------


def vae_boxed_params(module: AutoencoderKL) -> Any:
    """The abstract boxed `params` of `module` (shapes, dtypes, logical axis names)."""
    return boxed_params(lambda rng: init_params(module, rng), jax.random.PRNGKey(0))


def vae_abstract_params(module: AutoencoderKL) -> Any:
    """Shapes and dtypes of the unboxed `params` collection, without computing it."""
    return unbox_abstract(vae_boxed_params(module))


def load_vae(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
             mesh: Mesh | None = None, rules: LogicalRules | None = None
             ) -> tuple[VAEConfig, AutoencoderKL, dict[str, Any]]:
    """Reads a diffusers AutoencoderKL folder: `(config, module, params)`.

    `params` is the plain `params` collection in `param_dtype` (host numpy arrays without
    `mesh`, else placed leaf by leaf with the shardings `rules` give): apply with
    `module.apply({"params": params}, x, method=module.encode)`. `dtype` is the compute dtype.
    """
    _, config = read_vae_config(folder)
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    deprecated = any(k.endswith("attentions.0.query.weight") for k in state)
    table = vae_key_table(config, "deprecated" if deprecated else "current")
    boxed = vae_boxed_params(module)
    params = convert_to_flax(state, table, unbox_abstract(boxed), source=folder,
                             place=placer(boxed, mesh, rules))
    return config, module, params


def save_vae(folder: str, config_dict: Mapping[str, Any] | VAEConfig, params: Mapping[str, Any]) -> None:
    """Writes `params` (the `params` collection) as a diffusers AutoencoderKL folder that
    `diffusers.AutoencoderKL.from_pretrained` reads (float32 weights)."""
    if isinstance(config_dict, VAEConfig):
        config, out_config = config_dict, vae_config_to_diffusers(config_dict)
    else:
        config = vae_config_from_diffusers(config_dict, source=f"{folder}/{CONFIG_NAME}")
        out_config = {"_class_name": "AutoencoderKL", **dict(config_dict)}
    if set(params) == {"params"}:
        params = params["params"]
    table = vae_key_table(config)
    state = convert_to_torch(params, table, source=folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
    write_json(out_config, os.path.join(folder, CONFIG_NAME))
