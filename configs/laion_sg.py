"""Reflection-GRPO on LAION-SG with real models: Stable Diffusion as Diffuser and Editor,
Qwen2.5-VL as Checker and (separate weights) as Actor.

The tree is configs/shapes_grpo.py's, field for field (tests/test_laion_grpo.py checks it), so
the code that runs the tested ShapesSG jobs reads this one unchanged; only values differ.

Variants: a model set, prefixed by the job. `<models>` is stage 1 (grpo_actor),
`editor_<models>` stage 2 (grpo_editor), `reflection_<models>` both in order (stage 2 uses
stage 1's Actor). Model sets:
- `sd15_qwen3b` (default): SD-1.5 (512 px) + Qwen2.5-VL-3B-Instruct, a TPU pod slice.
- `sd21_qwen7b`: SD-2.1 (768 px, v-prediction read from its scheduler config) +
  Qwen2.5-VL-7B-Instruct, FSDP over the slice.
- `gpu`: sd15_qwen3b on one GPU, with a smaller rollout (4 prompts x 8).
- `tiny`: the same tree at test sizes (tests/test_laion_grpo.py fills the paths).

No path has a default: each is empty and the job refuses it in one line naming the field.
Build the data once (`rig_jax.data.laion_sg.build_laion_sg(json_dir, data_dir)`), then:
    M="--config.diffuser.path=/models/stable-diffusion-v1-5 \
       --config.checker.path=/models/Qwen2.5-VL-3B-Instruct \
       --config.actor.path=/models/Qwen2.5-VL-3B-Instruct --config.prompts.data_dir=/data/laion_sg_tfds"
    rig-train --config=configs/laion_sg.py:sd15_qwen3b --workdir runs/laion_actor $M
    rig-train --config=configs/laion_sg.py:editor_sd15_qwen3b --workdir runs/laion_editor $M \
        --config.actor.path=runs/laion_actor/actor
    rig-train --config=configs/laion_sg.py:reflection_sd15_qwen3b --workdir runs/laion_grpo $M
(on a pod, the same command on every host; `gpu` and `tiny` likewise, with their own paths).
"""
import ml_collections

from configs import common, shapes_grpo

MODELS = ("sd15_qwen3b", "sd21_qwen7b", "gpu", "tiny")
STAGES = {"": "grpo_actor", "editor_": "grpo_editor", "reflection_": "reflection_grpo"}
ACTOR_LORA = r"language_model/.*/(self_attn/[qkvo]|mlp/(gate|up|down))_proj/kernel"   # decoder linears
EDITOR_LORA = r".*attn[12]/to_(q|k|v|out_0)/kernel"                                  # U-Net attention
VARIANTS = tuple(prefix + models for prefix in STAGES for models in MODELS)
unread_fields = shapes_grpo.unread_fields      # the same tree, the same fields read


def split_variant(variant: str) -> tuple[str, str]:
    """`reflection_gpu` -> ("reflection_", "gpu"); unknown names are a ValueError (one line)."""
    for prefix in ("editor_", "reflection_", ""):
        if variant.startswith(prefix) and variant[len(prefix):] in MODELS:
            return prefix, variant[len(prefix):]
    raise ValueError(f"configs/laion_sg.py: unknown variant {variant!r} (expected <models>, editor_<models> "
                     f"or reflection_<models>, models one of {', '.join(MODELS)})")


