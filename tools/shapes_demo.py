"""The README's main job on ShapesSG (see configs/shapes.py)."""
from __future__ import annotations

import sys

from rig_jax.config import define_config_flag, run_with_config

_CONFIG = define_config_flag("configs/shapes.py:demo")


def run(config) -> None:
    import jax

    from rig_jax.parallel import make_mesh
    mesh = make_mesh(config.mesh)
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s)")


def main(argv: list[str] | None = None) -> None:
    sys.argv = [sys.argv[0], *(argv or sys.argv[1:])]
    run_with_config(run, _CONFIG)


if __name__ == "__main__":
    main()
