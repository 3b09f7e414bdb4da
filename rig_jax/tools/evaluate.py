"""rig-eval: score images against their LAION-SG scene graphs (the LAION-SG protocol).

    rig-eval --records test.json --images DIR --judge shapes --out OUTDIR
    rig-eval --shapes-demo 64 --out OUTDIR      # writes ShapesSG records + renders, then scores them
    rig-eval --config=configs/eval.py:vlm --config.vlm.path=QWEN_DIR --config.records=test.json \\
        --config.images=DIR --config.out=OUTDIR

The config is configs/eval.py (the short flags set its fields); the VLM judge is loaded onto
the mesh of `config.mesh` with its logical axis rules.

Images are matched to records by the record's `name` (`DIR/<name>`). The judge extracts a
scene graph per image and a verdict per ground-truth triplet; OUTDIR receives
`metrics.json` (SG-/Entity-/Relation-IoU in both node forms, judge score, rating mean,
malformed count, record count, judge seconds per image), `per_record.csv`, `report.html`
and `grid.png`.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rig_jax.config import SugarParser, run_tool
from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError, DataError
from rig_jax.eval.base import Judge, JudgeResult

JUDGES = ("shapes", "vlm")
VLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def build_parser() -> SugarParser:
    p = SugarParser("rig-eval", __doc__.split("\n\n")[0], "configs/eval.py:shapes")
    p.add_argument("--records", dest="records", help="LAION-SG JSON file (a list of records, or JSON lines)")
    p.add_argument("--images", dest="images", help="folder of each record's image, named by its `name`")
    p.add_argument("--judge", dest="judge", choices=JUDGES,
                   help="shapes: the ShapesSG pixel detector; vlm: a VLM judge from --vlm-path")
    p.add_argument("--vlm-path", dest="vlm.path", help="local folder of the judge VLM (for --judge vlm)")
    p.add_argument("--vlm-max-new-tokens", dest="vlm.max_new_tokens", type=int,
                   help="longest VLM answer in tokens (for --judge vlm)")
    p.add_argument("--out", dest="out", help="output folder")
    p.add_argument("--limit", dest="limit", type=int, help="score only the first N records")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per judge call")
    p.add_argument("--report-rows", dest="report_rows", type=int, help="records shown in report.html")
    p.add_argument("--grid-size", dest="grid_size", type=int, help="images in grid.png")
    p.add_argument("--shapes-demo", dest="shapes_demo", type=int, metavar="N",
                   help="first write N ShapesSG scenes (records + PNG renders) under OUT/shapes, "
                        "then score them (replaces --records/--images)")
    p.add_argument("--seed", dest="seed", type=int, help="seed of --shapes-demo")
    p.add_argument("--image-size", dest="image_size", type=int, help="image size of --shapes-demo")
    return p


def load_records(path: str) -> tuple[list[dict[str, Any]], list[SceneGraph]]:
    """Valid records of a LAION-SG file (invalid ones are skipped and counted in the log)."""
    from rig_jax.data.laion_sg import load_laion_sg_json

    records, _ = load_laion_sg_json(path)
    return records, [SceneGraph.from_laion_record(r) for r in records]


def image_paths(image_dir: str, records: Sequence[dict[str, Any]]) -> list[str]:
    """`image_dir/<name>` per record; a missing folder or image is a one-line DataError."""
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: image folder not found")
    paths = [os.path.join(image_dir, r["name"]) for r in records]
    missing = [(p, r) for p, r in zip(paths, records, strict=True) if not os.path.isfile(p)]
    if missing:
        path, record = missing[0]
        more = f" ({len(missing) - 1} more images missing)" if len(missing) > 1 else ""
        raise DataError(f"{path}: image not found for record img_id {record['img_id']}{more}")
    return paths


def load_image(path: str) -> np.ndarray:
    """HxWx3 float32 in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.float32) / 255.0
    except OSError as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def build_judge(config: Any, image_dir: str, graphs: Sequence[SceneGraph], first_image: np.ndarray,
                mesh: Any, rules: Any) -> Judge:
    if config.judge == "shapes":
        from rig_jax.data import shapes
        from rig_jax.eval.shapes_judge import ShapesJudge

        # Colours the records name join the default palette; labels all "object" mean colour-only.
        named = {a for g in graphs for it in g.items for a in it.attributes if a in shapes.PALETTE}
        colours = tuple(c for c in shapes.PALETTE if c in named or c in shapes.ShapesConfig().colours)
        colour_only = all(it.label == shapes.COLOUR_ONLY_LABEL for g in graphs for it in g.items)
        size = int(first_image.shape[0])
        try:
            world = shapes.ShapesConfig(image_size=size, colours=colours, colour_only=colour_only)
        except ConfigError as e:
            raise DataError(f"{image_dir}: images of {size} px cannot be read by the shapes judge ({e})") \
                from None
        return ShapesJudge(world)
    return build_vlm_judge(config, mesh, rules)


