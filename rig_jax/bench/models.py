"""The weights and inputs both sides of a bench read: random PyTorch reference models saved
once with `save_pretrained` (rig_jax reads the folders with its own loaders), and one numpy
draw of inputs per bench and batch (NHWC here; the torch side transposes outside timing).

Folders are named by a hash of their config and seed under the cache folder, so a second run
reuses them; each is written aside and swapped in whole (`replace_folder`)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from typing import Any

import numpy as np

from rig_jax.errors import RigError

# diffusers' SD-1.x scheduler_config.json (DDIM with the SD betas); both sides build theirs from it
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
# the special ids of the saved Qwen2.5-VL folders: the last four of the vocabulary
SPECIAL_FROM_END = {"image_token_id": 4, "video_token_id": 3, "vision_start_token_id": 2,
                    "vision_end_token_id": 1}


def require(*modules: str, why: str) -> None:
    """A one-line RigError naming the missing PyTorch-side packages."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RigError(f"{why}: {' and '.join(missing)} not installed; the PyTorch side needs the "
                       "test extras (pip install -e '.[test]')")


def cache_root(cache_dir: str) -> str:
    root = cache_dir or os.path.join(tempfile.gettempdir(), "rig_jax_benchmark")
    os.makedirs(root, exist_ok=True)
    return root


def folder_for(root: str, kind: str, described: Any, seed: int) -> str:
    text = json.dumps(described, sort_keys=True, default=list)
    return os.path.join(root, f"{kind}_{hashlib.sha1(f'{text}{seed}'.encode()).hexdigest()[:12]}")


def _save(folder: str, model: Any) -> None:
    """`model.save_pretrained` into a sibling, swapped in whole (a concurrent run that saved the
    same folder first wins; both wrote the same seeded weights)."""
    from rig_jax.outputs import replace_folder
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    with replace_folder(folder) as tmp:
        model.save_pretrained(tmp)


def _perturb(model: Any, seed: int, scale: float) -> Any:
    """Every weight nudged off its init (zero biases, unit norms would let a side skip work)."""
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def unet_folder(root: str, diffusers_config: dict[str, Any], seed: int) -> str:
    """A random diffusers `UNet2DConditionModel` of this config, saved once."""
    folder = folder_for(root, "unet", diffusers_config, seed)
    if not os.path.exists(os.path.join(folder, "config.json")):
        require("torch", "diffusers", why="saving the benchmark U-Net")
        import diffusers
        import torch
        torch.manual_seed(seed)
        _save(folder, _perturb(diffusers.UNet2DConditionModel.from_config(diffusers_config), seed, 0.02))
    return folder


def qwen_config_dict(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """transformers' Qwen2_5_VLConfig kwargs for a decoder shape (configs/benchmark.py)."""
    vocab = text["vocab_size"]
    mrope = list(text.get("mrope_section", (16, 24, 24)))
    text_config = dict(vocab_size=vocab, hidden_size=text["hidden_size"],
                       intermediate_size=text["intermediate_size"],
                       num_hidden_layers=text["num_hidden_layers"],
                       num_attention_heads=text["num_attention_heads"],
                       num_key_value_heads=text["num_key_value_heads"], max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": mrope},
                       initializer_range=0.05, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return dict(text_config=text_config,
                vision_config=dict(vision, out_hidden_size=text["hidden_size"],
                                   fullatt_block_indexes=list(vision["fullatt_block_indexes"])),
                tie_word_embeddings=bool(text["tie_word_embeddings"]),
                **{k: vocab - back for k, back in SPECIAL_FROM_END.items()})


def qwen_folder(root: str, config_kwargs: dict[str, Any], seed: int) -> str:
    """A random transformers `Qwen2_5_VLForConditionalGeneration`, saved once."""
    folder = folder_for(root, "qwen", config_kwargs, seed)
    if not os.path.exists(os.path.join(folder, "config.json")):
        require("torch", "transformers", why="saving the benchmark Qwen2.5-VL")
        import torch
        import transformers
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_kwargs)).eval()
        _save(folder, _perturb(model, seed, 0.02))
    return folder


