"""The demo's outputs (rig_jax.eval.demo_report) from hand-made records of real ShapesSG renders,
scored by the real `score_system` and read by the pixel Checker: no model is needed, so the
whole file runs in seconds. `fake_results` and `write_fake_workdir` also serve the notebook test."""
from __future__ import annotations

import base64
import csv
import dataclasses
import html.parser
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from rig_jax.data import shapes
from rig_jax.diffusion.settings import EditSettings, SamplerSettings
from rig_jax.errors import ConfigError
from rig_jax.eval.demo_report import nice_ticks, read_metrics_log, write_demo_outputs
from rig_jax.eval.report import png_bytes, upscale
from rig_jax.eval.shapes_judge import ShapesJudge
from rig_jax.rig.checker import ShapesChecker
from rig_jax.rig.loop import LoopRecord, Round
from rig_jax.rl.systems import LABELS, SystemResult, score_system

WORLD = shapes.ShapesConfig()
CHECKER = ShapesChecker(WORLD)
NUM_PROMPTS = 3
# Edit prompts with characters HTML must escape, so the page is checked for escaping too.
EDIT = "move the {obj} <left> & up"


def _without_first(scene: shapes.Scene) -> shapes.Scene:
    """The scene with its first object gone: the Checker reads "object missing"."""
    return dataclasses.replace(scene, objects=scene.objects[1:])


def _mirrored(scene: shapes.Scene) -> shapes.Scene:
    """Left-right mirror: every "left of" becomes "right of" (a violated triplet)."""
    size = scene.image_size
    objects = tuple(dataclasses.replace(o, box=(size - o.box[0] - o.box[2], *o.box[1:]))
                    for o in scene.objects)
    return dataclasses.replace(scene, objects=objects)


STAGES = {"missing": _without_first, "mirror": _mirrored, "true": lambda s: s}


def _record(scene: shapes.Scene, plan: tuple[str, ...], final: str = "last", empty: bool = False,
            draws: bool = False) -> LoopRecord:
    """One round per entry of `plan`: the scene with an object gone ("missing"), mirrored
    ("mirror") or as prompted ("true"); the result is the last or the best-scoring round.
    `draws`: independent samples (best-of-N), no edit prompt on any of them."""
    graph = shapes.scene_graph(scene)
    images = [shapes.render(STAGES[p](scene)) for p in plan]
    checks = CHECKER.check(np.stack(images), [graph] * len(images))
    n = len(plan)
    rounds = tuple(Round(image=im, check=c,
                         edit_prompt=None if k == n - 1 or draws else
                         ("" if empty else EDIT.format(obj=graph.items[0].text()) + f" #{k}"),
                         seconds=0.25 * (k + 1))
                   for k, (im, c) in enumerate(zip(images, checks, strict=True)))
    final_index = n - 1 if final == "last" else int(np.argmax([c.score for c in checks]))
    return LoopRecord(graph=graph, rounds=rounds, final_index=final_index, unet_generations=n,
                      vlm_calls=n - 1)


# Per system, per prompt: the rounds and which one is the result.
PLANS = {"diffuser": [(("missing",), "last"), (("mirror",), "last"), (("true",), "last")],
         "loop_stage2": [(("missing", "mirror", "true"), "last"), (("mirror", "true"), "last"),
                         (("missing", "true", "mirror"), "best")],
         "empty_edit": [(("missing", "mirror"), "last"), (("mirror", "mirror", "true"), "last"),
                        (("true",), "last")],
         "best_of_n": [(("mirror", "true"), "best"), (("true", "missing"), "best"), (("mirror",), "best")]}


