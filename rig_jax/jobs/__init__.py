"""What `rig-train` runs, by name: `config.job` picks a builder `(config, workdir, mesh, rules)
-> TrainJob`; the train loop (rig_jax/train) runs every job the same way."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rig_jax.errors import ConfigError

JobBuilder = Callable[[Any, str, Any, Any], Any]


# name -> "module:builder", imported only when chosen (a job's imports stay its own)
JOBS = {"pretrain_vae": "rig_jax.jobs.shapes_diffuser:build_vae_job",
        "pretrain_diffuser": "rig_jax.jobs.shapes_diffuser:build_diffuser_job",
        "sft_actor": "rig_jax.jobs.shapes_actor:build_actor_job",
        "grpo_actor": "rig_jax.rl.stage_actor:build_grpo_actor_job",
        "grpo_editor": "rig_jax.rl.stage_editor:build_grpo_editor_job"}


# Jobs that run others in order, each in `<workdir>/<stage>` with `config.stages.<stage>`
# merged over the shared config; `after` rewires a later stage to an earlier one's export.
STAGED = {"reflection_grpo": ("grpo_actor", "grpo_editor")}


def job_builder(name: str) -> JobBuilder:
    import importlib

    if name not in JOBS:
        known = sorted([*JOBS, *STAGED])
        raise ConfigError(f"job: unknown job {name!r} (known: {', '.join(known)})")
    module, builder = JOBS[name].split(":")
    return getattr(importlib.import_module(module), builder)
