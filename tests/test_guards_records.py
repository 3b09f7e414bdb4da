"""Issue 13, records and outputs: what rig-sample, rig-eval and the data builders refuse, skip
and count, one test per class of input (NaN/Inf, output paths, rig-eval's overwrite, malformed
JSON lines, record names, deep nesting and image bombs, the ShapesSG judge on other records,
killed tfds builds). The tools run in-process: `main` raising SystemExit(2) is the exit status."""
import io
import json
import os
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from rig_jax.data import laion_sg
from rig_jax.data import shapes as S
from rig_jax.data.scene_graph import Item, Relation, SceneGraph
from rig_jax.errors import ConfigError, DataError
from rig_jax.tools import evaluate, sample, shapes_data
from rig_jax.vlm.lenient_json import loads_lenient
from tests.sd_fixtures import shared_tiny_sd_folder

DEEP = 100_000


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four ShapesSG records (a list) and their renders."""
    root = tmp_path_factory.mktemp("guards_records")
    records = S.write_records(str(root / "test.json"), 4, seed=5, image_dir=str(root / "images"))
    return records, str(root / "images")


def _exit_2(main, argv, capsys) -> str:
    """The one stderr line of a tool run that must exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _jsonl(path, values) -> str:
    path.write_text("".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for v in values))
    return str(path)


def _eval_metrics(records_path, image_dir, out, *extra) -> dict:
    evaluate.main(["--records", records_path, "--images", image_dir, "--out", str(out), *extra])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_non_finite_noise_or_weights_are_errors_naming_the_stage(tmp_path_factory, tmp_path, capsys,
                                                                 monkeypatch):
    import jax
    import jax.numpy as jnp

    from rig_jax.rig import diffuser

    folder = shared_tiny_sd_folder(tmp_path_factory)[0]
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), np.float32)
    nan_noise = noise.copy()
    nan_noise[1, 3, 3, 0] = np.nan
    prompts = ["a red cube", "a blue ball"]

    # The tool: NaN starting noise (refused before the model, here absent, is read) and NaN
    # U-Net weights exit 2 with no PNG written.
    np.save(tmp_path / "nan.npy", nan_noise)
    np.save(tmp_path / "ok.npy", noise)
    grid = tmp_path / "grid.png"
    args = ["--prompt", prompts[0], "--prompt", prompts[1], "--steps", "2", "--guidance", "2",
            "--batch", "2", "--out", str(grid)]
    message = _exit_2(sample.main, ["--model", str(tmp_path / "absent"), "--init-latents",
                                    str(tmp_path / "nan.npy"), *args], capsys)
    assert "NaN or Inf" in message and "nan.npy" in message
    broken = tmp_path / "nan_unet"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = np.full_like(state["conv_out.bias"], np.nan)
    save_file(state, weights)
    real_generate, seen = diffuser.generate, []
    monkeypatch.setattr(diffuser, "generate", lambda pipe, params, *a, **k: (
        seen.append((pipe, params, a[1])), real_generate(pipe, params, *a, **k))[1])
    message = _exit_2(sample.main, ["--model", str(broken), "--init-latents", str(tmp_path / "ok.npy"),
                                    *args], capsys)
    assert "rig-sample: prompts 1-2" in message and "U-Net's denoised latents are not finite" in message
    assert not grid.exists()

    # The library, on the tool's pipeline and program: each stage poisoned in turn is named.
    pipe, tool_params, settings = seen[0]

    def scaled(params: dict, part: str, where: str, value: float) -> dict:
        """`params` with the first leaf of `part` whose path holds `where` filled with `value`."""
        flat = jax.tree_util.tree_flatten_with_path(params[part])[0]
        target = next(path for path, _ in flat if where in jax.tree_util.keystr(path))
        tree = jax.tree_util.tree_map_with_path(lambda p, x: jnp.full_like(x, value) if p == target else x,
                                                params[part])
        return {**params, part: tree}

    params = scaled(tool_params, "unet", "conv_out']['bias", 0.0)       # the NaN bias zeroed: finite
    images = real_generate(pipe, params, prompts, settings, init_latents=noise, check_finite=True)
    assert np.isfinite(np.asarray(images)).all()
    cases = [(params, nan_noise, diffuser.FINITE_STAGES[0]),
             (scaled(params, "text_encoder", "final_layer_norm", jnp.nan), noise, diffuser.FINITE_STAGES[1]),
             (scaled(params, "unet", "conv_out", jnp.inf), noise, diffuser.FINITE_STAGES[2]),
             (scaled(params, "vae", "decoder", jnp.nan), noise, diffuser.FINITE_STAGES[3])]
    for case_params, latents, stage in cases:
        with pytest.raises(diffuser.NonFiniteError, match=stage):
            real_generate(pipe, case_params, prompts, settings, init_latents=latents, check_finite=True)


