"""rig-sample: text-to-image with a Stable Diffusion pipeline (the Diffuser D), as a PNG grid.

    rig-sample --model DIR --prompt "a red cube left of a blue ball" --out grid.png
    rig-sample --model CKPT --prompts prompts.txt --seed 3 --steps 50 --guidance 7.5 --batch 8 \\
        --save-latents noise.npy --out grid.png
    rig-sample --model DIR --prompts prompts.txt --init-latents noise.npy --out again.png
    rig-sample --config=configs/sample.py:draft --config.model=DIR --config.sampler.guidance_rescale=0.7

The config is configs/sample.py (the short flags set its fields). `model` is a diffusers
folder or a `rig-convert to-orbax` checkpoint, loaded onto the mesh of `config.mesh`. The
starting noise of prompt i is drawn per batch from `seed`; `save_latents` writes it
(N, h, w, C) and `init_latents` uses such a file instead, which reproduces the images exactly
(with the same batch, sampler settings and seed when eta > 0). Every batch has `batch` rows
(the last is padded), so one compiled program serves them all.

`--out` and `--save-latents` are checked before the model is loaded, and written whole
(temporary sibling, then rename). Each batch's stages (starting noise, text encoder, U-Net,
VAE decoder) are reduced to one finite flag each on the device: NaN weights or noise are an
error naming the first stage at fault, never a black PNG.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rig_jax.config import SugarParser, run_tool
from rig_jax.diffusion.settings import SamplerSettings
from rig_jax.errors import ConfigError, DataError
from rig_jax.outputs import check_output_file, replace_file
from rig_jax.weights.diffusers_pipeline import TEXT_LAYERS

DTYPES = ("fp32", "bf16")


def build_parser() -> SugarParser:
    p = SugarParser("rig-sample", __doc__.splitlines()[0], "configs/sample.py:default")
    p.add_argument("--model", dest="model", help="diffusers SD folder or rig-convert orbax checkpoint")
    p.add_argument("--prompt", dest="prompts", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", dest="prompts_file", help="text file, one prompt per line")
    p.add_argument("--seed", dest="seed", type=int)
    p.add_argument("--steps", dest="sampler.num_steps", type=int, help="DDIM steps")
    p.add_argument("--guidance", dest="sampler.guidance_scale", type=float, help="CFG scale")
    p.add_argument("--eta", dest="sampler.eta", type=float, help="DDIM eta (0: deterministic)")
    p.add_argument("--batch", dest="batch", type=int, help="images per device call")
    p.add_argument("--height", dest="height", type=int, help="pixels (default: the U-Net's sample size)")
    p.add_argument("--width", dest="width", type=int, help="pixels (default: the U-Net's sample size)")
    p.add_argument("--init-latents", dest="init_latents", help=".npy of (N, h, w, C) starting latents")
    p.add_argument("--save-latents", dest="save_latents", help="write the starting latents to this .npy")
    p.add_argument("--out", dest="out", help="PNG grid to write")
    p.add_argument("--ncols", dest="ncols", type=int, help="images per grid row")
    p.add_argument("--scale", dest="scale", type=int, help="integer upscaling of each grid tile")
    p.add_argument("--dtype", dest="dtype", choices=DTYPES, help="compute dtype")
    p.add_argument("--text-layer", dest="text_layer", choices=TEXT_LAYERS,
                   help="text-encoder layer (default: the checkpoint's, else last)")
    return p


def read_prompts(config: Any) -> list[str]:
    prompts = list(config.prompts)
    if config.prompts_file:
        if not os.path.isfile(config.prompts_file):
            raise DataError(f"{config.prompts_file}: prompts file not found")
        with open(config.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or --prompts FILE")
    return prompts


def read_init_latents(path: str, num_prompts: int, channels: int | None = None) -> np.ndarray:
    """The (N, h, w, C) float32 latents of a .npy file; N must equal the number of prompts, C
    `channels` when given, and every value must be finite (NaN noise gives a black image)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: latents file not found")
    try:
        latents = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a .npy array ({str(e).splitlines()[0]})") from None
    wrong_channels = channels is not None and latents.shape[-1:] != (channels,)
    if latents.ndim != 4 or latents.shape[0] != num_prompts or wrong_channels:
        raise DataError(f"{path}: latents have shape {latents.shape}; expected "
                        f"({num_prompts}, h, w, {channels or 'C'}) for {num_prompts} prompts")
    if not np.issubdtype(latents.dtype, np.floating):
        raise DataError(f"{path}: latents have dtype {latents.dtype}; expected floating point")
    latents = latents.astype(np.float32)
    bad = int(latents.size - np.isfinite(latents).sum())
    if bad:
        raise DataError(f"{path}: {bad} of the latents are NaN or Inf (starting noise must be finite)")
    return latents


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    """Repeats the last row until there are `size` rows (a fixed batch shape compiles once)."""
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def run(config: Any) -> None:
    """Samples the prompts of `config` onto a PNG grid, on the mesh of `config.mesh`."""
    for name in ("batch", "ncols", "scale"):
        if config[name] < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {config[name]}")
    for name in ("height", "width"):
        if config[name] < 0:
            raise ConfigError(f"{name}: must be positive (or 0: the U-Net's sample size), got {config[name]}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if config.text_layer and config.text_layer not in TEXT_LAYERS:
        raise ConfigError(f"text_layer: {config.text_layer!r} is not one of {', '.join(TEXT_LAYERS)}")
    if not config.model:
        raise ConfigError("model: required (--model DIR or --config.model=DIR)")
    # Checked before the model is loaded, so a bad path never throws the sampled images away.
    check_output_file(config.out, "--out")
    if config.save_latents:
        check_output_file(config.save_latents, "--save-latents")
    settings = SamplerSettings.from_config(config.sampler)
    prompts = read_prompts(config)
    if config.init_latents:   # read (and checked finite) before the model loads; channels after
        read_init_latents(config.init_latents, len(prompts))

    from rig_jax.parallel import mesh_context

    with mesh_context(config) as (mesh, rules):
        _sample(config, settings, prompts, mesh, rules)


def _sample(config: Any, settings: SamplerSettings, prompts: list[str], mesh: Any, rules: Any) -> None:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from rig_jax.eval.report import save_png_grid
    from rig_jax.rig.diffuser import NonFiniteError, generate, latent_shape
    from rig_jax.weights.diffusers_pipeline import load_any_pipeline

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[config.dtype]
    pipe, params = load_any_pipeline(config.model, dtype=dtype, text_layer=config.text_layer or None,
                                     mesh=mesh, rules=rules)
    height, width = config.height or None, config.width or None
    if config.init_latents:
        init = read_init_latents(config.init_latents, len(prompts), pipe.latent_channels)
    else:
        latent_shape(pipe, 1, height, width)   # checks the size before any work
        init = None

    key = jax.random.key(config.seed)
    images, starts = [], []
    batch = config.batch
    for first in tqdm(range(0, len(prompts), batch), desc="rig-sample", unit="batch"):
        real = len(prompts[first:first + batch])
        batch_prompts = prompts[first:first + batch]
        batch_prompts += [batch_prompts[-1]] * (batch - real)
        noise_key, step_key = jax.random.split(jax.random.fold_in(key, first // batch))
        if init is None:
            shape = latent_shape(pipe, batch, height, width)
            latents = np.asarray(jax.random.normal(noise_key, shape, jnp.float32))
        else:
            latents = _pad(init[first:first + real], batch)
        try:
            out = generate(pipe, params, batch_prompts, settings, rng=step_key if settings.eta > 0 else None,
                           init_latents=latents, check_finite=True)
        except NonFiniteError as e:
            raise NonFiniteError(f"rig-sample: prompts {first + 1}-{first + real} of {len(prompts)} "
                                 f"({config.model}, dtype {config.dtype}): {str(e).split(': ', 1)[1]}") \
                from None
        images.extend(np.asarray(out[:real]))
        starts.append(latents[:real])

    save_png_grid(config.out, images, ncols=config.ncols, scale=config.scale)
    if config.save_latents:
        with replace_file(config.save_latents, "wb") as f:
            np.save(f, np.concatenate(starts))
    print(f"wrote {config.out} ({len(images)} images, {images[0].shape[1]}x{images[0].shape[0]})")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-sample`): bad input exits 2 with one line on stderr."""
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
