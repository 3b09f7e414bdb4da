"""The README's main job over several seeds: one markdown table of mean ± std per system.

Reads the `metrics.json` of each demo workdir (one per `--config.seed`), checks they ran the
same systems on the same prompts and noise, and prints the table (the columns of the report's
systems table), the `SG-IoU gain (d) - (a)` line and, per acceptance comparison of issue 11,
the difference of the means against the seed std.

    python -m rig_jax.tools.demo_table runs/demo_seed0 runs/demo_seed1 runs/demo_seed2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rig_jax.errors import ConfigError
from rig_jax.eval.demo_report import GAIN, TABLE_COLUMNS

SAME_ACROSS_SEEDS = ("prompts", "prompts_seed", "systems_seed", "max_rounds", "judge")
# (better system, worse system): the comparisons issue 11 asks about, on SG-IoU (attr).
COMPARISONS = (("loop_stage2", "diffuser"), ("loop_stage1", "loop_base"), ("loop_stage2", "loop_stage1"),
               ("loop_stage2", "empty_edit"), ("loop_stage2", "best_of_n"))


def read_runs(workdirs: Sequence[str]) -> list[dict[str, Any]]:
    """Each workdir's metrics.json; a one-line ConfigError for a missing file or runs that differ
    in systems, prompts or noise (they would not be seeds of one experiment)."""
    runs = []
    for folder in workdirs:
        path = os.path.join(folder, "metrics.json")
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the demo's metrics ({e})") from None
        if not isinstance(runs[-1].get("systems"), dict) or not runs[-1]["systems"]:
            raise ConfigError(f"{path}: no systems (not a shapes_demo metrics.json)")
    first = runs[0]
    for folder, run in zip(workdirs[1:], runs[1:], strict=True):
        if list(run["systems"]) != list(first["systems"]):
            raise ConfigError(f"{folder}/metrics.json: systems {list(run['systems'])} differ from "
                              f"{workdirs[0]}'s {list(first['systems'])}")
        for key in SAME_ACROSS_SEEDS:
            mine, theirs = run.get("info", {}).get(key), first.get("info", {}).get(key)
            if mine != theirs:
                raise ConfigError(f"{folder}/metrics.json: info.{key} {mine!r} differs "
                                  f"from {workdirs[0]}'s {theirs!r}")
    return runs


def per_seed(runs: Sequence[Mapping[str, Any]], system: str, key: str) -> np.ndarray:
    return np.array([float(r["systems"][system][key]) for r in runs])


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and the sample std over seeds (ddof 1; 0 for one seed)."""
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def markdown(runs: Sequence[Mapping[str, Any]]) -> str:
    systems = runs[0]["systems"]
    seeds = [r.get("info", {}).get("seed") for r in runs]
    head = "| system | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |"
    lines = [f"Seeds {seeds}, {runs[0]['info'].get('prompts')} prompts each; mean ± std over seeds.", "",
             head, "| --- |" + " ---: |" * len(TABLE_COLUMNS)]
    for name, m in systems.items():
        cells = []
        for _, key, form in TABLE_COLUMNS:
            mean, std = mean_std(per_seed(runs, name, key))
            cells.append(f"{mean:{form}} ± {std:{form}}")
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    gain = per_seed(runs, GAIN[0], "sg_iou_attr") - per_seed(runs, GAIN[1], "sg_iou_attr")
    lines += ["", f"SG-IoU gain (d) - (a): {gain.mean():+.3f}", ""]
    for better, worse in COMPARISONS:
        if better not in systems or worse not in systems:
            continue
        b, w = per_seed(runs, better, "sg_iou_attr"), per_seed(runs, worse, "sg_iou_attr")
        diff, std = float(b.mean() - w.mean()), max(mean_std(b)[1], mean_std(w)[1])
        lines.append(f"- {systems[better]['label']} minus {systems[worse]['label']}: {diff:+.3f} "
                     f"(larger seed std {std:.3f})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="demo workdirs, one per seed")
    args = parser.parse_args(argv)
    try:
        print(markdown(read_runs(args.workdirs)), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
