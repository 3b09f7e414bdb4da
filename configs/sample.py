"""rig-sample: prompts -> a PNG grid with a Stable Diffusion pipeline (the Diffuser D).

Variants: `default` (the sampler of configs/common.py: 50 DDIM steps, CFG 7.5), `draft`
(20 steps, for a quick look).
    rig-sample --config=configs/sample.py:draft --config.model=SD_DIR --config.prompts="('a cat',)"
    rig-sample --model SD_DIR --prompt "a red cube left of a blue ball" --steps 30   # short flags
"""
import ml_collections

from configs import common


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    c = common.base()
    c.model = ""                  # diffusers SD folder or rig-convert orbax checkpoint (required)
    c.prompts = ()                # prompts (--prompt, repeatable)
    c.prompts_file = ""           # text file, one prompt per line, blank lines skipped (--prompts)
    c.out = "samples.png"         # the PNG grid
    c.batch = 4                   # images per device call; the last batch is padded
    c.height = 0                  # pixels; 0: the U-Net's sample size
    c.width = 0
    c.init_latents = ""           # .npy (N, h, w, C) starting latents instead of noise
    c.save_latents = ""           # write the starting latents here
    c.ncols = 8                   # images per grid row
    c.scale = 1                   # integer upscaling of each tile
    c.dtype = "fp32"              # compute dtype: fp32 | bf16
    c.text_layer = ""             # last | penultimate; empty: the checkpoint's, else last
    c.sampler = common.sampler()
    if variant == "draft":
        c.sampler.num_steps = 20
    elif variant != "default":
        raise ValueError(f"configs/sample.py: unknown variant {variant!r} (expected default or draft)")
    return c