def test_output_paths_are_checked_before_any_work(scenes, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    missing = str(tmp_path / "no_such_model")
    # The model does not exist either: the --out error shows the path is checked first.
    for flag, value in (("--out", str(blocker / "grid.png")), ("--out", str(tmp_path)),
                        ("--save-latents", str(blocker / "z.npy"))):
        argv = ["--model", missing, "--prompt", "a cube", "--out", str(tmp_path / "g.png"), flag, value]
        assert f"{flag}={value}" in _exit_2(sample.main, argv, capsys)
    image_dir = scenes[1]
    for out in (blocker, blocker / "sub"):
        argv = ["--records", str(tmp_path / "none.json"), "--images", image_dir, "--out", str(out)]
        assert f"--out={out}" in _exit_2(evaluate.main, argv, capsys)
    argv = ["--config=configs/shapes_data.py:tiny", f"--config.out_dir={blocker / 'sub'}"]
    assert f"out_dir={blocker / 'sub'}" in _exit_2(shapes_data.main, argv, capsys)
    assert "noise_sigma" in _exit_2(shapes_data.main, ["--config=configs/shapes_data.py:tiny",
                                                       f"--config.out_dir={tmp_path / 'sd'}",
                                                       "--config.data.noise_sigma=nan"], capsys)
    with pytest.raises(ConfigError, match="data_dir"):
        laion_sg.build_laion_sg(os.path.dirname(image_dir), blocker / "tfds")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_rig_eval_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(scenes, tmp_path, capsys):
    records, image_dir = scenes
    records_path = _jsonl(tmp_path / "r.jsonl", records)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run")
    argv = ["--records", records_path, "--images", image_dir, "--out", str(out)]
    assert "--overwrite" in _exit_2(evaluate.main, argv, capsys)
    assert os.listdir(out) == ["earlier.txt"]
    metrics = _eval_metrics(records_path, image_dir, out, "--overwrite")
    assert metrics["num_records"] == 4
    assert sorted(os.listdir(out)) == ["grid.png", "metrics.json", "per_record.csv", "report.html"]
    assert sorted(os.listdir(tmp_path)) == ["eval", "r.jsonl"]        # no staging folder left
    inside = out / "images"
    shutil.copytree(image_dir, inside)
    argv = ["--records", records_path, "--images", str(inside), "--out", str(out), "--overwrite"]
    assert "inside --out" in _exit_2(evaluate.main, argv, capsys)


def test_malformed_json_lines_are_skipped_and_counted_in_metrics(scenes, tmp_path):
    records, image_dir = scenes
    truncated = json.dumps(records[0])[:-7]
    values = [records[0], truncated, records[1], "{nope", records[2], 7, records[3]]
    path = _jsonl(tmp_path / "r.jsonl", values)
    kept, summary = laion_sg.load_laion_sg_json(path)
    assert [r["img_id"] for r in kept] == [r["img_id"] for r in records]
    assert summary.skipped == {"malformed_json": 2, "not_object": 1} and summary.total == 7
    metrics = _eval_metrics(path, image_dir, tmp_path / "eval")
    assert metrics["num_records"] == 4 and metrics["records_in_file"] == 7
    assert metrics["skipped_records"] == {"malformed_json": 2, "not_object": 1}
    assert metrics["num_skipped"] == 3


def test_record_names_cannot_reach_outside_images(scenes, tmp_path):
    records, image_dir = scenes
    outside = tmp_path / "outside.png"
    shutil.copy(os.path.join(image_dir, records[0]["name"]), outside)
    escaping = [str(outside), "../outside.png", "sub/../../outside.png", "sub\\..\\..\\outside.png",
                "C:outside.png", "\\\\host\\outside.png", "a\x00.png"]
    for name in escaping:
        assert laion_sg.validate_record({**records[0], "name": name}) == (None, "unsafe_name"), name
    for name in ("a/b.png", "x..y.png", "..png"):
        assert laion_sg.validate_record({**records[0], "name": name})[0] is not None, name
    bad = [{**records[0], "img_id": f"bad{i}", "name": name} for i, name in enumerate(escaping[:3])]
    path = _jsonl(tmp_path / "r.jsonl", records + bad)
    metrics = _eval_metrics(path, image_dir, tmp_path / "eval")
    assert metrics["num_records"] == 4 and metrics["skipped_records"] == {"unsafe_name": 3}


def _png_claiming(path, width: int, height: int) -> str:
    """A 1x1 PNG whose header (CRC fixed up) claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return str(path)


def test_deep_nesting_and_image_bombs_are_one_line_errors_or_skips(scenes, tmp_path, capsys):
    records, image_dir = scenes
    for text, fragment in (("[" * DEEP, "nested deeper"), ('{"a": ' * DEEP, "no line is a JSON value")):
        (tmp_path / "deep.json").write_text(text)
        with pytest.raises(DataError, match=fragment) as info:
            laion_sg.load_laion_sg_json(tmp_path / "deep.json")
        assert "\n" not in str(info.value)
    deep_record = json.dumps({**records[0], "items": "X"}).replace('"X"', "[" * DEEP + "]" * DEEP)
    path = _jsonl(tmp_path / "r.jsonl", [*records, "[" * DEEP, deep_record])
    kept, summary = laion_sg.load_laion_sg_json(path)
    assert len(kept) == 4 and summary.skipped == {"malformed_json": 2}
    for answer in ("[" * DEEP, "[" * DEEP + "]" * DEEP, 'x {"a": ' * DEEP + "1" + "}" * DEEP):
        assert loads_lenient(answer) is None

    bombs = tmp_path / "bombs"
    bombs.mkdir()
    for width, height in ((100_000, 100_000), (10_000, 10_000)):   # PIL's error band, its warning band
        bomb = _png_claiming(bombs / f"{width}.png", width, height)
        with pytest.raises(DataError, match=r"pixels.*decompression bomb"):
            evaluate.load_image(bomb)
        assert laion_sg._read_image_bytes(bombs, "test", os.path.basename(bomb)) is None
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    _png_claiming(images / records[2]["name"], 100_000, 100_000)
    argv = ["--records", _jsonl(tmp_path / "ok.jsonl", records), "--images", str(images),
            "--out", str(tmp_path / "eval")]
    message = _exit_2(evaluate.main, argv, capsys)
    assert records[2]["name"] in message and "decompression bomb" in message


def test_shapes_judge_refuses_records_it_cannot_read(scenes, tmp_path, capsys):
    records, image_dir = scenes
    graph = SceneGraph((Item(0, "dog", ("brown",)), Item(1, "sofa", ("red",))), (Relation(0, "on", 1),))
    others = [graph.to_laion_record(img_id=f"dog{i}", name=r["name"]) for i, r in enumerate(records[:2])]
    argv = ["--records", _jsonl(tmp_path / "dogs.jsonl", others), "--images", image_dir,
            "--out", str(tmp_path / "e1")]
    message = _exit_2(evaluate.main, argv, capsys)
    assert "none of the 2 records is a ShapesSG scene" in message and "--judge vlm" in message
    capsys.readouterr()
    mixed = _jsonl(tmp_path / "mixed.jsonl", records + others[:1])
    metrics = _eval_metrics(mixed, image_dir, tmp_path / "e2")
    assert "warning: --judge shapes: 1 of 5 records are not ShapesSG scenes" in capsys.readouterr().err
    assert metrics["non_shapes_records"] == 1 and "1 of 5" in metrics["warnings"][0]


def test_builder_removes_incomplete_folders_of_killed_builds(scenes, tmp_path):
    import tensorflow_datasets as tfds

    records = scenes[0]
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    (json_dir / "test.json").write_text(json.dumps(records))
    data_dir = tmp_path / "tfds"
    dataset = data_dir / laion_sg.BUILDER_NAME
    killed = dataset / f"{tfds.core.constants.INCOMPLETE_PREFIX}AB12CD_1.0.0"
    killed.mkdir(parents=True)
    (killed / "test.array_record-00000-of-00001").write_bytes(b"half a shard")
    (dataset / "notes").mkdir()

    # A live build holds the lock: a second build waits and leaves the live one's folder alone.
    live = dataset / f"{tfds.core.constants.INCOMPLETE_PREFIX}LIVE00_1.0.0"
    held, release = threading.Event(), threading.Event()

    def live_build():
        with laion_sg._build_lock(data_dir):
            held.set()
            live.mkdir()
            release.wait(10)
            shutil.rmtree(live)             # a finished build renames or removes its folder

    holder = threading.Thread(target=live_build)
    holder.start()
    held.wait(10)
    built = []
    second = threading.Thread(target=lambda: built.append(laion_sg.build_laion_sg(json_dir, data_dir)))
    second.start()
    time.sleep(0.5)
    assert live.is_dir() and killed.is_dir() and not built
    release.set()
    holder.join(10)
    second.join(60)
    assert built and sorted(p.name for p in dataset.iterdir()) == ["1.0.0", "notes"]
    assert len(laion_sg.make_reader(built[0], "test", 4, seed=0, shuffle=False, num_epochs=1)
               .__iter__().__next__()["img_id"]) == 4
