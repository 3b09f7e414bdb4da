"""The ShapesSG data path end to end (configs/shapes_data.py): build, read, detect, report.

Builds the mesh, writes ShapesSG scenes as a LAION-SG dataset (JSON + PNG renders, then a
tfds array_record build), reads this host's shard back with grain, adds pixel noise, reads
each scene graph back with the pixel detector (the ShapesSG Checker and Judge), and writes
`metrics.json`, `per_record.csv`, `report.html` and `grid.png` under `config.out_dir`.
With several hosts each writes those for its shard under `out_dir/host_<i>`, and host 0
writes the means over all hosts' records to `out_dir/metrics.json`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from rig_jax.config import SugarParser, run_tool
from rig_jax.errors import ConfigError

COLOUR_ONLY = {"auto": None, "on": True, "off": False}


def world_config(world: Any):
    """`config.world` -> ShapesConfig (`colour_only`: auto | on | off)."""
    from rig_jax.data.shapes import ShapesConfig

    if world.colour_only not in COLOUR_ONLY:
        raise ConfigError(f"world.colour_only: {world.colour_only!r} is not one of {sorted(COLOUR_ONLY)}")
    return ShapesConfig(image_size=world.image_size, min_objects=world.min_objects,
                        max_objects=world.max_objects, colour_only=COLOUR_ONLY[world.colour_only])


def run(config: Any) -> dict[str, Any]:
    """The job on the mesh of `config.mesh`; returns the metrics it wrote. The output folder
    and the noise are checked first, so a bad `out_dir` fails before any scene is drawn."""
    import math

    from rig_jax.outputs import check_output_folder
    from rig_jax.parallel import mesh_context

    # A rerun rebuilds its outputs in place, so an existing folder is fine; a file is not.
    check_output_folder(config.out_dir, "out_dir", allow_existing=True)
    sigma = config.data.noise_sigma
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"data.noise_sigma: must be a finite number >= 0, got {sigma!r}")
    with mesh_context(config) as (mesh, _):
        return _run(config, mesh)


def _run(config: Any, mesh: Any) -> dict[str, Any]:
    import jax
    import numpy as np
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from rig_jax.data import laion_sg, shapes
    from rig_jax.eval.report import write_evaluation
    from rig_jax.eval.shapes_judge import ShapesJudge

    host, hosts = jax.process_index(), jax.process_count()
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s), "
          f"host {host} of {hosts}")
    world = world_config(config.world)
    if config.data.num_records < hosts:
        raise ConfigError(f"data.num_records: {config.data.num_records} is fewer than the {hosts} hosts")
    out = config.out_dir if hosts == 1 else os.path.join(config.out_dir, f"host_{host}")

    tfds.display_progress_bar(False)  # one bar (ours) is enough
    t0 = time.perf_counter()
    source_dir = os.path.join(out, "source")
    _, image_dir = shapes.shapes_demo(source_dir, config.data.num_records, config.seed, world, split="test")
    builder = laion_sg.build_laion_sg(source_dir, os.path.join(out, "tfds"), image_dir=image_dir,
                                      overwrite=True)
    print(f"wrote {config.data.num_records} ShapesSG scenes ({world.image_size}px) as LAION-SG "
          f"array_record in {time.perf_counter() - t0:.1f}s")

    reader = laion_sg.make_reader(builder, "test", config.data.batch_size, config.seed, shuffle=False,
                                  num_epochs=1, drop_remainder=False)
    judge = ShapesJudge(world)
    noise = np.random.default_rng(config.seed)
    records, graphs, results, images = [], [], [], []
    judge_seconds = 0.0
    per_host = config.data.num_records // hosts
    with tqdm(total=per_host, desc="judging (shapes)", unit="img", file=sys.stderr) as bar:
        for batch in reader:
            noisy = [np.clip(img.astype(np.float32) / 255.0
                             + noise.normal(0.0, config.data.noise_sigma, img.shape), 0.0, 1.0)
                     .astype(np.float32) for img in batch["image"]]
            t1 = time.perf_counter()
            results += judge.judge(noisy, batch["graph"])
            judge_seconds += time.perf_counter() - t1
            records += batch["record"]
            graphs += batch["graph"]
            images += noisy[:max(0, config.eval.grid_size - len(images))]
            bar.update(len(noisy))
    summary = builder.skip_summaries.get("test")   # what the build skipped, by kind
    skipped = dict(summary.skipped) if summary is not None else {}
    title = f"ShapesSG demo ({world.image_size}px, noise σ={config.data.noise_sigma})"
    metrics = write_evaluation(out, records, graphs, results, images, judge_name=config.eval.judge,
                               judge_seconds=judge_seconds, report_rows=config.eval.grid_size,
                               grid_size=config.eval.grid_size, title=title,
                               extra={"noise_sigma": config.data.noise_sigma, "host": host, "hosts": hosts,
                                      "skipped_records": skipped})
    if hosts > 1:
        metrics = write_all_hosts_metrics(config.out_dir, graphs, results, host)
    return metrics


def write_all_hosts_metrics(out_dir: str, graphs: list, results: list, host: int) -> dict[str, Any]:
    """Dataset means over every host's records (each host scored its own shard): the per-record
    scores are all-gathered, and host 0 writes `out_dir/metrics.json`."""
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    from rig_jax.eval.scene_graph_iou import score_record

    per_record = [{**score_record(r.graph, g), "judge_score": r.judge_score} for r, g in zip(results, graphs,
                                                                                          strict=True)]
    keys = sorted(per_record[0])
    local = np.asarray([[row[k] for k in keys] for row in per_record], np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # (hosts, records per host, keys)
    rows = gathered.reshape(-1, len(keys))
    metrics = {k: float(v) for k, v in zip(keys, rows.mean(axis=0), strict=True)}
    metrics.update(num_records=int(rows.shape[0]), hosts=int(gathered.shape[0]))
    if host == 0:
        from rig_jax.outputs import replace_file

        with replace_file(os.path.join(out_dir, "metrics.json")) as f:
            json.dump(metrics, f, indent=2)
        print(f"all {metrics['num_records']} records on {metrics['hosts']} hosts: "
              f"SG-IoU {metrics['sg_iou_attr']:.4f}; wrote {out_dir}/metrics.json")
    return metrics


def build_parser() -> SugarParser:
    return SugarParser("shapes_data", __doc__.splitlines()[0], "configs/shapes_data.py:demo")


def main(argv: list[str] | None = None) -> None:
    """`python -m rig_jax.tools.shapes_data --config=configs/shapes_data.py:demo --config.a.b=v`."""
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
