"""The ShapesSG data tool (rig_jax.tools.shapes_data, the judged clean renders) on the tiny
variant: on one process over a (2,2,2) mesh, and on two processes."""
import json
import subprocess
import sys

from tests.helpers import ROOT, tool_env


def test_demo_tiny_writes_all_outputs(tmp_path):
    out = tmp_path / "demo"
    env = tool_env(devices=8)
    result = subprocess.run([sys.executable, "-m", "rig_jax.tools.shapes_data",
                             "--config=configs/shapes_data.py:tiny", f"--config.out_dir={out}",
                             "--config.mesh.shape=(2,2,2)"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_records"] == 16 and metrics["noise_sigma"] == 0.05
    assert metrics["sg_iou_attr"] >= 0.9 and metrics["entity_iou_label"] >= 0.9
    for name in ("per_record.csv", "report.html", "grid.png"):
        assert (out / name).stat().st_size > 0
    assert len((out / "per_record.csv").read_text().strip().splitlines()) == 17


def test_demo_on_two_hosts_splits_the_data_and_aggregates(tmp_path):
    """The same command on 2 local processes (4 CPU devices each) joined by jax.distributed:
    each host judges its half, host 0 writes the means over all records."""
    import portpicker

    out = tmp_path / "demo"
    port = portpicker.pick_unused_port()
    env = tool_env(devices=4)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "rig_jax.tools.shapes_data", "--config=configs/shapes_data.py:tiny",
         f"--config.out_dir={out}", "--config.mesh.shape=(2,2,2)", "--config.distributed.enabled=True",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-2000:]
    halves = [json.loads((out / f"host_{i}" / "metrics.json").read_text()) for i in range(2)]
    assert [h["num_records"] for h in halves] == [8, 8] and [h["host"] for h in halves] == [0, 1]
    overall = json.loads((out / "metrics.json").read_text())
    assert overall["num_records"] == 16 and overall["hosts"] == 2
    assert abs(overall["sg_iou_attr"] - (halves[0]["sg_iou_attr"] + halves[1]["sg_iou_attr"]) / 2) < 1e-6
