"""Qwen2.5-VL folders <-> the Flax model: config reader, key tables for both Hugging Face
layouts, load, save.

Two layouts exist for `Qwen2_5_VLForConditionalGeneration`:
- "hf5" (transformers >= 5 module names): `model.language_model.*`, `model.visual.*`, `lm_head.*`;
- "legacy" (hub checkpoints, and what transformers 5.24 still writes): `model.*` for the
  decoder, `visual.*`, `lm_head.*`.
`load_qwen_vl` detects which one a folder holds; conversion is strict either way. The config
reader takes the nested (transformers >= 5) and the flat (hub, transformers 4) `config.json`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.qwen2_5_vl.lm import TextConfig
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs
from rig_jax.models.qwen2_5_vl.vision import VisionConfig
from rig_jax.parallel.rules import LogicalRules, unbox_abstract
from rig_jax.weights.fields import FieldReader
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import (
    LINEAR,
    KeyTable,
    KeyTableBuilder,
    Transform,
    conv_patch_to_linear,
    convert_to_flax,
    convert_to_torch,
)
from rig_jax.weights.placement import boxed_params, placer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
LAYOUTS = {
    "hf5": {"lm": "model.language_model.", "visual": "model.visual."},
    "legacy": {"lm": "model.", "visual": "visual."},
}

# ---- config.json ------------------------------------------------------------------

# Fields that describe training, serving or provenance and do not change the forward pass.
_METADATA = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "initializer_range", "use_cache", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "_attn_implementation", "_attn_implementation_autoset",
    "vision_token_id", "max_window_layers", "sliding_window", "chunk_size_feed_forward",
    "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
}
_TOKEN_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id"}
_TEXT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act",
    "rope_parameters", "rope_scaling", "rope_theta", "use_sliding_window", "layer_types",
    "tie_word_embeddings", "head_dim",
}
_TOP_FIELDS = {"text_config", "vision_config", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"}
_VISION_FIELDS = {
    "depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
    "in_chans", "patch_size", "spatial_patch_size", "temporal_patch_size", "spatial_merge_size",
    "window_size", "fullatt_block_indexes", "tokens_per_second", "hidden_act", "rope_parameters",
    "rope_theta",
}


def _refuse_unknown(fields: FieldReader, known: set[str]) -> None:
    extra = fields.unknown(known, ignored=lambda k: k in _METADATA or k in _TOKEN_FIELDS)
    if extra:
        raise fields.fail(f"unsupported field {fields.name(extra[0])}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _text_config(fields: FieldReader, top: Mapping[str, Any]) -> TextConfig:
    if fields.values is not top:  # the flat form's fields are checked with the top level
        _refuse_unknown(fields, _TEXT_FIELDS)
    d = fields.values
    if d.get("use_sliding_window"):
        raise fields.fail("field use_sliding_window=true is not supported")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise fields.fail(f"field layer_types holds {sorted(set(layer_types))}; only full_attention is "
                          "supported")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or top.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise fields.fail(f"rope type {rope_type!r} is not supported (default/mrope only)")
    theta = rope.pop("rope_theta", d.get("rope_theta", top.get("rope_theta", 1000000.0)))
    section = rope.pop("mrope_section", None)
    if rope:
        raise fields.fail(f"unsupported rope parameter {sorted(rope)[0]}")
    if section is None:
        raise fields.fail("field rope_parameters.mrope_section is missing")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
        fields.raw(field)  # required: a missing one is named before any other check
    heads = fields.integer("num_attention_heads")
    kv_heads = fields.integer("num_key_value_heads") if d.get("num_key_value_heads") is not None else heads
    cfg = TextConfig(
        vocab_size=fields.integer("vocab_size"),
        hidden_size=fields.integer("hidden_size"),
        intermediate_size=fields.integer("intermediate_size"),
        num_hidden_layers=fields.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=fields.number("rms_norm_eps", positive=True, default=1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in section),
        max_position_embeddings=fields.integer("max_position_embeddings", default=32768),
        hidden_act=fields.string("hidden_act", default="silu"),
    )
    if d.get("head_dim") not in (None, cfg.head_dim):
        raise fields.fail(f"field {fields.name('head_dim')} {d['head_dim']} differs from hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}, which is not supported")
    cfg.validate(fields.source)
    return cfg


def _vision_config(fields: FieldReader) -> VisionConfig:
    _refuse_unknown(fields, _VISION_FIELDS)
    for field in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        fields.raw(field)
    d = fields.values
    rope = dict(d.get("rope_parameters") or {})
    rope_type = rope.pop("rope_type", "axial")
    if rope_type not in ("axial", "default"):
        raise fields.fail(f"vision rope type {rope_type!r} is not supported")
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if rope:
        raise fields.fail(f"unsupported vision rope parameter {sorted(rope)[0]}")
    defaults = VisionConfig()
    patch = fields.integer("patch_size", default=defaults.patch_size)
    if d.get("spatial_patch_size") not in (None, patch):
        raise fields.fail("field vision_config.spatial_patch_size differs from patch_size")
    full_attention = fields.raw("fullatt_block_indexes", defaults.fullatt_block_indexes)
    if not isinstance(full_attention, (list, tuple)):
        raise fields.fail(f"field {fields.name('fullatt_block_indexes')} must be a list of block indexes, "
                          f"got {full_attention!r}")
    in_channels_field = "in_chans" if "in_chans" in d and "in_channels" not in d else "in_channels"
    cfg = VisionConfig(
        depth=fields.integer("depth"),
        hidden_size=fields.integer("hidden_size"),
        intermediate_size=fields.integer("intermediate_size"),
        num_heads=fields.integer("num_heads"),
        out_hidden_size=fields.integer("out_hidden_size"),
        in_channels=fields.integer(in_channels_field, default=defaults.in_channels),
        patch_size=patch,
        temporal_patch_size=fields.integer("temporal_patch_size", default=defaults.temporal_patch_size),
        spatial_merge_size=fields.integer("spatial_merge_size", default=defaults.spatial_merge_size),
        window_size=fields.integer("window_size", default=defaults.window_size),
        fullatt_block_indexes=tuple(fields.as_integer("fullatt_block_indexes", i, minimum=0)
                                    for i in full_attention),
        tokens_per_second=fields.integer("tokens_per_second", default=defaults.tokens_per_second),
        rope_theta=float(theta),
        hidden_act=fields.string("hidden_act", default=defaults.hidden_act),
    )
    cfg.validate(fields.source)
    return cfg


def _agreed_token_ids(top: FieldReader, text: FieldReader | None, source: str) -> dict[str, tuple[int, ...]]:
    """bos / eos / pad ids where the top level and `text_config` give them: where both do, they
    must be equal (a WeightsError names both values); where one does, it holds."""
    out = {}
    for field in sorted(_TOKEN_FIELDS):
        given = top.token_ids(field, None)
        if text is not None:
            inner = text.token_ids(field, None)
            if given and inner and set(given) != set(inner):
                raise WeightsError(f"{source}: {field} {list(given)} (top level) and text_config.{field} "
                                   f"{list(inner)} disagree")
            given = given or inner
        out[field] = given
    return out


def check_generation_tokens(config: Qwen25VLConfig, generation: Mapping[str, Any], source: str,
                            generation_source: str) -> Qwen25VLConfig:
    """`generation_config.json`'s token ids against `config`'s: its eos ids must include every
    config eos id (it may list more stops, as the hub's Qwen2.5-VL does), its pad and bos ids
    must equal the config's where both are given; a disagreement is a WeightsError naming both
    files and values. A config without eos ids takes the generation config's."""
    fields = FieldReader(generation, generation_source)
    eos = fields.token_ids("eos_token_id", None)
    if eos and config.eos_token_ids and not set(config.eos_token_ids) <= set(eos):
        raise WeightsError(f"{generation_source}: eos_token_id {list(eos)} lacks the eos ids "
                           f"{list(config.eos_token_ids)} of {source}")
    for field, ours in (("pad_token_id", config.pad_token_id), ("bos_token_id", config.bos_token_id)):
        theirs = fields.token_ids(field, None)
        if ours is not None and theirs and set(theirs) != {ours}:
            raise WeightsError(f"{generation_source}: {field} {list(theirs)} disagrees with {ours} in "
                               f"{source}")
    if eos and not config.eos_token_ids:
        return dataclasses.replace(config, eos_token_ids=tuple(eos))
    return config


def qwen_vl_config_from_hf(d: Mapping[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    """Reads a transformers `config.json` dict, the nested (transformers >= 5) or the flat
    (hub, transformers 4) form. Unsupported fields raise ConfigError naming them."""
    top = FieldReader(d, source)
    if d.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise top.fail(f"field model_type is {d['model_type']!r}, expected 'qwen2_5_vl'")
    nested = isinstance(d.get("text_config"), Mapping)
    text_fields = FieldReader(d["text_config"], source, prefix="text_config.") if nested else top
    _refuse_unknown(top, _TOP_FIELDS | ({"rope_scaling", "rope_theta"} if nested else _TEXT_FIELDS))
    text = _text_config(text_fields, d)
    if not isinstance(d.get("vision_config"), Mapping):
        raise top.fail("field vision_config is missing")
    vision = _vision_config(FieldReader(d["vision_config"], source, prefix="vision_config."))
    if vision.out_hidden_size != text.hidden_size:
        raise top.fail(f"vision_config.out_hidden_size {vision.out_hidden_size} differs from the text "
                       f"hidden_size {text.hidden_size}")
    text_d = text_fields.values
    tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
    tokens = _agreed_token_ids(top, text_fields if nested else None, source)
    bos, pad = tokens["bos_token_id"], tokens["pad_token_id"]
    ids = {field: top.integer(field, minimum=0)
           for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if field in d}
    return Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=tie,
                          bos_token_id=bos[0] if bos else None,
                          eos_token_ids=tokens["eos_token_id"],
                          pad_token_id=pad[0] if pad else None, **ids)


def read_qwen_vl_config(folder: str) -> tuple[dict[str, Any], Qwen25VLConfig]:
    """`(raw config.json dict, parsed Qwen25VLConfig)` of a local Hugging Face folder; the
    token ids of its generation_config.json, if any, must agree (`check_generation_tokens`)."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    path = os.path.join(folder, CONFIG_NAME)
    raw = read_json(path)
    config = qwen_vl_config_from_hf(raw, source=path)
    generation_path = os.path.join(folder, GENERATION_CONFIG_NAME)
    if os.path.isfile(generation_path):
        generation = read_json(generation_path)
        if not isinstance(generation, Mapping):
            raise WeightsError(f"{generation_path}: expected a JSON object")
        config = check_generation_tokens(config, generation, path, generation_path)
    return raw, config


# ---- key tables -------------------------------------------------------------------


def _patch_embed_transform(vision: VisionConfig) -> Transform:
    """Conv3d weight (E, C, T, p, p) with kernel = stride <-> Dense kernel (C*T*p*p, E)."""
    return conv_patch_to_linear((vision.in_channels, vision.temporal_patch_size,
                                 vision.patch_size, vision.patch_size))


def qwen_vl_key_table(config: Qwen25VLConfig, layout: str = "legacy") -> KeyTable:
    """Flax param path -> HF key for every weight of `Qwen25VL(config)`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
    lm, visual = LAYOUTS[layout]["lm"], LAYOUTS[layout]["visual"]
    b = KeyTableBuilder()
    b.embedding("language_model/embed_tokens", f"{lm}embed_tokens")
    for i in range(config.text.num_hidden_layers):
        flax, key = f"language_model/layers_{i}", f"{lm}layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            b.dense(f"{flax}/self_attn/{proj}", f"{key}.self_attn.{proj}")
        b.dense(f"{flax}/self_attn/o_proj", f"{key}.self_attn.o_proj", bias=False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            b.dense(f"{flax}/mlp/{proj}", f"{key}.mlp.{proj}", bias=False)
        b.norm(f"{flax}/input_layernorm", f"{key}.input_layernorm", bias=False)
        b.norm(f"{flax}/post_attention_layernorm", f"{key}.post_attention_layernorm", bias=False)
    b.norm("language_model/norm", f"{lm}norm", bias=False)
    if not config.tie_word_embeddings:
        b.add("lm_head", "lm_head.weight", LINEAR)
    vision = config.vision
    if vision is not None:
        b.add("visual/patch_embed/kernel", f"{visual}patch_embed.proj.weight", _patch_embed_transform(vision))
        for i in range(vision.depth):
            flax, key = f"visual/blocks_{i}", f"{visual}blocks.{i}"
            b.norm(f"{flax}/norm1", f"{key}.norm1", bias=False)
            b.norm(f"{flax}/norm2", f"{key}.norm2", bias=False)
            b.dense(f"{flax}/attn/qkv", f"{key}.attn.qkv")
            b.dense(f"{flax}/attn/proj", f"{key}.attn.proj")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                b.dense(f"{flax}/mlp/{proj}", f"{key}.mlp.{proj}")
        b.norm("visual/merger/ln_q", f"{visual}merger.ln_q", bias=False)
        b.dense("visual/merger/mlp_0", f"{visual}merger.mlp.0")
        b.dense("visual/merger/mlp_2", f"{visual}merger.mlp.2")
    return b.build()


def detect_layout(keys: Any, source: str) -> str:
    """"hf5" if the decoder lives under `model.language_model.`, "legacy" if under `model.`."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "hf5"
    if any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys):
        return "legacy"
    raise WeightsError(f"{source}: no Qwen2.5-VL decoder keys (neither model.language_model.* "
                       "nor model.layers.*)")


# ---- load / save ------------------------------------------------------------------


def qwen_vl_boxed_params(module: Qwen25VL) -> Any:
    """The abstract boxed `params` collection (logical axis names attached), no compute."""
    inputs = dummy_inputs(module.config)
    return boxed_params(lambda rng: module.init(rng, **inputs), jax.random.PRNGKey(0))


def qwen_vl_abstract_params(module: Qwen25VL) -> Any:
    """Shapes and dtypes of the unboxed `params` collection, without computing it."""
    return unbox_abstract(qwen_vl_boxed_params(module))


def load_qwen_vl(folder: str, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32, *,
                 mesh: Mesh | None = None, rules: LogicalRules | None = None
                 ) -> tuple[Qwen25VLConfig, Qwen25VL, dict[str, Any]]:
    """Reads a local HF Qwen2.5-VL folder: `(config, module, params)`.

    `params` is the plain `params` collection in `param_dtype`: host numpy arrays without
    `mesh`, else placed leaf by leaf with the shardings `rules` give (None: the active
    `nn.logical_axis_rules`, else the defaults), so a 7B model is never whole on one device.
    `dtype` is the compute dtype. Apply with `module.apply({"params": params}, ...)`. With tied
    embeddings a stored `lm_head.weight` (some exports keep the duplicate) is ignored.
    """
    _, config = read_qwen_vl_config(folder)
    module = Qwen25VL(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    table = qwen_vl_key_table(config, detect_layout(state, folder))
    ignore = (lambda k: k == "lm_head.weight") if config.tie_word_embeddings else (lambda k: False)
    boxed = qwen_vl_boxed_params(module)
    params = convert_to_flax(state, table, unbox_abstract(boxed), source=folder, ignore=ignore,
                             place=placer(boxed, mesh, rules))
    return config, module, params


def save_qwen_vl(folder: str, config_json: Mapping[str, Any], params: Mapping[str, Any],
                 layout: str = "legacy") -> None:
    """Writes `params` as an HF folder (float32 weights) with `config_json` as config.json;
    transformers' `from_pretrained` reads both layouts."""
    config = qwen_vl_config_from_hf(config_json, source=f"{folder}/{CONFIG_NAME}")
    state = convert_to_torch(params, qwen_vl_key_table(config, layout))
    save_safetensors({k: np.asarray(v) for k, v in state.items()}, os.path.join(folder, WEIGHTS_NAME))
    write_json(dict(config_json), os.path.join(folder, CONFIG_NAME))
