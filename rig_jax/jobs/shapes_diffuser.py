"""The ShapesSG Diffuser: a tiny Stable Diffusion pipeline trained from scratch on rendered
scenes, in two jobs of the one train loop.

- `pretrain_vae`: an f = 4 AutoencoderKL on renders (MSE + a small KL), then the latent
  scaling factor (1 / std of the posterior means) measured and written into its config.
- `pretrain_diffuser`: the SD-layout U-Net and the CLIP text encoder trained jointly on the
  frozen VAE's latents (v- or epsilon-prediction from the scheduler config), prompts `P`,
  with some probability `P + ". " + e` (e an Actor edit form, true of the image) and some
  probability the empty prompt (classifier-free guidance). Evaluated by sampling held-out
  prompts and reading the images back with the pixel detector.

Both write a diffusers folder (`model_index.json`, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) that `load_pipeline` reads like SD-1.5, with `shapes_config.json` beside it
recording the world, the guidance and the steps its evaluation uses.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.data import edit_forms, shapes
from rig_jax.data.shapes import WORLD_FILE, world_from_config
from rig_jax.errors import ConfigError
from rig_jax.eval.scene_graph_iou import score_record
from rig_jax.jobs import shapes_text
from rig_jax.models.vae import AutoencoderKL, sample_latent
from rig_jax.train.data import host_global_batches
from rig_jax.train.loop import TrainJob, TrainState
from rig_jax.weights.io import read_json, write_json

TEXT_LAYER = "last"


# ----------------------------------------------------------------------------- configs

def vae_config_dict(c: Any, image_size: int) -> dict[str, Any]:
    """diffusers AutoencoderKL config.json of the ShapesSG VAE."""
    n = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "act_fn": "silu", "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
            "sample_size": image_size, "scaling_factor": 1.0, "mid_block_add_attention": c.mid_attention}


def unet_config_dict(c: Any, latent_size: int, latent_channels: int, context_dim: int) -> dict[str, Any]:
    n = len(c.block_out_channels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention)]
    if len(c.cross_attention) != n:
        raise ConfigError("diffuser.unet.cross_attention: one entry per block_out_channels entry")
    coordinates = int(c.coordinate_channels)
    return {"_class_name": "UNet2DConditionModel", "sample_size": latent_size,
            "in_channels": latent_channels + coordinates, "coordinate_channels": coordinates,
            "out_channels": latent_channels, "down_block_types": down, "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups,
            "cross_attention_dim": context_dim, "attention_head_dim": c.attention_heads,
            "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0}


def text_config_dict(c: Any, vocab_size: int, max_length: int) -> dict[str, Any]:
    return {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "vocab_size": vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": 4 * c.hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "max_position_embeddings": max_length, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": c.hidden_size, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def scheduler_config_dict(c: Any) -> dict[str, Any]:
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": c.beta_schedule,
            "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 0, "prediction_type": c.prediction_type, "timestep_spacing": c.timestep_spacing,
            "rescale_betas_zero_snr": False}


def model_index() -> dict[str, Any]:
    return {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class PromptMix:
    """How training prompts are drawn: the edit condition `P + ". " + e` and the empty prompt."""
    edit_probability: float
    empty_probability: float


def training_text(graph: Any, rng: np.random.Generator, mix: PromptMix) -> str:
    u = rng.random()
    if u < mix.empty_probability:
        return ""
    prompt = graph.prompt()
    if u < mix.empty_probability + mix.edit_probability:
        triplets = edit_forms.graph_triplets(graph)
        form = edit_forms.EDIT_FORMS[int(rng.integers(len(edit_forms.EDIT_FORMS)))]
        chosen = [triplets[int(rng.integers(len(triplets)))]] if triplets else []
        return f"{prompt}. {edit_forms.edit_text(form, chosen, prompt)}"
    return prompt


def swapped_prompt(graph: Any) -> str:
    """The prompt with every relation turned to its opposite: the same words, false of the
    image (the hard negative of the relation contrast); empty when the graph has no relation."""
    if not graph.relations:
        return ""
    flipped = tuple(dataclasses.replace(r, predicate=shapes.OPPOSITE[r.predicate]) for r in graph.relations)
    return dataclasses.replace(graph, relations=flipped).prompt()


def scene_dataset(world: shapes.ShapesConfig, seed: int, batch_size: int, tokenizer: Any = None,
                  mix: PromptMix | None = None, negatives: bool = False) -> grain.IterDataset:
    """Endless host-local batches of renders (and token ids) of scenes drawn from `(seed, index)`,
    the same global batch on any number of hosts (`train.data.host_global_batches`). With
    `negatives`, each plain prompt also carries its relation-swapped form (`neg_*`)."""
    def example(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, int(index)])
        scene = shapes.generate_scene(rng, world)
        out = {"image": shapes.render(scene, world).astype(np.float32)}
        if tokenizer is not None:
            graph = shapes.scene_graph(scene)
            text = training_text(graph, rng, mix)
            out["ids"], out["mask"] = encode(text)
            if negatives:
                negative = swapped_prompt(graph) if text == graph.prompt() else ""
                out["neg_ids"], out["neg_mask"] = encode(negative)
                out["neg_valid"] = np.float32(bool(negative))
        return out

    def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)

    return host_global_batches(seed, batch_size, example)


# ----------------------------------------------------------------------------- losses

def vae_loss(vae: AutoencoderKL, kl_weight: float):
    def loss_fn(params: Any, frozen: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        x = batch["image"] * 2.0 - 1.0
        mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = sample_latent(mean, logvar, rng)
        recon = vae.apply({"params": params}, z, method=AutoencoderKL.decode)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return mse + kl_weight * kl, {"mse": mse, "kl": kl}
    return loss_fn


@dataclasses.dataclass(frozen=True)
class DiffusionObjective:
    """What the Diffuser's loss weighs. `timestep_power`: t = T * u ** power with u uniform
    (1 is uniform; below 1 draws the noisy steps more often, where the layout, and so every
    relation of the prompt, is decided and the words are the only signal). `relation_contrast`:
    weight of a logistic term asking the true prompt to predict the image better (lower MSE)
    than its relation-swapped form, by about `contrast_temperature`; 0 turns it off.
    `binding_weight`: weight of the text encoder's relation-binding contrast (`binding_logits`:
    a small image encoder must tell the true prompt from its relation-swapped form, as a
    CLIP with hard negatives would; the export drops the image encoder); 0 turns it off."""
    timestep_power: float = 1.0
    relation_contrast: float = 0.0
    contrast_temperature: float = 0.01
    binding_weight: float = 0.0

    @property
    def negatives(self) -> bool:
        return self.relation_contrast > 0 or self.binding_weight > 0

    def __post_init__(self) -> None:
        if not self.timestep_power > 0:
            raise ConfigError(f"diffuser.timestep_power: must be > 0, got {self.timestep_power}")
        if self.binding_weight < 0:
            raise ConfigError(f"diffuser.binding_weight: must be >= 0, got {self.binding_weight}")
        if self.relation_contrast < 0 or not self.contrast_temperature > 0:
            raise ConfigError("diffuser.relation_contrast must be >= 0 and "
                              "diffuser.contrast_temperature > 0")


def diffusion_loss(pipe: Any, objective: DiffusionObjective = DiffusionObjective()):
    """MSE of the U-Net's prediction (epsilon or v, as the scheduler config says) on latents of
    the frozen VAE, plus the optional relation contrast; the text encoder trains with the U-Net."""
    from rig_jax.rig.diffuser import text_embeddings

    schedule = pipe.schedule
    prediction = pipe.configs["scheduler"].get("prediction_type", "epsilon")

    def per_example_mse(params: Any, zt: jax.Array, t: jax.Array, ids: jax.Array, mask: jax.Array,
                        target: jax.Array) -> jax.Array:
        context = text_embeddings(pipe, params["text_encoder"], ids, mask)
        out = pipe.unet.apply({"params": params["unet"]}, zt.astype(pipe.unet.dtype), t, context)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))

    def loss_fn(params: Any, frozen: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        t_rng, n_rng, z_rng = jax.random.split(rng, 3)
        x = batch["image"] * 2.0 - 1.0
        mean, logvar = pipe.vae.apply({"params": frozen["vae"]}, x, method=AutoencoderKL.encode)
        z0 = jax.lax.stop_gradient(sample_latent(mean, logvar, z_rng)) * pipe.vae_config.scaling_factor
        b = z0.shape[0]
        u = jax.random.uniform(t_rng, (b,)) ** objective.timestep_power
        t = jnp.minimum((u * schedule.num_train_timesteps).astype(jnp.int32),
                        schedule.num_train_timesteps - 1)
        noise = jax.random.normal(n_rng, z0.shape, jnp.float32)
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        zt = jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise
        target = noise if prediction == "epsilon" else jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * z0
        mse = per_example_mse(params, zt, t, batch["ids"], batch["mask"], target)
        loss = jnp.mean(mse)
        aux: dict[str, jax.Array] = {}
        if objective.binding_weight:
            positive, negative = binding_logits(pipe, params, batch)
            valid = batch["neg_valid"]
            count = jnp.maximum(jnp.sum(valid), 1.0)
            binding = jnp.sum(valid * jax.nn.softplus(negative - positive)) / count
            loss = loss + objective.binding_weight * binding
            aux["binding"] = binding
            aux["binding_accuracy"] = jnp.sum(valid * (positive > negative)) / count
        if not objective.relation_contrast:
            return loss, {"mse": jnp.mean(mse), **aux} if aux else {}
        negative = per_example_mse(params, zt, t, batch["neg_ids"], batch["neg_mask"], target)
        tau = objective.contrast_temperature
        valid = batch["neg_valid"]
        margin = (mse - negative) / tau
        contrast = tau * jnp.sum(valid * jax.nn.softplus(margin)) / jnp.maximum(jnp.sum(valid), 1.0)
        won = jnp.sum(valid * (margin < 0)) / jnp.maximum(jnp.sum(valid), 1.0)
        return loss + objective.relation_contrast * contrast, {"mse": jnp.mean(mse), "contrast": contrast,
                                                               "contrast_won": won, **aux}
    return loss_fn


class BindingImageEncoder(nn.Module):
    """A small conv net reading a render into one vector (position kept: no global pooling)."""
    width: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images * 2.0 - 1.0
        for channels in (32, 64, 64):
            x = nn.relu(nn.Conv(channels, (3, 3), strides=2)(x))
        return nn.Dense(self.width)(x.reshape(x.shape[0], -1))


def pooled_text(pipe: Any, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The text encoder's mean token embedding, projected: word order is gone from a mean, so
    telling "A left of B" from "A right of B" needs each object's token to carry its role."""
    from rig_jax.rig.diffuser import text_embeddings

    tokens = text_embeddings(pipe, params["text_encoder"], ids, mask)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(tokens * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return pooled @ params["binding"]["projection"]


def binding_logits(pipe: Any, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Image-text scores of the true prompt and of its relation-swapped form (B,) each."""
    image = BindingImageEncoder(pipe.text_config.hidden_size).apply(
        {"params": params["binding"]["image"]}, batch["image"])
    positive = jnp.sum(image * pooled_text(pipe, params, batch["ids"], batch["mask"]), axis=-1)
    negative = jnp.sum(image * pooled_text(pipe, params, batch["neg_ids"], batch["neg_mask"]), axis=-1)
    return positive, negative


def binding_init(width: int, image_size: int, rng: jax.Array) -> dict[str, Any]:
    image_rng, projection_rng = jax.random.split(rng)
    image = BindingImageEncoder(width).init(image_rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
    projection = 0.01 * jax.random.normal(projection_rng, (width, width), jnp.float32)
    return {"image": image, "projection": projection}


TRAINING_AIDS = ("binding",)      # trained with the Diffuser, never exported


# ----------------------------------------------------------------------------- evaluation

def evaluate_images(images: np.ndarray, graphs: list[Any], world: shapes.ShapesConfig) -> dict[str, float]:
    """Detector scores of generated images against their prompts' graphs: SG-IoU (both node
    forms), Entity-IoU, Relation-IoU, all prompted colours found, fraction of relations right."""
    rows, colours_found, relations_right, relations = [], 0, 0, 0
    for image, graph in zip(images, graphs, strict=True):
        found = shapes.detect(np.asarray(image), world, graph)
        rows.append(score_record(found, graph))
        found_colours = {a for it in found.items for a in it.attributes}
        prompted = {a for it in graph.items for a in it.attributes}
        colours_found += prompted <= found_colours
        truth = {(r.subject, r.predicate, r.object) for r in found.relations}
        for r in graph.relations:
            relations += 1
            relations_right += (r.subject, r.predicate, r.object) in truth
    metrics = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
    metrics["all_colours"] = colours_found / len(graphs)
    metrics["relations_right"] = relations_right / max(relations, 1)
    return metrics


def held_out_scenes(world: shapes.ShapesConfig, seed: int, n: int) -> list[Any]:
    return shapes.generate_scenes(seed, n, world)


def write_world_file(folder: str, world: shapes.ShapesConfig, sampler: Mapping[str, Any],
                     extra: Mapping[str, Any]) -> None:
    record = {"world": {"image_size": world.image_size, "min_objects": world.min_objects,
                        "max_objects": world.max_objects, "colours": list(world.colours),
                        "shapes": list(world.shapes), "colour_only": world.is_colour_only},
              "sampler": dict(sampler), **extra}
    write_json(record, os.path.join(folder, WORLD_FILE))


def tokenizer_folder(workdir: str, world: shapes.ShapesConfig, max_length: int, init_from: str = "") -> str:
    """`<workdir>/tokenizer`, written once: a copy of `init_from`'s tokenizer when the run starts
    from a pipeline (its text encoder's rows follow those ids), else built for the world."""
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "vocab.json")) and jax.process_index() == 0:
        if init_from:
            source = os.path.join(init_from, "tokenizer")
            if not os.path.isfile(os.path.join(source, "vocab.json")):
                raise ConfigError(f"diffuser.init_from: {init_from} has no tokenizer/vocab.json")
            shutil.copytree(source, folder)
        else:
            labels = list(world.shapes) + [shapes.COLOUR_ONLY_LABEL]
            shapes_text.write_clip_tokenizer(folder, edit_forms.vocabulary(world.colours, labels), max_length)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("shapes tokenizer written")
    return folder


