"""Inputs checked where they enter (issue 13): weight tensors of the wrong shape, tokenizers
that do not fit their model, scheduler classes the sampler does not implement, and a
rig-convert --overwrite killed mid-write."""
from __future__ import annotations

import itertools
import os
import re
import shutil

import numpy as np
import pytest

from rig_jax.errors import WeightsError
from rig_jax.weights.io import StateDict
from rig_jax.weights.mapping import TRANSFORM_KINDS, convert_to_flax, flatten, unflatten
from tests.helpers import save_tiny_vlm_folder
from tests.sd_fixtures import shared_tiny_sd_folder

CORPUS = ["a red cube left of a blue ball", "is the cube red? answer yes or no", "the ball is blue"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return shared_tiny_sd_folder(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("guards_vlm"))
    save_tiny_vlm_folder(folder, CORPUS, vocab_size=300)
    return folder


@pytest.fixture(scope="module")
def tables(tiny_sd, tiny_vlm):
    """(model, key table, abstract Flax params) of every tiny model: U-Net, VAE, CLIP text, VLM."""
    from rig_jax.models.clip_text import CLIPTextModel
    from rig_jax.models.qwen2_5_vl.model import Qwen25VL
    from rig_jax.models.unet import UNet2DConditionModel
    from rig_jax.models.vae import AutoencoderKL
    from rig_jax.weights import clip_text, qwen2_5_vl, unet, vae

    _, unet_config = unet.read_unet_config(os.path.join(tiny_sd, "unet"))
    _, vae_config = vae.read_vae_config(os.path.join(tiny_sd, "vae"))
    _, clip_config = clip_text.read_clip_text_config(os.path.join(tiny_sd, "text_encoder"))
    _, vlm_config = qwen2_5_vl.read_qwen_vl_config(tiny_vlm)
    return [
        ("unet", unet.unet_key_table(unet_config),
         unet.unet_abstract_params(UNet2DConditionModel(unet_config))),
        ("vae", vae.vae_key_table(vae_config), vae.vae_abstract_params(AutoencoderKL(vae_config))),
        ("clip", clip_text.clip_key_table(clip_config),
         clip_text.clip_abstract_params(CLIPTextModel(clip_config))),
        ("vlm", qwen2_5_vl.qwen_vl_key_table(vlm_config),
         qwen2_5_vl.qwen_vl_abstract_params(Qwen25VL(vlm_config))),
    ]


def _wrong_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every misfit of a source shape worth naming: one axis more or fewer, each axis one
    larger, each pair of unequal axes swapped (the Qwen patch_embed case), and a 3x3 kernel
    where the trailing axes are 1x1 (a k x k conv given to a 1x1 -> dense transform)."""
    out = {"rank+1": shape + (1,), "rank-1": shape[:-1]}
    for i in range(len(shape)):
        out[f"axis{i}+1"] = shape[:i] + (shape[i] + 1,) + shape[i + 1:]
    for i, j in itertools.combinations(range(len(shape)), 2):
        if shape[i] != shape[j]:
            swapped = list(shape)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            out[f"swap{i}{j}"] = tuple(swapped)
    if len(shape) == 4 and shape[2:] == (1, 1):
        out["3x3"] = shape[:2] + (3, 3)
    return out


@pytest.mark.parametrize("kind", sorted(TRANSFORM_KINDS))
def test_every_transform_kind_checks_the_exact_source_shape(kind, tables):
    """For each registered transform kind (a new kind fails here until a tiny model uses it):
    the right source tensor converts and round-trips, and a wrong-rank or wrong-size one is a
    WeightsError naming the key and the file, whatever its element count."""
    found = [(model, path, entry, abstract) for model, table, params in tables
             for flat in [flatten(params)] for path, entry in table.items()
             for abstract in [flat[path]] if entry.transform.name == kind]
    assert found, f"no tiny model's key table uses transform kind {kind}: add a model that does"
    model, path, entry, abstract = found[0]
    want = tuple(abstract.shape)
    need = entry.transform.source_shape(want)
    rng = np.random.default_rng(0)
    good = rng.standard_normal(need).astype(np.float32)
    table, expected = {path: entry}, unflatten({path: abstract})

    def state(tensor: np.ndarray) -> StateDict:
        out = StateDict()
        out.add_file(f"{model}/weights.safetensors", {entry.source_key: tensor})
        return out

    got = flatten(convert_to_flax(state(good), table, expected, source=model))[path]
    assert got.shape == want
    np.testing.assert_array_equal(entry.transform.to_torch(np.asarray(got)), good)
    wrong = _wrong_shapes(need)
    assert "rank+1" in wrong and any(k.startswith("axis") for k in wrong)
    for name, shape in wrong.items():
        bad = np.zeros(shape, np.float32)
        with pytest.raises(WeightsError) as info:
            convert_to_flax(state(bad), table, expected, source=model)
        message = str(info.value)
        assert message.startswith(f"{model}/weights.safetensors: key {entry.source_key} has shape {shape}"), \
            (name, message)
        assert str(need) in message and "\n" not in message


def _corrupt(folder: str, key: str, edit) -> str:
    from safetensors.numpy import load_file, save_file

    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    path = os.path.join(folder, files[0])
    state = load_file(path)
    state[key] = edit(state[key])
    save_file(state, path, metadata={"format": "pt"})
    return path


def test_loaders_refuse_swapped_patch_embed_and_kxk_for_1x1(tiny_sd, tiny_vlm, tmp_path):
    """End to end: a saved Qwen2.5-VL whose patch_embed has its channel and time axes swapped
    (same element count: it loaded and gave wrong logits), and a U-Net whose 1x1 proj_in is
    stored as a 3x3 kernel (it was cut to one tap), are refused naming the key and the file."""
    from rig_jax.weights.qwen2_5_vl import load_qwen_vl
    from rig_jax.weights.unet import load_unet

    vlm = str(tmp_path / "vlm")
    shutil.copytree(tiny_vlm, vlm)
    key = "visual.patch_embed.proj.weight"
    path = _corrupt(vlm, key, lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4)))
    with pytest.raises(WeightsError, match=re.escape(f"{path}: key {key} has shape (32, 2, 3, 14, 14)")):
        load_qwen_vl(vlm)

    unet = str(tmp_path / "unet")
    shutil.copytree(os.path.join(tiny_sd, "unet"), unet)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    path = _corrupt(unet, key, lambda x: np.repeat(np.repeat(x, 3, axis=2), 3, axis=3))
    with pytest.raises(WeightsError, match=re.escape(f"{path}: key {key} has shape (32, 32, 3, 3)")):
        load_unet(unet)
