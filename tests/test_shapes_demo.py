"""The README's main job on the tiny variant, end to end through the console entry point: both
Reflection-GRPO stages (with LoRA), the six systems, the report files; a second run skips the
finished stages and the evaluation, which a changed config or stage export redoes."""
import csv
import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from rig_jax.rl.systems import SYSTEMS
from tests.helpers import tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_env = tool_env


def _demo(workdir):
    out = subprocess.run([sys.executable, "-m", "rig_jax.tools.shapes_demo",
                          "--config=configs/shapes.py:tiny", f"--config.workdir={workdir}",
                          "--config.rl.lora.enabled=true"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _train_rows(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"


@pytest.mark.heavy(seconds=340)
def test_demo_tiny_runs_every_stage_and_system(tmp_path):
    workdir = tmp_path / "demo"
    _demo(workdir)
    for stage in ("grpo_actor", "grpo_editor"):
        rows = _train_rows(workdir / stage / "metrics.jsonl")
        assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
        for key in ("rollout/reward_mean", "rollout/zero_std_fraction", "clip_fraction", "approx_kl"):
            assert key in rows[0], (stage, key)
        assert abs(rows[0]["ratio_mean"] - 1.0) < 1e-4            # pi_old is the policy at the rollout
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert list(metrics["systems"]) == list(SYSTEMS)
    for name, system in metrics["systems"].items():
        for key in ("sg_iou_attr", "sg_iou_label", "entity_iou_attr", "relation_iou_attr", "all_colours",
                    "rounds_used", "unet_calls", "seconds"):
            assert 0 <= system[key] and np.isfinite(system[key]), (name, key)
    assert metrics["systems"]["diffuser"]["rounds_used"] == 0
    assert metrics["systems"]["best_of_n"]["generations"] >= 1
    assert "gain_sg_iou_d_minus_a" in metrics
    with open(workdir / "per_record.csv") as f:
        assert len(list(csv.DictReader(f))) == 8 * len(SYSTEMS)
    parser = _Images()
    parser.feed((workdir / "report.html").read_text())
    assert parser.images >= 8 * len(SYSTEMS)                      # at least one round per system and prompt
    for plot in (workdir / "plots").iterdir():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = (workdir / "metrics.json").stat().st_mtime_ns
    again = _demo(workdir)
    assert again.stdout.count("skipped") == 3                     # both stages and the systems
    assert (workdir / "metrics.json").stat().st_mtime_ns == written


def test_a_rerun_skips_the_systems_only_for_the_same_config_and_stage_exports(tmp_path):
    from rig_jax.config import load_config_file
    from rig_jax.tools.shapes_demo import OUTPUT_FILES, evaluation_fingerprint, finished_evaluation

    config = load_config_file(os.path.join(ROOT, "configs", "shapes.py:tiny"))
    config.workdir = str(tmp_path)
    weights = tmp_path / "grpo_editor" / "editor" / "unet" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"1")
    (tmp_path / "grpo_actor" / "actor").mkdir(parents=True)
    (tmp_path / "grpo_actor" / "actor" / "config.json").write_text("{}")
    fingerprint = evaluation_fingerprint(config)
    assert finished_evaluation(str(tmp_path), fingerprint) is None                  # nothing written yet
    for name in OUTPUT_FILES:
        (tmp_path / name).write_text(json.dumps({"info": {"fingerprint": fingerprint}}))
    assert finished_evaluation(str(tmp_path), fingerprint) == {"info": {"fingerprint": fingerprint}}
    (tmp_path / "report.html").unlink()
    assert finished_evaluation(str(tmp_path), fingerprint) is None                  # an output is missing
    (tmp_path / "report.html").write_text("")

    config.systems.num_prompts += 1
    assert evaluation_fingerprint(config) != fingerprint                             # another config
    config.systems.num_prompts -= 1
    assert evaluation_fingerprint(config) == fingerprint
    os.utime(weights, ns=(0, 0))                                                # a stage trained again
    assert evaluation_fingerprint(config) != fingerprint
    assert finished_evaluation(str(tmp_path), evaluation_fingerprint(config)) is None
