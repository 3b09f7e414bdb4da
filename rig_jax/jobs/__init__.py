"""What `rig-train` runs, by name: `config.job` picks a builder `(config, workdir, mesh, rules)
-> TrainJob`; the train loop (rig_jax/train) runs every job the same way."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rig_jax.errors import ConfigError

JobBuilder = Callable[[Any, str, Any, Any], Any]


def _registry() -> dict[str, JobBuilder]:
    from rig_jax.jobs import shapes_actor, shapes_diffuser

    return {"pretrain_vae": shapes_diffuser.build_vae_job,
            "pretrain_diffuser": shapes_diffuser.build_diffuser_job,
            "sft_actor": shapes_actor.build_actor_job}


def job_builder(name: str) -> JobBuilder:
    jobs = _registry()
    if name not in jobs:
        raise ConfigError(f"job: unknown job {name!r} (known: {', '.join(sorted(jobs))})")
    return jobs[name]
