"""rig-benchmark: throughput as JSON lines (medians over repeats, device named); configs/benchmark.py.

    rig-benchmark sampler                       # tiny U-Net, CPU-sized
    rig-benchmark sampler --shape sd15          # SD-1.5 U-Net, 512², 50 steps, CFG 7.5, bf16
    rig-benchmark decode --shape qwen2-1.5b     # Qwen2-1.5B-shaped decoder, batch 64
    rig-benchmark train-step                    # U-Net fwd+bwd vs torch/diffusers, same weights
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'

Models are random-weight instances of the named shapes in configs/common.py, initialised
sharded on the mesh of `config.mesh`. `train-step` instead saves a random diffusers U-Net
(`save_pretrained`, cached under `config.cache_dir`) that rig_jax reads with `load_unet`, and
times both libraries' step in two worker processes, alternating (needs torch and diffusers).
Compare GPU numbers only with the PyTorch peers' baseline (peer_baseline.py) run on the same card in the
same session (docs/benchmarks.md records both).
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from rig_jax.config import SugarParser, run_tool
from rig_jax.errors import ConfigError, RigError

# diffusers' SD-1.x scheduler_config.json (DDIM with the SD betas)
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading"}
BENCHES = ("sampler", "decode", "train-step")
DEFAULT_SHAPES = {"sampler": "tiny", "decode": "tiny", "train-step": "sd1-small"}
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


def shape_name(config: Any) -> str:
    """`config.shape`, or the bench's default shape when it is empty."""
    return config.shape or DEFAULT_SHAPES[config.bench]


def model_shape(config: Any, family: str, what: str) -> Any:
    """The named shape `config.shape` of `config.models.<family>` (`qwen2.5-vl-7b` is the key
    `qwen2_5_vl_7b`)."""
    shapes = config.models[family]
    key = shape_name(config).replace(".", "_").replace("-", "_")
    if key not in shapes:
        names = ", ".join(sorted(shapes[k].get("name", k) for k in shapes))
        raise ConfigError(f"shape: unknown {what} shape {shape_name(config)!r} (expected one of {names})")
    return shapes[key]


def per_shape(config: Any, field: str) -> Any:
    """`config.<field>` unless 0 / (), else the shape's value from `config.per_shape.<bench>`."""
    value = config[field]
    if value:
        return value
    table, shape = config.per_shape[config.bench.replace("-", "_")], shape_name(config)
    return (table[shape] if shape in table else table["default"])[field]


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
    repeats = per_shape(config, "repeats")
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
        first, times = time_call(lambda: run(params, lat, cond, uncond), repeats)  # noqa: B023
        median = statistics.median(times)
        emit(bench="sampler", shape=shape_name(config), resolution=size * 8, batch=batch, steps=steps,
             guidance=config.guidance, dtype=dtype_name, median_s=round(median, 4),
             images_per_s=round(batch / median, 4), first_call_s=round(first, 2),
             repeats=repeats, **info)


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

    repeats = per_shape(config, "repeats")
    compile_s = timed(new_tokens)
    timed(1)
    total = statistics.median(timed(new_tokens) for _ in range(repeats))
    prefill = statistics.median(timed(1) for _ in range(repeats))
    decode_s = max(total - prefill, 1e-9)
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": dtype_name,
        "greedy": False, "params": n_params, "mesh_shape": list(mesh.devices.shape),
        "repeats": repeats, "compile_s": round(compile_s, 3),
        "prefill_s": round(prefill, 5), "total_s": round(total, 5),
        "tokens_per_s": round(batch * new_tokens / total, 2),
        "decode_tokens_per_s": round(batch * max(new_tokens - 1, 0) / decode_s, 2),
        "prefill_tokens_per_s": round(batch * prompt_len / prefill, 2),
    }


def bench_decode(config: Any, mesh: Any, rules: Any) -> None:
    prompt_len, new_tokens = per_shape(config, "prompt_len"), per_shape(config, "new_tokens")
    for batch in per_shape(config, "batch"):
        result = benchmark_decode(config, mesh, rules, batch, prompt_len, new_tokens)
        emit(bench="decode", shape=shape_name(config), **result, **device_info())


# ---- train-step: rig_jax's U-Net step against diffusers', side by side ------------------
#
# Each side runs in its own worker process (their thread pools never meet) and answers one
# JSON line per command on stdout. The driver times nothing itself: each worker times its own
# call with the result materialised, wall and CPU seconds (user + sys of the process).

TRAIN_STEP_WORKER = ("import sys; from rig_jax.tools.benchmark import train_step_worker; "
                     "train_step_worker(*sys.argv[1:])")


