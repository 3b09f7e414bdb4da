"""Reflection-GRPO on ShapesSG for rig-train, from the committed pretrained models.

Variants: `actor` (stage 1), `editor` (stage 2), `reflection` (both in order: stage 2 uses
stage 1's Actor), and `*_tiny` of each (seconds to minutes, CI).
    rig-train --config=configs/shapes_grpo.py:actor --workdir runs/grpo_actor
    rig-train --config=configs/shapes_grpo.py:editor --workdir runs/grpo_editor \
        --config.actor.path=runs/grpo_actor/actor
    rig-train --config=configs/shapes_grpo.py:reflection --workdir runs/grpo
"""
import os

import ml_collections

from configs import common

VARIANTS = ("actor", "editor", "reflection")
JOBS = {"actor": "grpo_actor", "editor": "grpo_editor", "reflection": "reflection_grpo"}
# The committed models, found from this file, so a job started outside the repository root
# loads them too (a relative path would be read against the working directory).
PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained",
                          "shapes_sg")


def get_config(variant: str = "actor") -> ml_collections.ConfigDict:
    base_variant = variant.removesuffix("_tiny")
    if base_variant not in VARIANTS:
        raise ValueError(f"configs/shapes_grpo.py: unknown variant {variant!r} (expected one of "
                         f"{', '.join(VARIANTS)}, each also as <name>_tiny)")
    tiny = variant.endswith("_tiny")
    c = common.base()
    c.job = JOBS[base_variant]
    c.workdir = ""

    c.world = ml_collections.ConfigDict()      # the world the pretrained models were trained on
    c.world.image_size = 32
    c.world.min_objects = 2
    c.world.max_objects = 2
    c.world.colours = ("red", "green", "blue", "yellow", "magenta", "cyan")
    c.world.shapes = ("circle", "square", "triangle")

    c.prompts = ml_collections.ConfigDict()
    c.prompts.source = "shapes"                # shapes | laion_sg
    c.prompts.eval_seed = 90_003               # held out: training prompts come from (seed, index)
    c.prompts.data_dir = ""                    # laion_sg: the tfds build folder
    c.prompts.split = "train"
    c.prompts.eval_split = "test"

    c.diffuser = ml_collections.ConfigDict()
    c.diffuser.path = f"{PRETRAINED}/diffuser"
    c.diffuser.dtype = "fp32"
    c.diffuser.sampler = common.sampler()
    c.diffuser.sampler.num_steps = 10 if tiny else 20     # the pretrained model's shapes_config.json
    c.diffuser.sampler.guidance_scale = 3.0

    c.editor = common.editor()
    # 0.8, not common's 0.6: on 8x8 latents the layout is fixed by t = 0.6 T, so an edit from there
    # moved no object (0 of 37 wrong relations fixed on training-seed prompts, 0.8: 1-4 of 37).
    c.editor.strength = 0.8
    c.editor_weights = ""                      # a pipeline folder (stage 2's export); empty: the Diffuser's
    # tiny: 8 steps, so an edit runs int(0.8 * 8) = 6 of them (CI's time; the path is the same)
    c.editor.sampler.num_steps = 8 if tiny else 20
    c.editor.sampler.guidance_scale = 3.0

    c.checker = ml_collections.ConfigDict()
    c.checker.kind = "shapes"                  # shapes (the pixel detector) | vlm
    c.checker.path = ""
    c.checker.dtype = "fp32"
    c.checker.max_new_tokens = 256
    c.checker.batch_size = 8
    c.checker.pad_to_multiple_of = 16

    c.judge = ml_collections.ConfigDict()      # only built when rl.reward = judge
    c.judge.kind = "shapes"
    c.judge.path = ""
    c.judge.dtype = "fp32"
    c.judge.max_new_tokens = 384
    c.judge.batch_size = 8

    c.actor = ml_collections.ConfigDict()
    c.actor.path = f"{PRETRAINED}/actor"
    c.actor.dtype = "fp32"
    c.actor.temperature = 0.0                  # <= 0: the folder's generation_config.json
    c.actor.max_new_tokens = 32
    c.actor.max_words = 40

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_rollout = 2 if tiny else 8
    c.rl.group_size = 4 if tiny else 8
    c.rl.candidates = 4 if tiny else 16
    c.rl.minibatches = 2
    c.rl.epochs = 1
    c.rl.advantage = "grpo"
    c.rl.advantage_clip = 5.0
    c.rl.advantage_eps = 1e-4
    c.rl.format_weight = 0.1
    c.rl.clip_epsilon = 0.2                    # stage 1 ratio clip
    c.rl.aggregation = "token"
    c.rl.clip_range = 1e-4                     # stage 2 ratio clip
    c.rl.timestep_fraction = 0.6
    c.rl.actor_greedy = False                  # stage 2: the Actor's edit prompt sampled at tau
    c.rl.lora = ml_collections.ConfigDict()
    c.rl.lora.enabled = False
    c.rl.lora.rank = 4
    c.rl.lora.alpha = 4.0
    c.rl.lora.targets = ()                     # per stage (stage_fields): the VLM's or the U-Net's attention
    c.step = ml_collections.ConfigDict()
    c.step.compute_dtype = "float32"
    c.step.ema_decay = 0.0
    c.step.micro_batches = 1                   # > 1: an update's rows in parts, gradients accumulated
    stage(c, "actor" if base_variant != "editor" else "editor")

    c.loop = ml_collections.ConfigDict()
    c.loop.max_rounds = 2 if tiny else 3
    c.loop.final = "last"

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 4 if tiny else 120
    c.train.log_every = 1
    c.train.eval_every = 0 if tiny else 40
    c.train.checkpoint_every = 2 if tiny else 10
    c.train.keep_checkpoints = 2
    c.train.max_bad_steps = 5
    c.train.progress = not tiny

    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 90_003
    c.eval.num_prompts = 4 if tiny else 64      # 0: no held-out evaluation
    c.eval.batch_size = 4 if tiny else 16

    if base_variant == "reflection":
        # per-stage overrides, applied in order by rig-train (stage 2 reads stage 1's Actor)
        c.stages = ml_collections.ConfigDict()
        c.stages.grpo_actor = ml_collections.ConfigDict(stage_fields("actor"))
        c.stages.grpo_editor = ml_collections.ConfigDict(stage_fields("editor"))
    return c


