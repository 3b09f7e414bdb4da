"""rig-eval end to end on ShapesSG records and renders, its one-line errors, and the report."""
import csv
import dataclasses
import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rig_jax.data import shapes as S
from rig_jax.eval.report import ReportRow, save_png_grid, write_html_report
from rig_jax.tools import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_eval")
    records_path, image_dir = str(root / "test.json"), str(root / "images")
    records = S.write_records(records_path, N, seed=11, config=S.ShapesConfig(), image_dir=image_dir)
    return root, records_path, image_dir, records


@pytest.fixture(scope="module")
def evaluated(shapes_data):
    root, records_path, image_dir, records = shapes_data
    out = str(root / "eval")
    evaluate.main(["--records", records_path, "--images", image_dir, "--judge", "shapes", "--out", out,
                   "--batch-size", "7"])
    return out, records


def test_end_to_end_metrics(evaluated):
    out, _ = evaluated
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for form in ("attr", "label"):
        assert metrics[f"sg_iou_{form}"] == 1.0
        assert metrics[f"entity_iou_{form}"] == 1.0 and metrics[f"relation_iou_{form}"] == 1.0
    assert metrics["judge_score"] == 1.0 and metrics["num_records"] == N
    assert metrics["malformed"] == 0 and metrics["rating_mean"] is None
    assert 0 < metrics["seconds_per_image"] < 1


