"""CLIP text encoder parity against transformers (both key layouts), round trips, errors."""
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

from rig_jax.errors import ConfigError, WeightsError
from rig_jax.models.clip_text import CLIPTextModel, init_params
from rig_jax.parallel.rules import DEFAULT_RULES
from rig_jax.weights.clip_text import (
    WEIGHTS_NAME,
    clip_key_table,
    clip_text_config_from_hf,
    load_clip_text,
    save_clip_text,
)
from tests.helpers import (
    STRICT_KEY_CASES,
    check_config_refused,
    check_strict_key_case,
    rel_err,
    write_weights_variant,
)

transformers = pytest.importorskip("transformers")

VOCAB, EOS, BOS, PAD, MAX_LEN = 1000, 999, 998, 1, 16
TOLERANCE = 1e-5


def make_reference(folder, hidden_act="quick_gelu", eos_token_id=EOS, seed=0):
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LEN, hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=BOS,
        pad_token_id=PAD)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, so a swapped scale/bias would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def to_text_model_layout(folder):
    """Rewrites a flat (transformers >= 5.6) save into the nested `text_model.` layout,
    with the `position_ids` buffer older saves carry."""
    path = os.path.join(folder, WEIGHTS_NAME)
    state = {f"text_model.{k}": v for k, v in load_file(path).items()}
    state["text_model.embeddings.position_ids"] = np.arange(MAX_LEN, dtype=np.int64)[None]
    save_file(state, path, metadata={"format": "pt"})


def batch():
    """Token ids with BOS, an EOS at a different place per row, right padding, and a mask."""
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 990, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    ids[:, 0] = BOS
    for row, end in enumerate((5, 11, 8)):
        ids[row, end] = EOS
        ids[row, end + 1:] = EOS  # SD pads with EOS; pooling must pick the first one
        mask[row, end + 1:] = 0
    return ids, mask


def reference_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                    output_hidden_states=True)
        penultimate = model.final_layer_norm(out.hidden_states[-2])  # diffusers' clip_skip=1
    return dict(last=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
                hidden=[h.numpy() for h in out.hidden_states], penultimate=penultimate.numpy())


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def tiny(request, tmp_path_factory):
    flat = str(tmp_path_factory.mktemp(f"clip_flat_{request.param}"))
    model = make_reference(flat, hidden_act=request.param)
    nested = str(tmp_path_factory.mktemp(f"clip_nested_{request.param}"))
    shutil.copytree(flat, nested, dirs_exist_ok=True)
    to_text_model_layout(nested)
    return dict(model=model, flat=flat, nested=nested, act=request.param)


def check_outputs(module, params, model, ids, mask):
    ref = reference_outputs(model, ids, mask)
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))(params, ids, mask)
    assert len(out["hidden_states"]) == len(ref["hidden"]) == 3
    for ours, theirs in zip(out["hidden_states"], ref["hidden"], strict=True):
        assert rel_err(ours, theirs) <= TOLERANCE
    assert rel_err(out["last_hidden_state"], ref["last"]) <= TOLERANCE
    assert rel_err(out["pooled_output"], ref["pooled"]) <= TOLERANCE
    for layer, key in (("last", "last"), ("penultimate", "penultimate")):
        enc = jax.jit(lambda p, i, m, layer=layer: module.apply({"params": p}, i, m, layer=layer,
                                                                  method=module.encode))(params, ids, mask)
        assert enc.shape == ref[key].shape
        assert rel_err(enc, ref[key]) <= TOLERANCE
    return ref


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_outputs_match_transformers(tiny, layout, use_mask):
    config, module, params = load_clip_text(tiny[layout])
    assert config.hidden_act == tiny["act"] and config.eos_token_id == EOS
    ids, mask = batch()
    check_outputs(module, params, tiny["model"], ids, mask if use_mask else None)


def test_both_layouts_give_the_same_params(tiny):
    _, _, flat = load_clip_text(tiny["flat"])
    _, _, nested = load_clip_text(tiny["nested"])
    jax.tree.map(np.testing.assert_array_equal, flat, nested)


def test_penultimate_differs_from_last(tiny):
    _, module, params = load_clip_text(tiny["flat"])
    ids, _ = batch()
    last = module.apply({"params": params}, ids, method=module.encode)
    penultimate = module.apply({"params": params}, ids, layer="penultimate", method=module.encode)
    assert rel_err(penultimate, last) > 1e-2
    with pytest.raises(ConfigError, match="layer: expected 'last' or 'penultimate'"):
        module.apply({"params": params}, ids, layer="first", method=module.encode)


def test_pooling_with_legacy_eos_id_two(tmp_path):
    # eos_token_id == 2: transformers pools at argmax(ids) (the EOS is the largest id).
    folder = str(tmp_path / "legacy")
    model = make_reference(folder, eos_token_id=2, seed=3)
    config, module, params = load_clip_text(folder)
    assert config.eos_token_id == 2
    ids, mask = batch()
    ref = reference_outputs(model, ids, mask)
    out = module.apply({"params": params}, ids, mask)
    assert rel_err(out["pooled_output"], ref["pooled"]) <= TOLERANCE
    picked = np.asarray(out["last_hidden_state"])[np.arange(3), ids.argmax(-1)]
    np.testing.assert_array_equal(np.asarray(out["pooled_output"]), picked)


