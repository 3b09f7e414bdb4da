"""The whole Stable Diffusion pipeline against diffusers' StableDiffusionPipeline on a tiny
random model: prompt embeddings, guided DDIM generation, diffusers -> rig_jax -> diffusers
round trips, the orbax form, the image editor, and one-line errors for broken folders."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rig_jax.diffusion import edit_latents
from rig_jax.errors import ConfigError, RigError, WeightsError
from rig_jax.rig import diffuser
from rig_jax.rig.editor import edit, edit_condition_text
from rig_jax.weights.diffusers_pipeline import (
    load_any_pipeline,
    load_pipeline,
    load_pipeline_checkpoint,
    save_pipeline,
    save_pipeline_checkpoint,
)
from rig_jax.weights.mapping import flatten
from rig_jax.weights.orbax_store import load_metadata, save_checkpoint
from tests.diffusion_helpers import edit_settings, sampler_settings
from tests.sd_fixtures import SCHEDULER_KWARGS, shared_tiny_sd_folder, single_threaded_torch

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4
PROMPTS = ["a red cube left of a blue ball", "two cats on a sofa"]
LONG_PROMPT = "a very long prompt that the tokenizer has to cut " * 3   # > 77 character tokens
TEN_STEPS = sampler_settings(num_steps=10, guidance_scale=7.5)


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with single_threaded_torch():
        yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return shared_tiny_sd_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(tiny_sd):
    return load_pipeline(tiny_sd[0])


@pytest.fixture(scope="module")
def start_latents():
    return np.random.default_rng(0).standard_normal((len(PROMPTS), 8, 8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def test_images():
    rng = np.random.default_rng(1)
    smooth = rng.uniform(0.2, 0.8, size=(2, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(smooth, 4, axis=1), 4, axis=2)   # (2, 16, 16, 3) in [0, 1]


def reference_generate(ref, prompts, latents_nhwc, output_type, steps=10, guidance=7.5):
    with torch.no_grad():
        out = ref(prompts, latents=torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy()),
                  num_inference_steps=steps, guidance_scale=guidance, output_type=output_type).images
    out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return out.transpose(0, 2, 3, 1) if output_type == "latent" else out


def test_loads_every_component(tiny_sd, loaded):
    pipe, params = loaded
    _, ref = tiny_sd
    assert set(params) == {"unet", "vae", "text_encoder"}
    assert pipe.text_layer == "last" and pipe.max_length == 77
    assert pipe.default_size == (16, 16) and pipe.vae_scale_factor == 2 and pipe.latent_channels == 4
    np.testing.assert_allclose(np.asarray(pipe.schedule.alphas_cumprod), ref.scheduler.alphas_cumprod.numpy(),
                               rtol=1e-5)
    assert pipe.schedule.steps_offset == SCHEDULER_KWARGS["steps_offset"]
    assert pipe.configs["model_index"]["unet"] == ["diffusers", "UNet2DConditionModel"]
    ref_count = sum(p.numel() for m in (ref.unet, ref.vae, ref.text_encoder) for p in m.parameters())
    assert sum(x.size for x in jax.tree.leaves(params)) == ref_count


def test_prompt_embeddings_match_diffusers(tiny_sd, loaded):
    pipe, params = loaded
    _, ref = tiny_sd
    prompts = [*PROMPTS, LONG_PROMPT]
    ours = np.asarray(diffuser.encode_prompts(pipe, params, prompts))
    uncond = np.asarray(diffuser.encode_prompts(pipe, params, [""] * len(prompts)))
    with torch.no_grad():
        cond_ref, uncond_ref = ref.encode_prompt(prompts, "cpu", 1, True)
    assert ours.shape == (3, 77, 32)
    assert rel_err(ours, cond_ref.numpy()) <= 1e-5
    assert rel_err(uncond, uncond_ref.numpy()) <= 1e-5
    assert np.abs(ours[0] - ours[1]).max() > 1e-3   # different prompts, different embeddings


def test_penultimate_layer_matches_clip_skip(tiny_sd):
    folder, ref = tiny_sd
    pipe, params = load_pipeline(folder, text_layer="penultimate")
    ours = np.asarray(diffuser.encode_prompts(pipe, params, PROMPTS))
    # diffusers' clip_skip=1 path reaches for `text_encoder.text_model`, which transformers >= 5.6
    # no longer has; its rule (hidden_states[-2] through the final layer norm) is applied here.
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states
        cond_ref = ref.text_encoder.final_layer_norm(hidden[-2])
        last_ref, _ = ref.encode_prompt(PROMPTS, "cpu", 1, True)
    assert rel_err(ours, cond_ref.numpy()) <= 1e-5
    assert np.abs(cond_ref.numpy() - last_ref.numpy()).max() > 1e-3


def test_guided_generation_matches_diffusers(tiny_sd, loaded, start_latents):
    pipe, params = loaded
    _, ref = tiny_sd
    images, latents = diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, init_latents=start_latents,
                                        return_latents=True)
    ref_latents = reference_generate(ref, PROMPTS, start_latents, "latent")
    ref_images = reference_generate(ref, PROMPTS, start_latents, "np")
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.float32
    assert rel_err(latents, ref_latents) <= TOLERANCE
    assert rel_err(images, ref_images) <= TOLERANCE
    # decode_latents is the same decoder the pipeline ends with
    np.testing.assert_allclose(np.asarray(diffuser.decode_latents(pipe, params, latents)), np.asarray(images),
                               atol=1e-6)


def test_generation_from_rng_is_deterministic(loaded):
    pipe, params = loaded
    first = diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, rng=jax.random.key(7))
    again = diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, rng=jax.random.key(7))
    other = diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, rng=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_generation_input_errors(loaded, start_latents):
    pipe, params = loaded
    with pytest.raises(RigError, match="rng"):
        diffuser.generate(pipe, params, PROMPTS, TEN_STEPS)
    with pytest.raises(RigError, match="init_latents"):
        diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, init_latents=start_latents[:1])
    with pytest.raises(RigError, match="eta > 0"):
        diffuser.generate(pipe, params, PROMPTS, sampler_settings(num_steps=10, eta=1.0),
                          init_latents=start_latents)
    with pytest.raises(ConfigError, match="height"):
        diffuser.generate(pipe, params, PROMPTS, TEN_STEPS, rng=jax.random.key(0), height=15)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pipeline_round_trip_through_diffusers(tiny_sd, loaded, start_latents, tmp_path):
    _, ref = tiny_sd
    pipe, params = loaded
    out = str(tmp_path / "exported")
    save_pipeline(out, pipe, params)
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
    reloaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        _same_state(getattr(ref, name), getattr(reloaded, name))
    settings = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}
    assert settings(reloaded.scheduler.config) == settings(ref.scheduler.config)
    assert reloaded.tokenizer(PROMPTS).input_ids == ref.tokenizer(PROMPTS).input_ids
    np.testing.assert_array_equal(reference_generate(reloaded, PROMPTS, start_latents, "latent", steps=3),
                                  reference_generate(ref, PROMPTS, start_latents, "latent", steps=3))
    # and back into rig_jax: the same params, bit for bit
    _, params_again = load_pipeline(out)
    a, b = flatten(params), flatten(params_again)
    assert set(a) == set(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg="/".join(path))


def test_pipeline_checkpoint_round_trip(loaded, tmp_path):
    pipe, params = loaded
    ckpt = str(tmp_path / "ckpt")
    save_pipeline_checkpoint(ckpt, pipe, params)
    again, params_again = load_any_pipeline(ckpt)
    assert again.configs == pipe.configs and again.tokenizer_files == pipe.tokenizer_files
    assert again.text_layer == pipe.text_layer
    a, b = flatten(params), flatten(params_again)
    assert set(a) == set(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg="/".join(path))
    # a tensor of the wrong shape is named by its param path, when saving and when loading
    broken = jax.tree.map(np.asarray, params)
    broken["unet"]["conv_in"]["bias"] = np.zeros((5,), np.float32)
    with pytest.raises(WeightsError, match=r"unet/conv_in/bias has shape \(5,\)"):
        save_pipeline_checkpoint(str(tmp_path / "refused"), pipe, broken)
    shutil.copytree(os.path.join(ckpt, "tokenizer"), str(tmp_path / "broken" / "tokenizer"))
    save_checkpoint(str(tmp_path / "broken"), broken, load_metadata(ckpt))
    with pytest.raises(WeightsError, match=r"unet/conv_in/bias has shape \(5,\)"):
        load_pipeline_checkpoint(str(tmp_path / "broken"))


def test_edit_at_strength_zero_is_the_vae_round_trip(loaded, test_images):
    pipe, params = loaded
    edited = edit(pipe, params, test_images, "make the cube green", PROMPTS,
                  edit_settings(strength=0.0, num_steps=4, guidance_scale=7.5))
    round_trip = diffuser.decode_latents(pipe, params, diffuser.encode_images(pipe, params, test_images))
    assert edited.shape == test_images.shape
    np.testing.assert_allclose(np.asarray(edited), np.asarray(round_trip), atol=1e-5)


def test_encode_images_samples_with_rng(loaded, test_images):
    pipe, params = loaded
    mean = diffuser.encode_images(pipe, params, test_images)
    drawn = diffuser.encode_images(pipe, params, test_images, rng=jax.random.key(0))
    drawn_again = diffuser.encode_images(pipe, params, test_images, rng=jax.random.key(0))
    assert mean.shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(drawn_again))
    assert np.abs(np.asarray(drawn) - np.asarray(mean)).max() > 1e-4


def test_stochastic_edit_is_the_latent_editor_with_text_and_vae(loaded, test_images):
    pipe, params = loaded
    kwargs = dict(settings=edit_settings(strength=0.5, num_steps=4, guidance_scale=5.0, eta=1.0))
    edit_prompts = ["make the cube green", "add a hat"]
    first = edit(pipe, params, test_images, edit_prompts, PROMPTS, rng=jax.random.key(0), **kwargs)
    again = edit(pipe, params, test_images, edit_prompts, PROMPTS, rng=jax.random.key(0), **kwargs)
    other = edit(pipe, params, test_images, edit_prompts, PROMPTS, rng=jax.random.key(1), **kwargs)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-4
    with pytest.raises(RigError, match="rng"):
        edit(pipe, params, test_images, edit_prompts, PROMPTS, **kwargs)

    # the same result composed by hand: VAE mean latents, P for inversion, P + ". " + e to denoise
    latents = diffuser.encode_images(pipe, params, test_images)
    prompt_cond = diffuser.encode_prompts(pipe, params, PROMPTS)
    edit_cond = diffuser.encode_prompts(pipe, params, [edit_condition_text(p, e)
                                                       for p, e in zip(PROMPTS, edit_prompts, strict=True)])
    uncond = diffuser.encode_prompts(pipe, params, [""])
    by_hand = jax.jit(functools.partial(edit_latents, diffuser.unet_denoiser(pipe), **kwargs))(
        params["unet"], latents, prompt_cond, edit_cond, uncond, schedule=pipe.schedule,
        rng=jax.random.key(0))
    expected = diffuser.decode_latents(pipe, params, by_hand)
    np.testing.assert_allclose(np.asarray(first), np.asarray(expected), atol=1e-5)
    assert edit_condition_text("P", "e") == "P. e"


# ----------------------------------------------------------------------------- broken folders

@pytest.fixture
def folder_copy(tiny_sd, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(tiny_sd[0], out)
    return out


def _rewrite_index(folder, edit_fn):
    path = os.path.join(folder, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    edit_fn(index)
    with open(path, "w") as f:
        json.dump(index, f)


def test_missing_folder_and_model_index_are_named(tmp_path):
    with pytest.raises(WeightsError, match=r"nowhere: folder not found"):
        load_pipeline(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty/model_index.json: file not found"):
        load_pipeline(str(tmp_path / "empty"))


def test_missing_component_folder_and_file_are_named(folder_copy):
    os.remove(os.path.join(folder_copy, "unet", "config.json"))
    with pytest.raises(WeightsError, match=r"unet/config.json: file not found"):
        load_pipeline(folder_copy)
    shutil.rmtree(os.path.join(folder_copy, "tokenizer"))
    with pytest.raises(WeightsError, match=r"copy/tokenizer: folder not found"):
        load_pipeline(folder_copy)


def test_model_index_components_are_checked(folder_copy):
    _rewrite_index(folder_copy, lambda index: index.update(safety_checker=["stable_diffusion", "Checker"]))
    load_pipeline(folder_copy)   # a component we never run is ignored
    _rewrite_index(folder_copy, lambda index: index.update(text_encoder_2=["transformers", "CLIPTextModel"]))
    with pytest.raises(ConfigError, match=r"model_index.json: component text_encoder_2"):
        load_pipeline(folder_copy)
    _rewrite_index(folder_copy, lambda index: (index.pop("text_encoder_2"), index.pop("vae")))
    with pytest.raises(WeightsError, match=r"model_index.json: component vae is missing"):
        load_pipeline(folder_copy)


def test_wrong_shape_is_named(folder_copy):
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder_copy, "vae", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["decoder.conv_in.bias"] = np.zeros((3,), np.float32)
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"decoder.conv_in.bias has shape \(3,\)"):
        load_pipeline(folder_copy)
    with pytest.raises(ConfigError, match="text_layer"):
        load_pipeline(folder_copy, text_layer="middle")
