"""Sharded initialisation, batch placement and jitted steps on the mesh."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rig_jax.parallel.rules import LogicalRules, activation_sharding, param_shardings


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                 *args: Any) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` (e.g. `model.init`) under jit so that every param is created
    already sharded on `mesh`: no host ever holds the full tree.

    Returns `(params, shardings)`, both plain (unboxed) pytrees.
    """
    boxed = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(boxed, mesh, rules)

    def unboxed_init(*a: Any) -> Any:
        return nn.meta.unbox(init_fn(*a))

    params = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return params, shardings


def abstract_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                       *args: Any) -> Any:
    """Shardings of the unboxed param tree of `init_fn(*args)`, without computing it
    (used to place weights loaded from a checkpoint)."""
    return abstract_params(init_fn, mesh, rules, *args)[1]


def abstract_params(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                    *args: Any) -> tuple[Any, Any]:
    """`(shapes, shardings)` of the unboxed param tree of `init_fn(*args)` (ShapeDtypeStruct
    leaves), traced, never run: what a warm-started job needs in place of a random init that it
    would throw away (for a large U-Net, a compile and a full copy of the weights)."""
    boxed = jax.eval_shape(init_fn, *args)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    shapes = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)   # no constraint
    return shapes, param_shardings(boxed, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh, rules: LogicalRules,
                leading: Sequence[str | None] = ("batch",)) -> Any:
    """Places a host-local batch (numpy leaves; leading axis = examples of this host)
    as global arrays sharded along the `batch` rule, for one host or many."""
    def place(x: Any) -> jax.Array:
        x = np.asarray(x)
        names = tuple(leading) + (None,) * (x.ndim - len(leading))
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = activation_sharding(mesh, rules, names, global_shape)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(place, batch)


def jit_step(fn: Callable[..., Any], in_shardings: Any, out_shardings: Any,
             donate_argnums: Sequence[int] = (0,), static_argnums: Sequence[int] = ()
             ) -> Callable[..., Any]:
    """`jax.jit` with explicit in/out shardings and donated inputs (the train state by
    default), so a step updates its buffers in place."""
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))