def worker_env(threads: int) -> dict[str, str]:
    """Environment of both workers: `threads` for torch's OpenMP/MKL and XLA's CPU pool, one
    host device, CPU only. With one thread XLA's Eigen pool is switched off as well, so neither
    side has a worker spinning while it waits (CPU seconds then count work only)."""
    import os
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    flags = "--xla_force_host_platform_device_count=1"
    if threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["XLA_FLAGS"] = flags
    return env


def _torch_side(folder: str, inputs: dict[str, Any], threads: int
                ) -> tuple[Callable[[], None], Callable[[], tuple[float, float]], dict[str, Any]]:
    import diffusers
    import torch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder).train()
    nchw = {k: torch.from_numpy(inputs[k].transpose(0, 3, 1, 2).copy()) for k in ("clean", "noise")}
    ab = torch.from_numpy(inputs["alpha_bar"]).view(-1, 1, 1, 1)
    t, cond = torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"])

    def step() -> torch.Tensor:
        unet.zero_grad(set_to_none=True)
        noisy = ab.sqrt() * nchw["clean"] + (1 - ab).sqrt() * nchw["noise"]
        pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, nchw["noise"])
        loss.backward()
        return loss

    def parity() -> tuple[float, float]:
        loss = float(step())
        return loss, float(sum(float((p.grad.double() ** 2).sum()) for p in unet.parameters()) ** 0.5)

    attn = type(next(iter(unet.attn_processors.values()))).__name__
    info = {"device": "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(), "attn_processor": attn}
    return step, parity, info


def _jax_side(folder: str, inputs: dict[str, Any], threads: int
              ) -> tuple[Callable[[], None], Callable[[], tuple[float, float]], dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rig_jax.weights.unet import load_unet

    _, module, params = load_unet(folder)
    params = jax.device_put(params)
    args = tuple(jax.device_put(inputs[k]) for k in ("clean", "noise", "alpha_bar", "t", "context"))

    def loss_fn(p: Any, clean: jax.Array, noise: jax.Array, alpha_bar: jax.Array, t: jax.Array,
                context: jax.Array) -> jax.Array:
        ab = alpha_bar[:, None, None, None]
        noisy = jnp.sqrt(ab) * clean + jnp.sqrt(1 - ab) * noise
        return jnp.mean((module.apply({"params": p}, noisy, t, context) - noise) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def step() -> Any:
        return jax.block_until_ready(grad_fn(params, *args))

    def parity() -> tuple[float, float]:
        loss, grads = step()
        return float(loss), float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                                               for g in jax.tree.leaves(grads))))

    return step, parity, {**device_info(), "threads": threads}


def _save_random_unet(folder: str, diffusers_config: dict[str, Any], seed: int) -> None:
    """A diffusers U-Net with random weights, nudged off the zero / one inits (which would let
    a side skip work unnoticed), saved with save_pretrained; written aside, then renamed."""
    import os
    import tempfile

    import diffusers
    import torch
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(diffusers_config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    unet.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run saved it first
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise


def train_step_worker(side: str, folder: str, inputs_path: str, threads: str, seed: str) -> None:
    """One side of the train-step benchmark, driven over stdin (`time`, `parity`, `quit`).

    The torch side saves the model first if `folder` has none. Both then load it, run the step
    twice untimed (the first call compiles on the JAX side) and answer `ready`."""
    import json
    import os
    import sys

    import numpy as np
    inputs = dict(np.load(inputs_path))
    if side == "torch":
        if not os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(os.path.dirname(folder), os.path.basename(folder) + ".json")) as f:
                _save_random_unet(folder, json.load(f), int(seed))
        step, parity, info = _torch_side(folder, inputs, int(threads))
    else:
        step, parity, info = _jax_side(folder, inputs, int(threads))

    def say(**record: Any) -> None:
        print(json.dumps(record), flush=True)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    say(ready=True, first_call_s=first, second_call_s=time.perf_counter() - t0, **info)
    for line in sys.stdin:
        command = line.strip()
        if command == "time":
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            say(s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
        elif command == "parity":
            loss, grad_norm = parity()
            say(loss=loss, grad_norm=grad_norm)
        else:
            break


class _Worker:
    """A worker process and its line protocol; a worker that dies is a RuntimeError with its
    stderr tail."""

    def __init__(self, side: str, folder: str, inputs_path: str, threads: int, seed: int):
        import subprocess
        import sys
        import tempfile
        self.side = side
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TRAIN_STEP_WORKER, side, folder, inputs_path, str(threads), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=worker_env(threads))
        self.ready = self.read()

    def read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stderr.seek(0)
                tail = self.stderr.read()[-2000:]
                raise RuntimeError(f"train-step {self.side} worker died (rc {self.proc.wait()}):\n{tail}")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.stderr.close()


