"""Reflection-GRPO stage 2 (`grpo_editor`): the Image Editor's re-denoising as a Gaussian policy.

Per rollout: the frozen Diffuser draws I_0, the Checker reads it, the wrong ones are kept,
the frozen (stage-1) Actor writes one edit prompt per image, and the Editor inverts each
image once and re-denoises it G times with eta > 0, keeping every step's x_t, x_{t-1} and
log p_old. Rewards (`rl.reward`, default S(I_1)) become group advantages; a random
`rl.timestep_fraction` of each trajectory's steps (never the last) is replayed under
pi_theta for DDPO's clipped ratio loss (`rl.loss`) with the KL |mu_theta - mu_ref|^2 /
(2 sigma^2) to the frozen starting U-Net. With `rl.lora.enabled` a LoRA tree on the U-Net
trains and the reference is the base. Exports `<workdir>/editor`, a diffusers folder.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.models.lora import apply_lora, init_lora, merge_lora
from rig_jax.rig.actor import ActorSettings, VLMActor
from rig_jax.rig.diffuser import encode_prompts
from rig_jax.rl.environment import actor_temperature, repeat_each
from rig_jax.rl.learner import (
    RolloutClock,
    choose_prompts,
    export_whole,
    lora_settings,
    score_groups,
    stage_setup,
)
from rig_jax.rl.losses import DiffusionLossSettings
from rig_jax.rl.registry import LOSSES
from rig_jax.rl.rewards import RewardBatch
from rig_jax.rl.rollout import (
    gather_steps,
    generate_images,
    group_edit,
    minibatches,
    reference_means,
    step_log_probs,
    trained_steps,
)
from rig_jax.rl.stage_actor import load_actor
from rig_jax.train.loop import TrainJob, TrainState
from rig_jax.train.optimizer import OptimizerSettings
from rig_jax.train.step import StepSettings

EXPORT_DIR = "editor"


def export_editor(folder: str, pipe: Any, params: Any) -> None:
    """The Editor as a diffusers folder, swapped in whole."""
    from rig_jax.weights.diffusers_pipeline import save_pipeline

    export_whole(folder, params, lambda tmp, host_params: save_pipeline(tmp, pipe, host_params))


def build_grpo_editor_job(config: Any, workdir: str, mesh: Any, rules: Any) -> TrainJob:
    rl = config.rl
    group, env = stage_setup(config, mesh, rules)
    sampler = env.edit.sampler
    if not sampler.eta > 0:
        raise ConfigError("editor.sampler.eta: stage 2 trains a stochastic policy, set it > 0 (DDPO: 1.0)")
    if env.edit.null_text.enabled:
        raise ConfigError("editor.null_text.enabled: stage 2 replays plain guided steps; per-step null-text "
                          "embeddings are not part of its policy (turn null-text off for stage 2)")
    actor_pipe, _, actor_params = load_actor(config, mesh, rules, trainable=False)
    actor = VLMActor(actor_pipe, ActorSettings(temperature=actor_temperature(config),
                                               max_new_tokens=config.actor.max_new_tokens,
                                               max_words=config.actor.max_words))
    lora = lora_settings(rl.lora)
    loss_settings = DiffusionLossSettings(clip_range=rl.clip_range, kl_beta=rl.kl_beta)
    loss = LOSSES.get(rl.loss, "rl.loss")
    pipe = env.pipe
    base = env.editor_params
    uncond = encode_prompts(pipe, base, [""])
    frozen = {"reference": base["unet"], "uncond": uncond}
    counts: dict[str, Any] = {}

    def unet(params: Any, frozen_tree: Any) -> Any:
        return apply_lora(frozen_tree["reference"], params, lora) if lora else params

    def current(params: Any) -> dict[str, Any]:
        weights = merge_lora(base["unet"], params, lora) if lora else params
        return {**base, "unet": weights}

    def init(rng: jax.Array) -> Any:
        from rig_jax.models.unet import example_inputs
        from rig_jax.weights.unet import unet_boxed_params

        if lora:
            return init_lora(unet_boxed_params(pipe.unet), lora, rng)
        return pipe.unet.init(rng, *example_inputs(pipe.unet_config))["params"]

    def loss_fn(params: Any, frozen_tree: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, dict]:
        weights = unet(params, frozen_tree)
        logp, mean, std = step_log_probs(pipe, sampler, weights, batch, frozen_tree["uncond"])
        dist = None
        if loss_settings.kl_beta > 0:
            axes = tuple(range(2, mean.ndim))
            dist = jnp.mean(jnp.square(mean - batch["ref_mean"]), axis=axes)
        return loss(logp, batch["old_logp"], batch["advantages"], batch["step_mask"], dist, std,
                    loss_settings)

    def rollout(state: TrainState, raw: Any, step: int) -> tuple[list[Any], dict[str, float]]:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
        gen_key, act_key, edit_key = jax.random.split(key, 3)
        host_rng = np.random.default_rng([config.seed, step])
        clock = RolloutClock()
        candidates = env.prompts.graphs(raw)
        images = generate_images(pipe, env.diffuser_params, candidates, env.sampler, gen_key, mesh, rules)
        clock.lap("generate")
        checks = env.checker.check(images, candidates)
        keep = choose_prompts([c.score for c in checks], group.prompts)
        graphs, images, checks = [candidates[i] for i in keep], images[keep], [checks[i] for i in keep]
        clock.lap("reflect")
        edits = actor.propose(actor_params, images, graphs, [c.feedback for c in checks], act_key,
                              num_samples=1, greedy=bool(rl.actor_greedy)).edits
        clock.lap("act")
        record = group_edit(pipe, current(state.params), images, graphs,
                            repeat_each([e.text for e in edits], group.group_size), env.edit,
                            group.group_size, mesh, rules, rng=edit_key, keep_trajectory=True)
        clock.lap("edit")
        graphs_g = repeat_each(graphs, group.group_size)
        after = env.checker.check(record["images"], graphs_g)
        advantages, metrics = score_groups(
            RewardBatch(graphs=graphs_g, checks_before=repeat_each(checks, group.group_size),
                        checks_after=after, images_after=record["images"], judge=env.judge),
            rl, group, counts)
        steps = trained_steps(record["log_probs"].shape[1], rl.timestep_fraction, group.samples, host_rng)
        batch = {**gather_steps(record, steps), "edit_cond": record["edit_cond"], "advantages": advantages,
                 "step_mask": np.ones(steps.shape, np.float32)}
        if loss_settings.kl_beta > 0:
            batch["ref_mean"] = reference_means(pipe, sampler, frozen["reference"], batch, record["uncond"],
                                                mesh, rules)
        clock.lap("score")
        metrics.update({"rollout/checker_malformed": float(sum(c.verdicts.malformed for c in checks + after)),
                        "rollout/score_before": float(np.mean([c.score for c in checks])),
                        "rollout/score_after": float(np.mean([c.score for c in after])), **clock.metrics()})
        return minibatches(batch, group, host_rng), metrics

    def export(state: TrainState) -> None:
        export_editor(os.path.join(workdir, EXPORT_DIR), pipe, current(state.params))

    from rig_jax.rl.evaluation import loop_evaluator

    return TrainJob(
        name="grpo_editor", init_params=init, loss_fn=loss_fn,
        warm_start=None if lora else (lambda: jax.tree.map(np.asarray, base["unet"])),
        optimizer=OptimizerSettings.from_config(config.optimizer), step=StepSettings(**config.step),
        dataset=lambda: env.prompts.dataset(group.candidates), frozen=frozen, rollout=rollout,
        host_state=counts, export=export, rows_first=True,    # (N, ...) latents, steps, conditions
        evaluate=loop_evaluator(config, workdir, env, actor, lambda s: actor_params,
                                lambda s: current(s.params)))
