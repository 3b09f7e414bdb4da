"""Loaders place params on the mesh: every leaf carries the NamedSharding the logical axis
rules give (U-Net, VAE, CLIP through load_pipeline and the orbax checkpoint), with the same
values as a host load; `rules=None` takes the active `nn.logical_axis_rules`."""
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from rig_jax.parallel.mesh import make_mesh
from rig_jax.parallel.rules import DEFAULT_RULES, param_shardings
from rig_jax.weights.diffusers_pipeline import (
    boxed_params,
    load_pipeline,
    load_pipeline_checkpoint,
    save_pipeline_checkpoint,
)
from rig_jax.weights.mapping import flatten
from rig_jax.weights.unet import load_unet, unet_boxed_params
from tests.sd_fixtures import shared_tiny_sd_folder

# Everything replicated: a rule set whose shardings differ from DEFAULT_RULES' everywhere they shard.
REPLICATED_RULES = tuple((name, None) for name, _ in DEFAULT_RULES)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(types.SimpleNamespace(shape=(2, 2, 2)))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return shared_tiny_sd_folder(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def host_load(sd_folder):
    return load_pipeline(sd_folder)


def assert_placed(params, boxed, mesh, rules):
    """Leaf by leaf: a global array on `mesh` with exactly the sharding `rules` name."""
    want = flatten(param_shardings(boxed, mesh, rules))
    got = flatten(params)
    assert set(got) == set(want)
    for path, leaf in got.items():
        assert isinstance(leaf, jax.Array), path
        assert leaf.sharding == want[path], (path, leaf.sharding, want[path])
    return sum(any(axis is not None for axis in s.spec) for s in want.values())


def assert_same_values(params, reference):
    got, want = flatten(params), flatten(reference)
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))


def test_load_pipeline_places_every_leaf(sd_folder, host_load, mesh):
    pipe, params = load_pipeline(sd_folder, mesh=mesh, rules=DEFAULT_RULES)
    boxed = boxed_params(pipe)
    sharded = 0
    for group in ("unet", "vae", "text_encoder"):
        sharded += assert_placed(params[group], boxed[group], mesh, DEFAULT_RULES)
        assert_same_values(params[group], host_load[1][group])
    assert sharded > 0  # the rules really split something on this mesh


def test_pipeline_checkpoint_places_every_leaf(host_load, mesh, tmp_path):
    pipe, host_params = host_load
    save_pipeline_checkpoint(str(tmp_path / "ckpt"), pipe, host_params)
    loaded_pipe, params = load_pipeline_checkpoint(str(tmp_path / "ckpt"), mesh=mesh, rules=DEFAULT_RULES)
    boxed = boxed_params(loaded_pipe)
    for group in ("unet", "vae", "text_encoder"):
        assert_placed(params[group], boxed[group], mesh, DEFAULT_RULES)
        assert_same_values(params[group], host_params[group])


def test_rules_default_to_the_active_context(sd_folder, mesh):
    with nn.logical_axis_rules(REPLICATED_RULES):
        _, module, params = load_unet(f"{sd_folder}/unet", mesh=mesh)
    assert assert_placed(params, unet_boxed_params(module), mesh, REPLICATED_RULES) == 0


def test_no_mesh_keeps_host_arrays(host_load):
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(host_load[1]))
