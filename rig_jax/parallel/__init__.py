"""Mesh, logical axis rules and sharded placement."""
from rig_jax.parallel.mesh import (
    make_mesh,
    maybe_initialize_distributed,
    mesh_context,
    process_zero_decides,
    resolve_mesh_shape,
)
from rig_jax.parallel.rules import (
                                    DEFAULT_RULES,
                                    MESH_AXES,
                                    activation_sharding,
                                    logical_to_spec,
                                    param_shardings,
                                    rules_from_config,
)
from rig_jax.parallel.sharding import abstract_shardings, init_sharded, jit_step, replicated, shard_batch

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "abstract_shardings", "activation_sharding", "init_sharded",
    "jit_step", "logical_to_spec", "make_mesh", "maybe_initialize_distributed", "mesh_context",
    "param_shardings", "process_zero_decides", "replicated", "resolve_mesh_shape", "rules_from_config",
    "shard_batch",
]
