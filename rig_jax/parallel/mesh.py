"""The one device mesh `(data, fsdp, tensor)`, built from config, multi-host start-up, and the
context every run enters once at the top (`mesh_context`).

A one-device run and a pod run go through the same code: only `config.mesh` changes.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from rig_jax.errors import ConfigError
from rig_jax.parallel.rules import MESH_AXES, LogicalRules, rules_from_config


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one `-1` entry so the product equals `num_devices`; checks the result. Entries
    must be integers: `2.5` or `"2"` is refused, not truncated."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise ConfigError(f"mesh.shape: expected {len(MESH_AXES)} integers {MESH_AXES}, got {shape!r}")
    bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    if bad:
        raise ConfigError(f"mesh.shape: entries must be integers (-1 fills the rest), got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"mesh.shape: expected {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape: entries must be positive or -1, got {shape}")
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh.shape: at most one -1 entry, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known != 0:
        raise ConfigError(
            f"mesh.shape: {shape} (product {known}) does not divide the {num_devices} devices")
    if -1 in shape:
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh.shape: {shape} uses {math.prod(shape)} of the {num_devices} devices; "
            "the product must equal the device count (use -1 to fill)")
    return shape


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh from `config.mesh` (`shape`: three ints, one may be -1)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config.shape, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape elsewhere
        from jax.experimental import mesh_utils
        if jax.process_count() > 1:
            device_array = mesh_utils.create_hybrid_device_mesh(
                _per_host_shape(shape), _across_hosts_shape(shape), devices=devices)
        else:
            device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def _across_hosts_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Puts the host split on the outermost axes (data first): the slow network carries
    only data-parallel gradient reductions where possible."""
    hosts = jax.process_count()
    out = []
    for s in shape:
        g = math.gcd(s, hosts)
        out.append(g)
        hosts //= g
    return tuple(out)


def _per_host_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // h for s, h in zip(shape, _across_hosts_shape(shape), strict=True))


def maybe_initialize_distributed(dist_config: Any) -> None:
    """Calls `jax.distributed.initialize` when `config.distributed.enabled` is set.

    On a TPU pod every field may stay empty (auto-detected); elsewhere give the
    coordinator address, the process count and this process's id.
    """
    if not dist_config.get("enabled", False):
        return
    # CPU processes (tests, a pod's host-side work) need a collectives backend of their own;
    # the setting does not touch GPU or TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if dist_config.get("coordinator_address"):
        kwargs["coordinator_address"] = dist_config.coordinator_address
    if dist_config.get("num_processes", -1) > 0:
        kwargs["num_processes"] = dist_config.num_processes
    if dist_config.get("process_id", -1) >= 0:
        kwargs["process_id"] = dist_config.process_id
    if dist_config.get("local_device_ids"):
        kwargs["local_device_ids"] = list(dist_config.local_device_ids)
    count, index = kwargs.get("num_processes"), kwargs.get("process_id")
    if count is not None and index is not None and index >= count:
        raise ConfigError(f"distributed.process_id: {index} is not below distributed.num_processes ({count})")
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:   # no coordinator given and no cluster (TPU pod, SLURM, MPI) detected
        reason = " ".join(str(e).split())
        raise ConfigError(f"distributed.enabled: jax.distributed.initialize failed ({reason}); off a TPU pod "
                          "or a SLURM/MPI job set distributed.coordinator_address, num_processes and "
                          "process_id") from None


def process_zero_decides(flag: bool) -> bool:
    """Process 0's `flag` on every host (itself on one process). For host-side decisions that
    choose which SPMD programs run next (skip a finished stage, an evaluation done earlier):
    hosts that read files of their own could disagree, and one host would then start a
    program the others never join."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


@contextlib.contextmanager
def mesh_context(config: Any) -> Iterator[tuple[Mesh, LogicalRules]]:
    """Builds the mesh and the logical axis rules from `config.mesh` and enters both (the jax
    mesh and `nn.logical_axis_rules`), yielding `(mesh, rules)` for the loaders and jitted
    steps: the models' `with_logical_constraint` calls act inside it. Every tool and every
    `rig/` run enters it once, at the top."""
    mesh_config = config.mesh if hasattr(config, "mesh") else config
    mesh = make_mesh(mesh_config)
    rules = rules_from_config(mesh_config.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh, rules