# The fields only one stage reads (the other stage's loss, rollout and reward terms).
STAGE_ONLY = {"grpo_actor": ("rl.clip_epsilon", "rl.aggregation", "rl.format_weight"),
              "grpo_editor": ("rl.clip_range", "rl.timestep_fraction", "rl.actor_greedy")}
CHECKER_VLM = ("path", "dtype", "max_new_tokens", "batch_size", "pad_to_multiple_of")
JUDGE_VLM = ("path", "dtype", "max_new_tokens", "batch_size")
NULL_TEXT = ("inner_steps", "learning_rate", "early_stop_epsilon", "early_stop_slope")


def unread_fields(c: ml_collections.ConfigDict) -> dict[str, str]:
    """Field -> why the GRPO jobs (rig_jax/rl, the demo) do not read it with config `c`; the
    loader refuses such a field when it is set on the command line (rig_jax.config.check_config).
    Shared by every config of this tree (shapes, laion_sg)."""
    unread: dict[str, str] = {}
    if "stages" in c and c.job == JOBS["reflection"]:
        # rig-train merges each stage's fields over the shared ones (tools/train.py stage_config)
        per_stage = [leaves(c.stages[name]) for name in c.stages]
        for key in per_stage[0]:
            if all(key in fields for fields in per_stage):
                where = ", ".join(f"--config.stages.{name}.{key}" for name in c.stages)
                unread[key] = f"every stage sets its own value (set {where})"
    elif "stages" in c:
        unread["stages"] = (f"job {c.job} runs one stage with the shared fields (only {JOBS['reflection']} "
                            "merges the stages)")
    if c.checker.kind == "shapes":
        unread.update({f"checker.{k}": "checker.kind=shapes (the pixel detector)" for k in CHECKER_VLM})
    if c.judge.kind == "shapes":
        unread.update({f"judge.{k}": "judge.kind=shapes (the pixel detector)" for k in JUDGE_VLM})
    elif not c.judge.path and c.rl.reward != "judge":
        unread.update({f"judge.{k}": "no judge.path: no VLM judge is built (the held-out evaluation "
                       "uses the pixel detector on ShapesSG, no judge on LAION-SG)"
                       for k in ("kind", "dtype", "max_new_tokens", "batch_size")})
    if not c.rl.lora.enabled:
        unread.update({f"rl.lora.{k}": "rl.lora.enabled is False (the whole model trains)"
                       for k in ("rank", "alpha", "targets")})
    if not c.editor.null_text.enabled:
        unread.update({f"editor.null_text.{k}": "editor.null_text.enabled is False" for k in NULL_TEXT})
    if c.prompts.source == "shapes":
        unread.update({f"prompts.{k}": "prompts.source=shapes (scenes drawn from the seed)"
                       for k in ("data_dir", "split", "eval_split")})
    elif c.prompts.source == "laion_sg":
        unread["world"] = "prompts.source=laion_sg (the world only draws ShapesSG scenes)"
        unread["prompts.eval_seed"] = "prompts.source=laion_sg (held-out prompts are prompts.eval_split)"
    unread["step.ema_decay"] = "the GRPO stages export and evaluate the trained params, never an EMA"
    for job, fields in STAGE_ONLY.items():
        if c.job != job and c.job != "reflection_grpo":
            unread.update({f: f"only stage {job} reads it, this job is {c.job}" for f in fields})
    return unread


