"""A whole Stable Diffusion pipeline (diffusers folder layout, or our orbax checkpoint) as
one frozen bundle of modules, configs, tokenizer and schedule plus one param tree.

A diffusers folder is `model_index.json` plus one sub-folder per component:
`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`. Each model is read by its
own strict loader (key tables, shape checks). Components we never run (safety checker,
feature extractor, image encoder) are ignored; any other component we do not know (an
SDXL `text_encoder_2`, a depth estimator) is a ConfigError, because silently dropping it
would generate with half a model.

The orbax form (written by `rig-convert to-orbax`) keeps the params in `params/`, every
raw config and the text-layer choice in `rig_metadata.json`, and the tokenizer files
verbatim in `tokenizer/`, so converting back reproduces the diffusers folder.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rig_jax.diffusion.schedulers import DDIMSchedule
from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from rig_jax.models.unet import UNet2DConditionModel, UNetConfig
from rig_jax.models.vae import AutoencoderKL, VAEConfig
from rig_jax.parallel.rules import LogicalRules, unbox_abstract
from rig_jax.weights.clip_text import (
    clip_boxed_params,
    clip_text_config_from_hf,
    load_clip_text,
    read_clip_text_config,
    save_clip_text,
)
from rig_jax.weights.io import check_tokenizer_fits, check_tokenizer_vocabulary, read_json, write_json
from rig_jax.weights.mapping import check_param_tree
from rig_jax.weights.placement import place_tree
from rig_jax.weights.unet import (
    load_unet,
    read_unet_config,
    save_unet,
    unet_boxed_params,
    unet_config_from_diffusers,
)
from rig_jax.weights.vae import (
    load_vae,
    read_vae_config,
    save_vae,
    vae_boxed_params,
    vae_config_from_diffusers,
)

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Components a diffusers SD folder may name that generation never uses.
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# model_index.json fields that are settings, not components.
PIPELINE_SETTINGS = ("requires_safety_checker",)
TEXT_LAYERS = ("last", "penultimate")
PARAM_GROUPS = ("unet", "vae", "text_encoder")

CHECKPOINT_KIND = "rig_jax.sd_pipeline"
CHECKPOINT_VERSION = 1
CHECKPOINT_TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True, eq=False)
class SDPipeline:
    """Everything but the weights: the three Flax modules and their parsed configs, the CLIP
    tokenizer, the DDIM schedule, which text-encoder layer conditions the U-Net, and the raw
    config dicts (written back unchanged on export).

    `eq=False`: a pipeline is compared (and hashed) by identity, so it can key caches of
    jitted functions; `jit_cache` holds those, built on first use per pipeline.
    """
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    schedule: DDIMSchedule
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    text_layer: str
    configs: Mapping[str, Mapping[str, Any]]   # model_index, unet, vae, text_encoder, scheduler
    tokenizer_files: Mapping[str, bytes]       # file name -> content of the tokenizer folder
    source: str = ""
    jit_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, per side."""
        return self.vae_config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet_config.latent_channels

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels that diffusers' pipeline picks by default: the U-Net's
        sample_size times the VAE factor."""
        size = self.unet_config.sample_size or 64
        h, w = size if isinstance(size, tuple) else (size, size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        """Tokens per prompt after padding (the tokenizer's model_max_length, as diffusers)."""
        return int(self.tokenizer.model_max_length)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """The value cached under `key` for this pipeline, built by `build()` the first time."""
        if key not in self.jit_cache:
            self.jit_cache[key] = build()
        return self.jit_cache[key]


# ----------------------------------------------------------------------------- diffusers folders

def _component_entry(index: Mapping[str, Any], name: str, index_path: str) -> tuple[str, str]:
    entry = index.get(name)
    if entry is None:
        raise WeightsError(f"{index_path}: component {name} is missing")
    if (not isinstance(entry, (list, tuple)) or len(entry) != 2
            or not all(isinstance(e, str) for e in entry)):
        raise WeightsError(f"{index_path}: component {name} must be [library, class], got {entry!r}")
    return entry[0], entry[1]


def read_model_index(folder: str) -> dict[str, Any]:
    """The checked `model_index.json` of a diffusers SD folder."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    index_path = os.path.join(folder, MODEL_INDEX)
    index = read_json(index_path)
    if not isinstance(index, dict):
        raise WeightsError(f"{index_path}: expected a JSON object")
    for name in COMPONENTS:
        _component_entry(index, name, index_path)
    for key, value in index.items():
        if key.startswith("_") or key in COMPONENTS or key in IGNORED_COMPONENTS or key in PIPELINE_SETTINGS:
            continue
        if value is None or (isinstance(value, (list, tuple)) and all(v is None for v in value)):
            continue
        raise ConfigError(f"{index_path}: component {key} ({value!r}) is not supported by a Stable "
                          "Diffusion 1.x/2.x pipeline")
    return index


def read_tokenizer_files(folder: str) -> dict[str, bytes]:
    """The files of a tokenizer folder, verbatim (they are copied, never re-serialised)."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    if not files:
        raise WeightsError(f"{folder}: no tokenizer files")
    return files


# Tokenizer classes a model_index.json may name for an SD 1.x/2.x pipeline (transformers 5 has one
# CLIPTokenizer class for both; older versions had a separate fast one).
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


def tokenizer_class(index: Mapping[str, Any], index_path: str) -> str:
    """The tokenizer class `model_index.json` names: one of TOKENIZER_CLASSES from transformers,
    else a ConfigError (another tokenizer would be read as CLIP's and encode different ids)."""
    library, name = _component_entry(index, "tokenizer", index_path)
    if library != "transformers" or name not in TOKENIZER_CLASSES:
        raise ConfigError(f"{index_path}: component tokenizer is [{library!r}, {name!r}]; a Stable Diffusion "
                          f"pipeline is read with transformers {' or '.join(TOKENIZER_CLASSES)} only")
    return name


def load_tokenizer(folder: str, class_name: str = "CLIPTokenizer") -> Any:
    """transformers' CLIP tokenizer (`class_name`, as `model_index.json` names it) from a local
    folder; any failure names the folder. The folder must hold its vocabulary (vocab.json and
    merges.txt, or tokenizer.json): without it transformers builds a tokenizer of the special
    tokens alone, which turns every prompt into the same ids. A `tokenizer_class` in the
    folder's tokenizer_config.json that is no CLIP tokenizer is refused too."""
    import transformers

    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: folder not found")
    if class_name not in TOKENIZER_CLASSES:
        raise ConfigError(f"{folder}: tokenizer class {class_name!r} is not one of {TOKENIZER_CLASSES}")
    names = set(os.listdir(folder))
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        missing = sorted({"vocab.json", "merges.txt"} - names)
        raise WeightsError(f"{folder}: no vocabulary ({' and '.join(missing)} missing, and no "
                           "tokenizer.json)")
    config_path = os.path.join(folder, "tokenizer_config.json")
    if "tokenizer_config.json" in names:
        declared = read_json(config_path).get("tokenizer_class")
        if declared is not None and declared not in TOKENIZER_CLASSES:
            raise WeightsError(f"{config_path}: tokenizer_class {declared!r} is not a CLIP tokenizer "
                               f"(the pipeline names {class_name})")
    cls = getattr(transformers, class_name, None) or transformers.CLIPTokenizer
    try:
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... by file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{folder}: cannot load the CLIP tokenizer ({reason})") from None
    check_tokenizer_vocabulary(tokenizer, folder)
    return tokenizer


def _check_text_layer(text_layer: str) -> None:
    if text_layer not in TEXT_LAYERS:
        raise ConfigError(f"text_layer: expected one of {TEXT_LAYERS}, got {text_layer!r}")


def _check_consistency(unet_config: UNetConfig, vae_config: VAEConfig, text_config: CLIPTextConfig,
                       tokenizer: Any, source: str, tokenizer_source: str | None = None,
                       text_source: str | None = None) -> None:
    """The parts must fit each other, or generation fails deep inside jit (or, for token ids
    beyond the text encoder's vocabulary, gives an all-black image without a word).
    `tokenizer_source` / `text_source` name the tokenizer folder and the text encoder config."""
    if text_config.hidden_size != unet_config.cross_attention_dim:
        raise ConfigError(f"{source}: text_encoder hidden_size {text_config.hidden_size} differs from unet "
                          f"cross_attention_dim {unet_config.cross_attention_dim}")
    if vae_config.latent_channels != unet_config.latent_channels:
        raise ConfigError(f"{source}: vae latent_channels {vae_config.latent_channels} differs from unet "
                          f"in_channels {unet_config.in_channels} less its coordinate_channels "
                          f"{unet_config.coordinate_channels}")
    max_length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(max_length, int) or not 1 <= max_length <= text_config.max_position_embeddings:
        raise ConfigError(f"{source}: tokenizer model_max_length {max_length!r} must be an integer in "
                          f"[1, {text_config.max_position_embeddings}] (the text encoder's "
                          "max_position_embeddings)")
    check_tokenizer_fits(tokenizer, text_config.vocab_size,
                         tokenizer_source or os.path.join(source, "tokenizer"),
                         text_source or os.path.join(source, "text_encoder", "config.json"))


def _assemble(unet_config: UNetConfig, vae_config: VAEConfig, text_config: CLIPTextConfig, tokenizer: Any,
              configs: Mapping[str, Mapping[str, Any]], tokenizer_files: Mapping[str, bytes], text_layer: str,
              dtype: Any, param_dtype: Any, source: str) -> SDPipeline:
    _check_consistency(unet_config, vae_config, text_config, tokenizer, source)
    schedule = DDIMSchedule.from_diffusers_config(configs["scheduler"],
                                                  source=os.path.join(source, SCHEDULER_CONFIG))
    return SDPipeline(
        unet=UNet2DConditionModel(unet_config, dtype=dtype, param_dtype=param_dtype),
        vae=AutoencoderKL(vae_config, dtype=dtype, param_dtype=param_dtype),
        text_encoder=CLIPTextModel(text_config, dtype=dtype, param_dtype=param_dtype),
        tokenizer=tokenizer, schedule=schedule, unet_config=unet_config, vae_config=vae_config,
        text_config=text_config, text_layer=text_layer, configs=configs, tokenizer_files=tokenizer_files,
        source=source)


def load_pipeline(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  text_layer: str = "last", *, mesh: Mesh | None = None, rules: LogicalRules | None = None
                  ) -> tuple[SDPipeline, dict[str, Any]]:
    """Reads a diffusers Stable Diffusion folder strictly: `(pipeline, params)` with
    `params = {"unet": ..., "vae": ..., "text_encoder": ...}` in `param_dtype`: host arrays
    without `mesh`, else every leaf placed as it is read with the shardings `rules` give.

    `dtype` is the compute dtype of the modules. `text_layer` picks the conditioning layer
    ("penultimate" is diffusers' clip_skip=1). A missing folder, file or key, a wrong shape
    or an unsupported config field raises a RigError naming it.
    """
    _check_text_layer(text_layer)
    index = read_model_index(folder)
    tokenizer_cls = tokenizer_class(index, os.path.join(folder, MODEL_INDEX))
    for name in COMPONENTS:
        if not os.path.isdir(os.path.join(folder, name)):
            raise WeightsError(f"{os.path.join(folder, name)}: folder not found (named in {MODEL_INDEX})")
    tokenizer_dir = os.path.join(folder, "tokenizer")
    tokenizer_files = read_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir, tokenizer_cls)
    # the parts are checked against each other before any weights are read
    _check_consistency(read_unet_config(os.path.join(folder, "unet"))[1],
                       read_vae_config(os.path.join(folder, "vae"))[1],
                       read_clip_text_config(os.path.join(folder, "text_encoder"))[1], tokenizer, folder)
    place = {"mesh": mesh, "rules": rules}
    unet_config, _, unet_params = load_unet(os.path.join(folder, "unet"), dtype, param_dtype, **place)
    vae_config, _, vae_params = load_vae(os.path.join(folder, "vae"), dtype, param_dtype, **place)
    text_config, _, text_params = load_clip_text(os.path.join(folder, "text_encoder"), dtype, param_dtype,
                                                 **place)
    configs = {
        "model_index": index,
        "unet": read_json(os.path.join(folder, "unet", "config.json")),
        "vae": read_json(os.path.join(folder, "vae", "config.json")),
        "text_encoder": read_json(os.path.join(folder, "text_encoder", "config.json")),
        "scheduler": read_json(os.path.join(folder, SCHEDULER_CONFIG)),
    }
    pipe = _assemble(unet_config, vae_config, text_config, tokenizer, configs, tokenizer_files, text_layer,
                     dtype, param_dtype, folder)
    return pipe, {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}


