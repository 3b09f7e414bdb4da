"""rig-convert: Stable Diffusion pipelines between diffusers folders and rig_jax orbax checkpoints.

Variants: `to-orbax` (default), `to-diffusers`; the source and target are fields.
    rig-convert to-orbax SD_DIR CKPT --text-layer penultimate     # short form
    rig-convert --config=configs/convert.py:to-diffusers --config.source=CKPT --config.target=SD_DIR
"""
import ml_collections

from configs import common


def get_config(variant: str = "to-orbax") -> ml_collections.ConfigDict:
    c = common.base()
    c.command = variant           # to-orbax | to-diffusers
    c.source = ""
    c.target = ""
    c.text_layer = "last"         # to-orbax: the conditioning layer stored (penultimate = clip_skip=1)
    c.overwrite = False           # write into an existing, non-empty target
    if variant not in ("to-orbax", "to-diffusers"):
        raise ValueError(f"configs/convert.py: unknown variant {variant!r} "
                         "(expected to-orbax or to-diffusers)")
    return c