# ----------------------------------------------------------------------------- pipelines

def new_pipeline(configs: Mapping[str, Mapping[str, Any]], tokenizer_dir: str, source: str) -> Any:
    """An SDPipeline (modules, parsed configs, tokenizer, schedule) from raw config dicts and a
    tokenizer folder, with no weights: what a model trained from scratch starts from."""
    from rig_jax.weights import diffusers_pipeline as dp
    from rig_jax.weights.clip_text import clip_text_config_from_hf
    from rig_jax.weights.unet import unet_config_from_diffusers
    from rig_jax.weights.vae import vae_config_from_diffusers

    return dp._assemble(
        unet_config_from_diffusers(configs["unet"], os.path.join(source, "unet/config.json")),
        vae_config_from_diffusers(configs["vae"], os.path.join(source, "vae/config.json")),
        clip_text_config_from_hf(configs["text_encoder"], os.path.join(source, "text_encoder/config.json")),
        dp.load_tokenizer(tokenizer_dir), configs, dp.read_tokenizer_files(tokenizer_dir), TEXT_LAYER,
        jnp.float32, jnp.float32, source)


def read_trained_vae(folder: str) -> tuple[dict[str, Any], Any]:
    """(config dict, host params) of the VAE `pretrain_vae` exported."""
    from rig_jax.weights.vae import load_vae

    config = read_json(os.path.join(folder, "config.json"))
    _, _, params = load_vae(folder)
    return config, params


