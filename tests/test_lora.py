"""LoRA (rig_jax/models/lora.py) on a tiny U-Net and a tiny Qwen2.5-VL: a zero LoRA changes
nothing, only LoRA leaves train, merge equals apply, bad patterns are refused, and the LoRA
leaves carry their kernels' logical axis names onto a (2, 2, 2) mesh."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

from rig_jax.errors import ConfigError
from rig_jax.models.lora import LoRASettings, apply_lora, init_lora, merge_lora, target_paths
from rig_jax.models.qwen2_5_vl.lm import TextConfig
from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig
from rig_jax.models.qwen2_5_vl.vision import VisionConfig, vision_inputs
from rig_jax.models.unet import UNet2DConditionModel, UNetConfig
from rig_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, param_shardings
from rig_jax.parallel.sharding import init_sharded
from rig_jax.train.state import create_state
from rig_jax.train.step import StepSettings, make_train_step

# the tiny SD-1 layout of tests/diffusion_helpers.py (cross-attention on the 8x8 level)
UNET = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 1),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                  transformer_layers_per_block=(1, 1), attention_heads=(2, 4), norm_num_groups=8)
UNET_LORA = LoRASettings(rank=4, alpha=8.0, targets=(
    r".*attn[12]/to_[qkv]/kernel", r".*attn1/to_out_0/kernel", r"up_blocks_1/resnets_0/conv_shortcut/kernel"))
IMAGE_TOKEN = 5
VLM = Qwen25VLConfig(
    text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 1, 1)),
    vision=VisionConfig(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                        patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,)),
    image_token_id=IMAGE_TOKEN)
VLM_LORA = LoRASettings(rank=4, alpha=12.0, targets=(
    r".*layers_\d+/self_attn/[qv]_proj/kernel", r".*mlp/down_proj/kernel",
    r"visual/blocks_\d+/attn/qkv/kernel", "lm_head"))


def unet_inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.array([10.0, 500.0]),
            jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32))


def vlm_inputs():
    grid = np.array([[1, 4, 4]])   # 16 patches, 4 merged image tokens
    ids = np.array([[1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 7, 9, 11]], np.int32)
    rng = np.random.default_rng(1)
    return {"input_ids": jnp.asarray(ids), "position_ids": jnp.broadcast_to(jnp.arange(8), (3, 1, 8)),
            "attention_mask": jnp.ones((1, 8), jnp.int32),
            "pixel_values": jnp.asarray(rng.standard_normal((16, VLM.vision.patch_dim)), jnp.float32),
            "vision": {k: jnp.asarray(v) for k, v in vision_inputs(grid, VLM.vision).items()}}


@functools.cache
def unet():
    """(forward(params), boxed abstract params, plain params)."""
    model = UNet2DConditionModel(UNET)
    inputs = unet_inputs()
    init = functools.partial(model.init, jax.random.key(0), *inputs)
    params = jax.jit(lambda: nn.meta.unbox(init())["params"])()
    return jax.jit(lambda p: model.apply({"params": p}, *inputs)), jax.eval_shape(init)["params"], params


@functools.cache
def vlm():
    model = Qwen25VL(VLM, dtype=jnp.float32)
    inputs = vlm_inputs()
    init = functools.partial(model.init, jax.random.key(0), **inputs)
    params = jax.jit(lambda: nn.meta.unbox(init())["params"])()
    return jax.jit(lambda p: model.apply({"params": p}, **inputs)[0]), jax.eval_shape(init)["params"], params


MODELS = {"unet": (unet, UNET_LORA), "vlm": (vlm, VLM_LORA)}


def randomise_b(lora, seed: int, scale: float = 0.1):
    """The LoRA tree with every `b` drawn from N(0, scale^2) (a fresh LoRA's b is zero)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "b" else x
                              for (path, x), k in zip(leaves, keys, strict=True)])


