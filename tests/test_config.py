"""Config loading, overrides and start-up validation: every failure is one line, exit 2."""
import os
import subprocess
import sys

import pytest

from rig_jax.config import check_overrides, load_config_file, validate_config
from rig_jax.errors import ConfigError
from tests.helpers import ROOT, tool_env


def run_tool(*args):
    return subprocess.run([sys.executable, "-m", "rig_jax.tools.shapes_data", *args], cwd=ROOT,
                          env=tool_env(devices=8), capture_output=True, text=True, timeout=120)


def test_variants_load_and_override_in_process():
    cfg = load_config_file(os.path.join(ROOT, "configs/shapes_data.py:tiny"))
    assert cfg.variant == "tiny" and cfg.data.num_records == 16
    check_overrides(cfg, ["--config.world.image_size=64", "--config.mesh.shape=(8,1,1)"], "x.py")
    with pytest.raises(ConfigError, match=r"unknown field 'imag_size' at world .*did you mean 'image_size'"):
        check_overrides(cfg, ["--config.world.imag_size=64"], "x.py")
    cfg.mesh.shape = (3, 1, 1)
    with pytest.raises(ConfigError, match=r"mesh\.shape"):
        validate_config(cfg, num_devices=8)


@pytest.mark.parametrize("override,needle", [
    ("--config.nonexistent=1", "unknown field 'nonexistent'"),
    ("--config.world.image_size=big", "--config.world.image_size=big"),
    ("--config.mesh.shape=(3,1,1)", "mesh.shape: (3, 1, 1)"),
    ("--config.data.num_records=1.5", "--config.data.num_records=1.5"),
])
def test_bad_config_exits_nonzero_with_one_line(override, needle):
    result = run_tool("--config=configs/shapes_data.py:tiny", override)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_missing_config_file_is_one_line():
    result = run_tool("--config=configs/nope.py")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "configs/nope.py" in lines[0], result.stderr
