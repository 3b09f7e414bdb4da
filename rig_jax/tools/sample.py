"""rig-sample: text-to-image with a Stable Diffusion pipeline (the Diffuser D), as a PNG grid.

    rig-sample --model DIR --prompt "a red cube left of a blue ball" --out grid.png
    rig-sample --model CKPT --prompts prompts.txt --seed 3 --steps 50 --guidance 7.5 --batch 8 \\
        --save-latents noise.npy --out grid.png
    rig-sample --model DIR --prompts prompts.txt --init-latents noise.npy --out again.png

`--model` is a diffusers folder or a `rig-convert to-orbax` checkpoint. The starting noise
of prompt i is drawn per batch from `--seed`; `--save-latents` writes it (N, h, w, C) and
`--init-latents` uses such a file instead, which reproduces the images exactly (with the
same `--batch`, `--steps`, `--guidance`, `--eta` and `--seed` when eta > 0). Every batch
has `--batch` rows (the last is padded), so one compiled program serves them all.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from rig_jax.cli import run_cli
from rig_jax.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rig-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers SD folder or rig-convert orbax checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--batch", type=int, default=4, help="images per device call")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the U-Net's sample size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the U-Net's sample size)")
    p.add_argument("--init-latents", help=".npy of (N, h, w, C) starting latents, used instead of noise")
    p.add_argument("--save-latents", help="write the starting latents (N, h, w, C) to this .npy")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--ncols", type=int, default=8, help="images per grid row")
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of each grid tile")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    p.add_argument("--text-layer", choices=("last", "penultimate"), default=None,
                   help="text-encoder layer (default: the checkpoint's, else last)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise DataError(f"{args.prompts}: prompts file not found")
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or --prompts FILE")
    return prompts


def read_init_latents(path: str, num_prompts: int, channels: int) -> np.ndarray:
    """The (N, h, w, C) float32 latents of a .npy file; N must equal the number of prompts."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: latents file not found")
    try:
        latents = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a .npy array ({str(e).splitlines()[0]})") from None
    if latents.ndim != 4 or latents.shape[0] != num_prompts or latents.shape[-1] != channels:
        raise DataError(f"{path}: latents have shape {latents.shape}; expected "
                        f"({num_prompts}, h, w, {channels}) for {num_prompts} prompts")
    if not np.issubdtype(latents.dtype, np.floating):
        raise DataError(f"{path}: latents have dtype {latents.dtype}; expected floating point")
    return latents.astype(np.float32)


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    """Repeats the last row until there are `size` rows (a fixed batch shape compiles once)."""
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def _main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "ncols", "scale"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be a positive integer, got {getattr(args, name)}")
    if args.eta < 0:
        raise ConfigError(f"--eta: must be >= 0, got {args.eta}")
    prompts = read_prompts(args)

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from rig_jax.eval.report import save_png_grid
    from rig_jax.rig.diffuser import generate, latent_shape
    from rig_jax.weights.diffusers_pipeline import load_any_pipeline

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    pipe, params = load_any_pipeline(args.model, dtype=dtype, text_layer=args.text_layer)
    params = jax.device_put(params)
    if args.init_latents:
        init = read_init_latents(args.init_latents, len(prompts), pipe.latent_channels)
    else:
        latent_shape(pipe, 1, args.height, args.width)   # checks the size before any work
        init = None

    key = jax.random.key(args.seed)
    images, starts = [], []
    batch = args.batch
    for first in tqdm(range(0, len(prompts), batch), desc="rig-sample", unit="batch"):
        real = len(prompts[first:first + batch])
        batch_prompts = prompts[first:first + batch]
        batch_prompts += [batch_prompts[-1]] * (batch - real)
        noise_key, step_key = jax.random.split(jax.random.fold_in(key, first // batch))
        if init is None:
            shape = latent_shape(pipe, batch, args.height, args.width)
            latents = np.asarray(jax.random.normal(noise_key, shape, jnp.float32))
        else:
            latents = _pad(init[first:first + real], batch)
        out = generate(pipe, params, batch_prompts, rng=step_key if args.eta > 0 else None,
                       init_latents=latents, num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta)
        images.extend(np.asarray(out[:real]))
        starts.append(latents[:real])

    save_png_grid(args.out, images, ncols=args.ncols, scale=args.scale)
    if args.save_latents:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_latents)), exist_ok=True)
        np.save(args.save_latents, np.concatenate(starts))
    print(f"wrote {args.out} ({len(images)} images, {images[0].shape[1]}x{images[0].shape[0]})")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-sample`): bad input exits 2 with one line on stderr."""
    run_cli(_main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
