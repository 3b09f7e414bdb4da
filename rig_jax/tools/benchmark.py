"""Throughput benchmarks, one JSON line per measurement (medians over repeats, device named).

    python -m tools.benchmark sampler                       # tiny U-Net, CPU-sized
    python -m tools.benchmark sampler --shape sd15          # SD-1.5 U-Net, 512², 50 steps, CFG 7.5, bf16
    python -m tools.benchmark decode --shape qwen2-1.5b     # Qwen2-1.5B-shaped decoder, batch 64

Compare GPU numbers only with ../shared/bench/peer_baseline.py run on the same card in the
same session (docs/benchmarks.md records both).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rig_jax.cli import run_cli
from rig_jax.errors import ConfigError

# diffusers' SD-1.x scheduler_config.json (DDIM with the SD betas)
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading"}


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def device_info() -> dict[str, Any]:
    import jax
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "num_devices": jax.device_count(), "jax": jax.__version__}


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(first call seconds incl. compile, per-repeat seconds) with results blocked on."""
    import jax
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def _unet_for(shape: str):
    from rig_jax.models.unet import UNetConfig
    if shape == "sd15":
        return UNetConfig(), 64, 77, 768   # config, latent size, context length, context width
    if shape == "tiny":
        cfg = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=(1, 1),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         transformer_layers_per_block=(1, 1), attention_heads=(4, 4),
                         norm_num_groups=8, cross_attention_dim=32)
        return cfg, 8, 8, 32
    raise ConfigError(f"--shape: unknown U-Net shape {shape!r} (expected tiny or sd15)")


def bench_sampler(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from rig_jax.diffusion import DDIMSchedule, sample
    from rig_jax.models.unet import UNet2DConditionModel
    from rig_jax.parallel import DEFAULT_RULES, init_sharded, make_mesh

    config, size, ctx_len, ctx_dim = _unet_for(args.shape)
    steps = args.steps or (50 if args.shape == "sd15" else 10)
    batches = args.batch or ([1, 8, 16, 32] if args.shape == "sd15" else [1, 2])
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    model = UNet2DConditionModel(config, dtype=dtype, param_dtype=jnp.float32)
    mesh = make_mesh(ml_collections.ConfigDict({"shape": (1, -1, 1)}))
    x0 = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    ctx0 = jnp.zeros((1, ctx_len, ctx_dim), jnp.float32)
    variables, _ = init_sharded(lambda r: model.init(r, x0, jnp.zeros((1,), jnp.int32), ctx0), mesh,
                                DEFAULT_RULES, jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(dtype), variables["params"])  # inference weights
    schedule = DDIMSchedule.from_diffusers_config(SD_SCHEDULER)

    def denoise(p, x, t, ctx):
        return model.apply({"params": p}, x, t, ctx)

    run = jax.jit(lambda p, lat, cond, uncond: sample(denoise, p, lat, cond, uncond, schedule, steps,
                                                      args.guidance))
    info = device_info()
    for batch in batches:
        rng = jax.random.key(batch)
        lat = jax.random.normal(rng, (batch, size, size, config.in_channels))
        cond = jax.random.normal(rng, (batch, ctx_len, ctx_dim)).astype(dtype)
        uncond = jnp.zeros((batch, ctx_len, ctx_dim), dtype)
        first, times = time_call(lambda: run(params, lat, cond, uncond), args.repeats)  # noqa: B023
        median = statistics.median(times)
        emit(bench="sampler", shape=args.shape, resolution=size * 8, batch=batch, steps=steps,
             guidance=args.guidance, dtype=args.dtype, median_s=round(median, 4),
             images_per_s=round(batch / median, 4), first_call_s=round(first, 2),
             repeats=args.repeats, **info)


def bench_decode(args: argparse.Namespace) -> None:
    from rig_jax.vlm.bench import benchmark_decode
    shape = args.shape
    batch, prompt, new = (4, 16, 16) if shape == "tiny" else (64, 256, 128)
    for b in args.batch or [batch]:
        result = benchmark_decode(shape, batch=b, prompt_len=args.prompt_len or prompt,
                                  new_tokens=args.new_tokens or new, dtype=args.dtype,
                                  repeats=args.repeats)
        emit(bench="decode", shape=shape, **result, **device_info())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rig-benchmark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    s = sub.add_parser("sampler", help="guided DDIM sampling with the U-Net (latents, no VAE)")
    s.add_argument("--shape", default="tiny", choices=("tiny", "sd15"))
    s.add_argument("--batch", type=int, nargs="*", help="batch sizes (default: 1 8 16 32 for sd15)")
    s.add_argument("--steps", type=int, default=0, help="DDIM steps (default: 50 for sd15, 10 tiny)")
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype; auto = bf16 on accelerators, fp32 on CPU (no bf16 units)")
    s.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("decode", help="prefill + sampled decoding with the VLM's decoder")
    d.add_argument("--shape", default="tiny",
                   choices=("tiny", "qwen2-1.5b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"))
    d.add_argument("--batch", type=int, nargs="*")
    d.add_argument("--prompt-len", type=int, default=0)
    d.add_argument("--new-tokens", type=int, default=0)
    d.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    d.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dtype == "auto":
        import jax
        args.dtype = "fp32" if jax.default_backend() == "cpu" else "bf16"
    run_cli({"sampler": bench_sampler, "decode": bench_decode}[args.which], args)


if __name__ == "__main__":
    main()