def fake_results() -> list[SystemResult]:
    """Four systems on the same three prompts: (a) one round each; (d) 2-3 rounds, always
    ending right (its last prompt by keeping the best round); (e) 1-3 rounds, empty edits;
    (f) 1-2 independent draws, the best kept."""
    scenes = shapes.generate_scenes(7, NUM_PROMPTS, WORLD)
    judge = ShapesJudge(WORLD)
    sampler = SamplerSettings.from_config(common.sampler())
    edit = EditSettings.from_config(common.editor())
    results = []
    for name, plan in PLANS.items():
        records = [_record(s, rounds, final, empty=name == "empty_edit", draws=name == "best_of_n")
                   for s, (rounds, final) in zip(scenes, plan, strict=True)]
        results.append(score_system(name, records, judge, WORLD, sampler, edit, seconds=1.5))
    return results


def _train_row(step: int) -> dict:
    """A train row in the shape grpo_actor / grpo_editor write (rig-train's metrics.jsonl)."""
    return {"step": step, "approx_kl": 1e-3 * step, "clip_fraction": 0.05 * step, "loss": 0.1 / step,
            "rollout/reward_mean": 0.1 * step, "rollout/reward_std": 0.05,
            "rollout/score_after": 0.2 + 0.1 * step, "rollout/score_before": 0.2,
            "rollout/zero_std_fraction": 0.5, "wall_seconds": 10.0 * step}


def write_logs(root: str, stages: dict[str, bool]) -> dict[str, str]:
    """metrics.jsonl per stage (4 train rows, an eval row at the end, one half-written line)
    for stages marked True; stages marked False get a path that does not exist."""
    logs = {}
    for name, present in stages.items():
        path = os.path.join(root, name, "metrics.jsonl")
        logs[name] = path
        if not present:
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rows = [_train_row(s) for s in range(1, 5)]
        rows.append({"step": 4, "eval/sg_iou_attr": 0.4, "eval/sg_iou_label": 0.5, "eval/score_final": 0.6})
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.write('{"step": 5, "loss"')
    return logs


def write_fake_workdir(out_dir: str, stages: dict[str, bool] | None = None) -> dict:
    """A small demo workdir (both stage logs, four systems): what the notebook test shows."""
    logs = write_logs(out_dir, stages or {"grpo_actor": True, "grpo_editor": True})
    info = {"seed": 0, "wall_seconds": 12.5, "machine": "test machine <cpu>"}
    return write_demo_outputs(out_dir, fake_results(), logs, info, report_prompts=2)


@pytest.fixture(scope="module")
def results() -> list[SystemResult]:
    return fake_results()


@pytest.fixture(scope="module")
def written(tmp_path_factory, results):
    out = str(tmp_path_factory.mktemp("demo"))
    logs = write_logs(out, {"grpo_actor": True, "grpo_editor": False})
    info = {"seed": 3, "wall_seconds": 42.0, "machine": "a <test> machine"}
    metrics = write_demo_outputs(out, results, logs, info, report_prompts=2)
    return out, metrics, logs


