"""The one train loop: every job that learns (pretraining, SFT, the GRPO stages) runs here.

A job is a `TrainJob`: how to build its params (born sharded by the logical axis rules), its
loss, optimizer and step settings, its data (a grain dataset of host-local numpy batches, so
the iterator position is checkpointed with the state), what it keeps frozen, and optional
host-side hooks to evaluate and to export. The loop owns the rest: placing the state on the
mesh, resuming from `<workdir>/checkpoints`, the jitted step with donated state, metrics,
the non-finite guard, checkpoints and the final export.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rig_jax.errors import ConfigError, RigError
from rig_jax.parallel.rules import LogicalRules
from rig_jax.parallel.sharding import abstract_params, init_sharded, shard_batch
from rig_jax.train.checkpoint import TrainCheckpointer, leaf_shapes
from rig_jax.train.metrics import MetricsWriter
from rig_jax.train.optimizer import OptimizerSettings, learning_rate_schedule, make_optimizer
from rig_jax.train.state import TrainState, create_state
from rig_jax.train.step import LossFn, StepSettings, make_train_step


class TrainingError(RigError):
    """A run that cannot go on (too many non-finite steps in a row)."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0               # 0: evaluate only at the end (when the job has a hook)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 20           # non-finite steps in a row that end the run
    progress: bool = True
    async_checkpoints: bool = True

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("train: total_steps, log_every and checkpoint_every must be >= 1")


@dataclasses.dataclass(frozen=True, eq=False)
class TrainJob:
    name: str
    init_params: Callable[[jax.Array], Any]      # rng -> boxed params (logical axis metadata)
    loss_fn: LossFn
    optimizer: OptimizerSettings
    step: StepSettings
    dataset: Callable[[], Any]                   # () -> grain IterDataset of host-local batches
    frozen: Any = None                           # placed arrays the loss reads but never trains
    batch_axes: tuple[str | None, ...] = ("batch",)
    warm_start: Callable[[], Any] | None = None  # () -> host params replacing the random init
    evaluate: Callable[[TrainState, int], Mapping[str, float]] | None = None
    export: Callable[[TrainState], None] | None = None
    # RL jobs: (state, the dataset's batch, step) -> (minibatches, host metrics). The state's
    # params at the call are pi_old; each minibatch is one update, and the next rollout waits
    # until all are used (checkpoints fall between rollouts, so a resume replays none of them).
    rollout: Callable[[TrainState, Any, int], tuple[list[Any], Mapping[str, float]]] | None = None
    host_state: dict[str, Any] | None = None     # the job's host-side statistics, checkpointed
    # every batch entry holds the batch's rows on axis 0, so `step.micro_batches` may split them
    rows_first: bool = False


def check_workdir(workdir: str, field: str = "--workdir") -> None:
    """Before any work: a workdir that is a file, lies under one, or cannot be created or
    written is a ConfigError naming `field`. An existing folder is fine (it is resumed)."""
    from rig_jax.outputs import check_output_folder

    check_output_folder(workdir, field, allow_existing=True)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{field}={workdir}: cannot write there ({reason})") from None


def state_shardings(params_shardings: Any, optimizer: optax.GradientTransformation, abstract: TrainState,
                    mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments and EMA follow their params; counters
    and the RNG are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, params_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt, rng=replicated,
                      ema_params=params_shardings if abstract.ema_params is not None else None,
                      bad_steps=replicated, skipped=replicated)


def init_state(job: TrainJob, seed: int, mesh: Mesh, rules: LogicalRules
               ) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """(state, its shardings, optimizer): params born sharded, the rest placed to match."""
    optimizer = make_optimizer(job.optimizer)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    if job.warm_start is None:
        params, params_shardings = init_sharded(job.init_params, mesh, rules, init_rng)
    else:
        shapes, params_shardings = abstract_params(job.init_params, mesh, rules, init_rng)
        params = _warm_params(job, shapes, params_shardings)
    use_ema = job.step.ema_decay > 0

    def build(p: Any) -> TrainState:
        return create_state(p, optimizer, state_rng, use_ema)

    shardings = state_shardings(params_shardings, optimizer, jax.eval_shape(build, params), mesh)
    state = jax.jit(build, out_shardings=shardings)(params)
    return state, shardings, optimizer


def _warm_params(job: TrainJob, fresh: Any, shardings: Any) -> Any:
    """The warm-start params placed with `shardings`, in the dtypes of `fresh` (the random
    init's shapes); a tree of another shape is refused."""
    warm = job.warm_start()
    have, want = leaf_shapes(warm), leaf_shapes(fresh)
    if have != want:
        diff = sorted(set(have) ^ set(want)) or [k for k in want if have[k] != want[k]]
        raise ConfigError(f"{job.name}: warm-start params do not fit this model (first misfit: {diff[0]})")
    return jax.tree.map(lambda x, f, s: jax.device_put(np.asarray(x, f.dtype), s), warm, fresh, shardings)


def _to_numpy(batch: Any) -> Any:
    return jax.tree.map(np.asarray, batch)


