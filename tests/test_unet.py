"""Parity of the Flax U-Net against diffusers' UNet2DConditionModel on tiny random models,
strict loading / export of diffusers folders, config checks and logical axis names."""
import dataclasses
import inspect
import json
import os
import re

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rig_jax.errors import ConfigError, RigError, WeightsError
from rig_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs
from rig_jax.parallel.rules import DEFAULT_RULES, param_shardings
from rig_jax.weights.unet import (
    DIFFUSERS_DEFAULTS,
    load_unet,
    read_unet_config,
    save_unet,
    unet_abstract_params,
    unet_config_from_diffusers,
    unet_key_table,
)
from tests.helpers import STRICT_KEY_CASES, check_strict_key_case, perturb

SD1_LIKE = dict(  # int attention_head_dim (= heads), 1x1-conv projections
    sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4)
SD2_LIKE = dict(  # per-block heads, linear projections, upcast, other sinusoid, cross dim 40
    sample_size=16, block_out_channels=(32, 48, 64), layers_per_block=1, norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=40, attention_head_dim=[2, 3, 4], use_linear_projection=True,
    upcast_attention=True, flip_sin_to_cos=False, freq_shift=1)
VARIATIONS = dict(  # uneven layers, 2 transformer layers, padding 0, odd sizes, centring, mid scale
    sample_size=8, block_out_channels=(16, 32), layers_per_block=[1, 2], norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, transformer_layers_per_block=2,
    downsample_padding=0, mid_block_scale_factor=1.5, center_input_sample=True, freq_shift=1)
CASES = {"sd1": (SD1_LIKE, (8, 8)), "sd2": (SD2_LIKE, (16, 16)), "variations": (VARIATIONS, (9, 7))}


def _torch_unet(kwargs: dict, seed: int) -> diffusers.UNet2DConditionModel:
    """A seeded random diffusers U-Net whose norms and biases are perturbed too (their
    defaults, ones and zeros, would hide a mapping mistake)."""
    torch.manual_seed(seed)
    return perturb(diffusers.UNet2DConditionModel(**kwargs).eval(), 0.05)