def test_end_to_end_files(evaluated):
    out, records = evaluated
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        page = f.read()
    for record in records:
        assert html.escape(record["caption_ori"]) in page
        assert record["name"] in page
    assert page.count("data:image/png;base64,") == N and "✗" not in page and page.count("✓") >= N
    with Image.open(os.path.join(out, "grid.png")) as grid:
        # 8 columns x 3 rows of 128 px tiles with 2 px borders
        assert grid.size == (2 + 8 * 130, 2 + 3 * 130)
    with open(os.path.join(out, "per_record.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in records]
    assert all(float(r["sg_iou_attr"]) == 1.0 for r in rows)


def test_wrong_images_score_below_one(shapes_data, tmp_path):
    _, records_path, _, records = shapes_data
    wrong_dir = tmp_path / "wrong"
    wrong_dir.mkdir()
    for record, scene in zip(records, S.generate_scenes(11, N, S.ShapesConfig()), strict=True):
        a, b, *rest = scene.objects   # first two objects trade places: the first relation flips
        moved = (dataclasses.replace(a, box=b.box), dataclasses.replace(b, box=a.box), *rest)
        S.write_png(str(wrong_dir / record["name"]), S.render(dataclasses.replace(scene, objects=moved)))
    out = str(tmp_path / "eval")
    evaluate.main(["--records", records_path, "--images", str(wrong_dir), "--out", out])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["sg_iou_attr"] < 0.6 and metrics["judge_score"] < 0.6
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        assert f.read().count("✗") >= N


def _exit_2_one_line(argv, capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_missing_inputs_exit_2(shapes_data, tmp_path, capsys):
    _, records_path, image_dir, records = shapes_data
    out = str(tmp_path / "eval")
    missing_dir = str(tmp_path / "no_such_images")
    assert missing_dir in _exit_2_one_line(["--records", records_path, "--images", missing_dir,
                                            "--out", out], capsys)
    missing_file = str(tmp_path / "none.json")
    assert missing_file in _exit_2_one_line(["--records", missing_file, "--images", image_dir,
                                             "--out", out], capsys)
    partial = tmp_path / "partial"
    partial.mkdir()
    for record in records[1:]:
        os.link(os.path.join(image_dir, record["name"]), partial / record["name"])
    message = _exit_2_one_line(["--records", records_path, "--images", str(partial), "--out", out], capsys)
    assert str(partial / records[0]["name"]) in message
    assert "--vlm-path" in _exit_2_one_line(["--records", records_path, "--images", image_dir,
                                             "--judge", "vlm", "--out", out], capsys)
    assert not os.path.exists(out)


def test_console_error_is_one_line(shapes_data, tmp_path):
    _, records_path, _, _ = shapes_data
    missing_dir = str(tmp_path / "absent")
    proc = subprocess.run([sys.executable, "-m", "rig_jax.tools.evaluate", "--records", records_path,
                           "--images", missing_dir, "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {missing_dir}: image folder not found"


def _scripted_vlm(images, prompts):
    """A stand-in VLM: names every listed object, no relation; says yes to every triplet, rates 7."""
    answers = []
    for prompt in prompts:
        objects = re.search(r"^Objects: (.*)$", prompt, re.M)
        if objects:
            answers.append(json.dumps({"scene_graph": [], "object_list": json.loads(objects.group(1)),
                                       "predicate_list": []}))
        else:
            n = len(re.findall(r"^\d+\. \[", prompt, re.M))
            answers.append(json.dumps({"verdicts": [{"id": i + 1, "answer": "yes"} for i in range(n)],
                                       "rating": 7}))
    assert len(images) == len(prompts) and all(im.shape == (32, 32, 3) for im in images)
    return answers


def test_vlm_judge_wiring(shapes_data, tmp_path, monkeypatch):
    from rig_jax.eval import judge as vlm_judge

    _, records_path, image_dir, _ = shapes_data
    folders = []

    def fake_make_vlm_generate(folder, max_new_tokens, **placement):
        folders.append((folder, max_new_tokens))
        return _scripted_vlm

    monkeypatch.setattr(vlm_judge, "make_vlm_generate", fake_make_vlm_generate)
    out = str(tmp_path / "eval")
    evaluate.main(["--records", records_path, "--images", image_dir, "--judge", "vlm",
                   "--vlm-path", str(tmp_path), "--vlm-max-new-tokens", "99", "--out", out])
    assert folders == [(str(tmp_path), 99)]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["judge"] == "vlm" and metrics["num_records"] == N and metrics["malformed"] == 0
    assert metrics["entity_iou_attr"] == 1.0 and metrics["sg_iou_attr"] == 0.0
    assert metrics["judge_score"] == 1.0 and metrics["rating_mean"] == 7.0 and metrics["num_rated"] == N


def test_shapes_demo_mode(tmp_path):
    out = str(tmp_path / "demo")
    evaluate.main(["--shapes-demo", "9", "--seed", "3", "--out", out, "--grid-size", "4"])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["num_records"] == 9 and metrics["sg_iou_attr"] == 1.0
    assert sorted(os.listdir(os.path.join(out, "shapes", "images"))) == [S.record_name(i) for i in range(9)]
    with Image.open(os.path.join(out, "grid.png")) as grid:
        assert grid.size == (2 + 4 * 130, 2 + 130)


def test_report_escapes_text_and_upscales(tmp_path):
    image = np.zeros((8, 8, 3), np.float32)
    image[2:4, 2:4] = 1.0
    row = ReportRow(name="a<b>.png", image=image, prompt="<script>alert(1)</script> left of & co",
                    triplets=[("<x>", "left of", "y")], verdicts=[False],
                    extracted=[("y", "left of", "<x>")], objects=["<x>", "y"],
                    scores={"sg_iou_attr": 0.0}, raw='{"scene_graph": "<raw>"}')
    path = str(tmp_path / "r.html")
    write_html_report(path, [row], title="T <1>", metrics={"sg_iou_attr": 0.5, "note": "<b>"})
    with open(path, encoding="utf-8") as f:
        page = f.read()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<raw>" not in page
    assert "&lt;x&gt;" in page and "✗" in page and "T &lt;1&gt;" in page and 'width="128"' in page
    grid = save_png_grid(str(tmp_path / "g.png"), [image, 1 - image, image], ncols=2, scale=3)
    assert grid.shape == (2 + 2 * 26, 2 + 2 * 26, 3)
    assert np.array_equal(grid[2:26, 2:26], np.repeat(np.repeat((image * 255).astype(np.uint8), 3, 0), 3, 1))
