"""AutoencoderKL parity against diffusers, weight round trips and strict errors."""
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rig_jax.errors import WeightsError
from rig_jax.models.vae import CONV_NAMES, AutoencoderKL, init_params, sample_latent
from rig_jax.parallel.rules import DEFAULT_RULES
from rig_jax.weights.vae import WEIGHTS_NAME, load_vae, save_vae, vae_config_from_diffusers, vae_key_table
from tests.helpers import STRICT_KEY_CASES, check_config_refused, check_strict_key_case, rel_err

diffusers = pytest.importorskip("diffusers")

TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, latent_channels=4, sample_size=16)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def make_reference(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # non-trivial norm affine params, so a swapped scale/bias would show
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    vae.save_pretrained(folder)
    return vae


def torch_encode(vae, x):
    with torch.no_grad():
        dist = vae.encode(nchw(x)).latent_dist
    return nhwc(dist.mean), nhwc(dist.logvar)


def torch_decode(vae, z):
    with torch.no_grad():
        return nhwc(vae.decode(nchw(z)).sample)


def jax_encode(module, params, x):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))(params, x)


def jax_decode(module, params, z):
    return jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, z)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    vae = make_reference(folder)
    config, module, params = load_vae(folder)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.randn(2, 8, 8, 4).astype(np.float32)
    return dict(folder=folder, vae=vae, config=config, module=module, params=params, x=x, z=z)


def test_config_fields_are_read(tiny):
    cfg = tiny["config"]
    assert cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 8 and cfg.layers_per_block == 1
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.shift_factor is None
    assert cfg.downsample_factor == 2 and cfg.latent_channels == 4


def test_encode_matches_diffusers(tiny):
    mean, logvar = jax_encode(tiny["module"], tiny["params"], tiny["x"])
    ref_mean, ref_logvar = torch_encode(tiny["vae"], tiny["x"])
    assert mean.shape == ref_mean.shape == (2, 8, 8, 4)
    assert mean.dtype == jnp.float32
    assert rel_err(mean, ref_mean) <= 1e-4
    assert rel_err(logvar, ref_logvar) <= 1e-4


def test_decode_matches_diffusers(tiny):
    image = jax_decode(tiny["module"], tiny["params"], tiny["z"])
    ref = torch_decode(tiny["vae"], tiny["z"])
    assert image.shape == ref.shape == (2, 16, 16, 3)
    assert rel_err(image, ref) <= 1e-4


def test_odd_sized_image_matches_diffusers(tiny):
    # The asymmetric (0, 1, 0, 1) downsample pad matters most at odd sizes.
    x = np.random.RandomState(5).uniform(-1, 1, (1, 10, 14, 3)).astype(np.float32)
    mean, logvar = jax_encode(tiny["module"], tiny["params"], x)
    ref_mean, ref_logvar = torch_encode(tiny["vae"], x)
    assert mean.shape == ref_mean.shape == (1, 5, 7, 4)
    assert rel_err(mean, ref_mean) <= 1e-4 and rel_err(logvar, ref_logvar) <= 1e-4


def test_logvar_is_clipped_like_diffusers(tiny, tmp_path):
    params = jax.tree.map(np.array, tiny["params"])
    params["quant_conv"]["bias"][4:] += 100.0   # logvar half of the moments
    _, logvar = jax_encode(tiny["module"], params, tiny["x"])
    assert np.all(np.asarray(logvar) == 20.0)
    params["quant_conv"]["bias"][4:] -= 300.0
    _, logvar = jax_encode(tiny["module"], params, tiny["x"])
    assert np.all(np.asarray(logvar) == -30.0)


def test_sample_latent_is_the_reparameterised_gaussian(tiny):
    mean, logvar = jax_encode(tiny["module"], tiny["params"], tiny["x"])
    rng = jax.random.PRNGKey(3)
    draw = sample_latent(mean, logvar, rng)
    expected = mean + np.exp(0.5 * np.asarray(logvar)) * np.asarray(jax.random.normal(rng, mean.shape))
    np.testing.assert_allclose(draw, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(draw, sample_latent(mean, logvar, jax.random.PRNGKey(4)))
    # statistics over many draws: mean and std of the posterior
    m, lv = jnp.full((4000,), 0.5), jnp.full((4000,), np.log(4.0))
    many = np.asarray(sample_latent(m, lv, jax.random.PRNGKey(0)))
    assert abs(many.mean() - 0.5) < 0.15 and abs(many.std() - 2.0) < 0.15


def test_save_round_trip_gives_identical_reference_outputs(tiny, tmp_path):
    out = str(tmp_path / "saved")
    config_dict = json.load(open(os.path.join(tiny["folder"], "config.json")))
    save_vae(out, config_dict, tiny["params"])
    reloaded = diffusers.AutoencoderKL.from_pretrained(out).eval()
    x, z = tiny["x"], tiny["z"]
    for ours, ref in zip(torch_encode(reloaded, x), torch_encode(tiny["vae"], x), strict=True):
        np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(torch_decode(reloaded, z), torch_decode(tiny["vae"], z))
    # and from a VAEConfig, through our own loader again
    out2 = str(tmp_path / "saved2")
    save_vae(out2, tiny["config"], {"params": tiny["params"]})
    config2, _, params2 = load_vae(out2)
    assert config2 == tiny["config"]
    jax.tree.map(np.testing.assert_array_equal, params2, tiny["params"])


def test_deprecated_attention_key_names_load(tiny, tmp_path):
    folder = str(tmp_path / "old")
    shutil.copytree(tiny["folder"], folder)
    path = os.path.join(folder, WEIGHTS_NAME)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(path).items():
        for new, old in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value
    assert any(".query.weight" in k for k in state)
    save_file(state, path)
    _, _, params = load_vae(folder)
    jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])


