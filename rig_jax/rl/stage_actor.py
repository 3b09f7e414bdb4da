"""Reflection-GRPO stage 1 (`grpo_actor`): the Actor's edit prompts as a token policy.

Per rollout: the frozen Diffuser draws I_0 for `rl.candidates` prompts, the Checker reads
them, the `rl.prompts_per_rollout` it finds wrong (S < 1) are kept, pi_old samples G edit
prompts per (I_0, feedback) at temperature tau, the frozen Editor applies each to the same
inverted latent with eta = 0, and the Checker scores the results. Rewards (`rl.reward`,
default S(I_1) - S(I_0), plus `rl.format_weight` x well_formed) become group advantages;
the update is DeepSeekMath's clipped token loss with the k3 KL to the warm-started Actor
(`rl.loss`, registered by name). With `rl.lora.enabled` only a LoRA tree trains and the
reference is the base with LoRA off. Exports `<workdir>/actor`, a Hugging Face folder
like the one it started from.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.models.lora import apply_lora, init_lora, merge_lora
from rig_jax.rig.actor import GRID_KEY, ActorSettings, VLMActor, static_grid, token_logprobs
from rig_jax.rl.environment import actor_temperature, check_trained_world, compute_dtype, repeat_each
from rig_jax.rl.learner import (
    RolloutClock,
    choose_prompts,
    export_whole,
    lora_settings,
    score_groups,
    stage_setup,
)
from rig_jax.rl.losses import TokenLossSettings
from rig_jax.rl.registry import LOSSES
from rig_jax.rl.rewards import RewardBatch
from rig_jax.rl.rollout import generate_images, group_edit, minibatches, place_global, to_host
from rig_jax.train.loop import TrainJob, TrainState
from rig_jax.train.optimizer import OptimizerSettings
from rig_jax.train.step import StepSettings
from rig_jax.weights.io import read_json

EXPORT_DIR = "actor"
WEIGHTS_FILE = "model.safetensors"


def load_actor(config: Any, mesh: Any, rules: Any, trainable: bool = True) -> tuple[Any, Any, Any]:
    """(pipeline, host params, params placed on the mesh) of `actor.path`: float32 masters when
    it trains, else stored in its compute dtype (a frozen 7B Actor in bf16 takes half)."""
    from rig_jax.vlm.pipeline import load_vlm_pipeline

    path = config.actor.path
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"actor.path: {path or '(empty)'} is not a Qwen2.5-VL folder (no config.json)")
    check_trained_world(path, "actor.path", config)
    dtype = compute_dtype(config.actor.dtype)
    pipe, host = load_vlm_pipeline(path, dtype, jnp.float32 if trainable else dtype)
    placed = jax.tree.map(lambda x, s: jax.device_put(x, s), host, actor_shardings(pipe, mesh, rules))
    return pipe, host, placed


def actor_shardings(pipe: Any, mesh: Any, rules: Any) -> Any:
    from rig_jax.parallel.rules import param_shardings
    from rig_jax.weights.qwen2_5_vl import qwen_vl_boxed_params

    return param_shardings(qwen_vl_boxed_params(pipe.model), mesh, rules)


def export_actor(source: str, folder: str, params: Any) -> None:
    """A copy of the source folder with the trained weights, swapped in whole."""
    from rig_jax.weights.qwen2_5_vl import save_qwen_vl

    def write(tmp: str, host_params: Any) -> None:
        weights = shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json")
        shutil.copytree(source, tmp, ignore=weights)
        save_qwen_vl(tmp, read_json(os.path.join(source, "config.json")), host_params)

    export_whole(folder, params, write)


def build_grpo_actor_job(config: Any, workdir: str, mesh: Any, rules: Any) -> TrainJob:
    rl = config.rl
    group, env = stage_setup(config, mesh, rules)
    if env.edit.sampler.eta != 0:
        raise ConfigError("editor.sampler.eta: stage 1 applies every edit prompt with eta = 0 (the words "
                          "are the only difference inside a group)")
    pipe, host_params, placed = load_actor(config, mesh, rules)
    tau = actor_temperature(config)
    actor = VLMActor(pipe, ActorSettings(temperature=tau, max_new_tokens=config.actor.max_new_tokens,
                                         max_words=config.actor.max_words))
    lora = lora_settings(rl.lora)
    loss_settings = TokenLossSettings(clip_epsilon=rl.clip_epsilon, kl_beta=rl.kl_beta,
                                      aggregation=rl.aggregation)
    loss = LOSSES.get(rl.loss, "rl.loss")
    frozen = {"reference": placed}
    counts: dict[str, Any] = {}
    grid: dict[str, np.ndarray] = {}      # the images' patch grid: host data the traced loss binds

    def with_grid(batch: Any) -> dict[str, Any]:
        return {**batch, GRID_KEY: grid[GRID_KEY]}

    def keep_grid(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch without its host grid, which must be one for the whole run (one compile)."""
        found = static_grid(batch)
        if GRID_KEY in grid and not np.array_equal(grid[GRID_KEY], found):
            raise ConfigError(f"grpo_actor: the images' patch grid changed from {grid[GRID_KEY].tolist()} "
                              f"to {found.tolist()} (all rollouts must draw images of one size)")
        grid[GRID_KEY] = found
        return {k: v for k, v in batch.items() if k != GRID_KEY}

    def policy(params: Any, frozen_tree: Any) -> Any:
        return apply_lora(frozen_tree["reference"], params, lora) if lora else params

    def init(rng: jax.Array) -> Any:
        from rig_jax.models.qwen2_5_vl.model import dummy_inputs
        from rig_jax.weights.qwen2_5_vl import qwen_vl_boxed_params

        if lora:
            return init_lora(qwen_vl_boxed_params(pipe.model), lora, rng)
        return pipe.model.init(rng, **dummy_inputs(pipe.config))["params"]

    def loss_fn(params: Any, frozen_tree: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict]:
        logp = token_logprobs(pipe, policy(params, frozen_tree), with_grid(batch), batch["tokens"],
                              batch["valid"], tau)
        ref = batch["ref_logp"] if loss_settings.kl_beta > 0 else None
        return loss(logp, batch["old_logp"], ref, batch["valid"].astype(jnp.float32), batch["advantages"],
                    loss_settings)

    reference_logprobs = jax.jit(
        lambda p, b: token_logprobs(pipe, p, with_grid(b), b["tokens"], b["valid"], tau))

    def rollout(state: TrainState, raw: Any, step: int) -> tuple[list[Any], dict[str, float]]:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
        gen_key, act_key = jax.random.split(key)
        clock = RolloutClock()
        candidates = env.prompts.graphs(raw)
        images = generate_images(env.pipe, env.diffuser_params, candidates, env.sampler, gen_key, mesh, rules)
        clock.lap("generate")
        checks = env.checker.check(images, candidates)
        keep = choose_prompts([c.score for c in checks], group.prompts)
        graphs, images, checks = [candidates[i] for i in keep], images[keep], [checks[i] for i in keep]
        clock.lap("reflect")
        pi_old = merge_lora(frozen["reference"], state.params, lora) if lora else state.params
        samples = actor.propose(pi_old, images, graphs, [c.feedback for c in checks], act_key,
                                num_samples=group.group_size)
        clock.lap("act")
        edited = group_edit(env.pipe, env.editor_params, images, graphs, [e.text for e in samples.edits],
                            env.edit, group.group_size, mesh, rules)["images"]
        clock.lap("edit")
        graphs_g = repeat_each(graphs, group.group_size)
        after = env.checker.check(edited, graphs_g)
        advantages, metrics = score_groups(
            RewardBatch(graphs=graphs_g, checks_before=repeat_each(checks, group.group_size),
                        checks_after=after, images_after=edited,
                        well_formed=[e.well_formed for e in samples.edits], judge=env.judge),
            rl, group, counts)
        batch = {**keep_grid({k: np.asarray(v) for k, v in samples.batch.items()}), "tokens": samples.tokens,
                 "valid": samples.valid, "old_logp": samples.policy_logprobs, "advantages": advantages}
        if loss_settings.kl_beta > 0:
            placed_batch = place_global(batch, mesh, rules)
            batch["ref_logp"] = to_host(reference_logprobs(frozen["reference"], placed_batch))
        clock.lap("score")
        metrics.update({"rollout/checker_malformed": float(sum(c.verdicts.malformed for c in checks + after)),
                        "rollout/score_before": float(np.mean([c.score for c in checks])),
                        "rollout/score_after": float(np.mean([c.score for c in after])),
                        "rollout/distinct_prompts": distinct_per_group(samples.edits, group.group_size),
                        **clock.metrics()})
        return minibatches(batch, group, np.random.default_rng([config.seed, step])), metrics

    def export(state: TrainState) -> None:
        params = merge_lora(frozen["reference"], state.params, lora) if lora else state.params
        export_actor(config.actor.path, os.path.join(workdir, EXPORT_DIR), params)

    from rig_jax.rl.evaluation import loop_evaluator

    return TrainJob(
        name="grpo_actor", init_params=init, loss_fn=loss_fn,
        warm_start=None if lora else (lambda: host_params),
        optimizer=OptimizerSettings.from_config(config.optimizer), step=StepSettings(**config.step),
        dataset=lambda: env.prompts.dataset(group.candidates), frozen=frozen, rollout=rollout,
        host_state=counts, export=export,
        evaluate=loop_evaluator(config, workdir, env, actor, lambda s: (
            merge_lora(frozen["reference"], s.params, lora) if lora else s.params), None))


def distinct_per_group(edits: list[Any], group_size: int) -> float:
    """Mean number of distinct edit texts in a group (how much the Actor still explores)."""
    texts = [e.text for e in edits]
    return float(np.mean([len(set(texts[i:i + group_size])) for i in range(0, len(texts), group_size)]))