def _check_param_groups(params: Mapping[str, Any], source: str) -> None:
    if not isinstance(params, Mapping) or set(params) != set(PARAM_GROUPS):
        have = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise WeightsError(f"{source}: params must hold exactly {list(PARAM_GROUPS)}, got {have}")


def export_model_index(index: Mapping[str, Any]) -> dict[str, Any]:
    """The model_index.json to write: our components as read, the ones we do not export
    (safety checker, ...) nulled so diffusers does not look for their folders."""
    out = dict(index)
    for name in IGNORED_COMPONENTS:
        if name in out:
            out[name] = [None, None]
    if "requires_safety_checker" in out:
        out["requires_safety_checker"] = False
    return out


def _write_files(folder: str, files: Mapping[str, bytes]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        tmp = os.path.join(folder, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, os.path.join(folder, name))


def save_pipeline(folder: str, pipe: SDPipeline, params: Mapping[str, Any]) -> None:
    """Writes `params` as a diffusers folder that `StableDiffusionPipeline.from_pretrained`
    loads: model_index.json, unet/, vae/, text_encoder/ (the `text_model.` key layout of
    real SD checkpoints), tokenizer/ (the original files) and scheduler/ (float32 weights).
    `model_index.json` goes last, so a folder without it is an unfinished export."""
    _check_param_groups(params, folder)
    save_unet(os.path.join(folder, "unet"), pipe.configs["unet"], params["unet"])
    save_vae(os.path.join(folder, "vae"), pipe.configs["vae"], params["vae"])
    save_clip_text(os.path.join(folder, "text_encoder"), pipe.configs["text_encoder"], params["text_encoder"],
                   layout="text_model")
    _write_files(os.path.join(folder, "tokenizer"), pipe.tokenizer_files)
    write_json(pipe.configs["scheduler"], os.path.join(folder, SCHEDULER_CONFIG))
    write_json(export_model_index(pipe.configs["model_index"]), os.path.join(folder, MODEL_INDEX))


# ----------------------------------------------------------------------------- orbax checkpoints

def is_pipeline_checkpoint(path: str) -> bool:
    """True when `path` is a rig_jax checkpoint folder (rather than a diffusers folder)."""
    from rig_jax.weights.orbax_store import METADATA_FILE, PARAMS_DIR
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        return False
    return os.path.isfile(os.path.join(path, METADATA_FILE)) or os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_pipeline_checkpoint(path: str, pipe: SDPipeline, params: Mapping[str, Any],
                             overwrite: bool = False) -> None:
    """Saves the pipeline as an orbax checkpoint: params in `params/`, configs and the text
    layer in the metadata JSON, the tokenizer files copied into `tokenizer/`."""
    from rig_jax.weights.orbax_store import save_checkpoint

    _check_param_groups(params, path)
    check_param_tree(params, expected_params(pipe), path)
    metadata = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "configs": {k: dict(v) for k, v in pipe.configs.items()},
        "text_layer": pipe.text_layer,
        "tokenizer_dir": CHECKPOINT_TOKENIZER_DIR,
    }
    params = {group: dict(params[group]) for group in PARAM_GROUPS}  # orbax saves sharded arrays as they are
    # Tokenizer first: the metadata file, written last by save_checkpoint, marks completion.
    _write_files(os.path.join(path, CHECKPOINT_TOKENIZER_DIR), pipe.tokenizer_files)
    save_checkpoint(path, params, metadata, overwrite=overwrite)


