"""transformers CLIPTextModel folders <-> the Flax CLIP text encoder: config reader, key
table, load (both key layouts), save.

transformers < 5.6 and every real Stable Diffusion checkpoint store `CLIPTextModel` under
a `text_model.` level (`text_model.encoder.layers.0...`); transformers >= 5.6 saves it
flat (`encoder.layers.0...`). `load_clip_text` detects which is present. The
`embeddings.position_ids` buffer some saves carry is ignored.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.clip_text import ACTIVATIONS, CLIPTextConfig, CLIPTextModel, init_params
from rig_jax.parallel.rules import LogicalRules, unbox_abstract
from rig_jax.weights.fields import FieldReader
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors, write_json
from rig_jax.weights.mapping import KeyTable, KeyTableBuilder, convert_to_flax, convert_to_torch
from rig_jax.weights.placement import boxed_params, placer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LAYOUT_PREFIXES = {"text_model": "text_model.", "flat": ""}

# Fields that shape the network, with transformers' CLIPTextConfig defaults.
_NETWORK_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# Fields that do not change inference: training-only settings, initialisation, the
# projection of CLIPModel (not part of the text model), and generic PretrainedConfig /
# serialisation metadata that old and new transformers versions write.
_HARMLESS_FIELDS = frozenset({
    "projection_dim", "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "_commit_hash", "_attn_implementation_autoset", "use_attention_mask",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tie_word_embeddings", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads", "chunk_size_feed_forward",
    "finetuning_task", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "gradient_checkpointing",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss", "use_cache",
})


# ---- config.json ------------------------------------------------------------------


def clip_text_config_from_hf(d: Mapping[str, Any], source: str = "config") -> CLIPTextConfig:
    """Parses a transformers CLIPTextConfig dict; `source` names the file in errors.

    A full `CLIPModel` config (model_type "clip") is read through its `text_config`.
    Unknown fields are a ConfigError naming the field, unless they are known metadata.
    """
    fields = FieldReader(d, source, _NETWORK_DEFAULTS)
    if d.get("model_type") == "clip" and isinstance(d.get("text_config"), Mapping):
        fields = FieldReader(d["text_config"], f"{source} (text_config)", _NETWORK_DEFAULTS)
    model_type = fields.raw("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise fields.fail(f"field model_type is {model_type!r}; expected clip_text_model")
    fields.refuse_unknown(_NETWORK_DEFAULTS, "a CLIP text model", ignored=lambda k: k in _HARMLESS_FIELDS)
    hidden, heads = fields.integer("hidden_size"), fields.integer("num_attention_heads")
    if hidden % heads:
        raise fields.fail(f"field num_attention_heads = {heads} does not divide hidden_size = {hidden}")
    return CLIPTextConfig(
        vocab_size=fields.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=fields.integer("intermediate_size"),
        num_hidden_layers=fields.integer("num_hidden_layers"),
        num_attention_heads=heads,
        max_position_embeddings=fields.integer("max_position_embeddings"),
        hidden_act=fields.choice("hidden_act", ACTIVATIONS),
        layer_norm_eps=fields.number("layer_norm_eps", positive=True),
        pad_token_id=fields.optional_integer("pad_token_id"),
        bos_token_id=fields.optional_integer("bos_token_id"),
        eos_token_id=fields.integer("eos_token_id", minimum=0),
        use_attention_mask=fields.boolean("use_attention_mask", default=False),
    )


def clip_text_config_to_hf(config: CLIPTextConfig) -> dict[str, Any]:
    """The transformers `config.json` content for this architecture."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def read_clip_text_config(folder: str) -> tuple[dict[str, Any], CLIPTextConfig]:
    """`(raw config.json dict, parsed CLIPTextConfig)` of a transformers CLIPTextModel folder."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    path = os.path.join(folder, CONFIG_NAME)
    raw = read_json(path)
    return raw, clip_text_config_from_hf(raw, source=path)


# ---- key table --------------------------------------------------------------------


def clip_key_table(config: CLIPTextConfig, prefix: str = "text_model.") -> KeyTable:
    """Flax param path -> transformers key for every weight of `CLIPTextModel(config)`.

    `prefix` is "text_model." (old layout, SD checkpoints) or "" (transformers >= 5.6).
    """
    b = KeyTableBuilder()
    b.embedding("embeddings/token_embedding", f"{prefix}embeddings.token_embedding")
    b.embedding("embeddings/position_embedding", f"{prefix}embeddings.position_embedding")
    b.norm("final_layer_norm", f"{prefix}final_layer_norm")
    for i in range(config.num_hidden_layers):
        flax, key = f"encoder/layers_{i}", f"{prefix}encoder.layers.{i}"
        b.norm(f"{flax}/layer_norm1", f"{key}.layer_norm1")
        b.norm(f"{flax}/layer_norm2", f"{key}.layer_norm2")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            b.dense(f"{flax}/self_attn/{name}", f"{key}.self_attn.{name}")
        for name in ("fc1", "fc2"):
            b.dense(f"{flax}/mlp/{name}", f"{key}.mlp.{name}")
    return b.build()


def detect_layout(keys: Any, source: str) -> str:
    """"text_model" when the checkpoint nests the model under `text_model.`, else "flat"."""
    keys = list(keys)
    if any(k.startswith("text_model.") for k in keys):
        return "text_model"
    if any(k.startswith(("encoder.", "embeddings.")) for k in keys):
        return "flat"
    raise WeightsError(f"{source}: no CLIP text encoder keys "
                       "(expected text_model.* or encoder.* / embeddings.*)")


# ---- load / save ------------------------------------------------------------------


def clip_boxed_params(module: CLIPTextModel) -> Any:
    """The abstract boxed `params` of `module` (shapes, dtypes, logical axis names)."""
    return boxed_params(lambda rng: init_params(module, rng, length=1), jax.random.PRNGKey(0))


def clip_abstract_params(module: CLIPTextModel) -> Any:
    """Shapes and dtypes of the unboxed `params` collection, without computing it."""
    return unbox_abstract(clip_boxed_params(module))


def _ignored(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def load_clip_text(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
                   mesh: Mesh | None = None, rules: LogicalRules | None = None
                   ) -> tuple[CLIPTextConfig, CLIPTextModel, dict[str, Any]]:
    """Reads a transformers CLIPTextModel folder (either key layout): `(config, module, params)`.

    `params` is the plain `params` collection in `param_dtype` (host numpy arrays without
    `mesh`, else placed leaf by leaf with the shardings `rules` give): apply with
    `module.apply({"params": params}, ids)`. `dtype` is the compute dtype.
    """
    _, config = read_clip_text_config(folder)
    module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype)
    state = load_safetensors_folder(folder)
    table = clip_key_table(config, LAYOUT_PREFIXES[detect_layout(state.keys(), folder)])
    boxed = clip_boxed_params(module)
    params = convert_to_flax(state, table, unbox_abstract(boxed), source=folder, ignore=_ignored,
                             place=placer(boxed, mesh, rules))
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
        config, out_config = config_dict, clip_text_config_to_hf(config_dict)
    else:
        config = clip_text_config_from_hf(config_dict, source=f"{folder}/{CONFIG_NAME}")
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
