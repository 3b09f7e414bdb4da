"""rig_jax.tools.demo_table: mean ± std over seed runs of the demo, and refusal of runs that differ."""
import json

import pytest

from rig_jax.eval.demo_report import TABLE_COLUMNS
from rig_jax.tools.demo_table import main, markdown, read_runs


def _run(folder, seed, sg_a, sg_d, prompts_seed=90003):
    metrics = {key: 0.5 for _, key, _ in TABLE_COLUMNS}
    systems = {"diffuser": {**metrics, "label": "(a)", "sg_iou_attr": sg_a},
               "loop_stage2": {**metrics, "label": "(d)", "sg_iou_attr": sg_d}}
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"systems": systems, "info": {
        "seed": seed, "prompts": 200, "prompts_seed": prompts_seed, "systems_seed": 90004}}))
    return str(folder)


def test_mean_std_over_seeds_and_the_gain_line(tmp_path, capsys):
    dirs = [_run(tmp_path / f"s{i}", i, 0.2, d) for i, d in enumerate((0.40, 0.50, 0.60))]
    text = markdown(read_runs(dirs))
    assert "Seeds [0, 1, 2]" in text
    assert "| (d) | 0.500 ± 0.100 |" in text          # sample std (ddof 1) of 0.4, 0.5, 0.6
    assert "| (a) | 0.200 ± 0.000 |" in text
    assert "SG-IoU gain (d) - (a): +0.300" in text
    assert "- (d) minus (a): +0.300 (larger seed std 0.100)" in text
    assert main(dirs) == 0 and "+0.300" in capsys.readouterr().out


def test_runs_on_other_prompts_or_missing_files_are_one_line_errors(tmp_path, capsys):
    a = _run(tmp_path / "a", 0, 0.2, 0.3)
    b = _run(tmp_path / "b", 1, 0.2, 0.3, prompts_seed=1)
    assert main([a, b]) == 2
    assert "info.prompts_seed 1 differs" in capsys.readouterr().err
    assert main([a, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing/metrics.json: cannot read" in err
    with pytest.raises(SystemExit):
        main([])
