"""Config values and the training / demo entry points (issue 13): every field set on the command
line either acts or is refused, bad values are one line naming the flag or field, and output
paths are checked before any work. In-process through the config loader; two subprocess runs
check the exit status and the one-line stderr of the entry points."""
import os
import subprocess
import sys

import ml_collections
import pytest

from rig_jax.config import parse_config
from rig_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = os.path.join(ROOT, "configs", "shapes_grpo.py")


def _parsers():
    from rig_jax.tools import shapes_data, shapes_demo, train

    return {"demo": shapes_demo.build_parser(), "train": train.build_parser(),
            "data": shapes_data.build_parser()}


def _refused(parser, argv, *needles):
    with pytest.raises(ConfigError) as info:
        parse_config(argv, parser)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (argv, message)
    return message


def test_bad_config_values_are_one_line_naming_the_flag(tmp_path):
    """Empty --config, non-integer mesh entries, negative seeds / noise / eta / guidance,
    --config.variant, an unknown variant (whole reason and the variants), distributed ids."""
    from rig_jax.parallel.mesh import maybe_initialize_distributed, resolve_mesh_shape

    p = _parsers()
    _refused(p["demo"], ["--config="], "--config: empty", "configs/shapes.py:demo")
    _refused(p["demo"], ["--config=:tiny"], "no file given")
    for shape in ("(2.5,1,1)", "('a',1,1)", "(True,1,1)"):
        _refused(p["demo"], [f"--config.mesh.shape={shape}"], f"--config.mesh.shape={shape}", "int")
    for shape in ((2.5, 1, 1), ("2", 1, -1), "811"):            # set in code, not on the command line
        with pytest.raises(ConfigError, match=r"mesh\.shape"):
            resolve_mesh_shape(shape, 8)
    for argv in (["--config.seed=-1"], ["--config.systems.seed=-3"], ["--config.prompts.eval_seed=-2"],
                 ["--config.diffuser.sampler.guidance_scale=-2"],
                 ["--config.stages.grpo_editor.editor.sampler.eta=-1"],
                 ["--config.editor.inversion.guidance_scale=nan"]):
        _refused(p["demo"], argv, argv[0], ">= 0")
    _refused(p["demo"], [f"--config.seed={2 ** 64}"], "2**63")
    _refused(p["data"], ["--config.data.noise_sigma=-0.1"], "--config.data.noise_sigma=-0.1", ">= 0")
    _refused(p["demo"], ["--config.variant=tiny"], "--config=configs/shapes.py:VARIANT", "demo, tiny")
    _refused(p["data"], ["--config.variant=tiny"], "--config=configs/shapes_data.py:VARIANT", "demo, tiny")

    # an unknown variant: the whole reason on one line, and the variants the module names
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "keyed.py").write_text(
        "import ml_collections\nVARIANTS = ('small', 'large')\n"
        "def get_config(variant='small'):\n    return {'small': ml_collections.ConfigDict()}[variant]\n")
    (folder / "lines.py").write_text(
        "def get_config(variant='a'):\n"
        "    raise ValueError('no variant ' + repr(variant) + '\\nexpected a or b')\n")
    _refused(p["train"], [f"--config={folder / 'keyed.py'}:large"], "unknown variant 'large'", "small, large")
    _refused(p["train"], [f"--config={folder / 'lines.py'}:c"], "no variant 'c' expected a or b")

    from rig_jax.train.step import StepSettings

    for fields, needle in ((dict(compute_dtype="float8"), "step.compute_dtype"),
                           (dict(ema_decay=1.5), "step.ema_decay"), (dict(ema_decay=-0.1), "step.ema_decay")):
        with pytest.raises(ConfigError, match=needle):
            StepSettings(**fields)
    for dist, needle in ((dict(num_processes=2, process_id=2), "distributed.process_id: 2 is not below"),):
        section = ml_collections.ConfigDict(dict(enabled=True, coordinator_address="127.0.0.1:1",
                                                 local_device_ids=(), **dist))
        with pytest.raises(ConfigError, match=needle):
            maybe_initialize_distributed(section)


