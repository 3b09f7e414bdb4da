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
    from rig_jax.jobs import job_builder
    from rig_jax.parallel import mesh_context
    from rig_jax.train.loop import LoopSettings, check_workdir, run_training

    if not config.workdir:
        raise ConfigError("--workdir: required (where checkpoints, metrics and exports go)")
    check_workdir(config.workdir)
    # orbax reports routine waits through absl at WARNING; the progress bar and metrics say enough
    logging.getLogger("absl").setLevel(logging.ERROR)
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
