"""rig-train: every job that learns, chosen by the config (`config.job`), on the mesh.

    rig-train --config=configs/shapes_train.py:diffuser --workdir runs/diffuser [--config.a.b=v]

A workdir that already holds a checkpoint resumes it (state, data position, host statistics).
"""
from __future__ import annotations

from typing import Any

from rig_jax.config import SugarParser, run_tool


def run(config: Any) -> dict[str, Any]:
    import logging

    from rig_jax.errors import ConfigError
    from rig_jax.jobs import STAGED

    if not config.workdir:
        raise ConfigError("--workdir: required (where checkpoints, metrics and exports go)")
    check_stage_folders(config, "--workdir")
    # orbax reports routine waits through absl at WARNING; the progress bar and metrics say enough
    logging.getLogger("absl").setLevel(logging.ERROR)
    if config.job in STAGED:
        return run_stages(config, STAGED[config.job])
    return run_job(config)


def check_stage_folders(config: Any, field: str) -> None:
    """Before any work: the workdir and, for a staged job, each `<workdir>/<stage>` can be a
    folder this process writes (an existing one is resumed); else one line naming `field`."""
    import os

    from rig_jax.jobs import STAGED
    from rig_jax.outputs import check_output_folder
    from rig_jax.train.loop import check_workdir

    check_output_folder(config.workdir, field, allow_existing=True)
    for name in STAGED.get(config.job, ()):
        check_output_folder(os.path.join(config.workdir, name), field, allow_existing=True)
    check_workdir(config.workdir, field)


STAGE_EXPORTS = {"grpo_actor": "actor/config.json", "grpo_editor": "editor/model_index.json"}


def stage_config(config: Any, name: str, earlier: dict[str, str]) -> Any:
    """The shared config with `config.stages.<name>` merged over it, the job and workdir set,
    and stage 2 pointed at stage 1's Actor."""
    import os

    from rig_jax.errors import ConfigError

    stage = config.copy_and_resolve_references()
    overrides = config.stages.get(name)
    if overrides is None:
        raise ConfigError(f"stages.{name}: missing (the per-stage fields of job {config.job})")
    _merge(stage, overrides.to_dict(), f"stages.{name}")
    with stage.unlocked():
        del stage["stages"]
        stage.job = name
        stage.workdir = os.path.join(config.workdir, name)
        if name == "grpo_editor" and "grpo_actor" in earlier:
            stage.actor.path = os.path.join(earlier["grpo_actor"], "actor")
    return stage


def _merge(config: Any, fields: dict[str, Any], where: str) -> None:
    from rig_jax.errors import ConfigError

    for key, value in fields.items():
        if key not in config:
            raise ConfigError(f"{where}.{key}: not a field of the config")
        if isinstance(value, dict):
            _merge(config[key], value, f"{where}.{key}")
        else:
            config[key] = value


def run_stages(config: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each stage in order in `<workdir>/<stage>`; a stage whose export is already there is
    skipped (a second run resumes where the first stopped). On several processes process 0's
    filesystem decides, so every host runs the same stages."""
    import os

    from rig_jax.parallel import process_zero_decides

    done: dict[str, str] = {}
    last: dict[str, Any] = {}
    for name in names:
        stage = stage_config(config, name, done)
        if process_zero_decides(os.path.isfile(os.path.join(stage.workdir, STAGE_EXPORTS[name]))):
            print(f"{name}: finished earlier ({stage.workdir}), skipped")
        else:
            last = {f"{name}/{k}": v for k, v in run_job(stage).items()}
        done[name] = stage.workdir
    return last


def run_job(config: Any) -> dict[str, Any]:
    from rig_jax.jobs import job_builder
    from rig_jax.parallel import mesh_context
    from rig_jax.train.loop import LoopSettings, run_training

    builder = job_builder(config.job)
    t = config.train
    loop = LoopSettings(total_steps=t.total_steps, log_every=t.log_every, eval_every=t.eval_every,
                        checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                        max_bad_steps=t.max_bad_steps, progress=t.progress)
    with mesh_context(config) as (mesh, rules):
        job = builder(config, config.workdir, mesh, rules)
        _, last = run_training(job, loop, config.workdir, mesh, rules, config.seed)
    return last


def build_parser() -> SugarParser:
    parser = SugarParser("rig-train", __doc__.splitlines()[0], "configs/shapes_train.py:diffuser")
    parser.add_argument("--workdir", dest="workdir", help="run folder (resumed when it holds a checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> None:
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
