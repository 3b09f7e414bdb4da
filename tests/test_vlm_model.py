"""Qwen2.5-VL in Flax against transformers' Qwen2_5_VLForConditionalGeneration (float32, CPU).

A tiny random model (every weight perturbed, biases and norm scales included) is saved once
per module; inputs are raw token ids, random packed pixel values and grids whose windows really
partition the images (window 56 px = 2x2 merged tokens; a 8x12-patch grid has 2x3 windows, a
6x10 one ragged 2x3 windows). transformers computes its own M-RoPE positions (`get_rope_index`);
rig_jax's come from `mrope_position_ids`.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.qwen2_5_vl import vision_inputs
from rig_jax.vlm.processor import mrope_position_ids
from rig_jax.weights.io import load_safetensors_folder, save_safetensors
from rig_jax.weights.qwen2_5_vl import (
    load_qwen_vl,
    qwen_vl_boxed_params,
    qwen_vl_config_from_hf,
    save_qwen_vl,
)
from tests.helpers import (
    END,
    IMAGE,
    PATCH_DIM,
    START,
    STRICT_KEY_CASES,
    check_strict_key_case,
    hf_rope_positions,
    left_pad,
    rel_err,
    save_tiny_qwen_vl,
    tiny_qwen_vl_config,
)


def save_tiny(folder: str, seed: int = 0, tie: bool = False):
    return save_tiny_qwen_vl(folder, tiny_qwen_vl_config(depth=3, tie=tie), seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("qwen_vl"))
    hf = save_tiny(folder)
    config, module, params = load_qwen_vl(folder, dtype=jnp.float32)
    return {"folder": folder, "hf": hf, "config": config, "module": module, "params": params}


def image_tokens(grid):
    return [START] + [IMAGE] * (int(np.prod(grid)) // 4) + [END]


def make_inputs(rows, grids, seed=0):
    """Left-padded ids + mask + positions (numpy) and random packed pixels for `grids`."""
    ids, mask = left_pad(rows)
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    pix = np.random.default_rng(seed).standard_normal((int(np.prod(grids, -1).sum()), PATCH_DIM))
    pos, deltas = mrope_position_ids(ids, grids if len(grids) else None, mask, IMAGE, START, 2)
    return ids, mask, pos, deltas, pix.astype(np.float32), grids


def hf_logits(hf, ids, mask, pix, grids):
    """transformers' logits, at the positions transformers computes itself."""
    kwargs = {}
    if len(grids):
        kwargs = {"pixel_values": torch.tensor(pix), "image_grid_thw": torch.tensor(grids)}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=hf_rope_positions(hf, ids, mask, grids), **kwargs).logits.numpy()


def our_logits(t, ids, mask, pos, pix, grids):
    extra = {}
    if len(grids):
        extra = {"pixel_values": jnp.asarray(pix), "vision": vision_inputs(grids, t["config"].vision)}
    logits, cache = t["module"].apply({"params": t["params"]}, jnp.asarray(ids), jnp.asarray(pos),
                                      jnp.asarray(mask), **extra)
    assert cache is None
    return np.asarray(logits)


def assert_close(ours, ref, mask):
    valid = mask.astype(bool)
    err = rel_err(ours[valid], ref[valid])
    assert err <= 1e-4, f"relative error {err}"
    return err


def test_position_ids_match_transformers(tiny):
    """Guards the inputs of the parity tests: the numpy M-RoPE positions equal get_rope_index."""
    rows = [[5, 6] + image_tokens((1, 8, 12)) + [7], [8] + image_tokens((1, 4, 4)) + [9, 10, 11]]
    ids, mask, pos, deltas, _, grids = make_inputs(rows, [(1, 8, 12), (1, 4, 4)])
    ref_pos, ref_deltas = tiny["hf"].model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == IMAGE).astype(np.int64)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))


def test_text_only_logits(tiny):
    rows = [[3, 17, 99, 250, 7, 8, 9, 10, 11], [40, 41, 42, 43]]
    ids, mask, pos, _, pix, grids = make_inputs(rows, np.zeros((0, 3)))
    ref = hf_logits(tiny["hf"], ids, mask, pix, grids)
    assert_close(our_logits(tiny, ids, mask, pos, pix, grids), ref, mask)


