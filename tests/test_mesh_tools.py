"""The tools run on the mesh of `config.mesh` and their params carry the rules' shardings.

`rig-sample` and `rig-eval --judge vlm` run in-process on a (2, 2, 2) mesh of the 8 fake CPU
devices, with tiny random models saved in the real folder layouts (a diffusers SD folder, a
Hugging Face Qwen2.5-VL folder). The params each tool hands to its jitted calls are
recorded, and every leaf must carry the NamedSharding that the logical axis rules give for
its logical names on that mesh (`logical_to_spec`): a loader that replicates, or a rule that
never reaches a model, fails here.
"""
import os

import flax.linen as nn
import jax
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rig_jax.parallel import DEFAULT_RULES, logical_to_spec, make_mesh, rules_from_config
from tests.sd_fixtures import shared_tiny_sd_folder
from tests.test_judge import tiny_vlm_folder  # noqa: F401  (the tiny VLM folder fixture)

MESH = ["--config.mesh.shape=(2,2,2)"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return shared_tiny_sd_folder(tmp_path_factory)


def _by_path(tree, is_leaf=None) -> dict[str, object]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def assert_placed_by_rules(params, boxed) -> int:
    """Every leaf of `params` is a jax.Array with the NamedSharding the default rules give its
    logical names on the (2, 2, 2) mesh; returns how many leaves are split over some axis."""
    mesh = make_mesh(ml_collections.ConfigDict({"shape": (2, 2, 2)}))
    rules = rules_from_config(DEFAULT_RULES)
    names = _by_path(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = _by_path(params)
    assert set(leaves) == set(names)
    split = 0
    for path, leaf in leaves.items():
        assert isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding), path
        assert dict(leaf.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}, path
        logical = tuple(names[path]) + (None,) * (leaf.ndim - len(names[path]))
        expected = NamedSharding(mesh, logical_to_spec(logical, leaf.shape, mesh, rules))
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (path, leaf.sharding.spec, expected.spec)
        split += any(axis is not None for axis in expected.spec)
    return split


def test_rig_sample_params_carry_the_rules_shardings(tiny_sd, tmp_path, monkeypatch):
    from rig_jax.rig import diffuser
    from rig_jax.tools import sample
    from rig_jax.weights.diffusers_pipeline import boxed_params

    seen = []
    real_generate = diffuser.generate

    def recording_generate(pipe, params, *args, **kwargs):
        seen.append((pipe, params))
        return real_generate(pipe, params, *args, **kwargs)

    monkeypatch.setattr(diffuser, "generate", recording_generate)
    out = tmp_path / "grid.png"
    sample.main(["--model", tiny_sd[0], "--prompt", "a red cube", "--prompt", "a blue ball", "--steps", "2",
                 "--batch", "2", "--out", str(out), *MESH])
    assert out.stat().st_size > 0 and len(seen) == 1
    pipe, params = seen[0]
    assert assert_placed_by_rules(params, boxed_params(pipe)) > 10


def test_rig_eval_vlm_judge_params_carry_the_rules_shardings(tiny_vlm_folder, tmp_path,  # noqa: F811
                                                            monkeypatch):
    from rig_jax.tools import evaluate
    from rig_jax.vlm import decode
    from rig_jax.weights.qwen2_5_vl import qwen_vl_boxed_params

    seen = []
    real_generate = decode.generate

    def recording_generate(module, params, *args, **kwargs):
        seen.append((module, params))
        return real_generate(module, params, *args, **kwargs)

    monkeypatch.setattr(decode, "generate", recording_generate)
    out = tmp_path / "eval"
    evaluate.main(["--shapes-demo", "2", "--judge", "vlm", "--vlm-path", tiny_vlm_folder[0],
                   "--vlm-max-new-tokens", "3", "--config.vlm.dtype=fp32", "--out", str(out), *MESH])
    assert os.path.isfile(out / "metrics.json") and seen
    module, params = seen[0]
    assert assert_placed_by_rules(params, qwen_vl_boxed_params(module)) > 10