def _inputs(kwargs: dict, hw: tuple[int, int], seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, *hw)).astype(np.float32)
    t = np.array([3, 517][:batch], dtype=np.int64)
    ctx = rng.standard_normal((batch, 7, kwargs["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def _torch_out(model, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


def _flax_out(module, params, x, t, ctx) -> np.ndarray:
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                jnp.asarray(ctx))
    return np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (torch model, folder, inputs, reference output), built once."""
    out = {}
    for seed, (name, (kwargs, hw)) in enumerate(CASES.items()):
        model = _torch_unet(kwargs, seed)
        folder = str(tmp_path_factory.mktemp(f"unet_{name}"))
        model.save_pretrained(folder)
        x, t, ctx = _inputs(kwargs, hw, seed)
        out[name] = (model, folder, (x, t, ctx), _torch_out(model, x, t, ctx))
    return out


@pytest.fixture(scope="module")
def loaded(cases):
    return {name: load_unet(folder) for name, (_, folder, _, _) in cases.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name, cases, loaded):
    _, _, (x, t, ctx), ref = cases[name]
    _, module, params = loaded[name]
    out = _flax_out(module, params, x, t, ctx)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    scale = np.abs(ref).max()
    assert err <= 1e-4 * scale, f"{name}: max abs diff {err:.3g}, max |ref| {scale:.3g}"


def test_config_reads_heads_and_fields(loaded):
    sd1, sd2 = loaded["sd1"][0], loaded["sd2"][0]
    # attention_head_dim is the head count in SD configs: 4 heads of 8 and 16 channels.
    assert sd1.attention_heads == (4, 4)
    assert [s.head_dim for s in sd1.down_block_specs()] == [8, 16]
    assert sd2.attention_heads == (2, 3, 4) and sd2.mid_block_spec().head_dim == 16
    assert sd2.use_linear_projection and sd2.upcast_attention and not sd2.flip_sin_to_cos
    assert sd2.freq_shift == 1 and sd2.cross_attention_dim == 40
    var = loaded["variations"][0]
    assert var.layers_per_block == (1, 2) and var.transformer_layers_per_block == (2, 2)
    assert var.downsample_padding == 0 and var.mid_block_scale_factor == 1.5 and var.center_input_sample


def test_scalar_timestep_broadcasts(cases, loaded):
    model, _, (x, _, ctx), _ = cases["sd1"]
    _, module, params = loaded["sd1"]
    t = np.array(251, dtype=np.int64)
    ref = _torch_out(model, x, t, ctx)
    out = _flax_out(module, params, x, t, ctx)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_round_trip_through_diffusers(cases, loaded, tmp_path):
    model, folder, (x, t, ctx), ref = cases["sd2"]
    raw, _ = read_unet_config(folder)
    _, _, params = loaded["sd2"]
    save_unet(str(tmp_path), raw, params)
    again = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    original = model.state_dict()
    exported = again.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    np.testing.assert_array_equal(_torch_out(again, x, t, ctx), ref)


def test_save_from_unet_config(loaded, tmp_path):
    config, _, params = loaded["variations"]
    save_unet(str(tmp_path), config, params)
    again = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path))
    assert unet_config_from_diffusers(dict(again.config), "reloaded") == config


def test_save_rejects_params_that_do_not_fit(loaded, tmp_path):
    config, _, params = loaded["sd1"]
    short = {k: v for k, v in params.items() if k != "conv_out"}
    with pytest.raises(WeightsError, match="params lack conv_out/bias"):
        save_unet(str(tmp_path), config, short)
    wrong = {**params, "conv_in": {**params["conv_in"], "bias": np.zeros(7, np.float32)}}
    with pytest.raises(WeightsError, match=re.escape("param conv_in/bias has shape (7,)")):
        save_unet(str(tmp_path), config, wrong)
    assert not os.listdir(tmp_path)


def _write_folder(folder, config: dict, tensors: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def sd1_files(cases):
    folder = cases["sd1"][1]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("case", STRICT_KEY_CASES)
def test_missing_surplus_misshaped_keys(cases, tmp_path, case):
    # to_k of the 8x8 level's cross-attention is (32, 24): one input column too many
    check_strict_key_case(case, cases["sd1"][1], str(tmp_path / case), load_unet,
                          missing="up_blocks.0.resnets.2.conv_shortcut.bias",
                          surplus=("mid_block.attentions.1.proj_in.weight", np.zeros((64, 64), np.float32)),
                          misshaped=("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                                     np.zeros((32, 25), np.float32)))


def test_unsupported_field_in_folder(sd1_files, tmp_path):
    config, tensors = sd1_files
    folder = _write_folder(tmp_path, {**config, "addition_embed_type": "text_time"}, tensors)
    message = re.escape("config.json: unsupported field addition_embed_type")
    with pytest.raises(ConfigError, match=message) as info:
        load_unet(folder)
    assert "\n" not in str(info.value) and folder in str(info.value)


@pytest.mark.parametrize("field,value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"), ("num_class_embeds", 10),
    ("encoder_hid_dim", 32), ("time_cond_proj_dim", 256), ("attention_type", "gated"),
    ("conv_in_kernel", 5), ("conv_out_kernel", 1), ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"), ("time_embedding_act_fn", "silu"), ("dual_cross_attention", True),
    ("only_cross_attention", True), ("num_attention_heads", 8), ("mid_block_type", None),
    ("dropout", 0.1), ("act_fn", "gelu"), ("cross_attention_dim", [24, 24]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("attention_head_dim", [4, 4, 4]), ("norm_num_groups", 5), ("layers_per_block", 0),
])
def test_unsupported_config_values(field, value, sd1_files):
    config, _ = sd1_files
    with pytest.raises(ConfigError, match=rf"^unet/config\.json: .*field {field}\b") as info:
        unet_config_from_diffusers({**config, field: value}, "unet/config.json")
    assert "\n" not in str(info.value)


def test_unknown_field(sd1_files):
    config, _ = sd1_files
    with pytest.raises(ConfigError, match=re.escape("unet/config.json: unknown field frobnicate")):
        unet_config_from_diffusers({**config, "frobnicate": 1}, "unet/config.json")
    with pytest.raises(ConfigError, match="_class_name"):
        unet_config_from_diffusers({**config, "_class_name": "UNet2DModel"}, "unet/config.json")


def test_defaults_follow_diffusers_signature():
    """Every argument of diffusers' __init__ is known here with the same default, so a new
    diffusers field shows up as a failing test rather than a silent difference."""
    signature = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    theirs = {k: p.default for k, p in signature.items() if k != "self"}
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in DIFFUSERS_DEFAULTS.items()}
    assert ours == {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}


def test_metadata_and_inert_fields_accepted(sd1_files):
    config, _ = sd1_files
    base = unet_config_from_diffusers(config, "c")
    extra = {**config, "_name_or_path": "x/y", "_diffusers_version": "0.6.0", "resnet_skip_time_act": True,
             "cross_attention_norm": "group_norm", "mid_block_only_cross_attention": True}
    assert unet_config_from_diffusers(extra, "c") == base


# The unet/config.json of the real SD 1.5 and SD 2.1 checkpoints (as published).
_BLOCKS = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
           "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "act_fn": "silu",
           "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
           "in_channels": 4, "out_channels": 4, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
           "norm_num_groups": 32, "_class_name": "UNet2DConditionModel"}
SD15_CONFIG = {**_BLOCKS, "_diffusers_version": "0.6.0", "attention_head_dim": 8, "cross_attention_dim": 768,
               "sample_size": 64}
SD21_CONFIG = {**_BLOCKS, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
               "cross_attention_dim": 1024, "sample_size": 96, "dual_cross_attention": False,
               "use_linear_projection": True, "num_class_embeds": None, "only_cross_attention": False,
               "resnet_time_scale_shift": "default", "upcast_attention": True, "class_embed_type": None}


@pytest.mark.parametrize("raw,head_dims", [(SD15_CONFIG, [40, 80, 160, 160]), (SD21_CONFIG, [64] * 4)],
                         ids=["sd15", "sd21"])
def test_full_size_layouts(raw, head_dims):
    """Key table and param shapes of the real architectures against diffusers' own model,
    built on the meta device (no memory, no weights)."""
    config = unet_config_from_diffusers(raw, "config.json")
    assert [s.head_dim for s in config.down_block_specs()] == head_dims
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    table = unet_key_table(config)
    assert sorted(e.source_key for e in table.values()) == sorted(shapes)
    expected = {tuple(p.key for p in path): leaf.shape for path, leaf in
                jax.tree_util.tree_flatten_with_path(unet_abstract_params(UNet2DConditionModel(config)))[0]}
    assert set(expected) == set(table)
    for path, entry in table.items():
        empty = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shapes[entry.source_key],
                                                (0,) * len(shapes[entry.source_key]))
        assert entry.transform.to_flax(empty).shape == expected[path], entry.source_key


def test_key_table_matches_params(loaded):
    for config, _, params in loaded.values():
        table = unet_key_table(config)
        flat = {tuple(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        assert set(table) == flat


def test_every_param_has_logical_names(loaded, devices):
    vocabulary = {name for name, _ in DEFAULT_RULES}
    config = loaded["sd2"][0]
    boxed = jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0),
                           *example_inputs(config))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, name
        assert all(n is None or n in vocabulary for n in leaf.names), (name, leaf.names)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=devices)
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    spec = shardings["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].spec
    assert tuple(spec) == ("fsdp", "tensor")


def test_gradient_checkpointing_same_values_and_grads():
    # One-level U-Net: a grad compile of the parity models takes most of a minute on 2 cores.
    config = UNetConfig(sample_size=4, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",), layers_per_block=(1,),
                        transformer_layers_per_block=(1,), attention_heads=(2,), norm_num_groups=8,
                        cross_attention_dim=8)
    module = UNet2DConditionModel(config)
    remat = UNet2DConditionModel(dataclasses.replace(config, gradient_checkpointing=True))
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32), jnp.asarray([10.0, 900.0]),
            jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32))
    # Random params from the abstract tree: a jitted `init` alone compiles for ~15 s here.
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32),
                          unet_abstract_params(module))

    def loss(m):
        return lambda p: jnp.mean(jnp.square(m.apply({"params": p}, *args)))

    value, grads = jax.jit(jax.value_and_grad(loss(module)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat)))(params)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, gr in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(gr, g, rtol=1e-4, atol=1e-7)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_bfloat16_compute(cases):
    _, folder, (x, t, ctx), ref = cases["sd1"]
    _, module, params = load_unet(folder, dtype=jnp.bfloat16)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                                jnp.asarray(ctx))
    assert out.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == np.float32
    err = np.abs(np.asarray(out, np.float32).transpose(0, 3, 1, 2) - ref).max()
    assert err <= 5e-2 * np.abs(ref).max()


def test_sharded_forward_equals_single_device(cases, loaded, devices):
    """The SD1-like U-Net with params placed by the logical rules on a (2, 2, 2) mesh and the
    batch split over (data, fsdp): the same output as on one device, and so is the shared-sample
    call (each sample with two contexts, the output batch-sharded like the plain one's)."""
    import ml_collections

    from rig_jax.parallel import make_mesh, shard_batch

    _, _, (x, t, ctx), _ = cases["sd1"]
    config, module, params = loaded["sd1"]
    mesh = make_mesh(ml_collections.ConfigDict({"shape": (2, 2, 2)}))
    boxed = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(config))["params"]
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    x4, ctx4 = np.concatenate([x, x]).transpose(0, 2, 3, 1), np.concatenate([ctx, ctx])
    t4 = np.concatenate([t, t]).astype(np.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        xb, tb, cb, pairs = shard_batch((x4, t4, ctx4, np.repeat(ctx4, 2, 0)), mesh, DEFAULT_RULES)
        out = jax.jit(module.apply)({"params": sharded}, xb, tb, cb)
        shared = jax.jit(module.apply)({"params": sharded}, xb, tb, pairs)   # the sample shared by 2
    assert len(out.sharding.device_set) == 8
    single = _flax_out(module, params, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out)[:2].transpose(0, 3, 1, 2), single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out)[2:].transpose(0, 3, 1, 2), single, atol=1e-5, rtol=0)
    assert shared.sharding.spec[0] == out.sharding.spec[0]
    np.testing.assert_allclose(np.asarray(shared)[::2], np.asarray(out), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(shared)[1::2], np.asarray(out), atol=1e-5, rtol=0)


def test_cpu_attention_blocks_match_torch_sdpa_with_and_without_vjp():
    """The CPU attention's inference blocking (one block per head when the keys are fewer than
    the queries, 2 MiB blocks otherwise) and its training blocking (what the VJP recomputes)
    give torch's SDPA output; the gradients match torch autograd. Shapes where the two
    blockings differ: cross-attention 256 x 77 and self-attention 1,024 tokens."""
    from rig_jax.models.attention import _inference_row_blocks, _row_blocks, dot_product_attention
    rng = np.random.default_rng(0)
    for q_len, kv_len in ((256, 77), (1024, 1024)):
        assert _inference_row_blocks(q_len, kv_len) != _row_blocks(q_len, kv_len)
        q, k, v = (rng.standard_normal((1, n, 2, 16)).astype(np.float32) for n in (q_len, kv_len, kv_len))
        tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        ref.pow(2).sum().backward()
        out = np.asarray(jax.jit(dot_product_attention)(q, k, v))
        np.testing.assert_allclose(out, ref.detach().numpy().transpose(0, 2, 1, 3), atol=2e-6)
        loss = lambda *a: jnp.sum(dot_product_attention(*a) ** 2)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        for g, t in zip(grads, (tq, tk, tv), strict=True):
            np.testing.assert_allclose(np.asarray(g), t.grad.numpy().transpose(0, 2, 1, 3), atol=2e-5)


def test_shared_sample_equals_the_repeated_sample(cases, loaded):
    """Two contexts per sample (the CFG pair, example-major): one call on the sample once
    (conv_in, the time embedding, the first down block's ResNet and self-attention at batch 2)
    equals the call on the sample repeated (batch 4), to 1e-6 of the output's scale; a context
    batch that is not a multiple of the sample's is one RigError."""
    _, _, (x, t, ctx), _ = cases["sd1"]
    _, module, params = loaded["sd1"]
    x, t = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32)
    pair = jnp.asarray(np.stack([ctx, ctx[::-1] * 0.5], axis=1).reshape(4, *ctx.shape[1:]))
    run = jax.jit(module.apply)
    shared = run({"params": params}, x, t, pair)
    repeated = run({"params": params}, jnp.repeat(x, 2, 0), jnp.repeat(t, 2), pair)
    assert shared.shape == repeated.shape == (4, *x.shape[1:])
    error = float(jnp.abs(shared - repeated).max() / jnp.abs(repeated).max())
    assert error <= 1e-6, error
    assert float(jnp.abs(shared[0::2] - shared[1::2]).max()) > 1e-3   # the two contexts differ
    with pytest.raises(RigError, match="multiple of the sample's batch 2"):
        module.apply({"params": params}, x, t, pair[:3])