def test_without_quant_convs_matches_diffusers(tmp_path):
    folder = str(tmp_path / "noquant")
    vae = make_reference(folder, seed=1, block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), use_quant_conv=False,
                         use_post_quant_conv=False)
    _, module, params = load_vae(folder)
    assert "quant_conv" not in params and "post_quant_conv" not in params
    x = np.random.RandomState(1).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    z = np.random.RandomState(2).randn(1, 8, 8, 4).astype(np.float32)
    mean, logvar = jax_encode(module, params, x)
    ref_mean, ref_logvar = torch_encode(vae, x)
    assert rel_err(mean, ref_mean) <= 1e-4 and rel_err(logvar, ref_logvar) <= 1e-4
    assert rel_err(jax_decode(module, params, z), torch_decode(vae, z)) <= 1e-4


def test_bfloat16_compute_stays_close(tiny):
    module = AutoencoderKL(tiny["config"], dtype=jnp.bfloat16)
    image = jax_decode(module, tiny["params"], tiny["z"])
    assert image.dtype == jnp.float32
    assert rel_err(image, torch_decode(tiny["vae"], tiny["z"])) <= 5e-2


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("case", STRICT_KEY_CASES)
def test_missing_surplus_misshaped_keys_are_named(tiny, tmp_path, case):
    check_strict_key_case(case, tiny["folder"], str(tmp_path / case), load_vae,
                          missing="decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                          surplus=("encoder.extra.weight", np.zeros(3, np.float32)),
                          misshaped=("encoder.conv_in.weight", np.zeros((32, 3, 5, 5), np.float32)))


def test_missing_folder_and_config_are_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=f"{re.escape(missing)}: folder not found"):
        load_vae(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"empty/config\.json: file not found"):
        load_vae(str(empty))


@pytest.mark.parametrize("field, value, pattern", [
    ("act_fn", "gelu", "field act_fn"),
    ("shift_factor", 0.1159, "field shift_factor"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "field down_block_types"),
    ("up_block_types", ["UpDecoderBlock2D"], "field up_block_types"),
    ("mid_block_add_attention", False, "field mid_block_add_attention"),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0], "field latents_mean"),
    ("norm_num_groups", 7, "field norm_num_groups"),
    ("layers_per_block", "2", "field layers_per_block"),
    ("new_fancy_field", 1, "unknown field new_fancy_field"),
    ("_class_name", "AsymmetricAutoencoderKL", "field _class_name"),
])
def test_unsupported_config_is_named(tiny, field, value, pattern):
    check_config_refused(tiny["folder"], vae_config_from_diffusers, {field: value}, "vae/config.json",
                         f".*{pattern}")


def test_shift_factor_zero_is_accepted(tiny):
    d = json.load(open(os.path.join(tiny["folder"], "config.json")))
    d["shift_factor"] = 0
    assert vae_config_from_diffusers(d, "x").shift_factor == 0.0


# ----------------------------------------------------------------------------- partitioning

def test_every_param_has_logical_axis_names(tiny):
    boxed = jax.eval_shape(lambda r: init_params(tiny["module"], r), jax.random.PRNGKey(0))["params"]
    vocabulary = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == len(vae_key_table(tiny["config"]))
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert len(leaf.names) == leaf.value.ndim, name
        assert all(n is None or n in vocabulary for n in leaf.names), name
        if name.endswith("['kernel']") and leaf.value.ndim == 4:
            assert leaf.names == CONV_NAMES, name
        if "norm" in name:
            assert leaf.names == ("norm",), name


def test_key_table_matches_reference_state_dict(tiny):
    table = vae_key_table(tiny["config"])
    assert sorted(e.source_key for e in table.values()) == sorted(tiny["vae"].state_dict())


def test_sharded_decode_matches_single_device(tiny, devices):
    from jax.sharding import Mesh, PartitionSpec

    from rig_jax.parallel.rules import param_shardings
    from rig_jax.parallel.sharding import shard_batch
    module, params = tiny["module"], tiny["params"]
    mesh = Mesh(np.asarray(devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    boxed = jax.eval_shape(lambda r: init_params(module, r), jax.random.PRNGKey(0))["params"]
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    conv = shardings["decoder"]["mid_block"]["resnets_0"]["conv1"]["kernel"]
    assert conv.spec == PartitionSpec(None, None, "fsdp", "tensor")
    z = np.concatenate([tiny["z"], tiny["z"][::-1]])  # 4 rows: data x fsdp
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        (zb,) = shard_batch((z,), mesh, DEFAULT_RULES)
        out = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(
            jax.device_put(params, shardings), zb)
    assert rel_err(out, jax_decode(module, params, z)) <= 1e-5
