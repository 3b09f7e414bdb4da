"""Reflection-GRPO rollouts: B prompts x G samples, jitted, sharded over the mesh's data axes.

Both stages edit one inverted latent per prompt G times (docs/method.md):
- stage 1 (`actor_rollout`): G edit prompts sampled from pi_old for one (I_k, feedback), each
  applied by the frozen Editor with eta = 0, so the words are the only difference in a group;
- stage 2 (`editor_rollout`): one edit prompt, G stochastic re-denoisings (eta > 0) whose
  per-step latents and log-probs are kept for the PPO update; a random `timestep_fraction`
  of the steps is trained, the last one never.
The Diffuser draws I_0, the Checker reads it, rewards and advantages are host-side
(`rl.rewards`, `rl.advantages`); what the learner trains on comes back as host-local numpy
minibatches for the train loop. Every host runs the same rollout on the same global prompts
(one SPMD program); the latents are placed batch-sharded so XLA splits the U-Net calls over
the data axes.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.diffusion.edit import EditStart, denoise_edit, invert_for_edit
from rig_jax.diffusion.sampler import combine_guidance
from rig_jax.diffusion.schedulers import ddim_mean, gaussian_log_prob
from rig_jax.diffusion.settings import EditSettings, SamplerSettings
from rig_jax.errors import ConfigError
from rig_jax.parallel.rules import LogicalRules, activation_sharding
from rig_jax.rig.diffuser import (
    UNCONDITIONAL_PROMPT,
    generate,
    images_to_latents,
    latent_shape,
    latents_to_images,
    text_embeddings,
    tokenize,
    unet_denoiser,
)
from rig_jax.rig.editor import edit_condition_text
from rig_jax.weights.diffusers_pipeline import SDPipeline


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """How a rollout is cut: `prompts` (B) per rollout, `group_size` (G) samples each, drawn
    from `candidates` generated prompts (those the Checker already finds right are used only
    when too few are wrong); `minibatches` updates per rollout, `epochs` passes over it."""
    prompts: int
    group_size: int
    candidates: int
    minibatches: int = 1
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size: a group needs >= 2 samples, got {self.group_size}")
        if self.prompts < 1 or self.candidates < self.prompts:
            raise ConfigError(f"rl.candidates: need >= rl.prompts_per_rollout >= 1, got {self.candidates} "
                              f"and {self.prompts}")
        rows = self.prompts * self.group_size
        if self.minibatches < 1 or rows % self.minibatches or self.epochs < 1:
            raise ConfigError(f"rl.minibatches: must divide the rollout's {rows} samples "
                              f"(and rl.epochs >= 1), got {self.minibatches}")

    @property
    def updates(self) -> int:
        """Optimizer steps one rollout feeds (train.total_steps must be a multiple)."""
        return self.minibatches * self.epochs

    @property
    def samples(self) -> int:
        return self.prompts * self.group_size


# ----------------------------------------------------------------------------- placement

def place_global(tree: Any, mesh: Any, rules: LogicalRules) -> Any:
    """Global arrays from host values every process holds alike, the leading axis sharded
    along the `batch` rule (what one SPMD program on every host expects)."""
    def place(x: Any) -> jax.Array:
        x = np.asarray(x)
        names = ("batch",) + (None,) * (x.ndim - 1)
        sharding = activation_sharding(mesh, rules, names, x.shape)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Global arrays back as numpy on every host (rewards and the Checker run there)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def host_rows(tree: Any) -> Any:
    """This host's rows of a global batch (the slice its devices hold in `shard_batch`)."""
    hosts, host = jax.process_count(), jax.process_index()

    def rows(x: np.ndarray) -> np.ndarray:
        n = x.shape[0] // hosts
        return x[host * n:(host + 1) * n]
    return jax.tree.map(rows, tree)


def minibatches(batch: dict[str, np.ndarray], settings: GroupSettings, rng: np.random.Generator
                ) -> list[dict[str, np.ndarray]]:
    """`epochs` passes over the rollout, each cut into `minibatches` shuffled pieces of whole
    rows (host-local rows of each piece)."""
    n = settings.samples
    out = []
    for _ in range(settings.epochs):
        order = rng.permutation(n) if settings.minibatches > 1 else np.arange(n)
        for piece in np.split(order, settings.minibatches):
            out.append(host_rows({k: v[piece] for k, v in batch.items()}))
    return out


# ----------------------------------------------------------------------------- text

@dataclasses.dataclass(frozen=True)
class TokenizedTexts:
    ids: np.ndarray
    mask: np.ndarray


def tokenized(pipe: SDPipeline, texts: Sequence[str]) -> TokenizedTexts:
    ids, mask = tokenize(pipe, list(texts))
    return TokenizedTexts(ids, mask)


