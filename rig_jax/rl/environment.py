"""What the Reflection-GRPO policies act in, built from one config: the prompts, the frozen
Diffuser, the Editor's weights, the Checker, and the Judge when a reward or an evaluation
asks for it. Both stages and the end-to-end job share it, so a config section means the
same thing everywhere.

Prompt sources: `shapes` (ShapesSG scenes drawn from `(seed, index)`, held-out prompts from
another seed) and `laion_sg` (the tfds LAION-SG build read with grain; every host reads the
same global batches, as the rollout is one SPMD program over all of them).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from rig_jax.data import shapes
from rig_jax.data.scene_graph import SceneGraph
from rig_jax.data.shapes import WORLD_FILE
from rig_jax.diffusion.settings import EditSettings, SamplerSettings
from rig_jax.errors import ConfigError
from rig_jax.parallel.rules import LogicalRules
from rig_jax.rig.checker import Checker, ShapesChecker, VLMChecker, VLMCheckerSettings
from rig_jax.weights.diffusers_pipeline import SDPipeline, load_pipeline
from rig_jax.weights.io import read_json

PROMPT_SOURCES = ("shapes", "laion_sg")
CHECKERS = ("shapes", "vlm")


# ----------------------------------------------------------------------------- prompts

@dataclasses.dataclass(frozen=True)
class ShapesPrompts:
    """ShapesSG prompts: training scenes from `(seed, index)`, held-out ones from `eval_seed`."""
    world: shapes.ShapesConfig
    seed: int
    eval_seed: int

    def dataset(self, batch_size: int) -> grain.IterDataset:
        indices = grain.MapDataset.range(2 ** 31 - 1).shuffle(seed=self.seed).batch(batch_size)
        return indices.map(lambda ix: {"index": np.asarray(ix, np.int64)}).to_iter_dataset()

    def graphs(self, batch: Any) -> list[SceneGraph]:
        scenes = [shapes.generate_scene(np.random.default_rng([self.seed, int(i)]), self.world)
                  for i in np.asarray(batch["index"]).reshape(-1)]
        return [shapes.scene_graph(scene) for scene in scenes]

    def held_out(self, n: int) -> list[SceneGraph]:
        return [shapes.scene_graph(s) for s in shapes.generate_scenes(self.eval_seed, n, self.world)]


@dataclasses.dataclass(frozen=True)
class LaionPrompts:
    """LAION-SG scene graphs from a tfds build (`rig_jax.data.laion_sg`)."""
    data_dir: str
    split: str
    eval_split: str
    seed: int

    def dataset(self, batch_size: int) -> grain.IterDataset:
        from rig_jax.data.laion_sg import make_reader

        # shard 0 of 1 on every host: the rollout needs the whole global batch everywhere
        return make_reader(self.data_dir, self.split, batch_size, self.seed, shard_index=0, shard_count=1)

    def graphs(self, batch: Any) -> list[SceneGraph]:
        return list(batch["graph"])

    def held_out(self, n: int) -> list[SceneGraph]:
        from rig_jax.data.laion_sg import make_reader

        reader = make_reader(self.data_dir, self.eval_split, n, self.seed, shuffle=False, num_epochs=1,
                             shard_index=0, shard_count=1, drop_remainder=False)
        return list(next(iter(reader))["graph"])


def prompt_source(config: Any) -> ShapesPrompts | LaionPrompts:
    p = config.prompts
    if p.source not in PROMPT_SOURCES:
        raise ConfigError(f"prompts.source: {p.source!r} is not one of {', '.join(PROMPT_SOURCES)}")
    if p.source == "shapes":
        return ShapesPrompts(shapes.world_from_config(config.world), config.seed, p.eval_seed)
    if not p.data_dir:
        raise ConfigError("prompts.data_dir: required for prompts.source=laion_sg (the tfds build folder)")
    return LaionPrompts(p.data_dir, p.split, p.eval_split, config.seed)


# ----------------------------------------------------------------------------- models

def check_trained_world(folder: str, field: str, config: Any) -> None:
    """Refuses ShapesSG prompts from a world the model at `folder` was not trained on (its
    `shapes_config.json`): a 2-object Actor's question budget or a Diffuser's vocabulary would
    otherwise fail deep inside a rollout, or silently measure the wrong thing. Folders without
    the file (SD, Qwen2.5-VL checkpoints) and LAION-SG prompts are not checked."""
    path = os.path.join(folder, WORLD_FILE)
    if config.prompts.source != "shapes" or not os.path.isfile(path):
        return
    trained = read_json(path).get("world")
    if not isinstance(trained, dict):
        raise ConfigError(f"{path}: no 'world' section ({field}'s model)")
    w = config.world
    for key in ("image_size", "colours", "shapes"):
        want = list(w[key]) if isinstance(w[key], (tuple, list)) else w[key]
        if key not in trained or trained[key] != want:
            raise ConfigError(f"world.{key}: {want} is not the {trained.get(key)} that {field}'s model was "
                              f"trained on ({path})")
    lo, hi = trained.get("min_objects"), trained.get("max_objects")
    if not isinstance(lo, int) or not isinstance(hi, int):
        raise ConfigError(f"{path}: world.min_objects / max_objects missing ({field}'s model)")
    if w.min_objects < lo or w.max_objects > hi:
        raise ConfigError(f"world.min_objects/max_objects: {w.min_objects}-{w.max_objects} objects lie "
                          f"outside the {lo}-{hi} that {field}'s model was trained on ({path})")


@dataclasses.dataclass(frozen=True, eq=False)
class Environment:
    """The frozen parts around the policy being trained, placed on the mesh."""
    pipe: SDPipeline
    diffuser_params: Any          # the Diffuser's own weights (draws I_0)
    editor_params: Any            # the Editor's weights: the Diffuser's unless editor_weights names others
    sampler: SamplerSettings      # the Diffuser's DDIM
    edit: EditSettings            # the Editor's inversion and re-denoising
    checker: Checker
    prompts: ShapesPrompts | LaionPrompts
    judge: Any = None


def compute_dtype(name: str) -> Any:
    dtypes = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


def load_diffuser(path: str, field: str, dtype: Any, mesh: Any, rules: LogicalRules
                  ) -> tuple[SDPipeline, Any]:
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{field}: {path or '(empty)'} is not a diffusers pipeline folder")
    return load_pipeline(path, dtype=dtype, param_dtype=jnp.float32, mesh=mesh, rules=rules)


def build_checker(config: Any, world: shapes.ShapesConfig | None, mesh: Any, rules: LogicalRules) -> Checker:
    c = config.checker
    if c.kind not in CHECKERS:
        raise ConfigError(f"checker.kind: {c.kind!r} is not one of {', '.join(CHECKERS)}")
    if c.kind == "shapes":
        if world is None:
            raise ConfigError("checker.kind=shapes: the pixel detector reads ShapesSG scenes only "
                              "(prompts.source=shapes)")
        return ShapesChecker(world)
    from rig_jax.vlm.pipeline import load_vlm_pipeline

    if not c.path:
        raise ConfigError("checker.path: required for checker.kind=vlm (a Qwen2.5-VL folder)")
    pipe, params = load_vlm_pipeline(c.path, compute_dtype(c.dtype), mesh=mesh, rules=rules)
    settings = VLMCheckerSettings(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                                  pad_to_multiple_of=c.pad_to_multiple_of)
    return VLMChecker(pipe, params, settings)


JUDGES = ("shapes", "vlm")


def check_judge(config: Any) -> None:
    """What `build_judge` would refuse, checked without loading anything, so a job that builds
    its Judge only after training (the demo's systems) refuses a bad one before it starts."""
    j = config.judge
    if j.kind not in JUDGES:
        raise ConfigError(f"judge.kind: {j.kind!r} is not one of {', '.join(JUDGES)}")
    if j.kind == "shapes" and config.prompts.source != "shapes":
        raise ConfigError("judge.kind=shapes: the pixel detector reads ShapesSG scenes only "
                          f"(prompts.source is {config.prompts.source!r})")
    if j.kind == "vlm" and not j.path:
        raise ConfigError("judge.path: required for judge.kind=vlm (a Qwen2.5-VL folder)")
    if j.kind == "vlm" and not os.path.isdir(j.path):
        raise ConfigError(f"judge.path: {j.path} is not a folder (a Qwen2.5-VL folder for judge.kind=vlm)")


def build_judge(config: Any, world: shapes.ShapesConfig | None, mesh: Any, rules: LogicalRules) -> Any:
    check_judge(config)
    j = config.judge
    if j.kind == "shapes":
        from rig_jax.eval.shapes_judge import ShapesJudge

        if world is None:
            raise ConfigError("judge.kind=shapes: the pixel detector reads ShapesSG scenes only")
        return ShapesJudge(world)
    from rig_jax.eval.judge import VLMJudge, make_vlm_generate

    return VLMJudge(make_vlm_generate(j.path, j.max_new_tokens, compute_dtype(j.dtype), mesh=mesh,
                                      rules=rules), batch_size=j.batch_size)


def build_environment(config: Any, mesh: Any, rules: LogicalRules, need_judge: bool = False) -> Environment:
    """Loads the Diffuser (and the Editor's weights when `editor_weights` is set), the Checker,
    the prompts and, with `need_judge`, the Judge."""
    check_trained_world(config.diffuser.path, "diffuser.path", config)
    if config.editor_weights:
        check_trained_world(config.editor_weights, "editor_weights", config)
    dtype = compute_dtype(config.diffuser.dtype)
    pipe, params = load_diffuser(config.diffuser.path, "diffuser.path", dtype, mesh, rules)
    editor_params = params
    if config.editor_weights:
        editor_pipe, editor_params = load_diffuser(config.editor_weights, "editor_weights", dtype, mesh,
                                                   rules)
        if editor_pipe.configs["unet"] != pipe.configs["unet"]:
            raise ConfigError(f"editor_weights: {config.editor_weights} holds a U-Net of another shape than "
                              f"diffuser.path's")
    source = prompt_source(config)
    world = source.world if isinstance(source, ShapesPrompts) else None
    return Environment(
        pipe=pipe, diffuser_params=params, editor_params=editor_params,
        sampler=SamplerSettings.from_config(config.diffuser.sampler, "diffuser.sampler"),
        edit=EditSettings.from_config(config.editor, "editor"),
        checker=build_checker(config, world, mesh, rules), prompts=source,
        judge=build_judge(config, world, mesh, rules) if need_judge else None)


def wants_judge(config: Any) -> bool:
    """The Judge is built when a reward needs it or a VLM judge is named (held-out evaluation
    then reports its SG-IoU; ShapesSG's pixel detector is always at hand)."""
    return config.rl.reward == "judge" or (config.judge.kind == "vlm" and bool(config.judge.path))


def actor_temperature(config: Any) -> float:
    """`actor.temperature`, or the folder's generation_config.json default when it is <= 0."""
    if config.actor.temperature > 0:
        return float(config.actor.temperature)
    path = os.path.join(config.actor.path, "generation_config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"actor.temperature: not set and {path} does not exist")
    value = read_json(path).get("temperature")
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path}: no positive 'temperature' (set actor.temperature)")
    return float(value)


def repeat_each(items: Sequence[Any], times: int) -> list[Any]:
    """[a, b] -> [a, a, b, b] for times = 2: a group's rows are adjacent (row i*G + g)."""
    return [x for x in items for _ in range(times)]
