"""Rewards by name (method.md, Reflection-GRPO), computed on the host outside jit.

Stage 1 default: `S(I_{k+1}) - S(I_k) + lambda_fmt * well_formed(e)` ("checker_delta" plus the
format term); stage 2 default: `S(I_{k+1})` ("checker_score"). "sg_iou" scores the scene graph
the Checker extracted from I_{k+1} against the prompt's graph; "judge" asks an evaluation judge.
A reward function takes a `RewardBatch` and returns one float per sample.

Config fields: `rl.reward` (name), `rl.format_weight` (lambda_fmt).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError, RigError
from rig_jax.eval.scene_graph_iou import iou
from rig_jax.rl.registry import REWARDS


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """One rollout's samples; entry `i` of every sequence belongs to sample `i`."""
    graphs: Sequence[SceneGraph]            # the prompts' ground-truth graphs
    checks_before: Sequence[Any] | None     # Checker results of I_k (.score, .verdicts.scene_graph)
    checks_after: Sequence[Any]             # Checker results of I_{k+1}
    images_after: np.ndarray | None = None  # (N, H, W, 3) float in [0, 1]
    well_formed: Sequence[bool] | None = None   # the Actor's edit prompts (stage 1); None in stage 2
    judge: Any = None                       # .judge(images, graphs) -> results with .triplet_verdicts

    def __post_init__(self):
        n = len(self.checks_after)
        lengths = {"graphs": len(self.graphs)}
        for name in ("checks_before", "images_after", "well_formed"):
            value = getattr(self, name)
            if value is not None:
                lengths[name] = len(value)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"RewardBatch: {len(self.checks_after)} checks_after but {wrong}")


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    name: str = "checker_delta"
    format_weight: float = 0.0    # lambda_fmt; applied only where well_formed is given

    def __post_init__(self):
        if not (math.isfinite(self.format_weight) and self.format_weight >= 0):
            raise ConfigError(f"rl.format_weight: must be a finite number >= 0, got {self.format_weight}")


def _scores(checks: Sequence[Any]) -> np.ndarray:
    return np.array([float(c.score) for c in checks], dtype=np.float64)


@REWARDS.register("checker_delta")
def checker_delta(batch: RewardBatch) -> np.ndarray:
    """`S(I_{k+1}) - S(I_k)`: credit for what the edit changed, not for where the image started."""
    if batch.checks_before is None:
        raise ConfigError("rl.reward: 'checker_delta' needs the Checker results of I_k "
                          "(checks_before); use 'checker_score' when there are none")
    return _scores(batch.checks_after) - _scores(batch.checks_before)


@REWARDS.register("checker_score")
def checker_score(batch: RewardBatch) -> np.ndarray:
    """`S(I_{k+1})`."""
    return _scores(batch.checks_after)


@REWARDS.register("sg_iou")
def checker_sg_iou(batch: RewardBatch) -> np.ndarray:
    """SG-IoU of the Checker's extracted triplets on I_{k+1} against the prompt's (attribute) triplets."""
    return np.array([iou({tuple(t) for t in check.verdicts.scene_graph},
                         set(graph.triplets(with_attributes=True)))
                     for check, graph in zip(batch.checks_after, batch.graphs, strict=True)],
                    dtype=np.float64)


@REWARDS.register("judge")
def judge_score(batch: RewardBatch) -> np.ndarray:
    """Fraction of ground-truth triplets the judge sees in I_{k+1} (0 for a graph with none)."""
    if batch.judge is None or batch.images_after is None:
        raise ConfigError("rl.reward: 'judge' needs a judge and the edited images (images_after)")
    results = list(batch.judge.judge(batch.images_after, list(batch.graphs)))
    if len(results) != len(batch.graphs):
        raise RigError(f"rl.reward: the judge returned {len(results)} results for {len(batch.graphs)} images")
    return np.array([sum(v is True for v in r.triplet_verdicts) / len(r.triplet_verdicts)
                     if r.triplet_verdicts else 0.0 for r in results], dtype=np.float64)


def compute_rewards(batch: RewardBatch, settings: RewardSettings) -> tuple[np.ndarray, dict[str, float]]:
    """(N,) float64 rewards of the named reward plus the format term, and their statistics.
    Non-finite rewards are returned as they are and counted (`reward_nonfinite`): the learner
    drops their groups (`rl.learner.score_groups`), a reward's NaN never reaches a gradient."""
    reward_fn = REWARDS.get(settings.name, "rl.reward")
    base = np.asarray(reward_fn(batch), dtype=np.float64)
    n = len(batch.checks_after)
    if base.shape != (n,):
        raise RigError(f"rl.reward: reward {settings.name!r} returned shape {base.shape} for {n} samples")
    finite = np.isfinite(base)
    stats = {f"reward_{settings.name}_mean": float(base[finite].mean()) if finite.any() else 0.0,
             "reward_nonfinite": float(np.sum(~finite))}
    rewards = base
    if batch.well_formed is not None:
        formed = np.array([bool(w) for w in batch.well_formed], dtype=np.float64)
        rewards = base + settings.format_weight * formed
        stats["well_formed_rate"] = float(formed.mean()) if n else 0.0
    return rewards, stats
