"""rig-convert and rig-sample as a user runs them (subprocesses, CPU): orbax round trips,
PNG grids, exact reproduction from saved latents, and one-line errors with exit status 2."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.sd_fixtures import shared_tiny_sd_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube left of a blue ball", "two cats on a sofa", "a green cone"]
SAMPLE_ARGS = ["--batch", "2", "--steps", "3", "--guidance", "7.5", "--ncols", "2"]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m rig_jax.tools.<tool> ARGS` in the repository root, CPU only."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.run([sys.executable, "-m", f"rig_jax.tools.{tool}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return shared_tiny_sd_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def orbax_ckpt(tiny_sd, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("tools_sd") / "ckpt")
    result = run_tool("convert", "to-orbax", tiny_sd[0], ckpt)
    assert result.returncode == 0, result.stderr
    assert "to-orbax" in result.stdout
    return ckpt


@pytest.fixture(scope="module")
def broken_copies(tiny_sd, tmp_path_factory):
    """Copies of the folder with unet/config.json deleted, and with one VAE tensor reshaped."""
    base = tmp_path_factory.mktemp("broken")
    no_config, wrong_shape = str(base / "no_config"), str(base / "wrong_shape")
    shutil.copytree(tiny_sd[0], no_config)
    os.remove(os.path.join(no_config, "unet", "config.json"))
    shutil.copytree(tiny_sd[0], wrong_shape)
    path = os.path.join(wrong_shape, "vae", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["decoder.conv_in.bias"] = np.zeros((3,), np.float32)
    save_file(state, path)
    return {"no_config": no_config, "wrong_shape": wrong_shape}


def _tensors(folder: str) -> dict[str, np.ndarray]:
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        for name in os.listdir(os.path.join(folder, part)):
            if name.endswith(".safetensors"):
                for key, value in load_file(os.path.join(folder, part, name)).items():
                    key = key.removeprefix("text_model.")   # both CLIP layouts name the same weights
                    if not key.endswith("position_ids"):
                        out[f"{part}/{key}"] = value
    return out


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_convert_round_trip_gives_identical_tensors(tiny_sd, orbax_ckpt, tmp_path):
    source = tiny_sd[0]
    back = str(tmp_path / "back")
    result = run_tool("convert", "to-diffusers", orbax_ckpt, back)
    assert result.returncode == 0, result.stderr
    original, converted = _tensors(source), _tensors(back)
    assert set(original) == set(converted)
    for key, value in original.items():
        assert converted[key].dtype == value.dtype, key
        np.testing.assert_array_equal(converted[key], value, err_msg=key)
    for config in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                   "scheduler/scheduler_config.json", "model_index.json"):
        assert _json(os.path.join(back, config)) == _json(os.path.join(source, config)), config
    for name in os.listdir(os.path.join(source, "tokenizer")):
        with open(os.path.join(source, "tokenizer", name), "rb") as a, \
                open(os.path.join(back, "tokenizer", name), "rb") as b:
            assert a.read() == b.read(), name
    # the target must be new (or --overwrite)
    assert_one_line_error(run_tool("convert", "to-diffusers", orbax_ckpt, back), back, "not empty")


def test_sample_grid_and_exact_reproduction_from_latents(tiny_sd, orbax_ckpt, tmp_path):
    from PIL import Image

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")
    prompt_args = ["--prompt", PROMPTS[0], "--prompts", str(prompts_file)]
    latents, first = str(tmp_path / "noise.npy"), str(tmp_path / "first.png")
    result = run_tool("sample", "--model", tiny_sd[0], *prompt_args, *SAMPLE_ARGS, "--seed", "3",
                      "--save-latents", latents, "--out", first)
    assert result.returncode == 0, result.stderr
    with Image.open(first) as img:
        grid = np.asarray(img.convert("RGB"))
    pad, tile = 2, 16   # 3 images of 16x16 in 2 columns: 2 rows
    assert grid.shape == (pad + 2 * (tile + pad), pad + 2 * (tile + pad), 3)
    tiles = [grid[pad + r * (tile + pad):][:tile, pad + c * (tile + pad):][:, :tile] for r, c in
             ((0, 0), (0, 1), (1, 0))]
    assert all(t.std() > 0 for t in tiles) and np.abs(tiles[0].astype(int) - tiles[1]).max() > 0
    noise = np.load(latents)
    assert noise.shape == (3, 8, 8, 4) and noise.dtype == np.float32

    # the saved noise reproduces the grid bit for bit, from the diffusers folder and the checkpoint
    outputs = []
    for model in (tiny_sd[0], orbax_ckpt):
        out = str(tmp_path / f"again_{len(outputs)}.png")
        result = run_tool("sample", "--model", model, *prompt_args, *SAMPLE_ARGS,
                          "--init-latents", latents, "--out", out)
        assert result.returncode == 0, result.stderr
        outputs.append(out)
    with open(first, "rb") as f:
        expected = f.read()
    for out in outputs:
        with open(out, "rb") as f:
            assert f.read() == expected, out


def test_missing_folder_is_one_line(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert_one_line_error(run_tool("convert", "to-orbax", missing, str(tmp_path / "ckpt")), missing,
                          "folder not found")
    assert_one_line_error(run_tool("sample", "--model", missing, "--prompt", "x"), missing)
    assert_one_line_error(run_tool("convert", "to-diffusers", missing, str(tmp_path / "out")), missing)


def test_missing_file_is_one_line(broken_copies, tmp_path):
    folder = broken_copies["no_config"]
    needle = os.path.join(folder, "unet", "config.json")
    assert_one_line_error(run_tool("convert", "to-orbax", folder, str(tmp_path / "ckpt")), needle)
    assert_one_line_error(run_tool("sample", "--model", folder, "--prompt", "x"), needle)


def test_wrong_shape_is_one_line(broken_copies, tmp_path):
    folder = broken_copies["wrong_shape"]
    assert_one_line_error(run_tool("convert", "to-orbax", folder, str(tmp_path / "ckpt")),
                          "decoder.conv_in.bias", "(3,)")
    assert_one_line_error(run_tool("sample", "--model", folder, "--prompt", "x"),
                          "decoder.conv_in.bias")


def test_wrong_checkpoint_shape_and_bad_latents_are_one_line(tiny_sd, orbax_ckpt, tmp_path):
    import jax

    from rig_jax.weights.orbax_store import load_checkpoint, save_checkpoint

    params, metadata = load_checkpoint(orbax_ckpt)
    params = jax.tree.map(np.asarray, params)
    params["text_encoder"]["final_layer_norm"]["scale"] = np.ones((7,), np.float32)
    broken = str(tmp_path / "broken_ckpt")
    shutil.copytree(os.path.join(orbax_ckpt, "tokenizer"), os.path.join(broken, "tokenizer"))
    save_checkpoint(broken, params, metadata)
    assert_one_line_error(run_tool("convert", "to-diffusers", broken, str(tmp_path / "out")),
                          "text_encoder/final_layer_norm/scale", "(7,)")
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros((2, 8, 8, 3), np.float32))
    assert_one_line_error(run_tool("sample", "--model", orbax_ckpt, "--prompt", "x",
                                   "--init-latents", bad), bad, "(2, 8, 8, 3)")