def boxed_params(pipe: SDPipeline) -> dict[str, Any]:
    """The abstract boxed param tree of the pipeline's modules (logical axis names attached)."""
    return {"unet": unet_boxed_params(pipe.unet), "vae": vae_boxed_params(pipe.vae),
            "text_encoder": clip_boxed_params(pipe.text_encoder)}


def expected_params(pipe: SDPipeline) -> dict[str, Any]:
    """The param tree the pipeline's modules need, as ShapeDtypeStructs (nothing computed)."""
    return unbox_abstract(boxed_params(pipe))


def load_pipeline_checkpoint(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                             text_layer: str | None = None, *, mesh: Mesh | None = None,
                             rules: LogicalRules | None = None) -> tuple[SDPipeline, dict[str, Any]]:
    """Reads a checkpoint written by `save_pipeline_checkpoint`: `(pipeline, params)`, the same
    as `load_pipeline` on the diffusers folder it came from (placed on `mesh` the same way).
    `text_layer` overrides the saved one."""
    from rig_jax.weights.orbax_store import PARAMS_DIR, load_checkpoint, load_metadata

    if not os.path.isdir(path):
        raise WeightsError(f"{path}: folder not found")
    metadata = load_metadata(path)
    if metadata.get("kind") != CHECKPOINT_KIND:
        raise WeightsError(f"{path}: not a Stable Diffusion pipeline checkpoint (metadata kind "
                           f"{metadata.get('kind')!r}, expected {CHECKPOINT_KIND!r})")
    configs = metadata.get("configs")
    if not isinstance(configs, dict) or any(not isinstance(configs.get(k), dict) for k in
                                             ("model_index", *PARAM_GROUPS, "scheduler")):
        raise WeightsError(f"{path}: metadata lacks the configs of model_index, unet, vae, text_encoder "
                           "and scheduler")
    text_layer = text_layer or metadata.get("text_layer", "last")
    _check_text_layer(text_layer)
    unet_config = unet_config_from_diffusers(configs["unet"], source=f"{path} (unet config)")
    vae_config = vae_config_from_diffusers(configs["vae"], source=f"{path} (vae config)")
    text_config = clip_text_config_from_hf(configs["text_encoder"], source=f"{path} (text_encoder config)")
    tokenizer_dir = os.path.join(path, metadata.get("tokenizer_dir", CHECKPOINT_TOKENIZER_DIR))
    tokenizer_files = read_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir, tokenizer_class(configs["model_index"],
                                                              f"{path} (model_index config)"))
    _check_consistency(unet_config, vae_config, text_config, tokenizer, path, tokenizer_dir,
                       f"{path} (text_encoder config)")
    pipe = _assemble(unet_config, vae_config, text_config, tokenizer, configs, tokenizer_files, text_layer,
                     dtype, param_dtype, path)
    restored, _ = load_checkpoint(path)
    check_param_tree(restored, expected_params(pipe), os.path.join(path, PARAMS_DIR))
    params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), restored)
    return pipe, place_tree(params, boxed_params(pipe), mesh, rules)


def load_any_pipeline(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      text_layer: str | None = None, *, mesh: Mesh | None = None,
                      rules: LogicalRules | None = None) -> tuple[SDPipeline, dict[str, Any]]:
    """A diffusers folder or a rig_jax pipeline checkpoint, whichever `path` is."""
    if os.path.isdir(path) and is_pipeline_checkpoint(path):
        return load_pipeline_checkpoint(path, dtype, param_dtype, text_layer, mesh=mesh, rules=rules)
    return load_pipeline(path, dtype, param_dtype, text_layer or "last", mesh=mesh, rules=rules)
