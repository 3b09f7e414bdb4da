"""The end-to-end comparison of the offline job: six systems on the same held-out prompts and
seeds, read by the same Judge (docs/method.md, "Evaluation systems"):

(a) `diffuser`: the Diffuser alone (I_0);
(b) `loop_base`: Generate-Reflect-Edit with the warm-started Actor and the base Editor;
(c) `loop_stage1`: as (b) with the stage-1 Actor;
(d) `loop_stage2`: as (c) with the stage-2 Editor;
(e) `empty_edit`: (d)'s rounds, Checker and Editor with the edit prompt left empty (what the
    Actor's words add);
(f) `best_of_n`: N Diffuser samples picked by the Checker, N = the mean generations (d) used,
    rounded up (the generation-matched baseline).
Every system starts from the same I_0 (the loop folds the same rng; best-of-N's first
sample is that I_0). Costs are counted per image: U-Net evaluations (DDIM steps x 2 under
guidance, inversion steps x 1 or 2) and VLM calls.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rig_jax.data import shapes
from rig_jax.data.scene_graph import SceneGraph
from rig_jax.diffusion.edit import edit_start_step
from rig_jax.diffusion.settings import EditSettings, SamplerSettings
from rig_jax.eval.scene_graph_iou import score_record
from rig_jax.rig.loop import LoopRecord, Models, Round, RoundSettings, generate_reflect_edit

SYSTEMS = ("diffuser", "loop_base", "loop_stage1", "loop_stage2", "empty_edit", "best_of_n")
LABELS = {"diffuser": "(a) Diffuser alone", "loop_base": "(b) loop, warm-started Actor, base Editor",
          "loop_stage1": "(c) loop after stage 1", "loop_stage2": "(d) loop after stage 2",
          "empty_edit": "(e) (d) with empty edit prompts", "best_of_n": "(f) best-of-N Diffuser (Checker)"}


@dataclasses.dataclass(frozen=True)
class SystemResult:
    name: str
    records: tuple[LoopRecord, ...]
    rows: tuple[dict[str, float], ...]      # per record: scores and costs
    metrics: dict[str, float]               # means over records
    seconds: float                          # wall time of the whole system


def unet_calls(sampler: SamplerSettings, edit: EditSettings, generations: int, edits: int) -> float:
    """U-Net evaluations: a guided DDIM step costs 2 (1 at guidance 1), an inversion step 1
    (2 under inversion guidance != 1), null-text's inner steps 2 each at most."""
    def per_step(scale: float) -> int:
        return 1 if scale == 1.0 else 2
    gen = sampler.num_steps * per_step(sampler.guidance_scale)
    run = edit.sampler.num_steps - edit_start_step(edit.sampler.num_steps, edit.strength)
    inversion = run * per_step(edit.inversion.guidance_scale)
    if edit.null_text.enabled:
        inversion += run * edit.null_text.inner_steps * 2
    return float(generations * gen + edits * (inversion + run * per_step(edit.sampler.guidance_scale)))


def colours_found(image: np.ndarray, graph: SceneGraph, world: shapes.ShapesConfig) -> float:
    found = {o.colour for o in shapes.detect_objects(image, world)}
    prompted = {a for item in graph.items for a in item.attributes}
    return float(prompted <= found)