def _require_torch() -> None:
    import importlib.util
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise RigError(f"train-step: {' and '.join(missing)} not installed; the PyTorch side needs the "
                       "test extras (pip install -e '.[test]')")


def _train_step_inputs(path: str, batch: int, size: int, channels: int, ctx_len: int, ctx_dim: int,
                       seed: int) -> None:
    """One numpy draw both sides read (NHWC; torch transposes outside the timed region):
    clean latents, noise, timesteps and their SD alpha-bar (scaled-linear betas), context."""
    import numpy as np
    r = np.random.default_rng(seed)
    betas = np.linspace(SD_SCHEDULER["beta_start"] ** 0.5, SD_SCHEDULER["beta_end"] ** 0.5,
                        SD_SCHEDULER["num_train_timesteps"], dtype=np.float64) ** 2
    t = r.integers(0, SD_SCHEDULER["num_train_timesteps"], (batch,))
    np.savez(path, clean=(0.5 * r.standard_normal((batch, size, size, channels))).astype(np.float32),
             noise=r.standard_normal((batch, size, size, channels)).astype(np.float32),
             t=t.astype(np.int64), alpha_bar=np.cumprod(1 - betas)[t].astype(np.float32),
             context=r.standard_normal((batch, ctx_len, ctx_dim)).astype(np.float32))


def _model_folder(config: Any, diffusers_config: dict[str, Any]) -> str:
    """The cache folder of this architecture and seed (its config saved beside it)."""
    import hashlib
    import os
    import tempfile
    root = config.cache_dir or os.path.join(tempfile.gettempdir(), "rig_jax_benchmark")
    os.makedirs(root, exist_ok=True)
    text = json.dumps(diffusers_config, sort_keys=True)
    name = f"unet_{hashlib.sha1(f'{text}{config.seed}'.encode()).hexdigest()[:12]}"
    with open(os.path.join(root, name + ".json"), "w") as f:
        f.write(text)
    return os.path.join(root, name)


