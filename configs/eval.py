"""rig-eval: score images against their LAION-SG scene graphs.

Variants: `shapes` (default: the ShapesSG pixel detector), `vlm` (a VLM judge; set `vlm.path`).
    rig-eval --config=configs/eval.py:vlm --config.vlm.path=QWEN_DIR --config.records=test.json \\
        --config.images=DIR --config.out=OUT
    rig-eval --records test.json --images DIR --judge vlm --vlm-path QWEN_DIR --out OUT   # short flags
"""
import ml_collections

from configs import common


def get_config(variant: str = "shapes") -> ml_collections.ConfigDict:
    c = common.base()
    c.records = ""                # LAION-SG JSON file (a list of records, or JSON lines)
    c.images = ""                 # folder of each record's image, named by the record's `name`
    c.judge = "shapes"            # shapes | vlm
    c.out = ""                    # output folder (required)
    c.overwrite = False           # replace a non-empty `out` folder (whole, once the evaluation is done)
    c.limit = 0                   # score only the first N records; 0: all
    c.batch_size = 32             # images per judge call
    c.report_rows = 200           # records shown in report.html
    c.grid_size = 64              # images in grid.png
    c.shapes_demo = 0             # N > 0: first write N ShapesSG scenes under OUT/shapes, score those
    c.image_size = 32             # image size of shapes_demo
    c.vlm = common.vlm()
    if variant == "vlm":
        c.judge = "vlm"
    elif variant != "shapes":
        raise ValueError(f"configs/eval.py: unknown variant {variant!r} (expected shapes or vlm)")
    return c