def latent_scaling_factor(vae: AutoencoderKL, params: Any, images: np.ndarray) -> float:
    """1 / std of the posterior means over `images`: latents of unit variance, as SD's 0.18215."""
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method=AutoencoderKL.encode))(
        params, jnp.asarray(images))
    return float(1.0 / np.std(gathered(mean)))


# ----------------------------------------------------------------------------- jobs

def gathered(tree: Any) -> Any:
    """Host copies of (possibly cross-host sharded) arrays, made on every host together: the
    ShapesSG models and their eval batches are small, and evaluation and export then run the
    same on every host."""
    from rig_jax.weights.mapping import to_host
    return jax.tree.map(to_host, tree)


def _shard_frozen(tree: Any, boxed: Any, mesh: Any, rules: Any) -> Any:
    from rig_jax.weights.placement import place_tree
    return place_tree(tree, boxed, mesh, rules)


def build_vae_job(config: Any, workdir: str, mesh: Any, rules: Any) -> TrainJob:
    """`pretrain_vae`: the ShapesSG AutoencoderKL; exports `<workdir>/vae` (diffusers layout)."""
    from rig_jax.models.vae import init_params as vae_init
    from rig_jax.train.optimizer import OptimizerSettings
    from rig_jax.train.step import StepSettings
    from rig_jax.weights.vae import save_vae, vae_config_from_diffusers

    world = world_from_config(config.world)
    config_dict = vae_config_dict(config.vae, world.image_size)
    vae = AutoencoderKL(vae_config_from_diffusers(config_dict, "vae config"))
    sample_seed = config.seed + 7919
    run_vae = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0))

    def reconstruct(params: Any, images: np.ndarray) -> np.ndarray:
        return np.clip(gathered(run_vae(params, jnp.asarray(images))) / 2 + 0.5, 0, 1)

    def export(state: TrainState) -> None:
        from rig_jax.eval.report import save_png_grid

        params = gathered(state.params)
        images = np.stack([shapes.render(s, world) for s in held_out_scenes(world, sample_seed, 256)])
        scale = latent_scaling_factor(vae, params, images)
        grid = np.concatenate([images[:32], reconstruct(params, images[:32])])   # every host: a collective
        if jax.process_index() == 0:
            save_vae(os.path.join(workdir, "vae"), {**config_dict, "scaling_factor": scale}, params)
            save_png_grid(os.path.join(workdir, "reconstructions.png"), list(grid), ncols=16)

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        scenes = held_out_scenes(world, sample_seed, config.eval.num_prompts)
        images = np.stack([shapes.render(s, world) for s in scenes])
        graphs = [shapes.scene_graph(s) for s in scenes]
        return evaluate_images(reconstruct(gathered(state.params), images), graphs, world)

    return TrainJob(
        name="pretrain_vae", init_params=lambda rng: vae_init(vae, rng, world.image_size)["params"],
        loss_fn=vae_loss(vae, config.vae.kl_weight),
        optimizer=OptimizerSettings.from_config(config.optimizer), step=StepSettings(**config.step),
        dataset=lambda: scene_dataset(world, config.seed, config.train.batch_size),
        frozen={}, evaluate=evaluate, export=export)