def check_vlm_config(vlm: Any) -> None:
    """Cheap checks of the VLM judge's section, before any data is read."""
    if not vlm.path:
        raise ConfigError("--judge vlm needs --vlm-path DIR (vlm.path: a local folder with the judge VLM: "
                          "weights, config.json, tokenizer and preprocessor_config.json)")
    if not os.path.isdir(vlm.path):
        raise ConfigError(f"{vlm.path}: --vlm-path folder not found")
    if vlm.max_new_tokens < 1:
        raise ConfigError("--vlm-max-new-tokens (vlm.max_new_tokens) must be at least 1")
    if vlm.dtype not in VLM_DTYPES:
        raise ConfigError(f"vlm.dtype: {vlm.dtype!r} is not one of {', '.join(VLM_DTYPES)}")


def build_vlm_judge(config: Any, mesh: Any, rules: Any) -> Judge:
    """The VLM judge: greedy answers of the Flax VLM in `vlm.path` (attribute + label nodes),
    its params placed on `mesh` by `rules`."""
    import jax.numpy as jnp

    from rig_jax.eval import judge as vlm_judge

    vlm = config.vlm
    check_vlm_config(vlm)
    generate = vlm_judge.make_vlm_generate(
        vlm.path, max_new_tokens=vlm.max_new_tokens, dtype=getattr(jnp, VLM_DTYPES[vlm.dtype]),
        pad_to_multiple_of=vlm.pad_to_multiple_of, mesh=mesh, rules=rules)
    return vlm_judge.VLMJudge(generate, with_attributes=True, batch_size=config.batch_size)


def evaluate(config: Any) -> dict[str, Any]:
    """Runs the evaluation `config` asks for on the mesh of `config.mesh`; returns the metrics."""
    from rig_jax.parallel import mesh_context

    if config.judge not in JUDGES:
        raise ConfigError(f"judge: {config.judge!r} is not one of {', '.join(JUDGES)}")
    if not config.out:
        raise ConfigError("out: required (--out DIR or --config.out=DIR)")
    if config.batch_size < 1 or config.limit < 0:
        raise ConfigError("--batch-size must be at least 1 and --limit at least 0 (0: every record)")
    records_path, image_dir = config.records, config.images
    if config.shapes_demo:
        from rig_jax.data import shapes

        if config.shapes_demo < 1:
            raise ConfigError("--shapes-demo must be at least 1")
        world = shapes.ShapesConfig(image_size=config.image_size)
        records_path, image_dir = shapes.shapes_demo(os.path.join(config.out, "shapes"), config.shapes_demo,
                                                     config.seed, world)
    elif not records_path or not image_dir:
        raise ConfigError("rig-eval needs --records FILE and --images DIR (or --shapes-demo N)")
    if config.judge == "vlm":
        check_vlm_config(config.vlm)   # fail on a bad --vlm-path before reading any data
    with mesh_context(config) as (mesh, rules):
        return _evaluate(config, records_path, image_dir, mesh, rules)


def _evaluate(config: Any, records_path: str, image_dir: str, mesh: Any, rules: Any) -> dict[str, Any]:
    from tqdm import tqdm

    records, graphs = load_records(records_path)
    if config.limit:
        records, graphs = records[:config.limit], graphs[:config.limit]
    paths = image_paths(image_dir, records)

    judge: Judge | None = None
    results: list[JudgeResult] = []
    kept_images: list[np.ndarray] = []
    keep = max(config.report_rows, config.grid_size)
    judge_seconds = 0.0
    first_shape: tuple[int, ...] | None = None
    with tqdm(total=len(paths), desc=f"judging ({config.judge})", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(paths), config.batch_size):
            batch_paths = paths[start:start + config.batch_size]
            batch = [load_image(p) for p in batch_paths]
            first_shape = first_shape or batch[0].shape
            for path, image in zip(batch_paths, batch, strict=True):
                if image.shape != first_shape:
                    raise DataError(f"{path}: image is {image.shape[0]}x{image.shape[1]}, the first "
                                    f"is {first_shape[0]}x{first_shape[1]}")
            if judge is None:
                judge = build_judge(config, image_dir, graphs, batch[0], mesh, rules)
            t0 = time.perf_counter()
            results += judge.judge(batch, graphs[start:start + len(batch)])
            judge_seconds += time.perf_counter() - t0
            kept_images += batch[:max(0, keep - len(kept_images))]
            bar.update(len(batch))

    from rig_jax.eval.report import write_evaluation

    metrics = write_evaluation(config.out, records, graphs, results, kept_images, judge_name=config.judge,
                               judge_seconds=judge_seconds, report_rows=config.report_rows,
                               grid_size=config.grid_size,
                               title=f"rig-eval: {os.path.basename(records_path)} ({config.judge} judge)",
                               extra={"records_file": os.path.abspath(records_path),
                                      "image_dir": os.path.abspath(image_dir)})
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-eval`): bad input exits 2 with one line on stderr."""
    run_tool(evaluate, argv, build_parser())


if __name__ == "__main__":
    main()