def edit_texts(graphs: Sequence[SceneGraph], edit_prompts: Sequence[str]) -> list[str]:
    return [edit_condition_text(g.prompt(), e) for g, e in zip(graphs, edit_prompts, strict=True)]


# ----------------------------------------------------------------------------- the Diffuser

def generate_images(pipe: SDPipeline, params: Any, graphs: Sequence[SceneGraph], settings: SamplerSettings,
                    rng: jax.Array, mesh: Any, rules: LogicalRules) -> np.ndarray:
    """I_0 = D(P) for every graph (deterministic DDIM from noise of `rng`), the noise placed
    batch-sharded so the Diffuser's calls split over the data axes."""
    if settings.eta != 0:
        raise ConfigError("diffuser.sampler.eta: the Diffuser draws I_0 with eta = 0 in the rollouts")
    noise = np.asarray(jax.random.normal(rng, latent_shape(pipe, len(graphs), None, None), jnp.float32))
    images = generate(pipe, params, [g.prompt() for g in graphs], settings,
                      init_latents=place_global(noise, mesh, rules))
    return to_host(images)


# ----------------------------------------------------------------------------- the Editor, G per latent

def _repeat_uncond(uncond: jax.Array | None, batch: int, group: int) -> jax.Array | None:
    """The unconditional embedding for G copies of each start: per-step (S, B, L, D) after
    null-text, else (B|1, L, D)."""
    if uncond is None:
        return None
    axis = 1 if uncond.ndim == 4 else 0
    return uncond if uncond.shape[axis] == 1 else jnp.repeat(uncond, group, axis=axis)


def _group_edit(pipe: SDPipeline, settings: EditSettings, group: int, keep_trajectory: bool, params: Any,
                images: jax.Array, prompt_ids: jax.Array, prompt_mask: jax.Array, edit_ids: jax.Array,
                edit_mask: jax.Array, uncond_ids: jax.Array, uncond_mask: jax.Array, rng: jax.Array | None
                ) -> dict[str, jax.Array]:
    text, unet = params["text_encoder"], params["unet"]
    denoise = unet_denoiser(pipe)
    prompt_cond = text_embeddings(pipe, text, prompt_ids, prompt_mask)
    edit_cond = text_embeddings(pipe, text, edit_ids, edit_mask)
    uncond = text_embeddings(pipe, text, uncond_ids, uncond_mask)
    latents = images_to_latents(pipe, params["vae"], images, None)
    start = invert_for_edit(denoise, unet, latents, prompt_cond, uncond, pipe.schedule, settings)
    batch = latents.shape[0]
    start = EditStart(jnp.repeat(start.latents, group, axis=0), _repeat_uncond(start.uncond, batch, group))
    out = denoise_edit(denoise, unet, start, edit_cond, pipe.schedule, settings, rng=rng,
                       return_trajectory=keep_trajectory)
    if not keep_trajectory:
        return {"images": latents_to_images(pipe, params["vae"], out)}
    final, trajectory = out
    return {"images": latents_to_images(pipe, params["vae"], final), "edit_cond": edit_cond,
            "uncond": uncond, "latents": jnp.swapaxes(trajectory.latents, 0, 1),
            "next_latents": jnp.swapaxes(trajectory.next_latents, 0, 1),
            "log_probs": jnp.swapaxes(trajectory.log_probs, 0, 1),
            "timesteps": trajectory.timesteps, "prev_timesteps": trajectory.prev_timesteps}


def group_edit(pipe: SDPipeline, params: Any, images: np.ndarray, graphs: Sequence[SceneGraph],
               edit_prompts: Sequence[str], settings: EditSettings, group: int, mesh: Any,
               rules: LogicalRules, rng: jax.Array | None = None, keep_trajectory: bool = False
               ) -> dict[str, np.ndarray]:
    """Edits each of the B `images` G times from ONE inversion under the prompt: rows i*G + g
    use `edit_prompts[i*G + g]`. With eta > 0 (`settings.sampler.eta`) the re-denoisings
    differ by their noise and `keep_trajectory` returns the per-step (N, S, ...) record."""
    b = len(graphs)
    if len(images) != b or len(edit_prompts) != b * group:
        raise ConfigError(f"group_edit: {len(images)} images, {b} graphs and {len(edit_prompts)} edit "
                          f"prompts for groups of {group}")
    prompt = tokenized(pipe, [g.prompt() for g in graphs])
    edit = tokenized(pipe, edit_texts([g for g in graphs for _ in range(group)], edit_prompts))
    uncond = tokenized(pipe, [UNCONDITIONAL_PROMPT])
    stochastic = settings.sampler.eta > 0
    if stochastic and rng is None:
        raise ConfigError("editor.sampler.eta > 0 needs an rng")
    key = ("rl_group_edit", settings, group, keep_trajectory)
    run = pipe.cached(key, lambda: jax.jit(
        functools.partial(_group_edit, pipe, settings, group, keep_trajectory)))
    placed = place_global((np.asarray(images, np.float32), prompt.ids, prompt.mask, edit.ids, edit.mask),
                          mesh, rules)
    out = run(params, *placed, uncond.ids, uncond.mask, rng if stochastic else None)
    return to_host(out)