class _Page(html.parser.HTMLParser):
    """Collects the round images (in document order), text, and the systems table's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[dict[str, str]] = []
        self.images = 0
        self.text: list[str] = []
        self.system_rows: list[str] = []
        self._in_systems = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images += 1
            if a.get("class") == "round":
                self.rounds.append(a)
        if tag == "table" and a.get("class") == "systems":
            self._in_systems = True
        if tag == "tr" and self._in_systems and "data-system" in a:
            self.system_rows.append(a["data-system"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_systems = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _page(out: str) -> tuple[_Page, str]:
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        source = f.read()
    page = _Page()
    page.feed(source)
    page.close()
    return page, source


def test_metrics_json_holds_the_means(written, results):
    out, metrics, _ = written
    with open(os.path.join(out, "metrics.json")) as f:
        on_disk = json.load(f)
    assert on_disk == metrics
    assert list(on_disk["systems"]) == [r.name for r in results]
    for r in results:
        entry = on_disk["systems"][r.name]
        assert entry["label"] == LABELS[r.name]
        assert entry["num_records"] == NUM_PROMPTS
        for key in ("sg_iou_attr", "sg_iou_label", "entity_iou_attr", "entity_iou_label", "relation_iou_attr",
                    "relation_iou_label", "all_colours", "checker_score", "rounds_used", "generations",
                    "unet_calls", "vlm_calls", "seconds"):
            assert entry[key] == pytest.approx(float(np.mean([row[key] for row in r.rows])), abs=1e-12), key
    by_name = {r.name: r for r in results}
    assert by_name["loop_stage2"].metrics["rounds_used"] == pytest.approx(5 / 3)
    assert by_name["loop_stage2"].metrics["sg_iou_attr"] == 1.0       # always ends on the true render
    gain = 1.0 - by_name["diffuser"].metrics["sg_iou_attr"]
    assert gain > 0
    assert on_disk["gain_sg_iou_d_minus_a"] == pytest.approx(gain)
    assert on_disk["info"] == {"seed": 3, "wall_seconds": 42.0, "machine": "a <test> machine"}


def test_gain_is_null_without_both_systems(tmp_path, results):
    metrics = write_demo_outputs(str(tmp_path), results[1:], {}, {}, report_prompts=1)
    assert metrics["gain_sg_iou_d_minus_a"] is None
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["gain_sg_iou_d_minus_a"] is None


def test_per_record_csv(written, results):
    out, _, _ = written
    with open(os.path.join(out, "per_record.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) * NUM_PROMPTS
    keys = list(results[0].rows[0])
    assert list(rows[0]) == ["system", "index", "prompt", *keys, "final_index", "edit_prompts"]
    for r in results:
        mine = [row for row in rows if row["system"] == r.name]
        assert [int(row["index"]) for row in mine] == list(range(NUM_PROMPTS))
        for row, record, scores in zip(mine, r.records, r.rows, strict=True):
            assert row["prompt"] == record.graph.prompt()
            assert int(row["final_index"]) == record.final_index
            for k in keys:
                assert float(row[k]) == scores[k]       # full precision
            edits = [x.edit_prompt for x in record.rounds if x.edit_prompt is not None]
            assert row["edit_prompts"] == " | ".join(edits)
    stage2 = [row for row in rows if row["system"] == "loop_stage2"]
    assert stage2[0]["edit_prompts"].count(" | ") == 1 and "#1" in stage2[0]["edit_prompts"]


def test_report_html_rounds_left_to_right(written, results):
    out, _, _ = written
    page, source = _page(out)
    shown = 2
    assert len(page.rounds) == sum(len(r.records[i].rounds) for r in results for i in range(shown))
    for i in range(shown):
        order = [(a["data-system"], int(a["data-round"])) for a in page.rounds if int(a["data-prompt"]) == i]
        expected = [(r.name, k) for r in results for k in range(len(r.records[i].rounds))]
        assert order == expected           # systems as rows, in order; rounds left to right
    # Each image is its round, upscaled nearest to >= 96 px.
    for a in page.rounds:
        r = next(x for x in results if x.name == a["data-system"])
        image = r.records[int(a["data-prompt"])].rounds[int(a["data-round"])].image
        data = a["src"].removeprefix("data:image/png;base64,")
        assert base64.b64decode(data) == png_bytes(upscale(image, 3))
        assert int(a["width"]) == 96
    assert not any(int(a["data-prompt"]) >= shown for a in page.rounds)
    text = "".join(page.text)
    for r in results:
        assert LABELS[r.name] in text
        for i in range(shown):
            assert r.records[i].graph.prompt() in text
            for x in r.records[i].rounds[:-1]:
                if x.edit_prompt:
                    assert x.edit_prompt in text           # unescaped by the parser: was escaped
    assert "<left>" not in source and "&lt;left&gt; &amp; up" in source
    assert "(empty edit prompt)" in text
    assert "<th>machine</th><td>a &lt;test&gt; machine</td>" in source
    assert "<th>seed</th><td>3</td>" in source and "<th>wall_seconds</th><td>42</td>" in source


def test_report_html_best_of_n_shows_draws_not_edits(written):
    """Best-of-N's samples are independent draws: captioned as draws, no edit arrow between them,
    the Checker's pick outlined; a loop's rounds keep I_k and their arrows."""
    out, _, _ = written
    prompts = _page(out)[1].split("<!-- rig-report:prompts -->")[1]
    row = prompts.split('<tr data-system="best_of_n">')[1].split("</tr>")[0]
    assert row.count("<figure") == 2 and 'class="arrow"' not in row and "(empty edit prompt)" not in row
    captions = [c.split("<br>")[0] for c in row.split("<figcaption>")[1:]]
    assert captions[0].startswith("draw 1 S=") and not captions[0].endswith("(final)")
    assert captions[1] == "draw 2 S=1.00 (final)" and "I<sub>" not in row
    loop_row = prompts.split('<tr data-system="empty_edit">')[1].split("</tr>")[0]
    assert "I<sub>0</sub>" in loop_row and 'class="arrow"' in loop_row and "draw 1" not in loop_row


def test_report_html_verdicts_and_final(written, results):
    out, _, _ = written
    _, source = _page(out)
    # A round of (d): three rounds, the first missing an object, the second mirrored, the last right.
    record = next(r for r in results if r.name == "loop_stage2").records[0]
    names = [[v.value for v in x.check.verdicts.verdicts] for x in record.rounds]
    assert "object missing" in names[0] and all(v == "satisfied" for v in names[-1])
    blocks = source.split('<figure class="')[1:]
    block = [b for b in blocks if 'data-system="loop_stage2" data-prompt="0"' in b]
    assert len(block) == 3
    for b, expected, x in zip(block, names, record.rounds, strict=True):
        chips = [c for c in ("sat", "vio", "mis") for _ in range(b.count(f'<span class="{c}"'))]
        assert sorted(chips) == sorted({"satisfied": "sat", "violated": "vio", "object missing": "mis"}[v]
                                       for v in expected)
        assert f"S={x.check.score:.2f}" in b
    assert [b.startswith("final") for b in block] == [False, False, True]
    # One outlined (final) image per system and shown prompt.
    assert source.count('<figure class="final"') == sum(1 for r in results for _ in range(2))


def test_report_html_systems_table_and_training(written, results):
    out, metrics, logs = written
    page, source = _page(out)
    assert page.system_rows == [r.name for r in results]
    for title in ("SG-IoU attr", "SG-IoU label", "Entity-IoU attr", "Relation-IoU attr", "all colours",
                  "rounds", "U-Net calls", "VLM calls", "s / image"):
        assert f"<th>{title}</th>" in source
    d = metrics["systems"]["loop_stage2"]
    assert f'<td class="num best">{d["sg_iou_attr"]:.3f}</td>' in source         # (d) is best here
    assert f'<td class="num">{d["unet_calls"]:.0f}</td>' in source
    # stage 1 logged: a plot; stage 2 never ran: a note naming its missing log.
    assert "stage 2 (grpo_editor): not run, no log at " + logs["grpo_editor"] in "".join(page.text)
    assert "stage 1 (grpo_actor): 4 logged steps up to step 4, 1 eval rows, 1 unreadable lines skipped" \
        in "".join(page.text)
    assert page.images == len(page.rounds) + 2        # + the stage-1 plot and the systems bars


def test_plots_are_pngs(written):
    out, _, _ = written
    for name in ("stage1.png", "systems.png"):
        with Image.open(os.path.join(out, "plots", name)) as im:
            im.verify()
            assert im.format == "PNG"
    with Image.open(os.path.join(out, "plots", "stage1.png")) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[1] == 5 * 300                # four training panels + eval SG-IoU
    assert (np.abs(rgb.astype(int) - [31, 119, 180]).sum(-1) < 30).sum() > 100   # curves drawn
    assert not os.path.exists(os.path.join(out, "plots", "stage2.png"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(out, "report.html")).st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_nice_ticks():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]
    assert nice_ticks(0.03, 0.41) == [0.2, 0.4]              # step 0.2 >= (0.41 - 0.03) / 3
    assert nice_ticks(3.0, 5.0, 5) == [3.0, 3.5, 4.0, 4.5, 5.0]
    assert nice_ticks(3.0, 5.0, 5, integer=True) == [3.0, 4.0, 5.0]
    assert nice_ticks(2.0, 2.0) == [2.0]


def test_plot_without_eval_rows(tmp_path, results):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_train_row(s)) + "\n" for s in (1, 2)))
    train, evals, bad = read_metrics_log(str(path))
    assert (len(train), len(evals), bad) == (2, 0, 0)
    write_demo_outputs(str(tmp_path / "out"), results, {"grpo_actor": str(path)}, {}, report_prompts=0)
    with Image.open(tmp_path / "out" / "plots" / "stage1.png") as im:
        assert im.size[0] == 4 * 300
    page, _ = _page(str(tmp_path / "out"))
    assert page.rounds == []


def test_log_without_some_keys(tmp_path, results):
    """A stage that logs no approx_kl (and no score_before) still plots: that panel says so."""
    rows = [{k: v for k, v in _train_row(s).items() if k not in ("approx_kl", "rollout/score_before")}
            for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_demo_outputs(str(tmp_path / "out"), results, {"grpo_editor": str(path)}, {}, report_prompts=1)
    with Image.open(tmp_path / "out" / "plots" / "stage1.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    kl = rgb[30:, 3 * 300:4 * 300]                            # the approx KL panel: frame and text only
    assert not (np.abs(kl.astype(int) - [31, 119, 180]).sum(-1) < 30).any()
    assert (np.abs(rgb[30:, :300].astype(int) - [31, 119, 180]).sum(-1) < 30).any()


def test_empty_log_is_a_note(tmp_path, results):
    (tmp_path / "empty.jsonl").write_text("\n")
    logs = {"grpo_actor": str(tmp_path / "empty.jsonl"), "grpo_editor": ""}
    write_demo_outputs(str(tmp_path / "out"), results, logs, {}, report_prompts=1)
    page, _ = _page(str(tmp_path / "out"))
    text = "".join(page.text)
    assert "stage 1 (grpo_actor): no training rows in" in text
    assert "stage 2 (grpo_editor): not run" in text
    assert sorted(os.listdir(tmp_path / "out" / "plots")) == ["systems.png"]


def test_nan_metric_is_null_json(tmp_path, results):
    broken = dataclasses.replace(results[0], metrics={**results[0].metrics, "seconds": math.nan})
    metrics = write_demo_outputs(str(tmp_path), [broken], {}, {"x": float("inf")}, report_prompts=1)
    with open(tmp_path / "metrics.json") as f:
        on_disk = json.load(f)
    assert on_disk["systems"]["diffuser"]["seconds"] is None and on_disk["info"]["x"] is None
    assert metrics == on_disk


@pytest.mark.parametrize("make", ["file", "under_file"])
def test_unwritable_out_dir(tmp_path, results, make):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = str(blocker if make == "file" else blocker / "out")
    with pytest.raises(ConfigError, match=str(out)):
        write_demo_outputs(out, results, {}, {}, report_prompts=1)


def test_fake_workdir_for_the_notebook(tmp_path):
    metrics = write_fake_workdir(str(tmp_path))
    assert set(metrics["systems"]) == {"diffuser", "loop_stage2", "empty_edit", "best_of_n"}
    assert sorted(os.listdir(tmp_path / "plots")) == ["stage1.png", "stage2.png", "systems.png"]
    buf = io.StringIO((tmp_path / "report.html").read_text())
    assert buf.read().count("<!-- rig-report:prompt ") == 2
