"""Held-out evaluation of the Generate-Reflect-Edit loop, shared by both GRPO stages and the
end-to-end job: the loop on prompts no training saw, scored by the Judge (the pixel
detector on ShapesSG) and by the Checker, with a PNG grid of every prompt's rounds."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError
from rig_jax.eval.scene_graph_iou import score_record
from rig_jax.rig.loop import LoopRecord, Models, RoundSettings, generate_reflect_edit


def round_settings(config: Any, batch_size: int, empty_edit: bool = False) -> RoundSettings:
    return RoundSettings(max_rounds=config.loop.max_rounds, final=config.loop.final, batch_size=batch_size,
                         empty_edit=empty_edit)


def score_records(records: Sequence[LoopRecord], judge: Any
                  ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Dataset means and per-record scores: the Checker's S of the first and final image, the
    rounds used, and with a judge SG-IoU / Entity-IoU / Relation-IoU (both node forms)."""
    rows: list[dict[str, float]] = []
    judged = judge.judge([r.final_image for r in records], [r.graph for r in records]) if judge else None
    for i, record in enumerate(records):
        row = {"score_first": record.rounds[0].check.score, "score_final": record.final_check.score,
               "rounds_used": float(record.rounds_used), "unet_generations": float(record.unet_generations),
               "vlm_calls": float(record.vlm_calls), "seconds": float(sum(r.seconds for r in record.rounds))}
        if judged is not None:
            row.update(score_record(judged[i].graph, record.graph))
            verdicts = judged[i].triplet_verdicts
            row["judge_triplets"] = float(np.mean(verdicts)) if verdicts else 0.0
        rows.append(row)
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    return means, rows


def rounds_grid(records: Sequence[LoopRecord], max_rounds: int, limit: int = 8) -> list[np.ndarray]:
    """Row-major images for a grid: one row per prompt, its rounds left to right (black
    where it stopped early)."""
    cells = []
    for record in records[:limit]:
        blank = np.zeros_like(record.rounds[0].image)
        row = [r.image for r in record.rounds]
        cells.extend(row + [blank] * (max_rounds + 1 - len(row)))
    return cells


def loop_evaluator(config: Any, workdir: str, env: Any, actor: Any, actor_params: Callable[[Any], Any],
                   editor_params: Callable[[Any], Any] | None
                   ) -> Callable[[Any, int], dict[str, float]] | None:
    """The train loop's `evaluate` hook: the loop with the state's Actor (stage 1) or Editor
    (stage 2) on `eval.num_prompts` held-out prompts, same prompts and seed at every call.
    `eval.num_prompts = 0`: no hook, so no held-out evaluation (nor its programs' compiles)."""
    n = config.eval.num_prompts
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"eval.num_prompts must be an integer >= 0 (0: no held-out evaluation), got {n!r}")
    if n == 0:
        return None
    graphs: list[SceneGraph] = env.prompts.held_out(n)
    settings = round_settings(config, config.eval.batch_size)

    def evaluate(state: Any, step: int) -> dict[str, float]:
        from rig_jax.eval.report import save_png_grid

        models = Models(diffuser_pipe=env.pipe, diffuser_params=env.diffuser_params,
                        editor_params=editor_params(state) if editor_params else env.editor_params,
                        sampler=env.sampler, edit=env.edit, checker=env.checker, actor=actor,
                        actor_params=actor_params(state))
        records = generate_reflect_edit(models, graphs, jax.random.PRNGKey(config.eval.seed), settings)
        means, _ = score_records(records, env.judge or default_judge(env))
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            save_png_grid(os.path.join(workdir, "samples", f"rounds_{step:06d}.png"),
                          rounds_grid(records, settings.max_rounds), ncols=settings.max_rounds + 1)
        return means

    return evaluate


def default_judge(env: Any) -> Any:
    """The pixel detector on ShapesSG prompts; None elsewhere (the VLM Judge is opt-in)."""
    from rig_jax.rl.environment import ShapesPrompts

    if isinstance(env.prompts, ShapesPrompts):
        from rig_jax.eval.shapes_judge import ShapesJudge

        return ShapesJudge(env.prompts.world)
    return None