def flat(tree):
    """{'/'-joined path: leaf}."""
    return {"/".join(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def lora_paths(lora):
    return sorted(path.removesuffix("/a") for path in flat(lora) if path.endswith("/a"))


@pytest.mark.parametrize("name", MODELS)
def test_zero_lora_leaves_outputs_unchanged(name):
    build, settings = MODELS[name]
    forward, _, base = build()
    lora = init_lora(base, settings, jax.random.key(1))
    adapted = jax.jit(lambda b, lo: forward(apply_lora(b, lo, settings)))(base, lora)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(forward(base)))
    assert lora_paths(lora) == sorted(target_paths(base, settings))
    for path, leaf in flat(lora).items():
        assert leaf.dtype == jnp.float32 and bool(jnp.any(leaf != 0)) == path.endswith("/a"), path


def _unet_loss(lora, base, batch, rng):
    del rng
    forward = unet()[0]
    out = forward(apply_lora(base, lora, UNET_LORA))
    return jnp.mean(jnp.square(out - batch)), {}


def test_only_lora_leaves_receive_gradients():
    _, _, base = unet()
    lora = init_lora(base, UNET_LORA, jax.random.key(1))
    target = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 4)), jnp.float32)
    grad = jax.jit(jax.grad(lambda lo: _unet_loss(lo, base, target, None)[0]))
    # b = 0: the gradient reaches every b (and no a: dL/da = dL/dW b^T)
    grads = grad(lora)
    for path, g in flat(grads).items():
        assert bool(jnp.any(g != 0)) == path.endswith("/b"), path
    # b != 0: every a and b gets a gradient
    grads = grad(randomise_b(lora, 3))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))

    optimizer = optax.sgd(0.1)
    state = create_state(lora, optimizer, 0, use_ema=False)
    before = jax.tree.map(np.array, base)
    step = jax.jit(make_train_step(_unet_loss, optimizer, StepSettings()))
    state, metrics = step(state, base, target)
    assert int(metrics["finite"]) == 1
    # the trained tree (and the optimizer state) is the LoRA tree alone; the base is untouched
    assert jax.tree.structure(state.params) == jax.tree.structure(lora)
    old = flat(lora)
    changed = {path: bool(jnp.any(new != old[path])) for path, new in flat(state.params).items()}
    assert all(v == path.endswith("/b") for path, v in changed.items()), changed
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base), before)


@pytest.mark.parametrize("name", MODELS)
def test_merge_equals_apply(name):
    build, settings = MODELS[name]
    forward, _, base = build()
    assert settings.scale != 1.0      # else a path that drops alpha/rank would pass
    lora = randomise_b(init_lora(base, settings, jax.random.key(1)), 4)
    merged = merge_lora(base, lora, settings)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    def kinds(tree):
        return jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert kinds(merged) == kinds(base)
    targets = set(target_paths(base, settings))
    flat_base = flat(base)
    for path, m in flat(merged).items():
        if path not in targets:
            assert m is flat_base[path], path     # untargeted leaves are the base's own arrays, not copies
    # one kernel against the formula, in float64
    path = sorted(targets)[0]
    node_w, node_m, node_l = base, merged, lora
    for k in path.split("/"):
        node_w, node_m, node_l = node_w[k], node_m[k], node_l[k]
    a, b = np.asarray(node_l["a"], np.float64), np.asarray(node_l["b"], np.float64)
    want = np.asarray(node_w, np.float64) + settings.alpha / settings.rank * (a @ b).reshape(node_w.shape)
    np.testing.assert_allclose(np.asarray(node_m), want, rtol=0, atol=1e-6)

    applied = jax.jit(lambda b_, lo: forward(apply_lora(b_, lo, settings)))(base, lora)
    from_merged = forward(merged)
    np.testing.assert_allclose(np.asarray(applied), np.asarray(from_merged), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(from_merged - forward(base)))) > 1e-3   # the LoRA does something