def benchmark_train_step(config: Any, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parity record, speed record) of one batch size: both workers started one after the
    other (compile timed alone), then timed calls alternating A B / B A round by round, so a
    machine whose speed drifts hits both sides alike."""
    import os

    from rig_jax.models.unet import UNetConfig
    from rig_jax.weights.unet import unet_config_to_diffusers

    shape = model_shape(config, "unet", "U-Net")
    unet_config = UNetConfig(**shape.unet.to_dict())
    size, ctx_len = shape.latent_size, shape.context_length
    repeats = per_shape(config, "repeats")
    folder = _model_folder(config, unet_config_to_diffusers(unet_config))
    inputs_path = f"{folder}_inputs_b{batch}_s{size}_l{ctx_len}.npz"
    _train_step_inputs(inputs_path, batch, size, unet_config.in_channels, ctx_len,
                       unet_config.cross_attention_dim, config.seed)
    workers: dict[str, _Worker] = {}
    try:
        for side in ("torch", "rig_jax"):
            workers[side] = _Worker(side, folder, inputs_path, config.threads, config.seed)
        wall: dict[str, list[float]] = {"rig_jax": [], "torch": []}
        cpu: dict[str, list[float]] = {"rig_jax": [], "torch": []}
        ratios, load = [], []
        for r in range(repeats):
            got = {side: workers[side].ask("time") for side in (("rig_jax", "torch") if r % 2 == 0
                                                               else ("torch", "rig_jax"))}
            for side, t in got.items():
                wall[side].append(t["s"])
                cpu[side].append(t["cpu_s"])
            ratios.append(got["torch"]["s"] / got["rig_jax"]["s"])
            load.append(round(os.getloadavg()[0], 2))
        checks = {side: w.ask("parity") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    jax_info, torch_info = workers["rig_jax"].ready, workers["torch"].ready
    common = {"bench": "train-step", "shape": shape_name(config), "batch": batch, "latent_size": size,
              "context": [ctx_len, unet_config.cross_attention_dim], "threads": config.threads}
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
    loss_err = rel(checks["rig_jax"]["loss"], checks["torch"]["loss"])
    grad_err = rel(checks["rig_jax"]["grad_norm"], checks["torch"]["grad_norm"])
    parity = {**common, "what": "parity", "loss_rig_jax": checks["rig_jax"]["loss"],
              "loss_torch": checks["torch"]["loss"], "loss_rel_err": loss_err,
              "grad_norm_rig_jax": checks["rig_jax"]["grad_norm"],
              "grad_norm_torch": checks["torch"]["grad_norm"], "grad_norm_rel_err": grad_err,
              "ok": max(loss_err, grad_err) < 1e-4}
    med = {side: statistics.median(v) for side, v in wall.items()}
    med_cpu = {side: statistics.median(v) for side, v in cpu.items()}
    ratio = statistics.median(ratios)
    speed = {
        **common, "what": "speed", "dtype": "fp32",
        "steps_per_s_rig_jax": round(1 / med["rig_jax"], 4), "steps_per_s_torch": round(1 / med["torch"], 4),
        "ratio": round(ratio, 4), "ratio_of_medians": round(med["torch"] / med["rig_jax"], 4),
        "ratio_of_mins": round(min(wall["torch"]) / min(wall["rig_jax"]), 4),
        "cpu_s_ratio": round(med_cpu["torch"] / med_cpu["rig_jax"], 4),
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
        "per_round_ratio": [round(x, 3) for x in ratios], "loadavg_1m": load, "repeats": repeats,
        "compile_s": round(jax_info["first_call_s"] - jax_info["second_call_s"], 2),
        "first_call_s": {"rig_jax": round(jax_info["first_call_s"], 2),
                         "torch": round(torch_info["first_call_s"], 2)},
        "backend": jax_info["backend"], "device": jax_info["device"], "jax": jax_info["jax"],
        "torch_device": torch_info["device"], "torch": torch_info["torch"],
        "diffusers": torch_info["diffusers"], "torch_threads": torch_info["threads"],
        "torch_attn_processor": torch_info["attn_processor"],
        "summary": f"{jax_info['backend']} train-step vs torch: {ratio:.2f}x",
    }
    return parity, speed


def bench_train_step(config: Any) -> None:
    _require_torch()
    for batch in per_shape(config, "batch"):
        parity, speed = benchmark_train_step(config, batch)
        emit(**parity)
        emit(**speed)


def run(config: Any) -> None:
    """The benchmark `config.bench` on the mesh of `config.mesh`."""
    from rig_jax.parallel import mesh_context

    if config.bench not in BENCHES:
        raise ConfigError(f"bench: {config.bench!r} is not one of {', '.join(BENCHES)}")
    if config.dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: {config.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    for field in ("repeats", "steps", "prompt_len", "new_tokens"):
        if config[field] < 0:
            raise ConfigError(f"{field}: must be >= 0 (0: the bench's default), got {config[field]}")
    if config.threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {config.threads}")
    if any(b < 1 for b in config.batch):
        raise ConfigError(f"batch: batch sizes must be >= 1, got {tuple(config.batch)}")
    unet = config.bench in ("sampler", "train-step")
    model_shape(config, "unet" if unet else "decoder", "U-Net" if unet else "decoder")  # fail before work
    if config.bench == "train-step":
        return bench_train_step(config)
    with mesh_context(config) as (mesh, rules):
        (bench_sampler if config.bench == "sampler" else bench_decode)(config, mesh, rules)


def build_parser() -> SugarParser:
    p = SugarParser("rig-benchmark", __doc__.splitlines()[0], "configs/benchmark.py:sampler")
    p.add_argument("bench", nargs="?", choices=BENCHES,
                   help="sampler: guided DDIM with the U-Net (latents, no VAE); decode: VLM decoder; "
                        "train-step: the U-Net's forward+backward, rig_jax vs torch/diffusers, same weights")
    p.add_argument("--shape", dest="shape", help="named shape: tiny, sd15, sd1-small (sampler, train-step); "
                                                 "tiny, qwen2-1.5b, qwen2.5-vl-3b, qwen2.5-vl-7b (decode)")
    p.add_argument("--batch", dest="batch", type=int, nargs="+", help="batch sizes")
    p.add_argument("--steps", dest="steps", type=int, help="DDIM steps (sampler)")
    p.add_argument("--guidance", dest="guidance", type=float, help="CFG scale (sampler)")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, help="prompt tokens (decode)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, help="generated tokens (decode)")
    p.add_argument("--dtype", dest="dtype", choices=DTYPE_NAMES, help="compute dtype")
    p.add_argument("--repeats", dest="repeats", type=int, help="timed runs (train-step: rounds)")
    p.add_argument("--threads", dest="threads", type=int, help="threads per side (train-step)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-benchmark`): bad input exits 2 with one line on stderr."""
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