def diffuser_configs(config: Any, vae_config: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    world_size = config.world.image_size
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    text = text_config_dict(config.diffuser.text, len(tokenizer), tokenizer.model_max_length)
    return {"model_index": model_index(), "vae": dict(vae_config),
            "unet": unet_config_dict(config.diffuser.unet, world_size // factor,
                                     vae_config["latent_channels"], config.diffuser.text.hidden_size),
            "text_encoder": text, "scheduler": scheduler_config_dict(config.diffuser.scheduler)}


def with_coordinate_inputs(unet: Any, source: Any, target: Any, folder: str) -> Any:
    """The U-Net params of `source` for `target`'s architecture: the same, or, when `target`
    adds coordinate channels to a U-Net without them, conv_in widened by zero input weights
    (so the warm-started model computes exactly what `source` did and learns to use them)."""
    if source.coordinate_channels == target.coordinate_channels:
        return unet
    if (source.coordinate_channels or dataclasses.replace(source, in_channels=target.in_channels,
                                                          coordinate_channels=target.coordinate_channels)
            != target):
        raise ConfigError(f"diffuser.init_from: the U-Net of {folder} (coordinate_channels "
                          f"{source.coordinate_channels}) cannot start diffuser.unet.coordinate_channels="
                          f"{target.coordinate_channels}: only adding coordinate channels to the same "
                          "architecture is supported")
    kernel = unet["conv_in"]["kernel"]
    pad = [(0, 0)] * (kernel.ndim - 2) + [(0, target.in_channels - source.in_channels), (0, 0)]
    return {**unet, "conv_in": {**unet["conv_in"], "kernel": jnp.pad(kernel, pad)}}


def build_diffuser_job(config: Any, workdir: str, mesh: Any, rules: Any) -> TrainJob:
    """`pretrain_diffuser`: U-Net + text encoder on the frozen VAE of `diffuser.vae_path`;
    exports the whole pipeline to `<workdir>/pipeline` with `shapes_config.json`."""
    from rig_jax.diffusion.settings import SamplerSettings
    from rig_jax.models.clip_text import init_params as clip_init
    from rig_jax.models.unet import example_inputs
    from rig_jax.rig.diffuser import generate
    from rig_jax.train.optimizer import OptimizerSettings
    from rig_jax.train.step import StepSettings
    from rig_jax.weights.diffusers_pipeline import save_pipeline
    from rig_jax.weights.vae import vae_boxed_params

    world = world_from_config(config.world)
    vae_path = config.diffuser.vae_path
    if not os.path.isfile(os.path.join(vae_path, "config.json")):
        raise ConfigError(f"diffuser.vae_path: {vae_path} holds no trained VAE "
                          "(run the pretrain_vae job first)")
    vae_config, vae_params = read_trained_vae(vae_path)
    tok_dir = tokenizer_folder(workdir, world, config.diffuser.max_length, config.diffuser.init_from)
    from rig_jax.weights.diffusers_pipeline import load_tokenizer
    configs = diffuser_configs(config, vae_config, load_tokenizer(tok_dir))
    pipe = new_pipeline(configs, tok_dir, os.path.join(workdir, "pipeline"))
    frozen = {"vae": _shard_frozen(vae_params, vae_boxed_params(pipe.vae), mesh, rules)}
    mix = PromptMix(config.diffuser.edit_probability, config.diffuser.empty_probability)
    objective = DiffusionObjective(config.diffuser.timestep_power, config.diffuser.relation_contrast,
                                   config.diffuser.contrast_temperature, config.diffuser.binding_weight)
    sampler = SamplerSettings.from_config(config.diffuser.sampler, "diffuser.sampler")
    eval_scenes = held_out_scenes(world, config.eval.seed, config.eval.num_prompts)
    eval_graphs = [shapes.scene_graph(s) for s in eval_scenes]

    def training_aids() -> dict[str, Any]:
        if not objective.binding_weight:
            return {}
        return {"binding": binding_init(pipe.text_config.hidden_size, world.image_size,
                                        jax.random.PRNGKey(config.seed + 1))}

    def init(rng: jax.Array) -> dict[str, Any]:
        u_rng, t_rng = jax.random.split(rng)
        return {**training_aids(), "unet": pipe.unet.init(u_rng, *example_inputs(pipe.unet_config))["params"],
                "text_encoder": clip_init(pipe.text_encoder, t_rng)["params"]}

    def eval_params(state: TrainState) -> dict[str, Any]:
        trained = state.ema_params if state.ema_params is not None else state.params
        trained = {k: v for k, v in trained.items() if k not in TRAINING_AIDS}
        return gathered({**trained, "vae": frozen["vae"]})

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        from rig_jax.eval.report import save_png_grid

        params = eval_params(state)
        images = []
        for start in range(0, len(eval_graphs), config.eval.batch_size):
            prompts = [g.prompt() for g in eval_graphs[start:start + config.eval.batch_size]]
            prompts += [prompts[-1]] * (config.eval.batch_size - len(prompts))   # one compiled shape
            rng = jax.random.fold_in(jax.random.PRNGKey(config.eval.seed), start)
            images.append(gathered(generate(pipe, params, prompts, sampler, rng=rng)))
        images = np.concatenate(images)[:len(eval_graphs)]
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
            save_png_grid(path, list(images[:64]), ncols=8)
        return evaluate_images(images, eval_graphs, world)

    def export(state: TrainState) -> None:

        params = eval_params(state)
        if jax.process_index() == 0:
            folder = os.path.join(workdir, "pipeline")
            save_pipeline(folder, pipe, params)
            if config.diffuser.export_half:
                from rig_jax.weights.io import to_half_variant
                for component in ("unet", "vae", "text_encoder"):
                    to_half_variant(os.path.join(folder, component))
            write_world_file(folder, world, dict(config.diffuser.sampler),
                             {"trained_steps": int(jax.device_get(state.step)), "seed": config.seed,
                              "eval_seed": config.eval.seed, "ema": state.ema_params is not None})

    def warm_start() -> dict[str, Any]:
        from rig_jax.weights.diffusers_pipeline import load_pipeline

        source, loaded = load_pipeline(config.diffuser.init_from)
        unet = with_coordinate_inputs(loaded["unet"], source.unet_config, pipe.unet_config,
                                      config.diffuser.init_from)
        return {**training_aids(), "unet": unet, "text_encoder": loaded["text_encoder"]}

    return TrainJob(
        name="pretrain_diffuser", init_params=init, loss_fn=diffusion_loss(pipe, objective),
        warm_start=warm_start if config.diffuser.init_from else None,
        optimizer=OptimizerSettings.from_config(config.optimizer), step=StepSettings(**config.step),
        dataset=lambda: scene_dataset(world, config.seed, config.train.batch_size, pipe.tokenizer, mix,
                                      negatives=objective.negatives),
        frozen=frozen, evaluate=evaluate, export=export)
