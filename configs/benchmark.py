"""rig-benchmark: throughput of the sampler (U-Net, guided DDIM), of VLM decoding, and of the
U-Net's train step against PyTorch's.

Variants: `sampler` (default: the tiny U-Net, CPU-sized), `sd15` (SD-1.5's U-Net at 512²),
`decode` (the tiny decoder), the decoder shapes `qwen2-1.5b`, `qwen2.5-vl-3b`, `qwen2.5-vl-7b`,
and `train-step` (rig_jax's U-Net forward+backward vs diffusers' on the same weights, default
shape `sd1-small`).
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'
    rig-benchmark decode --shape qwen2-1.5b        # short flags set the same fields
    rig-benchmark train-step --repeats 15          # needs torch + diffusers (the test extras)
"""
import ml_collections

from configs import common

DECODERS = ("qwen2-1.5b", "qwen2.5-vl-3b", "qwen2.5-vl-7b")
UNETS = ("sd15", "sd1-small")


def _defaults(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def _shapes() -> ml_collections.ConfigDict:
    """common.shapes() plus `sd1-small`: SD-1's layout at a CPU size (3 levels of 64/128/128
    channels, cross-attention on the top two, 32x32 latents, 77 tokens of width 64), the U-Net
    the train-step benchmark times against diffusers."""
    c = common.shapes()
    c.unet.sd1_small = ml_collections.ConfigDict({
        "latent_size": 32, "context_length": 77,
        "unet": ml_collections.ConfigDict(dict(
            sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=(2, 2, 2),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            transformer_layers_per_block=(1, 1, 1), attention_heads=(2, 4, 4), norm_num_groups=32,
            cross_attention_dim=64))})
    return c


def get_config(variant: str = "sampler") -> ml_collections.ConfigDict:
    c = common.base()
    c.bench = {"decode": "decode", "train-step": "train-step"}.get(
        variant, "decode" if variant in DECODERS else "sampler")
    c.shape = variant if variant in (*UNETS, *DECODERS) else ""   # "": the bench's default shape
    c.dtype = "auto"              # auto: bf16 on accelerators, fp32 on CPU (no bf16 units) | bf16 | fp32
    c.repeats = 0                 # timed runs; 0: the bench's (`per_shape`)
    c.batch = ()                  # batch sizes; (): the shape's, from `per_shape`
    c.steps = 0                   # sampler: DDIM steps; 0: the shape's
    c.guidance = common.sampler().guidance_scale
    c.prompt_len = 0              # decode: prompt tokens; 0: the shape's
    c.new_tokens = 0              # decode: generated tokens; 0: the shape's
    # train-step: each side (rig_jax, torch) in its own process with this many threads; 1 is
    # the figure to trust on a shared machine (torch's OpenMP pool collapses when another
    # process holds a core, XLA's does not).
    c.threads = 1
    c.cache_dir = ""              # train-step: where the random diffusers U-Net is saved; "": the temp dir
    c.models = _shapes()
    # What a 0 / () above means, per bench and shape (`default` serves every other shape).
    c.per_shape = ml_collections.ConfigDict()
    c.per_shape.sampler = ml_collections.ConfigDict({
        "sd15": _defaults(batch=(1, 8, 16, 32), steps=50, repeats=3),
        "default": _defaults(batch=(1, 2), steps=10, repeats=3)})
    c.per_shape.decode = ml_collections.ConfigDict({
        "tiny": _defaults(batch=(4,), prompt_len=16, new_tokens=16, repeats=3),
        "default": _defaults(batch=(64,), prompt_len=256, new_tokens=128, repeats=3)})
    c.per_shape.train_step = ml_collections.ConfigDict({
        "tiny": _defaults(batch=(2,), repeats=3),
        "default": _defaults(batch=(4,), repeats=11)})
    if variant not in ("sampler", "decode", "train-step", *UNETS, *DECODERS):
        raise ValueError(f"configs/benchmark.py: unknown variant {variant!r} (expected sampler, sd15, "
                         f"sd1-small, decode, train-step or one of {', '.join(DECODERS)})")
    return c