def leaves(section: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted names of a section's fields."""
    out = []
    for key, value in section.items():
        nested = isinstance(value, ml_collections.ConfigDict)
        out += leaves(value, f"{prefix}{key}.") if nested else [prefix + key]
    return out


def stage_fields(name: str) -> dict:
    """What differs between the stages (nested like the config): the loss, the reward, the KL
    weight, the editor's eta, the learning rate and the update's micro-batches."""
    if name == "actor":
        return {"rl": {"loss": "grpo_token", "reward": "checker_delta", "kl_beta": 0.04,
                       "lora": {"targets": (r".*self_attn/[qkvo]_proj/kernel",)}},
                "editor": {"sampler": {"eta": 0.0}}, "optimizer": {"learning_rate": 1e-4},
                "step": {"micro_batches": 1}}        # its batches cannot be split (token positions)
    return {"rl": {"loss": "ppo_diffusion", "reward": "checker_score", "kl_beta": 0.01,
                   "lora": {"targets": (r".*attn[12]/to_(q|k|v|out_0)/kernel",)}},
            "editor": {"sampler": {"eta": 1.0}}, "optimizer": {"learning_rate": 3e-5},
            "step": {"micro_batches": 1}}            # > 1: opt-in (docs/benchmarks.md, step.micro_batches)


def merge(c: ml_collections.ConfigDict, fields: dict) -> None:
    """Writes nested `fields` into `c` (every key must already exist there)."""
    for key, value in fields.items():
        if isinstance(value, dict):
            merge(c[key], value)
        else:
            c[key] = value


def stage(c: ml_collections.ConfigDict, name: str, fields_of=None) -> None:
    """The optimizer section and the stage's fields (`fields_of(name)`, default: stage_fields)."""
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.0           # set by the stage's fields
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    c.rl.loss = ""
    c.rl.reward = ""
    c.rl.kl_beta = 0.0
    merge(c, (fields_of or stage_fields)(name))
