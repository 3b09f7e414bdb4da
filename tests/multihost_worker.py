"""One process of the 2-process multi-host test (started by test_multihost.py).

argv: process_id, num_processes, coordinator port, output file. Joins the others with
jax.distributed over loopback (gloo CPU collectives), builds the 8-device mesh through
rig_jax.parallel, shards the tiny model and a batch, asks `process_zero_decides` with flags that
differ by host, and writes its results.
"""
import os
import sys

process_id, num_processes, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import flax.linen as nn
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from rig_jax.parallel import (
    DEFAULT_RULES,
    init_sharded,
    make_mesh,
    maybe_initialize_distributed,
    process_zero_decides,
    shard_batch,
)
from rig_jax.weights.mapping import to_host
from tests.tiny_annotated import TinyAnnotatedMLP

dist = ml_collections.ConfigDict(dict(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                                      num_processes=num_processes, process_id=process_id,
                                      local_device_ids=()))
maybe_initialize_distributed(dist)
assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()

mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(2, 2, 2))))
model = TinyAnnotatedMLP()
x_global = np.asarray(jax.random.normal(jax.random.key(1), (16, 8)))  # same on every host
y_global = np.random.default_rng(0).integers(0, model.vocab, 16)
per_host = 16 // num_processes
x_local = x_global[process_id * per_host:(process_id + 1) * per_host]
y_local = y_global[process_id * per_host:(process_id + 1) * per_host]

variables, shardings = init_sharded(lambda r, x: model.init(r, x), mesh, DEFAULT_RULES,
                                    jax.random.key(0), jax.ShapeDtypeStruct((16, 8), np.float32))
params = variables["params"]
tx = optax.adamw(1e-2)


def train_step(p, o, x, y):
    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss


with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    xb, yb = shard_batch((x_local, y_local), mesh, DEFAULT_RULES)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, xb)
    new_params, _, loss = jax.jit(train_step)(params, jax.jit(tx.init)(params), xb, yb)

out = multihost_utils.process_allgather(out, tiled=True)
# Each host asks with a flag of its own (as from its own files); all must get process 0's.
decided = [process_zero_decides(process_id == 0), process_zero_decides(process_id != 0)]
new_params = jax.tree.map(to_host, new_params)  # the exporters' gather
np.savez(out_path, out=np.asarray(out), loss=np.asarray(loss), decided=np.asarray(decided),
         **{"/".join(p.key for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(new_params)[0]})
jax.distributed.shutdown()
