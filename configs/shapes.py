"""The README's main job: RL-RIG on ShapesSG, end to end (rig_jax.tools.shapes_demo).

From the committed pretrained Diffuser and Actor (pretrained/shapes_sg): Reflection-GRPO
stage 1 (the Actor) and stage 2 (the Editor), then the six systems of docs/method.md on
held-out prompts, with metrics.json, per_record.csv, report.html and training plots under
`workdir`. A second run in the same workdir skips finished stages and resumes a stopped one.

Variants: `demo` (the README's `make demo`), `tiny` (the same path in minutes, CI).
    python -m rig_jax.tools.shapes_demo --config=configs/shapes.py:demo [--config.seed=1]
"""
import ml_collections

from configs import shapes_grpo

VARIANTS = ("demo", "tiny")


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/shapes.py: unknown variant {variant!r} (expected demo or tiny)")
    tiny = variant == "tiny"
    c = shapes_grpo.get_config("reflection_tiny" if tiny else "reflection")
    c.workdir = "runs/shapes_demo_tiny" if tiny else "runs/shapes_demo"
    c.train.total_steps = 4 if tiny else 40
    c.train.eval_every = 0
    c.train.checkpoint_every = 2 if tiny else 10
    c.systems = ml_collections.ConfigDict()
    c.systems.num_prompts = 8 if tiny else 200     # held-out prompts (prompts.eval_seed: never trained on)
    c.systems.seed = 90_004                        # the noise of I_0 and of every edit, alike for all systems
    c.systems.batch_size = 8 if tiny else 50
    c.systems.report_prompts = 8 if tiny else 40   # prompts shown in report.html (all are in per_record.csv)
    return c


def unread_fields(c: ml_collections.ConfigDict) -> dict[str, str]:
    """The GRPO tree's unread fields (configs/shapes_grpo.py), and `job`: the demo always runs
    both stages, then the systems."""
    return {**shapes_grpo.unread_fields(c), "job": "the demo always runs reflection_grpo (both stages)"}
