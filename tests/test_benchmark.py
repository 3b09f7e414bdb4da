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


def test_train_step_tiny_prints_parity_and_speed_lines(capsys, tmp_path):
    """rig_jax's and diffusers' step on the same saved weights: the two JSON lines and their
    fields (the figures themselves are not checked: this is about the harness, not speed)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    benchmark.main(["train-step", "--shape", "tiny", "--batch", "1", "--repeats", "2",
                    f"--config.cache_dir={tmp_path}"])
    parity, speed = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    for r in (parity, speed):
        assert r["bench"] == "train-step" and r["shape"] == "tiny" and r["batch"] == 1 and r["threads"] == 1
    assert parity["what"] == "parity" and parity["ok"]
    assert parity["loss_rel_err"] < 1e-4 and parity["grad_norm_rel_err"] < 1e-4
    assert speed["what"] == "speed" and speed["repeats"] == 2 and len(speed["per_round_ratio"]) == 2
    assert speed["backend"] == "cpu" and speed["device"] and speed["torch_device"] == "cpu"
    assert speed["steps_per_s_rig_jax"] > 0 and speed["steps_per_s_torch"] > 0 and speed["ratio"] > 0
    assert set(speed["median_s"]) == set(speed["median_cpu_s"]) == {"rig_jax", "torch"}
    assert speed["summary"].startswith("cpu train-step vs torch: ")


def test_train_step_without_torch_is_one_line(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["train-step", "--shape", "tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "torch not installed" in err
