"""ShapesSG pretraining jobs for rig-train: the VAE, then the Diffuser (U-Net + text encoder).

Variants: `vae`, `diffuser`, `actor` (the committed models), `vae_tiny`, `diffuser_tiny`,
`actor_tiny` (seconds, CI).
    rig-train --config=configs/shapes_train.py:vae --workdir runs/shapes_vae
    rig-train --config=configs/shapes_train.py:diffuser --workdir runs/shapes_diffuser \
        --config.diffuser.vae_path=runs/shapes_vae/vae
    rig-train --config=configs/shapes_train.py:actor --workdir runs/shapes_actor
"""
import ml_collections

from configs import common

VARIANTS = ("vae", "diffuser", "actor", "vae_tiny", "diffuser_tiny", "actor_tiny")
JOBS = {"vae": "pretrain_vae", "diffuser": "pretrain_diffuser", "actor": "sft_actor"}


def get_config(variant: str = "diffuser") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/shapes_train.py: unknown variant {variant!r} "
                         f"(expected {', '.join(VARIANTS)})")
    tiny = variant.endswith("_tiny")
    c = common.base()
    c.job = JOBS[variant.removesuffix("_tiny")]
    # step-bound jobs: each step's temp buffer kept between steps (rig_jax.runtime) where jax can
    # only use the CPU; docs/benchmarks.md measures the steps with and without it
    c.cpu_inline = "auto"
    c.workdir = ""
    c.world = ml_collections.ConfigDict()
    c.world.image_size = 32
    c.world.min_objects = 2            # two objects: one relation per prompt (the demo's world)
    c.world.max_objects = 2
    c.world.colours = ("red", "green", "blue", "yellow", "magenta", "cyan")
    c.world.shapes = ("circle", "square", "triangle")

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8 if tiny else (32 if c.job == "pretrain_vae" else 64)
    c.train.total_steps = 6 if tiny else (600 if c.job == "pretrain_vae" else 12000)
    c.train.log_every = 2 if tiny else 25
    c.train.eval_every = 0 if tiny else (200 if c.job == "pretrain_vae" else 1000)
    c.train.checkpoint_every = 3 if tiny else 250
    c.train.keep_checkpoints = 2
    c.train.max_bad_steps = 20
    c.train.progress = not tiny

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0 if tiny else 200
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0 if c.job == "pretrain_vae" else 1e-2
    c.optimizer.clip_norm = 1.0
    c.optimizer.accumulate_steps = 1

    c.step = ml_collections.ConfigDict()
    c.step.compute_dtype = "float32"
    c.step.ema_decay = 0.0 if c.job == "pretrain_vae" else 0.999

    c.vae = ml_collections.ConfigDict()
    c.vae.block_out_channels = (16, 16, 16) if tiny else (32, 64, 64)   # 3 levels: f = 4
    c.vae.layers_per_block = 1
    c.vae.latent_channels = 4
    c.vae.norm_num_groups = 8
    c.vae.mid_attention = True     # the VAE supports the attention mid block only
    c.vae.kl_weight = 1e-4

    c.diffuser = ml_collections.ConfigDict()
    c.diffuser.vae_path = ""
    c.diffuser.init_from = ""            # a pipeline folder whose U-Net and text encoder start the run
    c.diffuser.export_half = not tiny     # weights written as diffusers' fp16 variant (half the size)
    c.diffuser.max_length = 32
    c.diffuser.edit_probability = 0.3    # P + ". " + e, e an Actor edit form true of the image
    c.diffuser.empty_probability = 0.1   # the unconditional prompt (classifier-free guidance)
    c.diffuser.timestep_power = 1.0      # t = T * u ** power: below 1 favours the noisy, layout steps
    c.diffuser.relation_contrast = 0.0   # weight of "true prompt beats its relation-swapped form"
    c.diffuser.contrast_temperature = 0.01
    c.diffuser.binding_weight = 0.0      # the text encoder's relation-binding contrast (a training aid)
    c.diffuser.unet = ml_collections.ConfigDict()
    c.diffuser.unet.block_out_channels = (32, 32) if tiny else (64, 128)
    c.diffuser.unet.cross_attention = (True, True)
    c.diffuser.unet.layers_per_block = 1 if tiny else 2
    c.diffuser.unet.norm_num_groups = 8 if tiny else 16
    c.diffuser.unet.attention_heads = 2 if tiny else 4
    c.diffuser.unet.coordinate_channels = 2   # x, y ramps into conv_in (CoordConv): placement by words
    c.diffuser.text = ml_collections.ConfigDict()
    c.diffuser.text.hidden_size = 32 if tiny else 128
    c.diffuser.text.num_layers = 1 if tiny else 4
    c.diffuser.text.num_heads = 2 if tiny else 4
    c.diffuser.scheduler = ml_collections.ConfigDict()
    c.diffuser.scheduler.prediction_type = "v_prediction"
    c.diffuser.scheduler.beta_schedule = "squaredcos_cap_v2"
    c.diffuser.scheduler.timestep_spacing = "trailing"
    c.diffuser.sampler = common.sampler()
    c.diffuser.sampler.num_steps = 4 if tiny else 20
    c.diffuser.sampler.guidance_scale = 3.0

    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 90_001                # held out: training scenes come from (seed, index) draws
    c.eval.num_prompts = 8 if tiny else 100
    c.eval.batch_size = 8 if tiny else 50
    if c.job == "sft_actor":
        actor(c, tiny)
    return c


