"""Logical axis names and their mapping onto the mesh `(data, fsdp, tensor)`.

Every weight in rig_jax carries logical axis names (`nn.with_logical_partitioning`).
The names below are the whole vocabulary; `config.mesh.rules` maps each to mesh axes.
A dimension that a mapped mesh axis does not divide is replicated instead of failing,
so one rule set serves a tiny test model and a 7B model alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rig_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Order matters only for duplicate names (first wins).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),   # examples in a batch
    ("embed", "fsdp"),             # model width (hidden size) of transformers
    ("mlp", "tensor"),             # feed-forward hidden width
    ("heads", "tensor"),           # attention heads (q, and fused q/k/v outputs)
    ("kv_heads", "tensor"),        # key/value heads under grouped-query attention
    ("head_dim", None),            # per-head width
    ("vocab", "tensor"),           # vocabulary (embeddings, LM head)
    ("conv_in", "fsdp"),           # convolution input channels
    ("conv_out", "tensor"),        # convolution output channels
    ("norm", None),                # scales and biases of normalisations
    ("length", None),              # sequence positions (activations)
    ("kv_length", None),           # KV-cache positions (activations)
    ("height", None),              # image rows (activations)
    ("width", None),               # image columns (activations)
    ("channels", None),            # image channels (activations)
    ("layers", None),              # stacked layers
)

LogicalRules = Sequence[tuple[str, Any]]


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises `config.mesh.rules` (a sequence of `(name, axes)` pairs) and checks it."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"mesh.rules[{i}]: expected (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for axis in axes_tuple:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules[{i}] ({name}): unknown mesh axis {axis!r}; expected one of {MESH_AXES}")
        out.append((name, axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None)))
    return tuple(out)


def _mesh_axes_for(name: str | None, rules: LogicalRules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise ConfigError(f"mesh.rules: no rule for logical axis {name!r}")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: LogicalRules) -> PartitionSpec:
    """Maps logical axis names of one array to a PartitionSpec that fits `shape`.

    Mesh axes are dropped (from the right) where their product does not divide the
    dimension, and a mesh axis is used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = [a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1]
        while axes and dim % int(np.prod([mesh.shape[a] for a in axes])) != 0:
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def unbox_abstract(boxed: Any) -> Any:
    """`nn.meta.unbox` without sharding constraints: inside the mesh context (a set mesh and
    the logical rules) `unbox()` would apply one eagerly, which abstract leaves refuse."""
    def is_box(x: Any) -> bool:
        return isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for an (abstract) param tree whose leaves are Linen
    `LogicallyPartitioned` boxes; the result has the structure of the *unboxed* tree.
    Leaves without logical names are replicated."""
    logical_specs = nn.get_partition_spec(boxed_abstract)
    shapes = unbox_abstract(boxed_abstract)

    def to_sharding(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))

    return jax.tree.map(to_sharding, logical_specs, shapes, is_leaf=_is_spec)


def activation_sharding(mesh: Mesh, rules: LogicalRules, names: Sequence[str | None],
                        shape: Sequence[int]) -> NamedSharding:
    """A NamedSharding for one activation (e.g. a batch) from its logical names."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
