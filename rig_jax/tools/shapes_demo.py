"""The README's main job: RL-RIG on ShapesSG, end to end (configs/shapes.py).

Reflection-GRPO stage 1 (the Actor) and stage 2 (the Editor) from the committed pretrained
ShapesSG Diffuser and Actor, each in `<workdir>/<stage>` (a finished stage is skipped, a
stopped one resumes from its checkpoint), then the six systems of docs/method.md on
held-out prompts, the same prompts and noise for each, scored by the config's judge
(`judge.kind`: the pixel detector by default, or a VLM judge with `judge.path`):
`metrics.json` (its `info.judge` names the judge), `per_record.csv`, `report.html` and `plots/`
under the workdir. Every output path is checked before training starts. A rerun whose config and
stage exports are those of the workdir's metrics.json (`info.fingerprint`) skips the systems too.

    python -m rig_jax.tools.shapes_demo --config=configs/shapes.py:demo [--config.seed=1]
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any

from rig_jax.config import SugarParser, run_tool


def run(config: Any) -> dict[str, Any]:
    import logging

    import jax

    from rig_jax.jobs import STAGED
    from rig_jax.parallel import mesh_context, process_zero_decides
    from rig_jax.tools.train import run_stages

    check_before_work(config)
    logging.getLogger("absl").setLevel(logging.ERROR)
    start = time.perf_counter()
    run_stages(config, STAGED["reflection_grpo"])
    trained = time.perf_counter() - start
    fingerprint = evaluation_fingerprint(config)
    earlier = finished_evaluation(config.workdir, fingerprint)
    if process_zero_decides(earlier is not None):   # the evaluation is one SPMD program
        print(f"systems: evaluated earlier by this config on these stage exports "
              f"({config.workdir}/metrics.json), skipped")
        return earlier or {}
    with mesh_context(config) as (mesh, rules):
        results = evaluate(config, mesh, rules)
    from rig_jax.eval.demo_report import write_demo_outputs

    info = {"seed": config.seed, "systems_seed": config.systems.seed, "prompts": config.systems.num_prompts,
            "prompts_seed": config.prompts.eval_seed, "max_rounds": config.loop.max_rounds,
            "judge": config.judge.kind if config.judge.kind != "vlm" else f"vlm ({config.judge.path})",
            "train_seconds": round(trained, 1), "wall_seconds": round(time.perf_counter() - start, 1),
            "machine": machine(), "fingerprint": fingerprint}
    logs = {name: os.path.join(config.workdir, name, "metrics.jsonl") for name in STAGED["reflection_grpo"]}
    if jax.process_index() != 0:          # every host ran the same evaluation; process 0 writes it
        return {}
    metrics = write_demo_outputs(config.workdir, results, logs, info, config.systems.report_prompts)
    scores = ", ".join(f"{r.name} {r.metrics['sg_iou_attr']:.3f}" for r in results)
    print(f"SG-IoU (attr) per system: {scores}; wrote {config.workdir}/report.html")
    return metrics


DEMO_JOB = "reflection_grpo"
OUTPUT_FILES = ("metrics.json", "per_record.csv", "report.html")
WORKDIR_FLAG = "--config.workdir"


def check_before_work(config: Any) -> None:
    """What would otherwise fail only after training: the job, the judge of the systems, and
    every output path (the workdir, its stage folders, the report's files and `plots/`)."""
    from rig_jax.errors import ConfigError
    from rig_jax.outputs import check_output_file, check_output_folder
    from rig_jax.rl.environment import check_judge
    from rig_jax.tools.train import check_stage_folders

    if not config.workdir:
        raise ConfigError(f"{WORKDIR_FLAG}: required (the stages, the evaluation and the report go there)")
    if config.job != DEMO_JOB:
        raise ConfigError(f"job: the demo runs {DEMO_JOB} (both stages, then the systems), "
                          f"got {config.job!r}")
    check_judge(config)
    check_output_folder(config.workdir, WORKDIR_FLAG, allow_existing=True)
    for name in OUTPUT_FILES:
        check_output_file(os.path.join(config.workdir, name), WORKDIR_FLAG)
    check_output_folder(os.path.join(config.workdir, "plots"), WORKDIR_FLAG, allow_existing=True)
    check_stage_folders(config, WORKDIR_FLAG)


def evaluation_fingerprint(config: Any) -> str:
    """What the systems' results depend on: the whole config but its workdir, and the size and
    modification time of every file the two stages exported (a stage trained again changes them)."""
    import hashlib

    from rig_jax.tools.train import STAGE_EXPORTS

    digest = hashlib.sha256(config.to_json_best_effort(sort_keys=True).replace(config.workdir, "<workdir>")
                            .encode())
    for name, export in sorted(STAGE_EXPORTS.items()):
        folder = os.path.join(config.workdir, name, os.path.dirname(export))
        for root, _, files in sorted(os.walk(folder)):
            for file in sorted(files):
                info = os.stat(os.path.join(root, file))
                digest.update(f"{os.path.relpath(os.path.join(root, file), config.workdir)} {info.st_size} "
                              f"{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def finished_evaluation(workdir: str, fingerprint: str) -> dict[str, Any] | None:
    """metrics.json of an earlier evaluation with this fingerprint, or None. metrics.json is the
    last output written, so when it is there the report and the CSV are too."""
    import json

    path = os.path.join(workdir, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    done = all(os.path.isfile(os.path.join(workdir, name)) for name in OUTPUT_FILES)
    info = metrics.get("info") if isinstance(metrics, dict) else None
    return metrics if done and isinstance(info, dict) and info.get("fingerprint") == fingerprint else None


def machine() -> str:
    import jax

    return (f"{platform.machine()} {os.cpu_count()} CPU cores, {jax.device_count()} "
            f"{jax.default_backend()} device(s)")


def evaluate(config: Any, mesh: Any, rules: Any) -> list[Any]:
    """The six systems with the trained weights of `<workdir>/grpo_actor` and `grpo_editor`."""
    import jax
    from tqdm import tqdm

    from rig_jax.diffusion.settings import EditSettings
    from rig_jax.rig.actor import ActorSettings, VLMActor
    from rig_jax.rig.loop import Models
    from rig_jax.rl.environment import actor_temperature, build_environment, compute_dtype, load_diffuser
    from rig_jax.rl.evaluation import round_settings
    from rig_jax.rl.stage_actor import load_actor
    from rig_jax.rl.systems import SYSTEMS, SystemModels, evaluate_systems
    from rig_jax.tools.train import stage_config

    stage1 = stage_config(config, "grpo_actor", {})
    stage2 = stage_config(config, "grpo_editor", {"grpo_actor": stage1.workdir})
    env = build_environment(stage1, mesh, rules, need_judge=True)     # the systems' judge: config.judge
    pipe, _, warm_actor = load_actor(stage1, mesh, rules)
    _, _, trained_actor = load_actor(stage2, mesh, rules)        # stage 2 reads stage 1's export
    _, trained_editor = load_diffuser(os.path.join(stage2.workdir, "editor"), "grpo_editor export",
                                      compute_dtype(stage2.diffuser.dtype), mesh, rules)
    actor = VLMActor(pipe, ActorSettings(temperature=actor_temperature(stage1),
                                         max_new_tokens=config.actor.max_new_tokens,
                                         max_words=config.actor.max_words))
    base = Models(diffuser_pipe=env.pipe, diffuser_params=env.diffuser_params,
                  editor_params=env.editor_params, sampler=env.sampler, edit=env.edit, checker=env.checker,
                  actor=actor, actor_params=warm_actor)
    models = SystemModels(base=base, actor_stage1=trained_actor, editor_stage2=trained_editor,
                          edit_stage2=EditSettings.from_config(stage2.editor, "editor"))
    graphs = env.prompts.held_out(config.systems.num_prompts)
    bar = tqdm(total=len(SYSTEMS), desc="systems", unit="system")

    def progress(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(0 if name == SYSTEMS[0] else 1)

    try:
        return evaluate_systems(models, graphs, jax.random.PRNGKey(config.systems.seed),
                                round_settings(config, config.systems.batch_size),
                                env.judge, getattr(env.prompts, "world", None), progress)
    finally:
        bar.update(1)
        bar.close()


def build_parser() -> SugarParser:
    return SugarParser("shapes_demo", __doc__.splitlines()[0], "configs/shapes.py:demo")


def main(argv: list[str] | None = None) -> None:
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
