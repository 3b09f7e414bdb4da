"""rig-benchmark: throughput as JSON lines (medians over repeats, device named); configs/benchmark.py.

    rig-benchmark sampler                       # tiny U-Net, CPU-sized
    rig-benchmark sampler --shape sd15          # SD-1.5 U-Net, 512², 50 steps, CFG 7.5, bf16
    rig-benchmark decode --shape qwen2-1.5b     # Qwen2-1.5B-shaped decoder, batch 64
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'

Models are random-weight instances of the named shapes in configs/common.py, initialised
sharded on the mesh of `config.mesh`. Compare GPU numbers only with
../shared/bench/peer_baseline.py run on the same card in the same session (docs/benchmarks.md
records both).
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from rig_jax.config import SugarParser, run_tool
from rig_jax.errors import ConfigError

# diffusers' SD-1.x scheduler_config.json (DDIM with the SD betas)
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading"}
BENCHES = ("sampler", "decode")
DTYPE_NAMES = ("auto", "bf16", "fp32")


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


def model_shape(config: Any, family: str, what: str) -> Any:
    """The named shape `config.shape` of `config.models.<family>` (`qwen2.5-vl-7b` is the key
    `qwen2_5_vl_7b`)."""
    shapes = config.models[family]
    key = config.shape.replace(".", "_").replace("-", "_")
    if key not in shapes:
        names = ", ".join(sorted(shapes[k].get("name", k) for k in shapes))
        raise ConfigError(f"shape: unknown {what} shape {config.shape!r} (expected one of {names})")
    return shapes[key]


def per_shape(config: Any, field: str) -> Any:
    """`config.<field>` unless 0 / (), else the shape's value from `config.per_shape.<bench>`."""
    value = config[field]
    if value:
        return value
    table = config.per_shape[config.bench]
    return (table[config.shape] if config.shape in table else table["default"])[field]


def compute_dtype(name: str) -> Any:
    import jax
    import jax.numpy as jnp
    if name == "auto":
        name = "fp32" if jax.default_backend() == "cpu" else "bf16"
    return name, {"bf16": jnp.bfloat16, "fp32": jnp.float32}[name]


def bench_sampler(config: Any, mesh: Any, rules: Any) -> None:
    import jax
    import jax.numpy as jnp

    from rig_jax.diffusion import DDIMSchedule, sample
    from rig_jax.models.unet import UNet2DConditionModel, UNetConfig
    from rig_jax.parallel import init_sharded

    shape = model_shape(config, "unet", "U-Net")
    unet_config = UNetConfig(**shape.unet.to_dict())
    size, ctx_len, ctx_dim = shape.latent_size, shape.context_length, unet_config.cross_attention_dim
    steps, batches = per_shape(config, "steps"), per_shape(config, "batch")
    dtype_name, dtype = compute_dtype(config.dtype)
    model = UNet2DConditionModel(unet_config, dtype=dtype, param_dtype=jnp.float32)
    x0 = jnp.zeros((1, size, size, unet_config.in_channels), jnp.float32)
    ctx0 = jnp.zeros((1, ctx_len, ctx_dim), jnp.float32)
    variables, _ = init_sharded(lambda r: model.init(r, x0, jnp.zeros((1,), jnp.int32), ctx0), mesh, rules,
                                jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(dtype), variables["params"])  # inference weights
    schedule = DDIMSchedule.from_diffusers_config(SD_SCHEDULER)

    def denoise(p, x, t, ctx):
        return model.apply({"params": p}, x, t, ctx)

    run = jax.jit(lambda p, lat, cond, uncond: sample(denoise, p, lat, cond, uncond, schedule, steps,
                                                      config.guidance))
    info = device_info()
    for batch in batches:
        rng = jax.random.key(batch)
        lat = jax.random.normal(rng, (batch, size, size, unet_config.in_channels))
        cond = jax.random.normal(rng, (batch, ctx_len, ctx_dim)).astype(dtype)
        uncond = jnp.zeros((batch, ctx_len, ctx_dim), dtype)
        first, times = time_call(lambda: run(params, lat, cond, uncond), config.repeats)  # noqa: B023
        median = statistics.median(times)
        emit(bench="sampler", shape=config.shape, resolution=size * 8, batch=batch, steps=steps,
             guidance=config.guidance, dtype=dtype_name, median_s=round(median, 4),
             images_per_s=round(batch / median, 4), first_call_s=round(first, 2),
             repeats=config.repeats, **info)


