"""rig-train on two processes joined by jax.distributed (4 fake CPU devices each) logs the same
metrics as one process with 8 devices, and its checkpoint restores in a single-process run."""
import json
import os
import subprocess
import sys

import portpicker
import pytest

from tests.helpers import run_together, tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_train.py")
ARGS = ["-m", "rig_jax.tools.train", "--config", f"{CONFIG}:vae_tiny", "--config.mesh.shape=(2, 4, 1)",
        "--config.train.total_steps=4", "--config.train.log_every=1", "--config.train.checkpoint_every=2"]


_env = tool_env


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"} for line in f]


@pytest.mark.multihost
@pytest.mark.heavy(seconds=115)
def test_two_processes_log_what_one_process_logs(tmp_path):
    single = str(tmp_path / "single")
    done = subprocess.run([sys.executable, *ARGS, "--workdir", single], cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    multi = str(tmp_path / "multi")
    port = portpicker.pick_unused_port()
    run_together([[sys.executable, *ARGS, "--workdir", multi, "--config.distributed.enabled=True",
                   f"--config.distributed.coordinator_address=localhost:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
                  for i in range(2)], _env(4), ROOT, timeout=300)

    one, two = _metrics(single), _metrics(multi)
    assert [r["step"] for r in two if "loss" in r] == [1, 2, 3, 4]
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)

    # the two-process checkpoint restores in one process with 8 devices (and runs on from it)
    longer = [a if a != "--config.train.total_steps=4" else "--config.train.total_steps=6" for a in ARGS]
    more = subprocess.run([sys.executable, *longer, "--workdir", multi], cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    steps = [r["step"] for r in _metrics(multi) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