def run_training(job: TrainJob, settings: LoopSettings, workdir: str, mesh: Mesh, rules: LogicalRules,
                 seed: int) -> tuple[TrainState, dict[str, Any]]:
    """Trains `job` to `settings.total_steps`, resuming from `workdir` when it holds a checkpoint.
    Returns the final state and the last logged metrics."""
    if job.step.micro_batches > 1 and not job.rows_first:
        raise ConfigError(f"step.micro_batches: {job.name}'s batches do not all hold their rows on axis 0 "
                          f"(token positions, image patches), so they are not split; leave it at 1")
    check_workdir(workdir)
    state, shardings, optimizer = init_state(job, seed, mesh, rules)
    checkpointer = TrainCheckpointer(workdir, settings.keep_checkpoints, settings.async_checkpoints)
    dataset = job.dataset()
    data_iter = iter(dataset)
    host = {"wall_seconds": 0.0, "cpu_seconds": 0.0, "last_good_checkpoint": None}
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state, host = checkpointer.restore(start, state)
        data_iter.set_state(data_state)
        if job.host_state is not None:
            job.host_state.update(host.get("job", {}))
    start = int(start or 0)
    writer = MetricsWriter(workdir, settings.total_steps, start, settings.progress)
    schedule = learning_rate_schedule(job.optimizer)
    accumulate = job.optimizer.accumulate_steps

    def lr_at(updates: jax.Array) -> jax.Array:
        return schedule(updates // accumulate)

    step_fn = make_train_step(job.loss_fn, optimizer, job.step, lr_at)
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled = None
    last: dict[str, Any] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()

    pending: list[Any] = []              # minibatches of the current rollout still to train on
    rollout_metrics: dict[str, Any] = {}
    save_due = False

    def host_stats() -> dict[str, Any]:
        stats = {**host, "wall_seconds": host["wall_seconds"] + time.perf_counter() - wall0,
                 "cpu_seconds": host["cpu_seconds"] + time.process_time() - cpu0}
        if job.host_state is not None:
            stats["job"] = dict(job.host_state)
        return stats

    def next_batch(step: int) -> Any:
        nonlocal pending, rollout_metrics
        raw = next(data_iter) if job.rollout is None or not pending else None
        if job.rollout is not None and not pending:
            batches, metrics = job.rollout(state, raw, step)
            pending, rollout_metrics = list(batches), dict(metrics)
            if not pending:
                raise TrainingError(f"{job.name}: the rollout at step {step} gave no minibatch")
        batch = pending.pop(0) if job.rollout is not None else raw
        return shard_batch(_to_numpy(batch), mesh, rules, job.batch_axes)

    def save(step: int) -> None:
        nonlocal save_due
        if pending:                      # mid-rollout: wait for its last minibatch
            save_due = True
            return
        save_due = False
        if checkpointer.latest_step() == step:
            return
        host["last_good_checkpoint"] = checkpointer.path(step)
        checkpointer.save(step, state, data_iter.get_state(), host_stats())

    def evaluate(step: int) -> dict[str, Any]:
        return writer.write(step, {f"eval/{k}": v for k, v in job.evaluate(state, step).items()})

    try:
        for step in range(start + 1, settings.total_steps + 1):
            batch = next_batch(step)
            if compiled is None:
                batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
                frozen_shardings = jax.tree.map(lambda x: x.sharding, job.frozen)
                compiled = jax.jit(step_fn, in_shardings=(shardings, frozen_shardings, batch_shardings),
                                   out_shardings=(shardings, replicated), donate_argnums=(0,))
            state, metrics = compiled(state, job.frozen, batch)
            if step % settings.log_every == 0 or step == settings.total_steps:
                metrics = jax.device_get(metrics)
                if int(metrics["bad_steps"]) >= settings.max_bad_steps:
                    raise TrainingError(
                        f"{job.name}: {int(metrics['bad_steps'])} non-finite steps in a row at step {step} "
                        f"(train.max_bad_steps={settings.max_bad_steps}); last good checkpoint: "
                        f"{host['last_good_checkpoint'] or 'none (no checkpoint yet)'}")
                last = writer.write(step, {**metrics, **rollout_metrics,
                                           "wall_seconds": host_stats()["wall_seconds"]})
                writer.progress(step, float(metrics["loss"]))
            if job.evaluate is not None and settings.eval_every and step % settings.eval_every == 0:
                last.update(evaluate(step))
            due = save_due or step % settings.checkpoint_every == 0
            if due and int(jax.device_get(state.bad_steps)) == 0:
                save(step)
        final = settings.total_steps
        if int(jax.device_get(state.step)) >= final:
            pending.clear()      # the RL jobs refuse a total not a whole number of rollouts
            save(final)
            checkpointer.wait()
        if job.evaluate is not None and (not settings.eval_every or final % settings.eval_every):
            last.update(evaluate(final))
        if job.export is not None:
            job.export(state)
    finally:
        checkpointer.close()
        writer.close()
    return state, last