def score_system(name: str, records: Sequence[LoopRecord], judge: Any,
                 world: shapes.ShapesConfig | None, sampler: SamplerSettings, edit: EditSettings,
                 seconds: float, generations: Sequence[int] | None = None) -> SystemResult:
    """The Judge's SG-IoU / Entity-IoU / Relation-IoU (both node forms) of each final image, the
    all-colours rate (ShapesSG), rounds, seconds and costs; `generations` overrides the U-Net
    generation count per record (best-of-N draws N images, edits none)."""
    judged = judge.judge([r.final_image for r in records], [r.graph for r in records])
    rows = []
    for i, (record, result) in enumerate(zip(records, judged, strict=True)):
        gens = record.unet_generations if generations is None else generations[i]
        edits = 0 if generations is not None else record.rounds_used
        row = {**score_record(result.graph, record.graph),
               "checker_score": record.final_check.score, "rounds_used": float(edits),
               "generations": float(gens), "unet_calls": unet_calls(sampler, edit, gens - edits, edits),
               "vlm_calls": float(record.vlm_calls), "seconds": seconds / len(records)}
        if world is not None:
            row["all_colours"] = colours_found(record.final_image, record.graph, world)
        rows.append(row)
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return SystemResult(name, tuple(records), tuple(rows), metrics, seconds)


def best_of_n(models: Models, graphs: Sequence[SceneGraph], rng: jax.Array, n: int, batch_size: int
              ) -> list[LoopRecord]:
    """N Diffuser samples per prompt (sample 0 is the loop's I_0: same rng fold), the one the
    Checker scores highest kept (earliest on ties); each record holds the N samples as rounds."""
    draws = []
    for j in range(n):
        key = rng if j == 0 else jax.random.fold_in(rng, 1_000_003 + j)
        settings = RoundSettings(max_rounds=0, batch_size=batch_size)
        draws.append(generate_reflect_edit(models, graphs, key, settings))
    records = []
    for i, graph in enumerate(graphs):
        rounds = tuple(Round(d[i].rounds[0].image, d[i].rounds[0].check, None, d[i].rounds[0].seconds)
                       for d in draws)
        best = int(np.argmax([r.check.score for r in rounds]))
        records.append(LoopRecord(graph=graph, rounds=rounds, final_index=best, unet_generations=n,
                                  vlm_calls=sum(d[i].vlm_calls for d in draws)))
    return records


@dataclasses.dataclass(frozen=True)
class SystemModels:
    """The weights each system uses: the warm-started and stage-1 Actor params, the base and
    stage-2 Editor params (all on one SD pipeline and one VLM Actor module), and the edit
    settings each Editor was trained under (stage 2's eta > 0 policy is run as trained)."""
    base: Models                 # (b): warm-started Actor, base Editor
    actor_stage1: Any
    editor_stage2: Any
    edit_stage2: EditSettings


def evaluate_systems(models: SystemModels, graphs: Sequence[SceneGraph], rng: jax.Array,
                     rounds: RoundSettings, judge: Any, world: shapes.ShapesConfig | None,
                     progress: Any = None) -> list[SystemResult]:
    """All six systems, in SYSTEMS order; `progress(name)` is called as each starts."""
    base = models.base
    stage1 = dataclasses.replace(base, actor_params=models.actor_stage1)
    stage2 = dataclasses.replace(stage1, editor_params=models.editor_stage2, edit=models.edit_stage2)
    loops = {"diffuser": (base, dataclasses.replace(rounds, max_rounds=0)), "loop_base": (base, rounds),
             "loop_stage1": (stage1, rounds), "loop_stage2": (stage2, rounds),
             "empty_edit": (stage2, dataclasses.replace(rounds, empty_edit=True))}
    results = []
    for name in SYSTEMS[:-1]:
        if progress:
            progress(name)
        system_models, settings = loops[name]
        start = time.perf_counter()
        records = generate_reflect_edit(system_models, graphs, rng, settings)
        results.append(score_system(name, records, judge, world, base.sampler, base.edit,
                                    time.perf_counter() - start))
    if progress:
        progress("best_of_n")
    n = max(1, math.ceil(results[SYSTEMS.index("loop_stage2")].metrics["generations"] - 1e-9))
    start = time.perf_counter()
    records = best_of_n(base, graphs, rng, n, rounds.batch_size)
    results.append(score_system("best_of_n", records, judge, world, base.sampler, base.edit,
                                time.perf_counter() - start, generations=[n] * len(records)))
    return results
