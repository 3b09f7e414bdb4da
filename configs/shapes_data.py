"""The ShapesSG data path (rig_jax.tools.shapes_data): scenes written as a LAION-SG build,
read back with grain and judged by the pixel detector.

Variants: `demo` (default), `tiny` (seconds, for tests and smoke runs).
    python -m rig_jax.tools.shapes_data --config=configs/shapes_data.py:demo --config.world.image_size=64
"""
import ml_collections

from configs import common

VARIANTS = ("demo", "tiny")
JUDGES = ("shapes",)     # rig_jax.tools.shapes_data scores with the pixel detector only


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    c = common.base()
    c.variant = variant
    c.out_dir = "runs/shapes_data"

    c.world = ml_collections.ConfigDict()
    c.world.image_size = 32
    c.world.min_objects = 2
    c.world.max_objects = 3
    c.world.colour_only = "auto"    # auto (colour-only at <= 16 px) | on | off

    c.data = ml_collections.ConfigDict()
    c.data.num_records = {"demo": 256, "tiny": 16}.get(variant, 256)
    c.data.batch_size = {"demo": 32, "tiny": 8}.get(variant, 32)
    c.data.noise_sigma = 0.05      # Gaussian pixel noise added to the renders the judge reads

    c.eval = ml_collections.ConfigDict()
    c.eval.judge = "shapes"         # the pixel detector; the VLM judge runs through rig-eval
    c.eval.grid_size = 64           # images in the PNG grid

    if variant not in VARIANTS:
        raise ValueError(f"configs/shapes_data.py: unknown variant {variant!r} (expected demo or tiny)")
    return c


def check_config(c: ml_collections.ConfigDict) -> None:
    """`eval.judge` names the judge in metrics.json; only the pixel detector runs here."""
    if c.eval.judge not in JUDGES:
        raise ValueError(f"eval.judge: {c.eval.judge!r} is not run by shapes_data (only {', '.join(JUDGES)}, "
                         "the pixel detector); score with a VLM through rig-eval --judge vlm")