# ----------------------------------------------------------------------------- the policy step

def step_distribution(pipe: SDPipeline, sampler: SamplerSettings, unet_params: Any, latents: jax.Array,
                      t: jax.Array, prev_t: jax.Array, cond: jax.Array, uncond: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the stage-2 Gaussian policy at each row's (x_t, t): the guided model
    output (CFG with the editor's guidance) through the DDIM mean; traceable, float32."""
    n = latents.shape[0]
    uncond = jnp.broadcast_to(uncond, (n, *uncond.shape[1:])) if uncond.shape[0] == 1 else uncond
    if sampler.guidance_scale == 1.0:
        output = pipe.unet.apply({"params": unet_params}, latents, t, cond).astype(jnp.float32)
    else:
        both = pipe.unet.apply({"params": unet_params}, jnp.concatenate([latents, latents]),
                               jnp.concatenate([t, t]), jnp.concatenate([uncond, cond])).astype(jnp.float32)
        output = combine_guidance(both[:n], both[n:], sampler.guidance_scale, sampler.guidance_rescale)
    mean, std = ddim_mean(pipe.schedule, output, t, prev_t, latents, sampler.eta)
    return mean, jnp.broadcast_to(std, mean.shape)


def step_log_probs(pipe: SDPipeline, sampler: SamplerSettings, unet_params: Any, batch: dict[str, jax.Array],
                   uncond: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p (N, K), mean (N, K, ...), std (N, K)) of the trained steps of a stage-2 batch;
    `uncond` (1, L, D) is the unconditional embedding the rollout guided with."""
    n, k = batch["old_logp"].shape
    flat = lambda x: x.reshape((n * k, *x.shape[2:]))
    cond = jnp.repeat(batch["edit_cond"], k, axis=0)
    mean, std = step_distribution(pipe, sampler, unet_params, flat(batch["latents"]), flat(batch["t"]),
                                  flat(batch["prev_t"]), cond, uncond)
    logp = gaussian_log_prob(flat(batch["next_latents"]), mean, std)
    std_row = std.reshape(n * k, -1)[:, 0]
    return logp.reshape(n, k), mean.reshape((n, k, *mean.shape[1:])), std_row.reshape(n, k)


def trained_steps(num_steps: int, fraction: float, rows: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, K) step indices per sample: a random `fraction` of the steps, never the last
    (its std is the smallest and, with a final alpha of 1, zero)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"rl.timestep_fraction: must be in (0, 1], got {fraction}")
    candidates = num_steps - 1
    if candidates < 1:
        raise ConfigError("editor: stage 2 needs >= 2 re-denoising steps (raise editor.sampler.num_steps "
                          "or editor.strength)")
    k = max(1, round(fraction * candidates))
    return np.stack([np.sort(rng.permutation(candidates)[:k]) for _ in range(rows)]).astype(np.int32)


def gather_steps(record: dict[str, np.ndarray], steps: np.ndarray) -> dict[str, np.ndarray]:
    """The trained steps' (x_t, x_{t-1}, t, t_prev, log p_old) of each row of a trajectory."""
    rows = np.arange(steps.shape[0])[:, None]
    return {"latents": record["latents"][rows, steps], "next_latents": record["next_latents"][rows, steps],
            "old_logp": record["log_probs"][rows, steps].astype(np.float32),
            "t": record["timesteps"][steps].astype(np.int32),
            "prev_t": record["prev_timesteps"][steps].astype(np.int32)}


def reference_means(pipe: SDPipeline, sampler: SamplerSettings, ref_unet: Any, batch: dict[str, np.ndarray],
                    uncond: np.ndarray, mesh: Any, rules: LogicalRules) -> np.ndarray:
    """mu_ref of the trained steps under the frozen reference U-Net (for the KL term)."""
    run = pipe.cached(("rl_ref_means", sampler), lambda: jax.jit(
        lambda p, b, u: step_log_probs(pipe, sampler, p, b, u)[1]))
    keys = ("latents", "next_latents", "t", "prev_t", "old_logp", "edit_cond")
    placed = place_global({k: batch[k] for k in keys}, mesh, rules)
    return to_host(run(ref_unet, placed, jnp.asarray(uncond)))
