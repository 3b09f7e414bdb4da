"""rig-convert: Stable Diffusion pipelines between the diffusers folder layout and rig_jax
orbax checkpoints.

    rig-convert to-orbax DIFFUSERS_DIR CKPT_DIR       # strict load, then orbax + metadata
    rig-convert to-diffusers CKPT_DIR DIFFUSERS_DIR   # back to a folder diffusers loads

The checkpoint keeps every raw config, the text-layer choice and the tokenizer files, so
a round trip gives the same tensors and configs. A missing folder or file, a missing,
surplus or mis-shaped tensor exits with status 2 and one line naming it.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rig_jax.cli import run_cli
from rig_jax.errors import WeightsError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rig-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    to_orbax = sub.add_parser("to-orbax", help="diffusers folder -> rig_jax orbax checkpoint")
    to_orbax.add_argument("source", metavar="DIFFUSERS_DIR")
    to_orbax.add_argument("target", metavar="CKPT_DIR")
    to_orbax.add_argument("--text-layer", choices=("last", "penultimate"), default="last",
                          help="text-encoder layer that conditions the U-Net, stored in the checkpoint "
                               "(penultimate = diffusers' clip_skip=1)")
    to_orbax.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    to_diffusers = sub.add_parser("to-diffusers", help="rig_jax orbax checkpoint -> diffusers folder")
    to_diffusers.add_argument("source", metavar="CKPT_DIR")
    to_diffusers.add_argument("target", metavar="DIFFUSERS_DIR")
    to_diffusers.add_argument("--overwrite", action="store_true",
                              help="write into an existing, non-empty folder")
    return p


def _check_target(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise WeightsError(f"{path}: exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise WeightsError(f"{path}: folder is not empty (pass --overwrite to write into it)")


def _count(params: dict) -> int:
    import jax
    return sum(int(x.size) for x in jax.tree.leaves(params))


def _main(argv: Sequence[str]) -> None:
    from rig_jax.weights.diffusers_pipeline import (
        load_pipeline,
        load_pipeline_checkpoint,
        save_pipeline,
        save_pipeline_checkpoint,
    )

    args = build_parser().parse_args(argv)
    _check_target(args.target, args.overwrite)
    if args.command == "to-orbax":
        pipe, params = load_pipeline(args.source, text_layer=args.text_layer)
        save_pipeline_checkpoint(args.target, pipe, params, overwrite=args.overwrite)
    else:
        pipe, params = load_pipeline_checkpoint(args.source)
        save_pipeline(args.target, pipe, params)
    print(f"{args.command}: {args.source} -> {args.target} ({_count(params):,} parameters)")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-convert`): bad input exits 2 with one line on stderr."""
    run_cli(_main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
