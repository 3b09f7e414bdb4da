"""ShapesSG pretraining jobs for rig-train: the VAE, then the Diffuser (U-Net + text encoder).

Variants: `vae`, `diffuser` (the committed models), `vae_tiny`, `diffuser_tiny` (seconds, CI).
    rig-train --config=configs/shapes_train.py:vae --workdir runs/shapes_vae
    rig-train --config=configs/shapes_train.py:diffuser --workdir runs/shapes_diffuser \
        --config.diffuser.vae_path=runs/shapes_vae/vae
"""
import ml_collections

from configs import common

VARIANTS = ("vae", "diffuser", "vae_tiny", "diffuser_tiny")


def get_config(variant: str = "diffuser") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/shapes_train.py: unknown variant {variant!r} "
                         f"(expected {', '.join(VARIANTS)})")
    tiny = variant.endswith("_tiny")
    c = common.base()
    c.job = "pretrain_vae" if variant.startswith("vae") else "pretrain_diffuser"
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
    c.diffuser.max_length = 32
    c.diffuser.edit_probability = 0.3    # P + ". " + e, e an Actor edit form true of the image
    c.diffuser.empty_probability = 0.1   # the unconditional prompt (classifier-free guidance)
    c.diffuser.unet = ml_collections.ConfigDict()
    c.diffuser.unet.block_out_channels = (32, 32) if tiny else (64, 128)
    c.diffuser.unet.cross_attention = (True, True)
    c.diffuser.unet.layers_per_block = 1 if tiny else 2
    c.diffuser.unet.norm_num_groups = 8 if tiny else 16
    c.diffuser.unet.attention_heads = 2 if tiny else 4
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
    return c
