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
malformed count, record count, judge seconds per image, the records of the file skipped by
kind), `per_record.csv`, `report.html` and `grid.png`.

What it refuses, and when:
- OUTDIR is checked before any work (a file in its place or above it, an unwritable parent);
  a non-empty OUTDIR is refused unless `--overwrite`, and is then replaced whole: everything is
  written into a hidden sibling that takes its place in one rename, so a kill leaves the old
  folder or the new one. Inputs inside OUTDIR are refused with `--overwrite`.
- Malformed records (a JSON-lines line that is not JSON, a `name` that is absolute or holds
  `..`, ...) are skipped and counted by kind (`skipped_records` in metrics.json): a record
  never makes rig-eval read a file outside `--images`.
- An unreadable image, or one whose header claims more than `MAX_IMAGE_PIXELS` pixels, is a
  one-line error naming it (as a missing image is): a score must cover every record.
- `--judge shapes` reads only ShapesSG shapes and colours: if no record is a ShapesSG scene it
  refuses (every score would be 0); if only some are, it warns on stderr and in metrics.json
  (`warnings`, `non_shapes_records`).
"""
from __future__ import annotations

import os
import sys
import time
import warnings
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
    p.add_argument("--overwrite", dest="overwrite", action="store_const", const=True,
                   help="replace a non-empty --out folder (whole, once the evaluation is done)")
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


def load_records(path: str) -> tuple[list[dict[str, Any]], list[SceneGraph], Any]:
    """Valid records of a LAION-SG file, their graphs, and the file's SkipSummary (invalid
    records are skipped and counted by kind)."""
    from rig_jax.data.laion_sg import load_laion_sg_json

    records, summary = load_laion_sg_json(path)
    return records, [SceneGraph.from_laion_record(r) for r in records], summary


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
    """HxWx3 float32 in [0, 1]. The size in the header is checked before any pixel is
    decoded, so a 1x1 file claiming 100000x100000 is a DataError, not a MemoryError."""
    from PIL import Image

    from rig_jax.data.laion_sg import image_size_problem

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below
            with Image.open(path) as img:
                problem = image_size_problem(img.size)
                if problem is not None:
                    raise DataError(f"{path}: {problem}")
                return np.asarray(img.convert("RGB"), np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # what PIL raises on corrupt files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable image ({reason})") from None


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


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def shapes_vocabulary_check(graphs: Sequence[SceneGraph], records: Sequence[dict[str, Any]]
                            ) -> tuple[int, str] | None:
    """For `--judge shapes`: a DataError when no record is a ShapesSG scene (every score would
    be 0 without a word); (how many are not, the warning line) when only some are; else None."""
    from rig_jax.eval.shapes_judge import shapes_vocabulary_problem

    problems = [(r, p) for r, g in zip(records, graphs, strict=True)
                if (p := shapes_vocabulary_problem(g)) is not None]
    if not problems:
        return None
    record, problem = problems[0]
    example = f"e.g. img_id {record['img_id']}: {problem}"
    if len(problems) == len(records):
        raise DataError(f"--judge shapes: none of the {len(records)} records is a ShapesSG scene "
                        f"({example}); the pixel detector reads only ShapesSG shapes and colours, so "
                        "every score would be 0: use --judge vlm")
    return len(problems), (f"--judge shapes: {len(problems)} of {len(records)} records are not ShapesSG "
                           f"scenes and score 0 whatever the image shows ({example})")


def evaluate(config: Any) -> dict[str, Any]:
    """Runs the evaluation `config` asks for on the mesh of `config.mesh`; returns the metrics.
    `config.overwrite` allows replacing a non-empty `out` folder."""
    from rig_jax.outputs import check_output_folder, replace_folder
    from rig_jax.parallel import mesh_context

    overwrite = bool(config.overwrite)
    if config.judge not in JUDGES:
        raise ConfigError(f"judge: {config.judge!r} is not one of {', '.join(JUDGES)}")
    if not config.out:
        raise ConfigError("out: required (--out DIR or --config.out=DIR)")
    if config.batch_size < 1 or config.limit < 0:
        raise ConfigError("--batch-size must be at least 1 and --limit at least 0 (0: every record)")
    if config.shapes_demo:
        if config.shapes_demo < 1:
            raise ConfigError("--shapes-demo must be at least 1")
    elif not config.records or not config.images:
        raise ConfigError("rig-eval needs --records FILE and --images DIR (or --shapes-demo N)")
    check_output_folder(config.out, "--out", overwrite=overwrite)
    if overwrite and not config.shapes_demo:
        for flag, path in (("--records", config.records), ("--images", config.images)):
            if os.path.exists(config.out) and _inside(path, config.out):
                raise ConfigError(f"{flag}={path} is inside --out={config.out}, which --overwrite replaces")
    if config.judge == "vlm":
        check_vlm_config(config.vlm)   # fail on a bad --vlm-path before reading any data
    out = os.path.abspath(config.out)
    with replace_folder(out) as staging:
        records_path, image_dir = config.records, config.images
        shown_records = os.path.abspath(records_path) if records_path else ""
        if config.shapes_demo:
            from rig_jax.data import shapes

            world = shapes.ShapesConfig(image_size=config.image_size)
            records_path, image_dir = shapes.shapes_demo(os.path.join(staging, "shapes"), config.shapes_demo,
                                                         config.seed, world)
            shown_records = os.path.join(out, os.path.relpath(records_path, staging))
        shown_images = (os.path.join(out, os.path.relpath(image_dir, staging)) if config.shapes_demo
                        else os.path.abspath(image_dir))
        with mesh_context(config) as (mesh, rules):
            return _evaluate(config, records_path, image_dir, mesh, rules, staging,
                             {"records_file": shown_records, "image_dir": shown_images, "out": out})


def _evaluate(config: Any, records_path: str, image_dir: str, mesh: Any, rules: Any, write_to: str,
              shown: dict[str, str]) -> dict[str, Any]:
    from tqdm import tqdm

    records, graphs, summary = load_records(records_path)
    if config.limit:
        records, graphs = records[:config.limit], graphs[:config.limit]
    not_shapes = shapes_vocabulary_check(graphs, records) if config.judge == "shapes" else None
    if not_shapes:
        print(f"warning: {not_shapes[1]}", file=sys.stderr)
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

    extra: dict[str, Any] = {"records_file": shown["records_file"], "image_dir": shown["image_dir"],
                             "records_in_file": summary.total, "skipped_records": dict(summary.skipped),
                             "num_skipped": sum(summary.skipped.values())}
    if not_shapes:
        extra.update(warnings=[not_shapes[1]], non_shapes_records=not_shapes[0])
    metrics = write_evaluation(write_to, records, graphs, results, kept_images, judge_name=config.judge,
                               judge_seconds=judge_seconds, report_rows=config.report_rows,
                               grid_size=config.grid_size,
                               title=f"rig-eval: {os.path.basename(records_path)} ({config.judge} judge)",
                               extra=extra, shown_out=shown["out"])
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-eval`): bad input exits 2 with one line on stderr."""
    run_tool(evaluate, argv, build_parser())


if __name__ == "__main__":
    main()
