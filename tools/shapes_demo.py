"""The README's main job on ShapesSG (see configs/shapes.py).

Builds the mesh, writes ShapesSG scenes as a LAION-SG dataset (JSON + PNG renders, then a
tfds array_record build), reads this host's shard back with grain, adds pixel noise, reads
each scene graph back with the pixel detector (the ShapesSG Checker and Judge), and writes
`metrics.json`, `per_record.csv`, `report.html` and `grid.png` under `config.out_dir`
(`out_dir/host_<i>` per host when there are several).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from rig_jax.config import define_config_flag, run_with_config
from rig_jax.errors import ConfigError

_CONFIG = define_config_flag("configs/shapes.py:demo")
COLOUR_ONLY = {"auto": None, "on": True, "off": False}


def world_config(world: Any):
    """`config.world` -> ShapesConfig (`colour_only`: auto | on | off)."""
    from rig_jax.data.shapes import ShapesConfig

    if world.colour_only not in COLOUR_ONLY:
        raise ConfigError(f"world.colour_only: {world.colour_only!r} is not one of {sorted(COLOUR_ONLY)}")
    return ShapesConfig(image_size=world.image_size, min_objects=world.min_objects,
                        max_objects=world.max_objects, colour_only=COLOUR_ONLY[world.colour_only])


def run(config: Any) -> dict[str, Any]:
    import jax
    import numpy as np
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from rig_jax.data import laion_sg, shapes
    from rig_jax.eval.report import write_evaluation
    from rig_jax.parallel import make_mesh

    mesh = make_mesh(config.mesh)
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
    judge = shapes.ShapesJudge(world)
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
    return write_evaluation(out, records, graphs, results, images, judge_name=config.eval.judge,
                            judge_seconds=judge_seconds, report_rows=config.eval.grid_size,
                            grid_size=config.eval.grid_size,
                            title=f"ShapesSG demo ({world.image_size}px, noise σ={config.data.noise_sigma})",
                            extra={"noise_sigma": config.data.noise_sigma, "host": host, "hosts": hosts})


def main(argv: list[str] | None = None) -> None:
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    run_with_config(run, _CONFIG)


if __name__ == "__main__":
    main()
