"""rig-benchmark: throughput of the sampler (U-Net, guided DDIM) and of VLM decoding.

Variants: `sampler` (default: the tiny U-Net, CPU-sized), `sd15` (SD-1.5's U-Net at 512²),
`decode` (the tiny decoder), and the decoder shapes `qwen2-1.5b`, `qwen2.5-vl-3b`, `qwen2.5-vl-7b`.
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'
    rig-benchmark decode --shape qwen2-1.5b        # short flags set the same fields
"""
import ml_collections

from configs import common

DECODERS = ("qwen2-1.5b", "qwen2.5-vl-3b", "qwen2.5-vl-7b")


def _defaults(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def get_config(variant: str = "sampler") -> ml_collections.ConfigDict:
    c = common.base()
    c.bench = "decode" if variant == "decode" or variant in DECODERS else "sampler"
    c.shape = variant if variant in ("sd15", *DECODERS) else "tiny"
    c.dtype = "auto"              # auto: bf16 on accelerators, fp32 on CPU (no bf16 units) | bf16 | fp32
    c.repeats = 3
    c.batch = ()                  # batch sizes; (): the shape's, from `per_shape`
    c.steps = 0                   # sampler: DDIM steps; 0: the shape's
    c.guidance = common.sampler().guidance_scale
    c.prompt_len = 0              # decode: prompt tokens; 0: the shape's
    c.new_tokens = 0              # decode: generated tokens; 0: the shape's
    c.models = common.shapes()
    # What a 0 / () above means, per bench and shape (`default` serves every other shape).
    c.per_shape = ml_collections.ConfigDict()
    c.per_shape.sampler = ml_collections.ConfigDict({
        "sd15": _defaults(batch=(1, 8, 16, 32), steps=50),
        "default": _defaults(batch=(1, 2), steps=10)})
    c.per_shape.decode = ml_collections.ConfigDict({
        "tiny": _defaults(batch=(4,), prompt_len=16, new_tokens=16),
        "default": _defaults(batch=(64,), prompt_len=256, new_tokens=128)})
    if variant not in ("sampler", "sd15", "decode", *DECODERS):
        raise ValueError(f"configs/benchmark.py: unknown variant {variant!r} (expected sampler, sd15, "
                         f"decode or one of {', '.join(DECODERS)})")
    return c
