"""rig-benchmark: named shapes and per-bench defaults (docs/benchmarks.md records the figures).

    rig-benchmark sampler --peer                        # CPU-sized U-Net vs diffusers, one thread each
    rig-benchmark all --peer                            # every bench, the same two worker processes
    rig-benchmark decode --shape qwen2.5-vl-7b --peer   # accelerator shapes
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'

Variants: a bench name (`sampler`, `inversion`, `decode`, `actor-step`, `editor-step`, `loop`,
`train-step`, `all`) or a shape name (`sd15`, `qwen2.5-vl-7b`, ...: that shape, with the bench
of its family). Shapes (the `--shape` names; config keys spell dots and dashes as `_`):

- U-Net family (sampler, inversion, editor-step, train-step): `tiny` (tests), `cpu` (SD-1's
  layout at 8.6 M params: 64/128/128 channels, cross-attention on the top two levels, 32x32
  latents, 77 x 64 context; `sd1-small` is the same shape under its old name), `sd15`.
- decoder family (decode, actor-step): `tiny`, `cpu` (a 5 M-param Qwen2.5-VL text model:
  hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 2,048), `qwen2-1.5b`, `qwen2.5-vl-3b`,
  `qwen2.5-vl-7b` (the decoders of the Qwen releases, random weights).
- loop: `shapes-sg` (the committed ShapesSG Diffuser, Actor and pixel Checker, K = 2 rounds);
  `tiny` (the same models, K = 0: Generate and Reflect only, 2 DDIM steps; the tests' shape,
  whose first call compiles in ~7 s where one edit round adds ~20 s).

Fields left at None take the shape's value from `per_shape`; a value given must be >= 1.
"""
import ml_collections

from configs import common, shapes, shapes_train

BENCHES = ("sampler", "inversion", "decode", "actor-step", "editor-step", "loop", "train-step")
FAMILIES = {"sampler": "unet", "inversion": "unet", "editor-step": "unet", "train-step": "unet",
            "decode": "decoder", "actor-step": "decoder", "loop": "loop"}
DECODERS = ("qwen2-1.5b", "qwen2.5-vl-3b", "qwen2.5-vl-7b")
UNETS = ("sd15", "sd1-small")
# A tiny vision tower for the CPU decoders (the benches time the text model; the saved
# Qwen2.5-VL folder needs one), and the released one for the accelerator shapes.
SMALL_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=(0,))
RELEASED_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=(7, 15, 23, 31))


def key(name: str) -> str:
    """The config key of a shape name: `qwen2.5-vl-7b` -> `qwen2_5_vl_7b`."""
    return name.replace(".", "_").replace("-", "_")