@pytest.mark.parametrize("layout", ["text_model", "flat"])
def test_save_round_trip_gives_identical_reference_outputs(tiny, tmp_path, layout):
    _, _, params = load_clip_text(tiny["flat"])
    out = str(tmp_path / layout)
    config_dict = json.load(open(os.path.join(tiny["flat"], "config.json")))
    save_clip_text(out, config_dict, params, layout=layout)
    keys = load_file(os.path.join(out, WEIGHTS_NAME)).keys()
    assert all(k.startswith("text_model.") == (layout == "text_model") for k in keys)
    reloaded = transformers.CLIPTextModel.from_pretrained(out).eval()
    ids, mask = batch()
    ours, ref = reference_outputs(reloaded, ids, mask), reference_outputs(tiny["model"], ids, mask)
    for key in ("last", "pooled", "penultimate"):
        np.testing.assert_array_equal(ours[key], ref[key])
    _, _, params2 = load_clip_text(out)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_compute_stays_close(tiny):
    config, _, params = load_clip_text(tiny["flat"])
    module = CLIPTextModel(config, dtype=jnp.bfloat16)
    ids, mask = batch()
    out = module.apply({"params": params}, ids, mask)
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    ref = reference_outputs(tiny["model"], ids, mask)
    assert rel_err(out["last_hidden_state"].astype(jnp.float32), ref["last"]) <= 5e-2


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("case", STRICT_KEY_CASES)
def test_missing_surplus_misshaped_keys_are_named(tiny, tmp_path, case):
    check_strict_key_case(case, tiny["nested"], str(tmp_path / case), load_clip_text,
                          missing="text_model.encoder.layers.1.self_attn.v_proj.bias",
                          surplus=("text_projection.weight", np.zeros((8, 32), np.float32)),
                          misshaped=("text_model.encoder.layers.0.mlp.fc1.weight",
                                     np.zeros((32, 32), np.float32)))


def test_no_text_encoder_keys_is_named(tiny, tmp_path):
    folder = write_weights_variant(tiny["nested"], str(tmp_path / "vision"), lambda s: (
        s.clear(), s.__setitem__("vision_model.x", np.zeros(2, np.float32))))
    with pytest.raises(WeightsError, match="no CLIP text encoder keys"):
        load_clip_text(folder)


def test_missing_folder_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=f"{re.escape(missing)}: folder not found"):
        load_clip_text(missing)


@pytest.mark.parametrize("field, value, pattern", [
    ("hidden_act", "gelu_new", "field hidden_act"),
    ("num_attention_heads", 5, "field num_attention_heads"),
    ("eos_token_id", [49407, 49406], "field eos_token_id"),
    ("model_type", "clip_vision_model", "field model_type"),
    ("num_key_value_heads", 2, "unknown field num_key_value_heads"),
    ("layer_norm_eps", -1.0, "field layer_norm_eps"),
])
def test_unsupported_config_is_named(tiny, field, value, pattern):
    check_config_refused(tiny["flat"], clip_text_config_from_hf, {field: value}, "te/config.json", pattern)


def test_harmless_metadata_is_accepted(tiny):
    d = json.load(open(os.path.join(tiny["flat"], "config.json")))
    d.update({"_name_or_path": "openai/clip-vit-large-patch14", "torch_dtype": "float16", "dropout": 0.0,
              "projection_dim": 768, "use_attention_mask": True, "id2label": {"0": "LABEL_0"}})
    config = clip_text_config_from_hf(d, "x")
    assert config.use_attention_mask and config.hidden_size == 32
    # a full CLIPModel config is read through its text_config
    assert clip_text_config_from_hf({"model_type": "clip", "text_config": d}, "x") == config


# ----------------------------------------------------------------------------- partitioning

EXPECTED_NAMES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
    "out_proj": ("heads", "embed"), "fc1": ("embed", "mlp"), "fc2": ("mlp", "embed"),
    "token_embedding": ("vocab", "embed"), "position_embedding": (None, "embed"),
}


def test_every_param_has_logical_axis_names(tiny):
    config, module, _ = load_clip_text(tiny["flat"])
    boxed = jax.eval_shape(lambda r: init_params(module, r, length=4), jax.random.PRNGKey(0))["params"]
    vocabulary = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == len(clip_key_table(config))
    for path, leaf in leaves:
        keys = [p.key for p in path]
        name = "/".join(keys)
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert len(leaf.names) == leaf.value.ndim, name
        assert all(n is None or n in vocabulary for n in leaf.names), name
        if "norm" in keys[-2]:
            assert leaf.names == ("norm",), name
        elif keys[-1] in ("kernel", "embedding"):
            assert leaf.names == EXPECTED_NAMES[keys[-2]], name


def test_key_tables_match_reference_state_dict(tiny):
    config, _, _ = load_clip_text(tiny["flat"])
    flat_keys = set(tiny["model"].state_dict())
    assert {e.source_key for e in clip_key_table(config, "").values()} == flat_keys
    assert ({e.source_key for e in clip_key_table(config).values()}
            == {f"text_model.{k}" for k in flat_keys})


def test_sharded_forward_matches_single_device(tiny, devices):
    from jax.sharding import Mesh, PartitionSpec

    from rig_jax.parallel.rules import param_shardings
    from rig_jax.parallel.sharding import shard_batch
    _, module, params = load_clip_text(tiny["flat"])
    mesh = Mesh(np.asarray(devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    boxed = jax.eval_shape(lambda r: init_params(module, r, length=4), jax.random.PRNGKey(0))["params"]
    shardings = param_shardings(boxed, mesh, DEFAULT_RULES)
    layer = shardings["encoder"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    assert layer["mlp"]["fc2"]["kernel"].spec == PartitionSpec("tensor", "fsdp")
    sharded = jax.device_put(params, shardings)
    ids, mask = batch()
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows: data x fsdp
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        ids_b, mask_b = shard_batch((ids, mask), mesh, DEFAULT_RULES)
        out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["last_hidden_state"])(
            sharded, ids_b, mask_b)
    ref = module.apply({"params": params}, ids, mask)["last_hidden_state"]
    assert rel_err(out, ref) <= TOLERANCE