def test_fields_the_job_would_not_read_are_refused():
    """A field set on the command line that the job would ignore with this config is refused with
    the reason; the same field is accepted where it acts. `eval.judge=vlm` of shapes_data (which
    only runs the detector) is refused."""
    p = _parsers()
    ignored = [
        ("demo", ["--config.rl.kl_beta=0.1"], "--config.stages.grpo_actor.rl.kl_beta"),      # stages set it
        ("demo", ["--config.optimizer.learning_rate=1e-3"], "every stage sets its own value"),
        ("demo", ["--config.job=grpo_actor"], "reflection_grpo"),
        ("demo", ["--config.judge.path=/x"], "judge.kind=shapes"),
        ("demo", ["--config.judge.kind=vlm"], "no judge.path"),
        ("demo", ["--config.checker.dtype=bf16"], "checker.kind=shapes"),
        ("demo", ["--config.rl.lora.rank=8"], "rl.lora.enabled is False"),
        ("demo", ["--config.editor.null_text.inner_steps=3"], "null_text.enabled is False"),
        ("demo", ["--config.prompts.data_dir=/x"], "prompts.source=shapes"),
        ("demo", ["--config.distributed.coordinator_address=h:1"], "distributed.enabled is False"),
        ("demo", ["--config.step.ema_decay=0.99"], "never an EMA"),
        ("train", [f"--config={GRPO}:actor", "--config.rl.clip_range=0.1"], "only stage grpo_editor"),
        ("train", [f"--config={GRPO}:editor_tiny", "--config.rl.aggregation=sequence"],
         "only stage grpo_actor"),
        ("train", [f"--config={GRPO}:reflection_tiny", "--config.job=grpo_actor",
                   "--config.stages.grpo_actor.rl.kl_beta=0.1"], "runs one stage"),
        ("train", [f"--config={ROOT}/configs/laion_sg.py:tiny", "--config.world.image_size=8"],
         "prompts.source=laion_sg"),
        ("data", ["--config.eval.judge=vlm"], "--config.eval.judge=vlm: 'vlm' is not run by shapes_data"),
    ]
    for tool, argv, needle in ignored:
        _refused(p[tool], argv, needle)
    acting = [
        ("demo", ["--config.stages.grpo_actor.rl.kl_beta=0.1"]),
        ("demo", ["--config.rl.lora.enabled=True", "--config.rl.lora.rank=8"]),
        ("demo", ["--config.checker.kind=vlm", "--config.checker.dtype=bf16"]),
        ("demo", ["--config.judge.kind=vlm", "--config.judge.path=/x"]),
        ("demo", ["--config.distributed.enabled=True", "--config.distributed.num_processes=2"]),
        ("train", [f"--config={GRPO}:editor", "--config.rl.clip_range=0.1"]),
        ("train", [f"--config={GRPO}:reflection_tiny", "--config.rl.aggregation=sequence"]),
        ("train", [f"--config={GRPO}:reflection_tiny", "--config.job=grpo_actor", "--config.rl.kl_beta=0.1"]),
    ]
    for tool, argv in acting:
        parse_config(argv, p[tool])


def test_default_config_outside_the_repository_root(tmp_path, monkeypatch):
    """The main job without --config from another folder loads the committed models (the
    config's paths do not depend on the working directory)."""
    monkeypatch.chdir(tmp_path)
    config = parse_config([], _parsers()["demo"])
    for path in (config.diffuser.path, config.actor.path):
        assert os.path.isfile(os.path.join(path, "config.json" if path == config.actor.path else
                                           "model_index.json")), path


def _demo_config(workdir, *argv):
    return parse_config(["--config=configs/shapes.py:tiny", f"--config.workdir={workdir}", *argv],
                        _parsers()["demo"])


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    """rig-train's --workdir and the demo's workdir (its stage folders, report files, plots/):
    a file in the way or a path under a file fails at once, naming the flag; a workdir holding
    an earlier run is resumed."""
    from rig_jax.tools import shapes_demo, train

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(train, "run_stages", started)
    monkeypatch.setattr(train, "run_job", started)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    def layout(name, files=(), folders=()):
        root = tmp_path / name
        for f in folders:
            (root / f).mkdir(parents=True)
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text("x")
        return root

    def train_config(workdir):
        return parse_config([f"--config={GRPO}:reflection_tiny", f"--workdir={workdir}"], _parsers()["train"])

    refused = [
        (train.run, train_config(blocker), "--workdir"),
        (train.run, train_config(blocker / "run"), "--workdir"),
        (train.run, train_config(layout("t1", files=["grpo_editor"])), "--workdir"),
        (shapes_demo.run, _demo_config(blocker), "--config.workdir"),
        (shapes_demo.run, _demo_config(blocker / "run"), "--config.workdir"),
        (shapes_demo.run, _demo_config(layout("d1", folders=["report.html"])), "--config.workdir"),
        (shapes_demo.run, _demo_config(layout("d2", files=["plots"])), "--config.workdir"),
        (shapes_demo.run, _demo_config(layout("d3", files=["grpo_actor"])), "--config.workdir"),
        (shapes_demo.run, _demo_config(tmp_path / "d4", "--config.judge.kind=vlm",
                                       f"--config.judge.path={tmp_path / 'no_vlm'}"), "judge.path"),
    ]
    for run, config, needle in refused:
        with pytest.raises(ConfigError, match=needle):
            run(config)
    resumed = layout("d5", files=["metrics.json", "grpo_actor/metrics.jsonl"], folders=["plots"])
    for run, config in ((shapes_demo.run, _demo_config(resumed)), (train.run, train_config(resumed))):
        with pytest.raises(Started):
            run(config)


