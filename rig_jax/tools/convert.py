"""rig-convert: Stable Diffusion pipelines between the diffusers folder layout and rig_jax
orbax checkpoints.

    rig-convert to-orbax DIFFUSERS_DIR CKPT_DIR       # strict load, then orbax + metadata
    rig-convert to-diffusers CKPT_DIR DIFFUSERS_DIR   # back to a folder diffusers loads
    rig-convert --config=configs/convert.py:to-orbax --config.source=DIR --config.target=CKPT

The config is configs/convert.py (the command and paths are sugar for its fields); params
are loaded onto the mesh of `config.mesh` and gathered when written.

The checkpoint keeps every raw config, the text-layer choice and the tokenizer files, so
a round trip gives the same tensors and configs. A missing folder or file, a missing,
surplus or mis-shaped tensor exits with status 2 and one line naming it. The target is
checked before anything is read (writable; not a non-empty folder unless --overwrite) and
written into a hidden sibling that replaces it whole at the end: a conversion killed midway
leaves the old target as it was.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from rig_jax.config import SugarParser, run_tool
from rig_jax.errors import ConfigError
from rig_jax.outputs import check_output_folder, replace_folder

COMMANDS = ("to-orbax", "to-diffusers")
TEXT_LAYERS = ("last", "penultimate")


def build_parser() -> SugarParser:
    p = SugarParser("rig-convert", __doc__.split("\n\n")[0], "configs/convert.py:to-orbax")
    p.add_argument("command", nargs="?", choices=COMMANDS,
                   help="to-orbax: diffusers folder -> rig_jax orbax checkpoint; to-diffusers: back")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="DIFFUSERS_DIR (to-orbax) or CKPT_DIR")
    p.add_argument("target", nargs="?", metavar="TARGET", help="CKPT_DIR (to-orbax) or DIFFUSERS_DIR")
    p.add_argument("--text-layer", dest="text_layer", choices=TEXT_LAYERS,
                   help="to-orbax: text-encoder layer that conditions the U-Net, stored in the checkpoint "
                        "(penultimate = diffusers' clip_skip=1)")
    p.add_argument("--overwrite", dest="overwrite", action="store_const", const=True,
                   help="replace an existing, non-empty target folder (whole, once the conversion is done)")
    return p


def _check_target(path: str, overwrite: bool) -> None:
    """Before any work: the target can be written (a writable folder, or a creatable path with a
    writable parent), and an existing non-empty one is replaced only with --overwrite."""
    check_output_folder(path, "target", overwrite=overwrite)


@contextlib.contextmanager
def _staged(target: str) -> Iterator[str]:
    """A folder to write the whole conversion into; on success it replaces `target` in one
    atomic step (`outputs.replace_folder`), so a conversion killed at any point leaves the old
    target complete (and loadable) or the new one, never a mixture. With several processes
    their staging folders would differ, so the target is written in place there, and replacing
    a non-empty one is refused (it could not be made whole)."""
    import jax

    if jax.process_count() > 1:
        if os.path.isdir(target) and os.listdir(target):
            raise ConfigError(f"target={target}: --overwrite of a non-empty folder needs one process "
                              "(distributed.enabled=False): several cannot swap it in whole")
        yield target
        return
    with replace_folder(target) as staging:
        yield staging


def _count(params: dict) -> int:
    import jax
    return sum(int(x.size) for x in jax.tree.leaves(params))


def run(config: Any) -> None:
    """Converts `config.source` to `config.target` as `config.command` says, under the mesh context."""
    from rig_jax.parallel import mesh_context
    from rig_jax.weights.diffusers_pipeline import (
        load_pipeline,
        load_pipeline_checkpoint,
        save_pipeline,
        save_pipeline_checkpoint,
    )

    if config.command not in COMMANDS:
        raise ConfigError(f"command: {config.command!r} is not one of {', '.join(COMMANDS)}")
    if not config.source or not config.target:
        raise ConfigError(f"rig-convert {config.command} needs SOURCE and TARGET (or --config.source / "
                          "--config.target)")
    if config.text_layer not in TEXT_LAYERS:
        raise ConfigError(f"text_layer: {config.text_layer!r} is not one of {', '.join(TEXT_LAYERS)}")
    _check_target(config.target, config.overwrite)
    with mesh_context(config) as (mesh, rules):
        if config.command == "to-orbax":
            pipe, params = load_pipeline(config.source, text_layer=config.text_layer, mesh=mesh, rules=rules)
            with _staged(config.target) as folder:
                save_pipeline_checkpoint(folder, pipe, params, overwrite=folder == config.target)
        else:
            pipe, params = load_pipeline_checkpoint(config.source, mesh=mesh, rules=rules)
            with _staged(config.target) as folder:
                save_pipeline(folder, pipe, params)
    print(f"{config.command}: {config.source} -> {config.target} ({_count(params):,} parameters)")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-convert`): bad input exits 2 with one line on stderr."""
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
