"""Reflection-GRPO on the LAION-SG path (prompts.source=laion_sg, checker.kind=vlm): both stages
of configs/laion_sg.py:reflection_tiny run by rig-train on tiny random models saved from the
PyTorch references (Stable Diffusion, Qwen2.5-VL with its vision tower) and a tiny tfds build;
and every real variant checked against the ShapesSG config tree the other tests exercise, so
the real run cannot drift from what is tested."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rig_jax.errors import RigError
from tests.helpers import tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "laion_sg.py")
LOGGED = ("rollout/reward_mean", "rollout/reward_std", "rollout/zero_std_fraction", "clip_fraction",
          "approx_kl", "ratio_mean", "grad_norm", "time/rollout_s", "rollout/score_before")
PATHS = ("diffuser.path", "checker.path", "actor.path", "prompts.data_dir")


def _graphs():
    """LAION-SG-like scene graphs: attributes, several relations, non-consecutive item ids."""
    from rig_jax.data.scene_graph import Item, Relation, SceneGraph

    return [
        SceneGraph((Item(1, "dog", ("brown",)), Item(2, "sofa", ("red", "old"))), (Relation(1, "on", 2),)),
        SceneGraph((Item(1, "cup", ()), Item(2, "table", ("wooden",)), Item(5, "lamp", ())),
                   (Relation(1, "on", 2), Relation(5, "left of", 1))),
        SceneGraph((Item(4, "cat", ("black",)), Item(7, "window", ())), (Relation(4, "below", 7),)),
        SceneGraph((Item(1, "tree", ("tall",)), Item(2, "house", ("white",))), (Relation(1, "behind", 2),)),
    ]


def _laion_build(root):
    """train and test splits of four records each, built with the tfds builder the run reads."""
    from rig_jax.data.laion_sg import build_laion_sg

    json_dir = root / "json"
    json_dir.mkdir()
    graphs = _graphs()
    for split, order in (("train", graphs), ("test", graphs[::-1])):
        records = [g.to_laion_record(f"{split}{i}", f"{split}{i}.jpg") for i, g in enumerate(order)]
        (json_dir / f"{split}.json").write_text(json.dumps(records))
    build_laion_sg(json_dir, root / "tfds")
    return str(root / "tfds")


def _qwen_vl_folder(folder, seed):
    """A tiny random Qwen2.5-VL in the Hugging Face layout (weights, config, tokenizer with a
    chat template, preprocessor_config.json). The byte-level BPE is trained on the Checker's and
    the Actor's question templates, so their questions stay a few hundred tokens long."""
    from rig_jax.vlm import prompts
    from tests.helpers import save_tiny_vlm_folder

    corpus = [prompts.CHECKER_TEMPLATE, prompts.ACTOR_TEMPLATE, *(g.prompt() for g in _graphs())]
    save_tiny_vlm_folder(folder, corpus, vocab_size=1000, seed=seed)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The four paths configs/laion_sg.py:tiny leaves empty, as {field: folder}; the Checker and
    the Actor are separate random models, as in the real run."""
    pytest.importorskip("torch")
    from tests.sd_fixtures import shared_tiny_sd_folder, single_threaded_torch

    diffuser, _ = shared_tiny_sd_folder(tmp_path_factory)
    with single_threaded_torch():
        checker = _qwen_vl_folder(tmp_path_factory.mktemp("checker"), seed=0)
        actor = _qwen_vl_folder(tmp_path_factory.mktemp("actor"), seed=1)
    return {"diffuser.path": diffuser, "checker.path": checker, "actor.path": actor,
            "prompts.data_dir": _laion_build(tmp_path_factory.mktemp("laion_sg"))}


_env = tool_env


def _rig_train(variant, workdir, folders, *overrides):
    args = [sys.executable, "-m", "rig_jax.tools.train", f"--config={CONFIG}:{variant}",
            f"--workdir={workdir}", *(f"--config.{field}={path}" for field, path in folders.items()),
            *overrides]
    # a cold compilation cache on a busy 2-core machine took 12 minutes; a warm one about 2
    out = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the config tree

def _tree(config, prefix=""):
    """{dotted field: type of its value} of a ConfigDict, recursively."""
    import ml_collections

    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_tree(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = type(value)
    return out


def _configs(variant):
    from configs import laion_sg, shapes_grpo

    prefix, models = laion_sg.split_variant(variant)
    stage = {"": "actor", "editor_": "editor", "reflection_": "reflection"}[prefix]
    shapes = shapes_grpo.get_config(stage + ("_tiny" if models == "tiny" else ""))
    return laion_sg.get_config(variant), shapes


def _variants():
    from configs import laion_sg

    return laion_sg.VARIANTS


@pytest.mark.parametrize("variant", _variants())
def test_variant_has_the_tested_tree(variant):
    """Same fields and value types as configs/shapes_grpo.py's variant for the same job (no
    extras): the code the ShapesSG tests run reads every field of this config too."""
    ours, shapes = _configs(variant)
    assert ours.job == shapes.job
    a, b = _tree(ours), _tree(shapes)
    assert sorted(set(a) ^ set(b)) == []
    assert {k: v for k, v in a.items() if b[k] is not v} == {}
    for field in (*PATHS, "judge.path"):                  # no invented path that silently "works"
        section, name = field.split(".")
        assert ours[section][name] == "", field
    assert ours.editor_weights == ""                         # the Diffuser's weights


@pytest.mark.parametrize("variant", [v for v in _variants() if not v.endswith("tiny")])
def test_real_variants_keep_method_defaults(variant):
    """The real runs: bf16 models, SD's 50-step DDIM at guidance 7.5, LoRA, method.md's GRPO
    settings for each stage they run (stage fields merged as rig-train merges them)."""
    from rig_jax.tools.train import stage_config

    config, _ = _configs(variant)
    assert {config.diffuser.dtype, config.actor.dtype, config.checker.dtype} == {"bf16"}
    assert config.prompts.source == "laion_sg" and config.checker.kind == "vlm"
    assert (config.prompts.split, config.prompts.eval_split) == ("train", "test")
    for sampler in (config.diffuser.sampler, config.editor.sampler):
        assert (sampler.num_steps, sampler.guidance_scale) == (50, 7.5)
    assert config.editor.strength == 0.6 and config.rl.group_size == 8 and config.rl.lora.enabled
    assert config.distributed.enabled == (not variant.endswith("gpu"))
    stages = ([stage_config(config, s, {}) for s in ("grpo_actor", "grpo_editor")] if "stages" in config
              else [config])
    for stage in stages:
        if stage.job == "grpo_actor":
            assert (stage.rl.clip_epsilon, stage.rl.kl_beta, stage.editor.sampler.eta) == (0.2, 0.04, 0.0)
        else:
            assert (stage.rl.clip_range, stage.rl.kl_beta, stage.editor.sampler.eta) == (1e-4, 0.01, 1.0)
            assert stage.rl.timestep_fraction == 0.6
        assert stage.rl.lora.targets


def test_unknown_variant_is_one_line():
    from rig_jax.config import load_config_file
    from rig_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown variant 'sd15'") as info:
        load_config_file(f"{CONFIG}:sd15")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the laion_sg / vlm path

def test_empty_paths_are_refused_naming_the_field(devices):
    """Each path the real variants leave empty is refused in one line naming the field, by the
    functions the stages build their models and prompts with (the judge's only when a reward
    asks for a Judge); the end-to-end test below runs those functions with the paths filled."""
    from configs import laion_sg
    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.parallel.rules import DEFAULT_RULES
    from rig_jax.rl.environment import build_checker, build_environment, build_judge, prompt_source
    from rig_jax.rl.stage_actor import load_actor

    config = laion_sg.get_config("sd15_qwen3b")
    mesh = make_mesh(config.mesh, devices)
    calls = {"diffuser.path": lambda: build_environment(config, mesh, DEFAULT_RULES),
             "prompts.data_dir": lambda: prompt_source(config),
             "checker.path": lambda: build_checker(config, None, mesh, DEFAULT_RULES),
             "judge.path": lambda: build_judge(config, None, mesh, DEFAULT_RULES),
             "actor.path": lambda: load_actor(config, mesh, DEFAULT_RULES)}
    assert sorted(calls) == sorted([*PATHS, "judge.path"])
    for field, call in calls.items():
        with pytest.raises(RigError) as info:
            call()
        assert str(info.value).startswith(f"{field}: ") and "\n" not in str(info.value), field


@pytest.mark.heavy(seconds=110)
def test_reflection_tiny_trains_both_stages_and_exports(folders, tmp_path):
    """Both stages through rig-train: the rollout reads LAION-SG batches, the VLM Checker scores
    SD images, the Actor's first update is on-policy (ratio 1, no KL), the held-out loop reads
    the test split, and each export loads back."""
    from rig_jax.vlm.pipeline import load_vlm_pipeline
    from rig_jax.weights.diffusers_pipeline import load_pipeline

    workdir = tmp_path / "grpo"
    _rig_train("reflection_tiny", workdir, folders)
    for stage in ("grpo_actor", "grpo_editor"):
        records = _records(workdir / stage)
        rows = [r for r in records if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2], stage
        for key in LOGGED:
            assert key in rows[0], (stage, key)
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
        assert abs(rows[0]["ratio_mean"] - 1.0) < 1e-4, stage
        assert 0.0 <= rows[0]["rollout/zero_std_fraction"] <= 1.0
        assert 0.0 <= rows[0]["rollout/score_before"] <= 1.0
        evals = [r for r in records if "eval/score_final" in r]
        assert len(evals) == 1 and evals[0]["eval/rounds_used"] == 1.0, stage
    assert _records(workdir / "grpo_actor")[0]["approx_kl"] < 1e-8

    actor, params = load_vlm_pipeline(str(workdir / "grpo_actor" / "actor"))
    source, _ = load_vlm_pipeline(folders["actor.path"])
    assert actor.config.vision is not None and actor.config == source.config
    assert "visual" in params
    editor, params = load_pipeline(str(workdir / "grpo_editor" / "editor"))
    diffuser, _ = load_pipeline(folders["diffuser.path"])
    assert editor.configs["unet"] == diffuser.configs["unet"] and "unet" in params