def test_demo_systems_use_the_configured_judge(tmp_path, monkeypatch):
    """The systems are scored by the Judge that build_environment builds from `judge.*`, not by
    a pixel detector fixed in the tool (the trained exports are stood in for)."""
    from rig_jax.rl import environment, stage_actor, systems
    from rig_jax.tools import shapes_demo

    seen = {}
    real_build = environment.build_environment

    def build(*args, **kwargs):
        seen["env"] = real_build(*args, **kwargs)
        return seen["env"]

    def evaluate_systems(models, graphs, rng, rounds, judge, world, progress):
        seen["judge"] = judge
        return []

    monkeypatch.setattr(environment, "build_environment", build)
    monkeypatch.setattr(environment, "load_diffuser", lambda *a, **k: (None, None))
    monkeypatch.setattr(stage_actor, "load_actor", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(systems, "evaluate_systems", evaluate_systems)
    shapes_demo.evaluate(_demo_config(tmp_path / "w"), None, None)
    assert seen["judge"] is not None and seen["judge"] is seen["env"].judge


def _run(module, *args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(result, *needles):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_entry_points_exit_2_with_one_line(tmp_path):
    """The main job from outside the repository root with no --config and a file as its workdir,
    and rig-train with distributed.enabled and no coordinator off a pod: exit 2, one line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(_run("rig_jax.tools.shapes_demo", f"--config.workdir={blocker}", cwd=tmp_path),
                    f"--config.workdir={blocker}")
    assert sorted(os.listdir(tmp_path)) == ["file"]            # nothing written where it was started
    _one_line_error(_run("rig_jax.tools.train", "--config=configs/shapes_train.py:vae_tiny",
                         f"--workdir={tmp_path / 'w'}", "--config.distributed.enabled=True", cwd=ROOT),
                    "distributed.enabled", "coordinator_address")


def test_a_world_the_models_were_not_trained_on_is_refused(tmp_path):
    """The GRPO jobs read the world a ShapesSG model records (shapes_config.json) and refuse
    prompts from another one, naming the field and the file; a range inside the trained one,
    a folder without the file and LAION-SG prompts pass."""
    import json

    from configs import shapes_grpo
    from rig_jax.rl.environment import WORLD_FILE, check_trained_world

    config = shapes_grpo.get_config("reflection")
    folder = tmp_path / "model"
    folder.mkdir()
    check_trained_world(str(folder), "actor.path", config)            # no file: nothing to check
    record = {"world": {"image_size": 32, "min_objects": 2, "max_objects": 3,
                        "colours": list(config.world.colours), "shapes": list(config.world.shapes)}}
    (folder / WORLD_FILE).write_text(json.dumps(record))
    check_trained_world(str(folder), "actor.path", config)            # 2 objects, inside 2-3
    cases = {("max_objects", 4): ("world.min_objects/max_objects", "2-4", "2-3"),
             ("image_size", 64): ("world.image_size", "64"),
             ("colours", ("red", "green")): ("world.colours", "['red', 'green']")}
    for (key, value), needles in cases.items():
        bad = shapes_grpo.get_config("reflection")
        bad.world[key] = value
        with pytest.raises(ConfigError) as info:
            check_trained_world(str(folder), "actor.path", bad)
        message = str(info.value)
        assert "\n" not in message and "actor.path" in message and str(folder / WORLD_FILE) in message
        for needle in needles:
            assert needle in message, message
    bad.prompts.source = "laion_sg"
    check_trained_world(str(folder), "actor.path", bad)               # LAION-SG: no world to match
    (folder / WORLD_FILE).write_text(json.dumps({"sampler": {}}))
    with pytest.raises(ConfigError, match="no 'world' section"):
        check_trained_world(str(folder), "diffuser.path", config)
