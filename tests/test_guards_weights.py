"""Inputs checked where they enter (issue 13): weight tensors of the wrong shape, tokenizers
that do not fit their model, scheduler classes the sampler does not implement, and a
rig-convert --overwrite killed mid-write."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil

import numpy as np
import pytest

from rig_jax.errors import ConfigError, WeightsError
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


# ---- tokenizers -----------------------------------------------------------------------------

def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)


def test_sd_tokenizer_must_have_its_vocabulary_fit_and_class(tiny_sd, tmp_path):
    """A CLIP tokenizer folder without vocab.json/merges.txt (it loaded as a two-token
    tokenizer), or whose vocabulary is its special tokens alone, is refused; ids beyond the
    text encoder's vocab_size are refused naming both files, before any weights are read; the
    model_index.json tokenizer class is honoured (CLIPTokenizer / CLIPTokenizerFast) or refused."""
    from rig_jax.weights.diffusers_pipeline import load_pipeline, load_tokenizer, tokenizer_class

    folder = str(tmp_path / "sd")
    shutil.copytree(tiny_sd, folder)
    tok = os.path.join(folder, "tokenizer")
    bare = str(tmp_path / "bare")
    shutil.copytree(tok, bare)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        if os.path.exists(os.path.join(bare, name)):
            os.remove(os.path.join(bare, name))
    with pytest.raises(WeightsError, match=re.escape(f"{bare}: no vocabulary (merges.txt and vocab.json")):
        load_tokenizer(bare)
    special_only = str(tmp_path / "special_only")
    shutil.copytree(bare, special_only)
    with open(os.path.join(special_only, "vocab.json"), "w") as f:
        json.dump({"<|startoftext|>": 0, "<|endoftext|>": 1}, f)
    with open(os.path.join(special_only, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with pytest.raises(WeightsError, match=re.escape(f"{special_only}: the tokenizer has no vocabulary")):
        load_tokenizer(special_only)

    vocab_size = json.load(open(os.path.join(folder, "text_encoder", "config.json")))["vocab_size"]
    _edit_json(os.path.join(tok, "tokenizer.json"), lambda t: t["model"]["vocab"].__setitem__("zebra</w>",
                                                                                                vocab_size))
    with pytest.raises(WeightsError, match=re.escape(
            f"{tok}: tokenizer ids reach {vocab_size}, beyond the vocab_size {vocab_size} of "
            f"{os.path.join(folder, 'text_encoder', 'config.json')}")):
        load_pipeline(folder)
    shutil.rmtree(tok)
    shutil.copytree(os.path.join(tiny_sd, "tokenizer"), tok)

    index_path = os.path.join(folder, "model_index.json")
    index = json.load(open(index_path))
    assert tokenizer_class(index, index_path) == "CLIPTokenizer"
    assert tokenizer_class({**index, "tokenizer": ["transformers", "CLIPTokenizerFast"]}, index_path) == \
        "CLIPTokenizerFast"
    assert len(load_tokenizer(tok, "CLIPTokenizerFast")) == vocab_size
    _edit_json(index_path, lambda d: d.__setitem__("tokenizer", ["transformers", "T5Tokenizer"]))
    with pytest.raises(ConfigError, match=re.escape(f"{index_path}: component tokenizer is ['transformers', "
                                                    "'T5Tokenizer']")):
        load_pipeline(folder)
    _edit_json(os.path.join(tok, "tokenizer_config.json"), lambda d: d.update(tokenizer_class="T5Tokenizer"))
    with pytest.raises(WeightsError, match="tokenizer_class 'T5Tokenizer' is not a CLIP tokenizer"):
        load_tokenizer(tok)


def test_vlm_tokenizer_and_special_token_ids_must_agree(tiny_vlm, tmp_path):
    """The VLM's tokenizer must hold a vocabulary and fit the text model's vocab_size; its eos /
    pad ids must agree among config.json's top level, its text_config and
    generation_config.json (which may list extra stops); a config without eos ids takes the
    generation config's, so the judge's stop tokens follow."""
    from rig_jax.vlm.pipeline import load_tokenizer, load_vlm_pipeline, stop_tokens
    from rig_jax.weights.qwen2_5_vl import read_qwen_vl_config

    folder = str(tmp_path / "vlm")
    shutil.copytree(tiny_vlm, folder)
    config_path = os.path.join(folder, "config.json")
    generation_path = os.path.join(folder, "generation_config.json")
    original = json.load(open(config_path))
    eos, pad = original["text_config"]["eos_token_id"], original["text_config"]["pad_token_id"]
    assert read_qwen_vl_config(folder)[1].eos_token_ids == (eos,)

    _edit_json(config_path, lambda d: d.update(eos_token_id=eos + 1))
    with pytest.raises(WeightsError, match=re.escape(
            f"{config_path}: eos_token_id [{eos + 1}] (top level) and text_config.eos_token_id [{eos}] "
            "disagree")):
        read_qwen_vl_config(folder)
    _edit_json(config_path, lambda d: d.update(eos_token_id=eos))
    read_qwen_vl_config(folder)

    _edit_json(generation_path, lambda d: d.update(eos_token_id=[eos + 1]))
    with pytest.raises(WeightsError, match=re.escape(
            f"{generation_path}: eos_token_id [{eos + 1}] lacks the eos ids [{eos}] of {config_path}")):
        read_qwen_vl_config(folder)
    _edit_json(generation_path, lambda d: d.update(eos_token_id=[eos, pad], pad_token_id=pad + 1))
    with pytest.raises(WeightsError, match=re.escape(
            f"{generation_path}: pad_token_id [{pad + 1}] disagrees with {pad} in {config_path}")):
        read_qwen_vl_config(folder)
    _edit_json(generation_path, lambda d: d.update(pad_token_id=pad))
    assert read_qwen_vl_config(folder)[1].eos_token_ids == (eos,)

    # a config that gives no eos id takes the generation config's: the stop tokens follow
    end_of_text = eos + 5
    _edit_json(config_path, lambda d: (d.pop("eos_token_id"), d["text_config"].update(eos_token_id=None)))
    _edit_json(generation_path, lambda d: d.update(eos_token_id=[end_of_text]))
    config = read_qwen_vl_config(folder)[1]
    assert config.eos_token_ids == (end_of_text,)
    assert end_of_text in stop_tokens(config, load_tokenizer(folder))

    shutil.rmtree(folder)
    shutil.copytree(tiny_vlm, folder)
    tokenizer = load_tokenizer(folder)
    _edit_json(config_path, lambda d: d["text_config"].__setitem__("vocab_size", len(tokenizer) - 1))
    with pytest.raises(WeightsError, match=re.escape(
            f"{folder}: tokenizer ids reach {len(tokenizer) - 1}, beyond the vocab_size {len(tokenizer) - 1} "
            f"of {config_path}")):
        load_vlm_pipeline(folder)
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(WeightsError, match=re.escape(f"{folder}: no tokenizer vocabulary")):
        load_tokenizer(folder)


# ---- schedulers -----------------------------------------------------------------------------

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


@pytest.mark.parametrize("class_name,extra,reason", [
    ("LCMScheduler", {}, "consistency"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas=true"),
    ("DPMSolverSDEScheduler", {}, "stochastic differential equation"),
    ("MyOwnScheduler", {}, "not a scheduler rig_jax knows"),
])
def test_scheduler_ddim_cannot_stand_in_for_is_refused(class_name, extra, reason, capsys):
    """A scheduler class the sampler does not implement and DDIM cannot honestly replace is a
    one-line ConfigError naming file and class (it was sampled as DDIM without a word)."""
    from rig_jax.diffusion.schedulers import DDIMSchedule

    source = "sd/scheduler/scheduler_config.json"
    pattern = re.escape(f"{source}: ") + f".*{class_name}.*{re.escape(reason)}"
    with pytest.raises(ConfigError, match=pattern) as info:
        DDIMSchedule.from_diffusers_config({"_class_name": class_name, **SD_BETAS, **extra}, source)
    assert "\n" not in str(info.value)
    assert "warning" not in capsys.readouterr().err


def test_scheduler_sharing_ddims_betas_is_sampled_as_ddim_with_a_warning(capsys):
    """PNDM / Euler configs share DDIM's betas and prediction type: the schedule is DDIM's on that
    config, and one warning line says DDIM is used instead and why; DDIM itself says nothing."""
    from rig_jax.diffusion.schedulers import DDIMSchedule

    ddim = DDIMSchedule.from_diffusers_config({"_class_name": "DDIMScheduler", **SD_BETAS}, "ddim.json")
    assert capsys.readouterr().err == ""
    for class_name in ("PNDMScheduler", "EulerDiscreteScheduler"):
        schedule = DDIMSchedule.from_diffusers_config(
            {"_class_name": class_name, **SD_BETAS, "use_karras_sigmas": False, "prediction_type": "epsilon"},
            f"{class_name}.json")
        np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), np.asarray(ddim.alphas_cumprod))
        assert schedule.timesteps(10).tolist() == ddim.timesteps(10).tolist()
        err = capsys.readouterr().err.splitlines()
        assert err == [f"warning: {class_name}.json: {class_name} is not implemented; sampling with DDIM "
                       "instead, on the same betas (scaled_linear) and prediction type (epsilon)"]


# ---- rig-convert --overwrite ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Converts with the orbax writer replaced by a SIGKILL of the process: by then the tokenizer
# files of the new checkpoint are written (in place, they overwrote the old ones).
KILLED_CONVERT = """
import os, signal, sys
import rig_jax.weights.orbax_store as store
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
store.save_checkpoint = killed
from rig_jax.tools import convert
convert.main(sys.argv[1:])
"""


def _convert_config(source: str, target: str, overwrite: bool):
    from rig_jax.config import parse_config
    from rig_jax.tools import convert

    return parse_config(["to-orbax", source, target] + (["--overwrite"] if overwrite else []),
                        convert.build_parser())


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_convert_overwrite_killed_midway_keeps_the_old_folder_whole(tiny_sd, tmp_path, monkeypatch):
    """rig-convert --overwrite SIGKILLed midway (a real kill -9 of the converting process, after
    the new tokenizer files are written) leaves the old target byte for byte; a finished
    overwrite leaves exactly the new checkpoint, none of the old files. The target is checked
    before anything is read, and refused when non-empty without --overwrite. (Written in place,
    the killed run left the new tokenizer files in the old folder: a mixture.)"""
    import subprocess
    import sys

    from rig_jax.tools import convert
    from rig_jax.weights import diffusers_pipeline as dp
    from rig_jax.weights.orbax_store import METADATA_FILE, PARAMS_DIR, load_metadata

    target = str(tmp_path / "target")
    shutil.copytree(tiny_sd, target)          # an old folder in the way: the SD folder itself
    with open(os.path.join(target, "tokenizer", "tokenizer_config.json"), "a") as f:
        f.write("\n")                         # old != new tokenizer files
    before = _tree(target)

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = ["to-orbax", tiny_sd, target, "--overwrite"]
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERT, *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert _tree(target) == before            # the old folder, whole

    with pytest.raises(ConfigError, match=re.escape(f"target={target}: folder is not empty (pass")):
        convert.run(_convert_config(tiny_sd, target, False))
    # the target is checked before any work: a file in its place fails before the source is read
    monkeypatch.setattr(dp, "load_pipeline", lambda *a, **k: pytest.fail("source read before the check"))
    blocker = str(tmp_path / "a_file")
    open(blocker, "w").close()
    with pytest.raises(ConfigError, match=re.escape(f"target={blocker}: exists and is not a folder")):
        convert.run(_convert_config(tiny_sd, blocker, True))
    monkeypatch.undo()

    convert.run(_convert_config(tiny_sd, target, True))
    after = _tree(target)
    assert not set(after) & set(before) - {"tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json"}
    assert METADATA_FILE in after and any(n.startswith(PARAMS_DIR + os.sep) for n in after)
    assert after["tokenizer/tokenizer_config.json"] == _tree(tiny_sd)["tokenizer/tokenizer_config.json"]
    assert load_metadata(target)["kind"] == dp.CHECKPOINT_KIND and dp.is_pipeline_checkpoint(target)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".target")]   # no staging left behind


# A stage export swapped in with the process SIGKILLed at its second rename (moving the old
# export aside was the first): the folder must still hold the old export or the new one.
KILLED_SWAP = """
import os, signal, sys
from rig_jax import outputs
renames = []
def replace(a, b, real=os.replace):
    renames.append(a)
    if len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.replace = replace
outputs.swap_in_folder(sys.argv[1], sys.argv[2])
"""


def test_stage_export_swap_killed_leaves_old_or_new_folder(tmp_path):
    """outputs.swap_in_folder (the whole-folder replace of the stage exports and replace_folder)
    killed with -9 between its renames left no folder at the export path (old moved aside, new not yet in)."""
    import subprocess
    import sys

    folder, new = tmp_path / "export", tmp_path / "export.tmp"
    for path, text in ((folder, "old"), (new, "new")):
        path.mkdir()
        (path / "model_index.json").write_text(text)
    result = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(new), str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, -9), result.stderr
    assert (folder / "model_index.json").read_text() in ("old", "new")
    if result.returncode == 0:
        assert (folder / "model_index.json").read_text() == "new" and not new.exists()