def alphas_cumprod() -> np.ndarray:
    s = SD_SCHEDULER
    betas = np.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                        dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def leading_timesteps(steps: int) -> np.ndarray:
    """DDIMScheduler's `leading` spacing with steps_offset 1 (t, descending)."""
    ratio = SD_SCHEDULER["num_train_timesteps"] // steps
    return (np.arange(steps)[::-1] * ratio + SD_SCHEDULER["steps_offset"]).astype(np.int64)


def make_inputs(path: str, bench: str, batch: int, spec: dict[str, Any], seed: int) -> str:
    """One numpy draw for `bench` at `batch`, written to `path` (.npz) unless it exists."""
    if os.path.exists(path):
        return path
    r = np.random.default_rng([seed, batch, len(bench)])
    f32 = lambda *shape, scale=1.0: (scale * r.standard_normal(shape)).astype(np.float32)
    arrays: dict[str, np.ndarray] = {}
    if bench in ("sampler", "inversion", "editor-step", "train-step"):
        size, ch, ctx_len, ctx_dim = spec["latent_size"], spec["in_channels"], spec["context_length"], \
            spec["cross_attention_dim"]
        rows = batch
        arrays.update(cond=f32(rows, ctx_len, ctx_dim), uncond=f32(1, ctx_len, ctx_dim))
        if bench == "sampler":
            arrays["latents"] = f32(rows, size, size, ch)
        elif bench == "inversion":
            arrays["clean"] = f32(rows, size, size, ch, scale=0.5)
        elif bench == "train-step":
            t = r.integers(0, SD_SCHEDULER["num_train_timesteps"], (rows,))
            arrays.update(clean=f32(rows, size, size, ch, scale=0.5), noise=f32(rows, size, size, ch),
                          t=t.astype(np.int64), alpha_bar=alphas_cumprod()[t].astype(np.float32))
        else:  # editor-step: K trained steps per row, never the schedule's last
            k, schedule = spec["trained_steps"], leading_timesteps(spec["steps"])
            picks = np.stack([np.sort(r.permutation(len(schedule) - 1)[:k]) for _ in range(rows)])
            t = schedule[picks]
            ratio = SD_SCHEDULER["num_train_timesteps"] // spec["steps"]
            arrays.update(latents=f32(rows, k, size, size, ch), next_latents=f32(rows, k, size, size, ch),
                          ref_mean=f32(rows, k, size, size, ch), t=t.astype(np.int64),
                          prev_t=(t - ratio).astype(np.int64),
                          old_logp=(-3.0 + 0.5 * r.standard_normal((rows, k))).astype(np.float32),
                          advantages=r.standard_normal(rows).astype(np.float32))
    elif bench in ("decode", "actor-step"):
        vocab, prompt, new = spec["vocab_size"], spec["prompt_len"], spec["new_tokens"]
        arrays["ids"] = r.integers(1, vocab - 8, (batch, prompt)).astype(np.int64)
        if bench == "actor-step":
            lengths = r.integers(max(1, new // 2), new + 1, (batch,))
            mask = (np.arange(new)[None, :] < lengths[:, None]).astype(np.float32)
            base = -np.log(vocab)
            arrays.update(completions=r.integers(1, vocab - 8, (batch, new)).astype(np.int64), mask=mask,
                          old_logp=(base + 0.1 * r.standard_normal((batch, new))).astype(np.float32),
                          ref_logp=(base + 0.1 * r.standard_normal((batch, new))).astype(np.float32),
                          advantages=r.standard_normal(batch).astype(np.float32))
    from rig_jax.outputs import replace_file
    with replace_file(path, "wb") as f:
        np.savez(f, **arrays)
    return path
