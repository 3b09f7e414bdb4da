"""The README's main job, end to end on the tiny variant."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_tiny_writes_all_outputs(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "tools.shapes_demo", "--config=configs/shapes.py:tiny",
                             f"--config.out_dir={out}", "--config.mesh.shape=(2,2,2)"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_records"] == 16 and metrics["noise_sigma"] == 0.05
    assert metrics["sg_iou_attr"] >= 0.9 and metrics["entity_iou_label"] >= 0.9
    for name in ("per_record.csv", "report.html", "grid.png"):
        assert (out / name).stat().st_size > 0
    assert len((out / "per_record.csv").read_text().strip().splitlines()) == 17
