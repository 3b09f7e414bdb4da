"""Where loaded params go: host arrays (no mesh) or the mesh, leaf by leaf, with the shardings
the logical axis rules give.

A loader reads the abstract boxed param tree of its module (`jax.eval_shape(model.init)`: shapes,
dtypes and the logical axis names of `nn.with_logical_partitioning`), turns it into one
NamedSharding per leaf with `rig_jax.parallel.rules.param_shardings`, and places each converted
tensor as soon as it exists. A device receives only its own shards
(`jax.make_array_from_callback`), so no device ever holds a whole replicated tree, on one host
or many.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rig_jax.parallel.rules import DEFAULT_RULES, LogicalRules, param_shardings
from rig_jax.weights.mapping import FlaxPath, flatten

Placer = Callable[[FlaxPath, np.ndarray], Any]


def boxed_params(init_fn: Callable[..., Any], *args: Any) -> Any:
    """The abstract boxed `params` collection of `init_fn(*args)` (e.g. `module.init`):
    ShapeDtypeStructs inside LogicallyPartitioned boxes, nothing computed."""
    return jax.eval_shape(init_fn, *args)["params"]


def resolve_rules(rules: LogicalRules | None) -> LogicalRules:
    """The rules to place with: those given, else the `nn.logical_axis_rules` context the run
    entered, else rig_jax's defaults."""
    if rules is not None:
        return tuple(rules)
    return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def leaf_shardings(boxed: Any, mesh: Mesh, rules: LogicalRules | None) -> dict[FlaxPath, NamedSharding]:
    """Flax path -> NamedSharding for every leaf of the boxed abstract tree."""
    return flatten(param_shardings(boxed, mesh, resolve_rules(rules)))


def place_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One host array as a global array with `sharding`: each addressable device gets its shard."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def placer(boxed: Any, mesh: Mesh | None, rules: LogicalRules | None) -> Placer | None:
    """The function that places one converted leaf by its path; None without a mesh (the leaves
    stay host numpy arrays, as a single-device run wants)."""
    if mesh is None:
        return None
    shardings = leaf_shardings(boxed, mesh, rules)
    return lambda path, value: place_array(value, shardings[path])


def place_tree(params: Any, boxed: Any, mesh: Mesh | None, rules: LogicalRules | None) -> Any:
    """A whole host tree placed leaf by leaf (for trees restored or built on the host)."""
    if mesh is None:
        return params
    shardings = param_shardings(boxed, mesh, resolve_rules(rules))
    return jax.tree.map(place_array, params, shardings)
