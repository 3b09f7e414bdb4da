"""rig-benchmark prints one JSON line per measurement, with the device named."""
import json

import pytest

from rig_jax.tools import benchmark


def test_sampler_tiny_prints_json_lines(capsys):
    benchmark.main(["sampler", "--batch", "1", "2", "--steps", "2", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["batch"] for r in lines] == [1, 2]
    for r in lines:
        assert r["bench"] == "sampler" and r["steps"] == 2 and r["dtype"] == "fp32"
        assert r["images_per_s"] > 0 and r["backend"] == "cpu" and r["device"]


def test_unknown_shape_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["sampler", "--shape", "sdxl"])
    assert exit_info.value.code == 2