def test_coordinate_channels_match_diffusers_given_the_ramps(tmp_path):
    """A U-Net with `coordinate_channels` = 2 is, for diffusers, a 6-in 4-out U-Net whose caller
    appends the x and y ramps (as inpainting U-Nets take mask channels): ours appends them itself."""
    from rig_jax.models.unet import coordinate_ramps

    kwargs = {**SD1_LIKE, "in_channels": 6, "out_channels": 4}
    model = _torch_unet(kwargs, seed=5)
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "coordinate_channels": 2}))
    config, module, params = load_unet(str(tmp_path))
    assert (config.in_channels, config.coordinate_channels, config.latent_channels) == (6, 2, 4)
    x, t, ctx = _inputs(kwargs, (8, 8), seed=5)
    ramps = np.broadcast_to(np.asarray(coordinate_ramps(8, 8)).transpose(0, 3, 1, 2), (2, 2, 8, 8))
    ref = _torch_out(model, np.concatenate([x, ramps], axis=1), t, ctx)
    out = _flax_out(module, params, x, t, ctx)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    # x grows to the right, y downwards, both centred on the pixels
    np.testing.assert_allclose(np.asarray(coordinate_ramps(2, 4))[0, 0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(np.asarray(coordinate_ramps(2, 4))[0, :, 0, 1], [-0.5, 0.5])
    assert read_unet_config(str(tmp_path))[1] == config
    with pytest.raises(RigError, match="sample has 6 channels, expected 4"):
        module.apply({"params": params}, np.zeros((1, 8, 8, 6), np.float32), t[:1], ctx[:1])
    with pytest.raises(ConfigError, match="coordinate_channels=3 must be 0 or 2"):
        unet_config_from_diffusers({**json.loads(path.read_text()), "coordinate_channels": 3})
