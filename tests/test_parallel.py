"""Mesh construction, logical -> mesh sharding, and sharded == single-device numerics."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from rig_jax.errors import ConfigError
from rig_jax.parallel import (
    DEFAULT_RULES,
    init_sharded,
    jit_step,
    logical_to_spec,
    make_mesh,
    mesh_context,
    resolve_mesh_shape,
    rules_from_config,
    shard_batch,
)
from tests.tiny_annotated import EXPECTED_SPECS, TinyAnnotatedMLP

MESHES = [(8, 1, 1), (2, 2, 2), (1, 1, 8)]


def mesh_config(shape):
    c = ml_collections.ConfigDict()
    c.shape = shape
    return c


@pytest.fixture(scope="module")
def problem():
    model = TinyAnnotatedMLP()
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.randint(jax.random.key(2), (16,), 0, model.vocab)
    params = nn.meta.unbox(model.init(jax.random.key(0), x))["params"]

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    def train_step(p, o, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    ref_out = model.apply({"params": params}, x)
    ref_params, _, ref_loss = jax.jit(train_step)(params, opt_state, x, y)
    return dict(model=model, x=x, y=y, tx=tx, train_step=train_step, ref_out=ref_out,
                ref_params=ref_params, ref_loss=ref_loss, params=params)


@pytest.mark.parametrize("shape", MESHES)
def test_partition_specs_and_sharded_numerics(devices, problem, shape):
    mesh = make_mesh(mesh_config(shape))
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape, strict=True))
    model, x, y = problem["model"], problem["x"], problem["y"]

    def init_fn(rng, x):
        return model.init(rng, x)

    variables, shardings = init_sharded(init_fn, mesh, DEFAULT_RULES, jax.random.key(0), x)
    params, param_sh = variables["params"], shardings["params"]
    specs = {"/".join(p.key for p in path): tuple(s.spec)
             for path, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    for name, want in EXPECTED_SPECS[shape].items():
        got = specs[name] + (None,) * (len(want) - len(specs[name]))
        assert got == want, (shape, name, specs[name])
    # initialised already sharded, with the same values as the single-device init
    for (path, leaf), ref in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(problem["params"]), strict=True):
        assert tuple(leaf.sharding.spec) == specs["/".join(p.key for p in path)]
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), atol=1e-6, rtol=0)

    with jax.set_mesh(mesh):
        xb, yb = shard_batch((np.asarray(x), np.asarray(y)), mesh, DEFAULT_RULES)
        with nn.logical_axis_rules(DEFAULT_RULES):
            out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, xb)
            np.testing.assert_allclose(np.asarray(out), np.asarray(problem["ref_out"]), atol=1e-6, rtol=0)

            tx = problem["tx"]
            opt_state = jax.jit(tx.init)(params)
            opt_sh = jax.tree.map(lambda a: a.sharding, opt_state)
            batch_sh = (xb.sharding, yb.sharding)
            step = jit_step(problem["train_step"], (param_sh, opt_sh, *batch_sh),
                            (param_sh, opt_sh, None), donate_argnums=(0, 1))
            new_params, _, loss = step(params, opt_state, xb, yb)
    assert abs(float(loss) - float(problem["ref_loss"])) <= 1e-6
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(problem["ref_params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert jax.tree.leaves(new_params)[0].sharding == jax.tree.leaves(param_sh)[0]


def test_batch_is_sharded_over_data_and_fsdp(devices):
    mesh = make_mesh(mesh_config((2, 2, 2)))
    xb = shard_batch(np.zeros((8, 3), np.float32), mesh, DEFAULT_RULES)
    assert xb.sharding.spec == PartitionSpec(("data", "fsdp"), None)


def test_indivisible_dimension_is_replicated(devices):
    mesh = make_mesh(mesh_config((1, 1, 8)))
    assert logical_to_spec(("embed", "mlp"), (16, 12), mesh, DEFAULT_RULES) == PartitionSpec(None, None)
    assert logical_to_spec(("embed", "mlp"), (16, 24), mesh, DEFAULT_RULES) == PartitionSpec(None, "tensor")


@pytest.mark.parametrize("shape,devices_n,want", [((1, -1, 1), 8, (1, 8, 1)), ((2, 2, -1), 8, (2, 2, 2)),
                                                  ((8, 1, 1), 8, (8, 1, 1))])
def test_resolve_mesh_shape(shape, devices_n, want):
    assert resolve_mesh_shape(shape, devices_n) == want


@pytest.mark.parametrize("shape,message", [((3, 1, 1), "does not divide"), ((3, -1, 1), "does not divide"),
                                           ((2, 2, 1), "product must equal"), ((-1, -1, 1), "at most one"),
                                           ((2, 2), "expected 3"), ((0, 1, 8), "positive")])
def test_impossible_mesh_is_a_config_error(shape, message):
    with pytest.raises(ConfigError, match=message):
        resolve_mesh_shape(shape, 8)


def test_rules_from_config_rejects_unknown_mesh_axis():
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        rules_from_config((("embed", "model"),))
    assert rules_from_config((("batch", ["data", "fsdp"]), ("x", None))) == (("batch", ("data", "fsdp")),
                                                                            ("x", None))


def test_mesh_context_enters_the_mesh_and_the_rules(devices):
    """Inside `mesh_context` the models' logical constraints resolve through config.mesh.rules."""
    config = ml_collections.ConfigDict({"mesh": {"shape": (2, 2, 2), "rules": DEFAULT_RULES}})
    with mesh_context(config) as (mesh, rules):
        assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        assert tuple(nn.get_logical_axis_rules()) == tuple(rules)
        constrained = jax.jit(lambda x: nn.with_logical_constraint(x, ("batch", "mlp")))(np.ones((8, 4)))
        assert constrained.sharding.spec == PartitionSpec(("data", "fsdp"), "tensor")
    assert not nn.get_logical_axis_rules()
