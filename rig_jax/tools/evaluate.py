"""rig-eval: score images against their LAION-SG scene graphs (the LAION-SG protocol).

    rig-eval --records test.json --images DIR --judge shapes --out OUTDIR
    rig-eval --shapes-demo 64 --out OUTDIR      # writes ShapesSG records + renders, then scores them

Images are matched to records by the record's `name` (`DIR/<name>`). The judge extracts a
scene graph per image and a verdict per ground-truth triplet; OUTDIR receives
`metrics.json` (SG-/Entity-/Relation-IoU in both node forms, judge score, rating mean,
malformed count, record count, judge seconds per image), `per_record.csv`, `report.html`
and `grid.png`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rig_jax.cli import run_cli
from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError, DataError
from rig_jax.eval.base import Judge, JudgeResult

JUDGES = ("shapes", "vlm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rig-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", help="LAION-SG JSON file (a list of records, or JSON lines)")
    p.add_argument("--images", help="folder holding each record's image, named by the record's `name`")
    p.add_argument("--judge", choices=JUDGES, default="shapes",
                   help="shapes: the ShapesSG pixel detector; vlm: a VLM judge from --vlm-path")
    p.add_argument("--vlm-path", help="local folder of the judge VLM (for --judge vlm)")
    p.add_argument("--vlm-max-new-tokens", type=int, default=384,
                   help="longest VLM answer in tokens (for --judge vlm)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=32, help="images per judge call")
    p.add_argument("--report-rows", type=int, default=200, help="records shown in report.html")
    p.add_argument("--grid-size", type=int, default=64, help="images in grid.png")
    p.add_argument("--shapes-demo", type=int, default=None, metavar="N",
                   help="first write N ShapesSG scenes (records + PNG renders) under OUT/shapes, "
                        "then score them (replaces --records/--images)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shapes-demo")
    p.add_argument("--image-size", type=int, default=32, help="image size of --shapes-demo")
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


def build_judge(args: argparse.Namespace, graphs: Sequence[SceneGraph], first_image: np.ndarray) -> Judge:
    if args.judge == "shapes":
        from rig_jax.data import shapes
        from rig_jax.eval.shapes_judge import ShapesJudge

        # Colours the records name join the default palette; labels all "object" mean colour-only.
        named = {a for g in graphs for it in g.items for a in it.attributes if a in shapes.PALETTE}
        colours = tuple(c for c in shapes.PALETTE if c in named or c in shapes.ShapesConfig().colours)
        colour_only = all(it.label == shapes.COLOUR_ONLY_LABEL for g in graphs for it in g.items)
        size = int(first_image.shape[0])
        try:
            config = shapes.ShapesConfig(image_size=size, colours=colours, colour_only=colour_only)
        except ConfigError as e:
            raise DataError(f"{args.images}: images of {size} px cannot be read by the shapes judge ({e})") \
                from None
        return ShapesJudge(config)
    return build_vlm_judge(args)


def check_vlm_args(args: argparse.Namespace) -> None:
    """Cheap checks of the VLM judge's arguments, before any data is read."""
    if not args.vlm_path:
        raise ConfigError("--judge vlm needs --vlm-path DIR (a local folder with the judge VLM: weights, "
                          "config.json, tokenizer and preprocessor_config.json)")
    if not os.path.isdir(args.vlm_path):
        raise ConfigError(f"{args.vlm_path}: --vlm-path folder not found")
    if args.vlm_max_new_tokens < 1:
        raise ConfigError("--vlm-max-new-tokens must be at least 1")


def build_vlm_judge(args: argparse.Namespace) -> Judge:
    """The VLM judge: greedy answers of the Flax VLM in `--vlm-path` (attribute + label nodes)."""
    from rig_jax.eval import judge as vlm_judge

    check_vlm_args(args)
    generate = vlm_judge.make_vlm_generate(args.vlm_path, max_new_tokens=args.vlm_max_new_tokens)
    return vlm_judge.VLMJudge(generate, with_attributes=True, batch_size=args.batch_size)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation the parsed arguments ask for; returns the metrics it wrote."""
    from tqdm import tqdm

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size and --limit must be at least 1")
    if args.shapes_demo is not None:
        from rig_jax.data import shapes

        if args.shapes_demo < 1:
            raise ConfigError("--shapes-demo must be at least 1")
        config = shapes.ShapesConfig(image_size=args.image_size)
        args.records, args.images = shapes.shapes_demo(os.path.join(args.out, "shapes"), args.shapes_demo,
                                                       args.seed, config)
    elif not args.records or not args.images:
        raise ConfigError("rig-eval needs --records FILE and --images DIR (or --shapes-demo N)")
    if args.judge == "vlm":
        check_vlm_args(args)   # fail on a bad --vlm-path before reading any data
    records, graphs = load_records(args.records)
    if args.limit is not None:
        records, graphs = records[:args.limit], graphs[:args.limit]
    paths = image_paths(args.images, records)

    judge: Judge | None = None
    results: list[JudgeResult] = []
    kept_images: list[np.ndarray] = []
    keep = max(args.report_rows, args.grid_size)
    judge_seconds = 0.0
    first_shape: tuple[int, ...] | None = None
    with tqdm(total=len(paths), desc=f"judging ({args.judge})", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch_paths = paths[start:start + args.batch_size]
            batch = [load_image(p) for p in batch_paths]
            first_shape = first_shape or batch[0].shape
            for path, image in zip(batch_paths, batch, strict=True):
                if image.shape != first_shape:
                    raise DataError(f"{path}: image is {image.shape[0]}x{image.shape[1]}, the first "
                                    f"is {first_shape[0]}x{first_shape[1]}")
            if judge is None:
                judge = build_judge(args, graphs, batch[0])
            t0 = time.perf_counter()
            results += judge.judge(batch, graphs[start:start + len(batch)])
            judge_seconds += time.perf_counter() - t0
            kept_images += batch[:max(0, keep - len(kept_images))]
            bar.update(len(batch))

    from rig_jax.eval.report import write_evaluation

    metrics = write_evaluation(args.out, records, graphs, results, kept_images, judge_name=args.judge,
                               judge_seconds=judge_seconds, report_rows=args.report_rows,
                               grid_size=args.grid_size,
                               title=f"rig-eval: {os.path.basename(args.records)} ({args.judge} judge)",
                            extra={"records_file": os.path.abspath(args.records),
                                   "image_dir": os.path.abspath(args.images)})
    return metrics


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
    return evaluate(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-eval`): bad input exits 2 with one line on stderr."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