def benchmark_decode(config: Any, mesh: Any, rules: Any, batch: int, prompt_len: int,
                     new_tokens: int) -> dict[str, Any]:
    """Tokens/s of prefill + `new_tokens` sampled decoding steps (no early stop) for a
    random-weight decoder of the named shape, params (in the compute dtype) initialised
    sharded under jit on the mesh. Times are medians of `config.repeats` runs after a warm-up."""
    import jax
    import numpy as np

    from rig_jax.models.qwen2_5_vl.lm import TextConfig
    from rig_jax.models.qwen2_5_vl.model import Qwen25VL, Qwen25VLConfig, dummy_inputs
    from rig_jax.parallel import activation_sharding, init_sharded
    from rig_jax.vlm.decode import generate

    fields = model_shape(config, "decoder", "decoder").to_dict()
    tied = fields.pop("tie_word_embeddings")
    fields.pop("name")
    if "mrope_section" in fields:
        fields["mrope_section"] = tuple(fields["mrope_section"])
    text = TextConfig(**fields)
    dtype_name, dtype = compute_dtype(config.dtype)
    model_config = Qwen25VLConfig(text=text, vision=None, tie_word_embeddings=tied)
    module = Qwen25VL(model_config, dtype=dtype, param_dtype=dtype)
    inputs = dummy_inputs(model_config)
    params, _ = init_sharded(lambda rng: module.init(rng, **inputs)["params"], mesh, rules,
                             jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def place(x: np.ndarray, names: tuple[str | None, ...]) -> jax.Array:
        return jax.device_put(x, activation_sharding(mesh, rules, names, x.shape))

    ids = np.random.default_rng(0).integers(0, text.vocab_size, (batch, prompt_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (3, batch, prompt_len)).copy()
    prompts = {"input_ids": place(ids, ("batch", None)),
               "attention_mask": place(np.ones_like(ids), ("batch", None)),
               "position_ids": place(positions, (None, "batch", None)),
               "rope_deltas": place(np.zeros((batch,), np.int32), ("batch",))}
    rng = jax.random.PRNGKey(1)

    def timed(steps: int) -> float:
        start = time.perf_counter()
        jax.block_until_ready(generate(module, params, prompts, rng, steps, temperature=1.0))
        return time.perf_counter() - start

    compile_s = timed(new_tokens)
    timed(1)
    total = statistics.median(timed(new_tokens) for _ in range(config.repeats))
    prefill = statistics.median(timed(1) for _ in range(config.repeats))
    decode_s = max(total - prefill, 1e-9)
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": dtype_name,
        "greedy": False, "params": n_params, "mesh_shape": list(mesh.devices.shape),
        "repeats": config.repeats, "compile_s": round(compile_s, 3),
        "prefill_s": round(prefill, 5), "total_s": round(total, 5),
        "tokens_per_s": round(batch * new_tokens / total, 2),
        "decode_tokens_per_s": round(batch * max(new_tokens - 1, 0) / decode_s, 2),
        "prefill_tokens_per_s": round(batch * prompt_len / prefill, 2),
    }


def bench_decode(config: Any, mesh: Any, rules: Any) -> None:
    prompt_len, new_tokens = per_shape(config, "prompt_len"), per_shape(config, "new_tokens")
    for batch in per_shape(config, "batch"):
        result = benchmark_decode(config, mesh, rules, batch, prompt_len, new_tokens)
        emit(bench="decode", shape=config.shape, **result, **device_info())


def run(config: Any) -> None:
    """The benchmark `config.bench` on the mesh of `config.mesh`."""
    from rig_jax.parallel import mesh_context

    if config.bench not in BENCHES:
        raise ConfigError(f"bench: {config.bench!r} is not one of {', '.join(BENCHES)}")
    if config.dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: {config.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    for field in ("repeats", "steps", "prompt_len", "new_tokens"):
        if config[field] < (1 if field == "repeats" else 0):
            raise ConfigError(f"{field}: must be >= {1 if field == 'repeats' else 0}, got {config[field]}")
    if any(b < 1 for b in config.batch):
        raise ConfigError(f"batch: batch sizes must be >= 1, got {tuple(config.batch)}")
    model_shape(config, "unet" if config.bench == "sampler" else "decoder",
                "U-Net" if config.bench == "sampler" else "decoder")   # a bad shape fails before any work
    with mesh_context(config) as (mesh, rules):
        (bench_sampler if config.bench == "sampler" else bench_decode)(config, mesh, rules)


def build_parser() -> SugarParser:
    p = SugarParser("rig-benchmark", __doc__.splitlines()[0], "configs/benchmark.py:sampler")
    p.add_argument("bench", nargs="?", choices=BENCHES,
                   help="sampler: guided DDIM with the U-Net (latents, no VAE); decode: VLM decoder")
    p.add_argument("--shape", dest="shape", help="named shape: tiny, sd15 (sampler); tiny, qwen2-1.5b, "
                                                 "qwen2.5-vl-3b, qwen2.5-vl-7b (decode)")
    p.add_argument("--batch", dest="batch", type=int, nargs="+", help="batch sizes")
    p.add_argument("--steps", dest="steps", type=int, help="DDIM steps (sampler)")
    p.add_argument("--guidance", dest="guidance", type=float, help="CFG scale (sampler)")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, help="prompt tokens (decode)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, help="generated tokens (decode)")
    p.add_argument("--dtype", dest="dtype", choices=DTYPE_NAMES, help="compute dtype")
    p.add_argument("--repeats", dest="repeats", type=int)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-benchmark`): bad input exits 2 with one line on stderr."""
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