def test_one_image_logits(tiny):
    grid = (1, 8, 12)
    windows = vision_inputs([grid], tiny["config"].vision)["window_segments"]
    assert len(np.unique(windows)) == 6  # window attention really partitions this image
    ids, mask, pos, _, pix, grids = make_inputs([[5, 6] + image_tokens(grid) + [7, 8, 9]], [grid])
    ref = hf_logits(tiny["hf"], ids, mask, pix, grids)
    assert_close(our_logits(tiny, ids, mask, pos, pix, grids), ref, mask)


def test_two_images_of_different_sizes_logits(tiny):
    g1, g2 = (1, 8, 12), (1, 6, 10)
    rows = [[5] + image_tokens(g1) + [7, 8] + image_tokens(g2) + [9, 10, 11]]
    ids, mask, pos, _, pix, grids = make_inputs(rows, [g1, g2], seed=1)
    ref = hf_logits(tiny["hf"], ids, mask, pix, grids)
    assert_close(our_logits(tiny, ids, mask, pos, pix, grids), ref, mask)


def test_vision_tower_and_padding(tiny):
    """The merged features equal transformers' visual tower; padding the packed sequence to a
    fixed length leaves the real features unchanged."""
    g1, g2 = (1, 8, 12), (1, 6, 10)
    grids = np.array([g1, g2])
    pix = np.random.default_rng(2).standard_normal((int(np.prod(grids, -1).sum()), PATCH_DIM))
    pix = pix.astype(np.float32)
    with torch.no_grad():
        ref = tiny["hf"].model.visual(torch.tensor(pix), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    visual = tiny["module"].bind({"params": tiny["params"]}).visual
    ours = np.asarray(visual(jnp.asarray(pix), vision_inputs(grids, tiny["config"].vision)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    padded = np.concatenate([pix, np.ones((16, PATCH_DIM), np.float32)])
    out = np.asarray(visual(jnp.asarray(padded), vision_inputs(grids, tiny["config"].vision, len(padded))))
    np.testing.assert_allclose(out[:len(ref)], ours, rtol=1e-5, atol=1e-6)


def test_tied_embeddings(tmp_path):
    folder = str(tmp_path / "tied")
    hf = save_tiny(folder, seed=3, tie=True)
    config, module, params = load_qwen_vl(folder, dtype=jnp.float32)
    assert config.tie_word_embeddings and "lm_head" not in params
    ids, mask, pos, _, pix, grids = make_inputs([[3, 4, 5, 6, 7], [8, 9]], np.zeros((0, 3)))
    ref = hf_logits(hf, ids, mask, pix, grids)
    t = {"module": module, "params": params, "config": config}
    assert_close(our_logits(t, ids, mask, pos, pix, grids), ref, mask)


def rename_to_hf5(state):
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        out[key] = value
    return out


def test_both_layouts_load_with_shards(tiny, tmp_path):
    """The transformers >= 5 names (`model.language_model.*`, `model.visual.*`), split into two
    shards with an index, give the same params as the legacy single file."""
    state = rename_to_hf5(load_safetensors_folder(tiny["folder"]))
    assert any(k.startswith("model.language_model.") for k in state)
    folder = tmp_path / "hf5"
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_safetensors({k: state[k] for k in names}, str(folder / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(open(os.path.join(tiny["folder"], "config.json")).read())
    _, _, params = load_qwen_vl(str(folder), dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])


@pytest.mark.parametrize("case", STRICT_KEY_CASES)
def test_missing_surplus_misshaped_keys(tiny, tmp_path, case):
    check_strict_key_case(case, tiny["folder"], str(tmp_path / case), load_qwen_vl,
                          missing="model.layers.1.self_attn.k_proj.bias",
                          surplus=("visual.blocks.9.norm1.weight", np.ones(32, np.float32)),
                          misshaped=("visual.merger.mlp.2.weight", np.ones((64, 64), np.float32)))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(WeightsError, match="folder not found"):
        load_qwen_vl(str(tmp_path / "absent"))


def test_params_carry_logical_axis_names(tiny):
    import flax.linen as nn

    specs = nn.get_partition_spec(qwen_vl_boxed_params(tiny["module"]))
    layer = specs["language_model"]["layers_0"]
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(layer["self_attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads")
    assert tuple(layer["self_attn"]["o_proj"]["kernel"]) == ("heads", "embed")
    assert tuple(layer["mlp"]["gate_proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(layer["input_layernorm"]["scale"]) == ("norm",)
    assert tuple(specs["language_model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]) == ("embed", "vocab")
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(len(s) for s in leaves)  # every weight is named


def test_save_in_hf5_layout_reads_back_in_transformers(tiny, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    folder = str(tmp_path / "export")
    with open(os.path.join(tiny["folder"], "config.json")) as f:
        config_json = json.load(f)
    save_qwen_vl(folder, config_json, tiny["params"], layout="hf5")
    assert "model.language_model.norm.weight" in load_safetensors_folder(folder)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    ids, mask, _, _, pix, grids = make_inputs([[5] + image_tokens((1, 4, 4)) + [6]], [(1, 4, 4)])
    np.testing.assert_allclose(hf_logits(hf, ids, mask, pix, grids),
                               hf_logits(tiny["hf"], ids, mask, pix, grids), rtol=1e-6, atol=1e-6)


def test_config_from_hf_forms_and_errors(tiny):
    with open(os.path.join(tiny["folder"], "config.json")) as f:
        nested = json.load(f)
    config = qwen_vl_config_from_hf(nested)
    assert config == tiny["config"]
    # the flat hub form (transformers 4): text fields at the top, rope_scaling of type mrope
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    flat.update(text)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]
    flat["vision_config"] = dict(nested["vision_config"], in_chans=3, spatial_patch_size=14)
    flat["vision_config"].pop("in_channels")
    assert qwen_vl_config_from_hf(flat) == config
    with pytest.raises(ConfigError, match=r"unsupported field text_config\.attention_sinks"):
        qwen_vl_config_from_hf({**nested, "text_config": {**nested["text_config"], "attention_sinks": 4}})
    with pytest.raises(ConfigError, match=r"vision_config\.deepstack"):
        qwen_vl_config_from_hf({**nested, "vision_config": {**nested["vision_config"], "deepstack": [1]}})
    yarn = {**nested["text_config"], "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        qwen_vl_config_from_hf({**nested, "text_config": yarn})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        sliding = {**nested["text_config"], "use_sliding_window": True}
        qwen_vl_config_from_hf({**nested, "text_config": sliding})
    with pytest.raises(ConfigError, match="mrope_section"):
        bad = {**nested["text_config"], "rope_parameters": {"rope_theta": 1e4, "mrope_section": [2, 2, 2]}}
        qwen_vl_config_from_hf({**nested, "text_config": bad})


def test_cpu_hand_written_vjps_match_autodiff():
    """The CPU training paths' custom VJPs (SwiGLU product, RMSNorm, `cpu_matmul` with narrowing,
    widening and square kernels) give autodiff's values and gradients of the plain formulas."""
    from rig_jax.models import layers
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((6, 40)), jnp.float32)
    up = jnp.asarray(r.standard_normal((6, 40)), jnp.float32)
    scale = jnp.asarray(1 + 0.1 * r.standard_normal(40), jnp.float32)
    kernel = jnp.asarray(r.standard_normal((40, 24)), jnp.float32)
    g = jnp.asarray(r.standard_normal((6, 40)), jnp.float32)
    rms = lambda a, s: a * jax.lax.rsqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-5) * s
    cases = [
        (layers._silu_gate_cpu, lambda a, b: jax.nn.silu(a) * b, (x, up), g),
        (lambda a, s: layers._rms_norm_cpu(a, s, jnp.float32(1e-5)), rms, (x, scale), g),
        (layers.cpu_matmul, lambda a, k: a @ k, (x, kernel), g[:, :24]),
        (layers.cpu_matmul, lambda a, k: a @ k, (x[:, :24], kernel.T), g),
        (layers.cpu_matmul, lambda a, k: a @ k, (x, kernel @ kernel.T), g),
    ]
    for fast, plain, args, cot in cases:
        out, vjp = jax.vjp(fast, *args)
        ref, ref_vjp = jax.vjp(plain, *args)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        for got, want in zip(vjp(cot)[:2], ref_vjp(cot), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # float32 products of bfloat16 operands (the logits): cotangents in the operands' dtypes
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, k: layers.cpu_matmul(a, k, jnp.float32), xb, kb)
    grads = vjp(g[:, :24])
    assert out.dtype == jnp.float32 and [a.dtype for a in grads] == [jnp.bfloat16, jnp.bfloat16]
    np.testing.assert_allclose(np.asarray(grads[1], np.float32),
                               np.asarray(xb, np.float32).T @ np.asarray(g[:, :24]), rtol=2e-2, atol=5e-2)
