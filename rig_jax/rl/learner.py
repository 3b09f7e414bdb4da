"""What both Reflection-GRPO stages do between a rollout and its updates, on the host:
rewards by name, group advantages by name, the per-rollout metrics and the running counts
kept in the checkpoint; plus the pieces of config both stages read (LoRA, the groups)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.models.lora import LoRASettings
from rig_jax.rl.advantages import AdvantageSettings, compute_advantages
from rig_jax.rl.rewards import RewardBatch, RewardSettings, compute_rewards
from rig_jax.rl.rollout import GroupSettings


def group_settings(rl: Any) -> GroupSettings:
    return GroupSettings(prompts=rl.prompts_per_rollout, group_size=rl.group_size, candidates=rl.candidates,
                         minibatches=rl.minibatches, epochs=rl.epochs)


def stage_setup(config: Any, mesh: Any, rules: Any) -> tuple[GroupSettings, Any]:
    """What both stages start with: the groups (checked against train.total_steps) and the
    environment, with the Judge when a reward or a named VLM judge wants it."""
    from rig_jax.rl.environment import build_environment, wants_judge

    group = group_settings(config.rl)
    check_total_steps(config.train.total_steps, group)
    return group, build_environment(config, mesh, rules, need_judge=wants_judge(config))


def export_whole(folder: str, params: Any, write: Any) -> None:
    """`write(tmp, host_params)` into a sibling of `folder`, then swapped in whole (a crash
    mid-write leaves the previous export, never a mix); process 0 writes."""
    import shutil

    import jax

    from rig_jax.outputs import swap_in_folder
    from rig_jax.weights.mapping import to_host

    params = jax.tree.map(to_host, params)
    if jax.process_index() != 0:
        return
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp, params)
    swap_in_folder(tmp, folder)


def lora_settings(section: Any) -> LoRASettings | None:
    """`rl.lora` -> LoRASettings, or None when LoRA is off (the whole model trains)."""
    if not section.enabled:
        return None
    return LoRASettings(rank=section.rank, alpha=section.alpha, targets=tuple(section.targets))


def check_total_steps(total_steps: int, group: GroupSettings) -> None:
    if total_steps % group.updates:
        raise ConfigError(f"train.total_steps: {total_steps} is not a whole number of rollouts of "
                          f"{group.updates} updates (rl.minibatches x rl.epochs)")


def choose_prompts(scores: Sequence[float], wanted: int) -> np.ndarray:
    """Indices of `wanted` candidates, those the Checker finds wrong (S < 1) first, in draw
    order: a prompt whose image is already right gives the Actor nothing to fix."""
    scores = np.asarray(scores, np.float64)
    wrong = np.flatnonzero(scores < 1.0)
    right = np.flatnonzero(scores >= 1.0)
    return np.concatenate([wrong, right])[:wanted]


@dataclasses.dataclass
class RolloutClock:
    """Seconds per rollout phase (generate, reflect, act, edit, score), for the logs."""
    start: float = dataclasses.field(default_factory=time.perf_counter)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[f"time/{name}_s"] = now - self.start
        self.start = now

    def metrics(self) -> dict[str, float]:
        return {**self.phases, "time/rollout_s": sum(self.phases.values())}


def drop_nonfinite_groups(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewards with every group holding a non-finite value set to zeros (a group with equal
    rewards carries no signal), and which groups those were."""
    groups = np.asarray(rewards, np.float64).reshape(-1, group_size).copy()
    dropped = ~np.all(np.isfinite(groups), axis=1)
    groups[dropped] = 0.0
    return groups.reshape(-1), dropped


def score_groups(batch: RewardBatch, rl: Any, group: GroupSettings, counts: dict[str, Any]
                 ) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards (`rl.reward`, + `rl.format_weight` x well_formed) -> advantages
    (`rl.advantage`) and their metrics; a group with a non-finite reward gets zero advantages
    and is counted; `counts` (the job's checkpointed host state) keeps the run's totals."""
    reward_settings = RewardSettings(name=rl.reward, format_weight=rl.format_weight)
    rewards, reward_stats = compute_rewards(batch, reward_settings)
    rewards, dropped = drop_nonfinite_groups(rewards, group.group_size)
    advantages, stats = compute_advantages(rl.advantage, rewards, group.group_size,
                                           AdvantageSettings(clip=rl.advantage_clip, eps=rl.advantage_eps))
    advantages = np.where(np.repeat(dropped, group.group_size), 0.0, advantages)
    stats["nonfinite_groups"] = float(dropped.sum())
    counts["nonfinite_groups"] = int(counts.get("nonfinite_groups", 0)) + int(dropped.sum())
    counts["groups"] = int(counts.get("groups", 0)) + int(stats["num_groups"])
    counts["zero_std_groups"] = int(counts.get("zero_std_groups", 0)) + int(stats["zero_std_groups"])
    counts["rollouts"] = int(counts.get("rollouts", 0)) + 1
    metrics = {f"rollout/{k}": float(v) for k, v in {**reward_stats, **stats}.items()}
    metrics["rollout/zero_std_fraction_total"] = counts["zero_std_groups"] / max(counts["groups"], 1)
    return advantages.astype(np.float32), metrics