def get_config(variant: str = "sd15_qwen3b") -> ml_collections.ConfigDict:
    prefix, models = split_variant(variant)
    tiny = models == "tiny"
    c = common.base()
    c.job = STAGES[prefix]
    c.workdir = ""
    if models == "sd15_qwen3b":
        # A 3B Actor's float32 masters (15 GB) + the Checker in bf16 (7.5 GB) + SD-1.5 in float32
        # (4.3 GB) replicated per chip (pure data parallel, (-1, 1, 1)) overflow a 16 GiB v5e chip
        # and leave little for activations on a 32 GiB v4. So FSDP inside groups of 4 chips (one
        # host's, on the fast ICI; the mesh puts hosts on the data axis) and data parallel across
        # groups: ~7 GB of weights per chip, and the token-by-token decoders gather weights over 4
        # chips, not the whole slice. The batch is split over both axes (rules: batch -> data, fsdp).
        c.mesh.shape = (-1, 4, 1)
    elif models == "sd21_qwen7b":
        c.mesh.shape = (1, -1, 1)          # ~55 GB of weights (7B masters alone 33 GB): FSDP over all chips
    else:
        c.mesh.shape = (1, 1, 1)           # one device (an H200 holds all of sd15_qwen3b's ~27 GB)
    c.distributed.enabled = models in ("sd15_qwen3b", "sd21_qwen7b")   # pods: auto-detected

    c.world = ml_collections.ConfigDict()      # read only by prompts.source=shapes (shared tree)
    c.world.image_size = 32
    c.world.min_objects = 2
    c.world.max_objects = 2
    c.world.colours = ("red", "green", "blue", "yellow", "magenta", "cyan")
    c.world.shapes = ("circle", "square", "triangle")

    c.prompts = ml_collections.ConfigDict()
    c.prompts.source = "laion_sg"
    c.prompts.eval_seed = 90_003               # shapes only (LAION-SG holds out eval_split)
    c.prompts.data_dir = ""                    # the tfds build folder (build_laion_sg's data_dir)
    c.prompts.split = "train"
    c.prompts.eval_split = "test"

    # Image size comes from the folder (U-Net sample_size x VAE factor: 512 for SD-1.5, 768 for 2.1)
    c.diffuser = ml_collections.ConfigDict()
    c.diffuser.path = ""                       # a diffusers Stable Diffusion folder
    c.diffuser.dtype = "fp32" if tiny else "bf16"
    c.diffuser.sampler = common.sampler()      # 50 DDIM steps, guidance 7.5
    c.editor = common.editor()                 # strength 0.6, plain DDIM inversion (w_inv = 1)
    c.editor_weights = ""                      # a pipeline folder (stage 2's export); empty: the Diffuser's
    if tiny:
        c.diffuser.sampler.num_steps = 5
        c.editor.sampler.num_steps = 5         # strength 0.6: 3 re-denoising steps (stage 2 trains 1)

    c.checker = ml_collections.ConfigDict()
    c.checker.kind = "vlm"                     # greedy Qwen2.5-VL (rig_jax.rig.checker.VLMChecker)
    c.checker.path = ""                        # a Qwen2.5-VL folder
    c.checker.dtype = "fp32" if tiny else "bf16"
    c.checker.max_new_tokens = 8 if tiny else 384   # verdicts + scene graph of a LAION-SG prompt
    # images per decoder call; 768 px images are 729 tokens each (512 px: 324)
    c.checker.batch_size = {"tiny": 2, "sd21_qwen7b": 16}.get(models, 32)
    c.checker.pad_to_multiple_of = 16 if tiny else 64

    c.judge = ml_collections.ConfigDict()      # only built when rl.reward = judge (then set judge.path)
    c.judge.kind = "vlm"
    c.judge.path = ""
    c.judge.dtype = c.checker.dtype
    c.judge.max_new_tokens = 8 if tiny else 384
    c.judge.batch_size = 2 if tiny else 8

    c.actor = ml_collections.ConfigDict()
    c.actor.path = ""                          # a Qwen2.5-VL folder (the Instruct model, or stage 1's export)
    c.actor.dtype = "fp32" if tiny else "bf16"
    # Set, not the folder's default: Qwen2.5-VL-Instruct's generation_config.json is near-greedy,
    # which would make the G samples of a group alike (zero-std groups, no signal).
    c.actor.temperature = 1.0
    c.actor.max_new_tokens = 8 if tiny else 96   # {"edit_prompt": "..."} of at most max_words words
    c.actor.max_words = 40

    c.rl = ml_collections.ConfigDict()
    # Pod: 16 prompts x G=8 = 128 edits per rollout (32 per update, one or more per chip), the 16
    # drawn from 32 generated so that most are ones the Checker finds wrong.
    c.rl.prompts_per_rollout = {"tiny": 2, "gpu": 4}.get(models, 16)
    c.rl.group_size = 2 if tiny else 8         # G (method.md)
    c.rl.candidates = {"tiny": 2, "gpu": 8}.get(models, 32)
    c.rl.minibatches = 2 if tiny else 4
    c.rl.epochs = 1
    c.rl.advantage = "grpo"
    c.rl.advantage_clip = 5.0
    c.rl.advantage_eps = 1e-4
    c.rl.format_weight = 0.1
    c.rl.clip_epsilon = 0.2                    # stage 1 ratio clip (method.md)
    c.rl.aggregation = "token"
    c.rl.clip_range = 1e-4                     # stage 2 ratio clip (method.md, DDPO)
    c.rl.timestep_fraction = 0.6
    c.rl.actor_greedy = False
    c.rl.lora = ml_collections.ConfigDict()
    c.rl.lora.enabled = True
    # Rank 16, alpha 2 x rank: between DDPO's rank-4 SD-1.5 LoRA and Flow-GRPO's rank 32 / alpha 64;
    # the trained tree stays small (tens of MB) next to the frozen 3B / 7B bases it is applied to.
    c.rl.lora.rank = 2 if tiny else 16
    c.rl.lora.alpha = 2.0 * c.rl.lora.rank
    c.rl.lora.targets = ()                     # per stage (stage_fields)
    c.step = ml_collections.ConfigDict()
    # The trained LoRA factors stay float32; the models compute in their own dtype (bf16 above).
    c.step.compute_dtype = "float32"
    c.step.ema_decay = 0.0
    c.step.micro_batches = 1                   # per stage (stage_fields)
    stage(c, "actor" if prefix != "editor_" else "editor")

    c.loop = ml_collections.ConfigDict()
    c.loop.max_rounds = 1 if tiny else 3
    c.loop.final = "last"

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 2 if tiny else 800  # [choice] 200 rollouts (3,200 prompts) per stage on a pod
    c.train.log_every = 1
    c.train.eval_every = 0 if tiny else 200   # 0: once, at the end
    c.train.checkpoint_every = 2 if tiny else 20
    c.train.keep_checkpoints = 2 if tiny else 3
    c.train.max_bad_steps = 5
    c.train.progress = not tiny

    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 90_003
    c.eval.num_prompts = {"tiny": 2, "gpu": 64}.get(models, 256)   # held out: eval_split's first
    c.eval.batch_size = 2 if tiny else 32

    if prefix == "reflection_":
        c.stages = ml_collections.ConfigDict()
        c.stages.grpo_actor = ml_collections.ConfigDict(stage_fields("actor"))
        c.stages.grpo_editor = ml_collections.ConfigDict(stage_fields("editor"))
    return c


def stage_fields(name: str) -> dict:
    """What differs between the stages (nested like the config). Stage 1 adapts every linear
    layer of the Actor's decoder (its vision tower stays the base's) at DeepSeekMath's eps/beta;
    stage 2 the U-Net's self- and cross-attention projections at DDPO's LoRA rate."""
    if name == "actor":
        return {"rl": {"loss": "grpo_token", "reward": "checker_delta", "kl_beta": 0.04,
                       "lora": {"targets": (ACTOR_LORA,)}},
                # [choice] DeepSeekMath's full-model 1e-6 raised for a rank-16 update
                "editor": {"sampler": {"eta": 0.0}}, "optimizer": {"learning_rate": 1e-5},
                "step": {"micro_batches": 1}}
    return {"rl": {"loss": "ppo_diffusion", "reward": "checker_score", "kl_beta": 0.01,
                   "lora": {"targets": (EDITOR_LORA,)}},
            "editor": {"sampler": {"eta": 1.0}}, "optimizer": {"learning_rate": 3e-4},
            "step": {"micro_batches": 1}}


def stage(c: ml_collections.ConfigDict, name: str) -> None:
    shapes_grpo.stage(c, name, stage_fields)