def actor(c: ml_collections.ConfigDict, tiny: bool) -> None:
    """The `sft_actor` job's sections: a tiny Qwen2.5-VL (0.52 M params, 32 px renders in
    8 px patches: 4 image tokens) warm-started on (image, prompt, Checker feedback) -> edit
    prompt; train / optimizer / step / eval replaced, the Diffuser's sections dropped."""
    from rig_jax.data.edit_forms import ACTOR_FORMS

    del c["vae"], c["diffuser"]
    c.train.batch_size = 8 if tiny else 16
    c.train.total_steps = 6 if tiny else 1200
    c.train.log_every = 2 if tiny else 25
    c.train.eval_every = 0 if tiny else 400
    c.train.checkpoint_every = 3 if tiny else 100
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 0 if tiny else 50
    c.optimizer.schedule = "constant" if tiny else "cosine"
    c.optimizer.decay_steps = 0 if tiny else c.train.total_steps - c.optimizer.warmup_steps
    c.optimizer.final_lr_fraction = 0.05
    c.optimizer.weight_decay = 1e-2
    c.step.ema_decay = 0.0

    c.actor = ml_collections.ConfigDict()
    c.actor.forms = ACTOR_FORMS               # answer forms, one drawn per example
    c.actor.corruption_weights = (0.5, 0.3, 0.2)   # violate (re-placed), drop, reshape
    c.actor.max_prompt_tokens = 160           # the question, left-padded (a 2-object world takes ~150)
    c.actor.max_answer_tokens = 32            # the JSON answer and the end-of-turn token
    c.actor.temperature = 1.0                 # the default sampling temperature (generation_config.json)
    c.actor.text = ml_collections.ConfigDict()
    c.actor.text.hidden_size = 32 if tiny else 128
    c.actor.text.intermediate_size = 64 if tiny else 256
    c.actor.text.num_layers = 1 if tiny else 2
    c.actor.text.num_heads = 2 if tiny else 4
    c.actor.text.num_kv_heads = 1 if tiny else 2
    c.actor.text.mrope_section = (2, 3, 3) if tiny else (4, 6, 6)   # sums to head_dim / 2
    c.actor.text.max_positions = 1024
    c.actor.vision = ml_collections.ConfigDict()
    c.actor.vision.patch_size = 8             # 32 px = 2 x 2 merged patches, no resampling
    c.actor.vision.hidden_size = 32 if tiny else 64
    c.actor.vision.intermediate_size = 64 if tiny else 128
    c.actor.vision.depth = 1 if tiny else 2
    c.actor.vision.num_heads = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 90_002                      # held out: training examples come from (seed, index)
    c.eval.num_inputs = 4 if tiny else 200
    c.eval.samples = 8                        # answers per input (distinct-prompt count)
    c.eval.batch_inputs = 4 if tiny else 25   # inputs per generate call (x samples rows)