def _d(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def _cpu_unet() -> ml_collections.ConfigDict:
    return _d(latent_size=32, context_length=77, unet=_d(
        sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=(2, 2, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 1, 1), attention_heads=(2, 4, 4), norm_num_groups=32,
        cross_attention_dim=64))


def _shapes() -> ml_collections.ConfigDict:
    """common.shapes() plus the CPU-sized shapes of this benchmark and the decoders' vision
    towers and special ids (what the saved Qwen2.5-VL folder needs besides the text model)."""
    c = common.shapes()
    c.unet.cpu = _cpu_unet()
    c.unet.sd1_small = _cpu_unet()
    c.decoder.cpu = dict(name="cpu", vocab_size=2048, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         mrope_section=(8, 12, 12), tie_word_embeddings=False)
    c.vision = ml_collections.ConfigDict()
    for name in ("tiny", "cpu", "qwen2-1.5b"):    # Qwen2-1.5B has no vision tower: the smallest
        c.vision[key(name)] = dict(SMALL_VISION)
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        c.vision[key(name)] = dict(RELEASED_VISION)
    c.loop = ml_collections.ConfigDict()
    c.loop.shapes_sg = _d(name="shapes-sg", diffuser="pretrained/shapes_sg/diffuser",
                          actor="pretrained/shapes_sg/actor", max_rounds=2)
    c.loop.tiny = _d(name="tiny", diffuser="pretrained/shapes_sg/diffuser",
                     actor="pretrained/shapes_sg/actor", max_rounds=0)   # Generate + Reflect only
    return c


def _per_shape() -> ml_collections.ConfigDict:
    """What a None field means, per bench and shape (`default`: every other shape).
    repeats: timed rounds after two untimed calls per side; batch: batch sizes (editor-step:
    rows of N x K trained steps; loop: prompts); steps: DDIM steps (editor-step: the schedule
    the trained steps come from); trained_steps: K (editor-step)."""
    unet = dict(
        tiny=_d(batch=(2,), steps=2, repeats=3),
        cpu=_d(batch=(4,), steps=10, repeats=7),
        sd15=_d(batch=(1, 8, 16, 32), steps=50, repeats=3))
    unet["sd1_small"] = unet["cpu"]
    unet["default"] = unet["cpu"]
    lm = dict(
        tiny=_d(batch=(2,), prompt_len=8, new_tokens=4, repeats=3),
        cpu=_d(batch=(8,), prompt_len=64, new_tokens=64, repeats=7),
        default=_d(batch=(64,), prompt_len=256, new_tokens=128, repeats=3))
    actor = dict(
        tiny=_d(batch=(2,), prompt_len=8, new_tokens=4, repeats=3),
        cpu=_d(batch=(8,), prompt_len=64, new_tokens=64, repeats=7),
        default=_d(batch=(8,), prompt_len=512, new_tokens=128, repeats=3))
    editor = dict(
        tiny=_d(batch=(1,), steps=4, trained_steps=1, repeats=3),
        cpu=_d(batch=(2,), steps=10, trained_steps=2, repeats=7),
        sd15=_d(batch=(4,), steps=50, trained_steps=2, repeats=3))
    editor["sd1_small"] = editor["cpu"]
    editor["default"] = editor["cpu"]
    train = dict(tiny=_d(batch=(1,), repeats=3), default=_d(batch=(4,), repeats=11))
    # 8 prompts (a rollout's B in the demo): at 4 (seed 0) the committed Diffuser drew every prompt
    # right, so no edit ran and the bench timed Generate + Reflect only (docs/benchmarks.md)
    loop = dict(tiny=_d(batch=(1,), steps=2, repeats=1), default=_d(batch=(8,), steps=10, repeats=3))
    c = ml_collections.ConfigDict()
    for bench, table in (("sampler", unet), ("inversion", unet), ("decode", lm), ("actor_step", actor),
                         ("editor_step", editor), ("train_step", train), ("loop", loop)):
        c[bench] = ml_collections.ConfigDict(table)
    return c


def get_config(variant: str = "sampler") -> ml_collections.ConfigDict:
    c = common.base()
    if variant in (*BENCHES, "all"):
        c.bench, c.shape = variant, ""     # "": `cpu` (the loop: `shapes-sg`)
    elif variant in (*UNETS, *DECODERS):
        c.bench, c.shape = ("decode" if variant in DECODERS else "sampler"), variant
    else:
        raise ValueError(f"configs/benchmark.py: unknown variant {variant!r} (expected one of "
                         f"{', '.join((*BENCHES, 'all', *UNETS, *DECODERS))})")
    c.peer = False                # also run the PyTorch reference, interleaved round by round
    c.forward_only = False        # training benches: time the loss without its gradient (where time goes)
    c.dtype = "auto"              # auto: bf16 on accelerators, fp32 on CPU (no bf16 units) | bf16 | fp32
    c.device = "auto"             # auto: gpu when /dev/nvidia0 exists, else cpu | cpu | gpu
    c.repeats = None              # timed rounds; None: the shape's (`per_shape`)
    c.batch = None                # batch sizes (a tuple); None: the shape's
    c.steps = None                # DDIM steps; None: the shape's
    c.trained_steps = None        # editor-step: trained steps per row; None: the shape's
    c.prompt_len = None           # decode / actor-step: prompt tokens; None: the shape's
    c.new_tokens = None           # decode: generated tokens, actor-step: completion tokens
    c.guidance = common.sampler().guidance_scale
    # Threads per side. 1 is the figure to trust on a shared machine: torch's OpenMP pool
    # collapses when another process holds a core, XLA's does not.
    c.threads = 1
    c.cache_dir = ""              # where the random models and inputs are saved; "": the temp dir
    c.compile_cache = ""          # a persistent XLA cache for the rig_jax worker ("": none; tests only)
    c.peak_tflops = 0.0           # the device peak for `mfu`; 0: the table in rig_jax/bench/flops.py
    # The rig_jax worker's XLA:CPU host setting (rig_jax.runtime) per bench: that of the job whose
    # step the bench times, so it measures what the tools run. train-step is pretraining's step
    # (configs/shapes_train.py); the others run in the loop and the GRPO stages (configs/shapes.py).
    # RIG_CPU_INLINE, when set, overrides them all.
    loop_setting = shapes.get_config("demo").cpu_inline
    c.worker_cpu_inline = ml_collections.ConfigDict({key(b): loop_setting for b in BENCHES})
    c.worker_cpu_inline.train_step = shapes_train.get_config("diffuser").cpu_inline
    # glibc's huge-page tunable (rig_jax.runtime) for the rig_jax worker, as the jobs have it (off;
    # RIG_CPU_HUGEPAGES overrides it); the peer runs as a user would run torch, without it unless
    # asked (1: the same memory treatment for both sides)
    c.worker_cpu_hugepages = shapes.get_config("demo").cpu_hugepages
    c.peer_cpu_hugepages = "0"
    c.models = _shapes()
    c.per_shape = _per_shape()
    return c
