"""Safetensors folders: single files, shard indexes, and one-line errors."""
import json

import numpy as np
import pytest

from rig_jax.errors import WeightsError
from rig_jax.weights.io import load_safetensors_folder, read_json, save_safetensors


def test_sharded_folder_reads_every_shard(tmp_path):
    save_safetensors({"a": np.ones((2, 3), np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_safetensors({"b": np.zeros((4,), np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_safetensors_folder(str(tmp_path))
    assert sorted(tensors) == ["a", "b"] and tensors["a"].shape == (2, 3)


def test_single_file_save_removes_a_stale_index(tmp_path):
    stale = {"weight_map": {"old": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(stale))
    save_safetensors({"new": np.arange(3, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert list(load_safetensors_folder(str(tmp_path))) == ["new"]


@pytest.mark.parametrize("setup,needle", [
    ("missing_folder", "folder not found"),
    ("empty_folder", "no safetensors weights"),
    ("missing_shard", "shard named in model.safetensors.index.json not found"),
    ("bad_index", "not valid JSON"),
])
def test_errors_name_the_path(tmp_path, setup, needle):
    folder = tmp_path / "w"
    if setup != "missing_folder":
        folder.mkdir()
    if setup == "missing_shard":
        index = {"weight_map": {"a": "x.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if setup == "bad_index":
        (folder / "model.safetensors.index.json").write_text("{truncated")
    with pytest.raises(WeightsError, match=needle) as err:
        load_safetensors_folder(str(folder))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        read_json(str(tmp_path / "config.json"))


def test_a_lone_variant_is_read_and_pickles_are_named(tmp_path):
    half = np.ones(2, np.float16)
    save_safetensors({"w": half}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    tensors = load_safetensors_folder(str(tmp_path))
    assert tensors["w"].dtype == np.float16
    save_safetensors({"w": half}, str(tmp_path / "diffusion_pytorch_model.ema.safetensors"))
    with pytest.raises(WeightsError, match="several weight variants"):
        load_safetensors_folder(str(tmp_path))
    save_safetensors({"w": np.zeros(2, np.float32)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert load_safetensors_folder(str(tmp_path))["w"].dtype == np.float32  # the plain name wins
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(WeightsError, match=r"only PyTorch pickle weights \(pytorch_model.bin\)"):
        load_safetensors_folder(str(pickled))


def test_a_plain_single_file_wins_over_a_variant_index(tmp_path):
    save_safetensors({"shard": np.ones(1, np.float16)}, str(tmp_path / "m-1.safetensors"))
    index = {"weight_map": {"shard": "m-1.safetensors"}}
    (tmp_path / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    assert list(load_safetensors_folder(str(tmp_path))) == ["shard"]
    save_safetensors({"plain": np.ones(1, np.float32)}, str(tmp_path / "model.safetensors"))
    assert list(load_safetensors_folder(str(tmp_path))) == ["plain"]