def test_patterns_are_checked():
    _, abstract, base = unet()
    for tree in (abstract, base):
        bad = LoRASettings(4, 8.0, (r".*attn1/to_q/kernel", r".*attn9/to_q/kernel"))
        with pytest.raises(ConfigError, match=r"lora\.targets: pattern '\.\*attn9/to_q/kernel' matches no"):
            init_lora(tree, bad, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"pattern '\.\*attn1/to_out_0/\.\*' matches .*to_out_0/bias"):
        target_paths(base, LoRASettings(4, 8.0, (r".*attn1/to_out_0/.*",)))
    with pytest.raises(ConfigError, match=r"'conv_in/kernel' matches conv_in/kernel of shape \(3, 3, 4,"):
        target_paths(base, LoRASettings(4, 8.0, ("conv_in/kernel",)))
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        LoRASettings(0, 8.0, ("x",))
    with pytest.raises(ConfigError, match=r"lora\.targets: pattern '\[' is not a regular expression"):
        LoRASettings(4, 8.0, ["["])
    lora = init_lora(base, UNET_LORA, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"LoRA tree: .*to_[qkv]/kernel has a \(16, 4\)"):
        apply_lora(base, lora, LoRASettings(2, 8.0, UNET_LORA.targets))


@pytest.mark.parametrize("name, kernel, names, spec", [
    ("unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel", ("embed", "heads"),
     ("fsdp", "tensor")),
    ("unet", "up_blocks_1/resnets_0/conv_shortcut/kernel", ("conv_in", "conv_out"), ("fsdp", "tensor")),
    ("vlm", "language_model/layers_0/self_attn/v_proj/kernel", ("embed", "kv_heads"), ("fsdp", "tensor")),
    ("vlm", "lm_head", ("embed", "vocab"), ("fsdp", "tensor")),
])
def test_logical_names_and_shardings(devices, name, kernel, names, spec):
    build, settings = MODELS[name]
    _, abstract, _ = build()
    mesh = Mesh(np.array(devices).reshape(2, 2, 2), MESH_AXES)
    init_fn = functools.partial(init_lora, abstract, settings)
    logical = nn.get_partition_spec(jax.eval_shape(init_fn, jax.random.key(0)))
    lora, shardings = init_sharded(init_fn, mesh, DEFAULT_RULES, jax.random.key(0))
    node_names, node_shardings, node_lora = logical, shardings, lora
    for k in kernel.split("/"):
        node_names, node_shardings, node_lora = node_names[k], node_shardings[k], node_lora[k]
    assert node_names == {"a": PartitionSpec(names[0], None), "b": PartitionSpec(None, names[1])}
    assert node_shardings["a"].spec == PartitionSpec(spec[0], None)
    assert node_shardings["b"].spec == PartitionSpec(None, spec[1])
    assert node_lora["a"].sharding == node_shardings["a"] and node_lora["b"].sharding == node_shardings["b"]


def test_sharded_apply_equals_single_device(devices):
    """The jitted forward with the base and the LoRA both born sharded equals the unsharded one."""
    forward, abstract, base = unet()
    mesh = Mesh(np.array(devices).reshape(2, 2, 2), MESH_AXES)
    lora = randomise_b(init_lora(base, UNET_LORA, jax.random.key(1)), 4)
    placed_base = jax.device_put(base, param_shardings(abstract, mesh, DEFAULT_RULES))
    lora_abstract = jax.eval_shape(functools.partial(init_lora, abstract, UNET_LORA), jax.random.key(1))
    placed_lora = jax.device_put(lora, param_shardings(lora_abstract, mesh, DEFAULT_RULES))
    run = jax.jit(lambda b, lo: forward(apply_lora(b, lo, UNET_LORA)))
    np.testing.assert_allclose(np.asarray(run(placed_base, placed_lora)), np.asarray(run(base, lora)),
                               rtol=0, atol=1e-5)
