"""rig-benchmark: rig_jax's speed as JSON lines, beside the PyTorch references with --peer.

    rig-benchmark sampler --peer                # guided DDIM vs diffusers, CPU-sized U-Net
    rig-benchmark all --peer                    # sampler inversion decode actor-step editor-step loop
    rig-benchmark decode --shape qwen2.5-vl-7b --peer --batch 64
    rig-benchmark --config=configs/benchmark.py:sd15 --config.batch='(1, 8)'

Benches: sampler (DDIM with CFG), inversion (DDIM inversion), decode (greedy VLM decoding),
actor-step (stage 1's token-GRPO gradient on the VLM), editor-step (stage 2's diffusion-PPO
gradient on the U-Net), train-step (the U-Net's epsilon-MSE gradient), loop (Generate-Reflect-
Edit images/s on the committed ShapesSG models; rig_jax only: no PyTorch implementation of the
loop exists to compare with). Both sides read the same random weights, saved once with
`save_pretrained` under `--config.cache_dir` (torch, diffusers and transformers write them), and
one numpy draw of inputs; each side runs in its own worker process with `--threads` threads,
timed alternately round by round. docs/benchmarks.md explains every field.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rig_jax.config import SugarParser, run_tool
from rig_jax.errors import ConfigError

BENCHES = ("sampler", "inversion", "decode", "actor-step", "editor-step", "loop", "train-step")
ALL = ("sampler", "inversion", "decode", "actor-step", "editor-step", "loop")
TRAINING = ("actor-step", "editor-step", "train-step")
DTYPE_NAMES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "gpu", "tpu")
# flag -> config field of the counts that must be >= 1 when given
COUNTS = {"--repeats": "repeats", "--steps": "steps", "--trained-steps": "trained_steps",
          "--prompt-len": "prompt_len", "--new-tokens": "new_tokens", "--threads": "threads"}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def check_config(config: Any) -> tuple[str, ...]:
    """The benches to run, after every check that needs no work (one-line ConfigErrors)."""
    from rig_jax.bench import driver
    from rig_jax.bench.models import require
    from rig_jax.runtime import checked_setting

    benches = ALL if config.bench == "all" else (config.bench,)
    if config.bench != "all" and config.bench not in BENCHES:
        raise ConfigError(f"bench: {config.bench!r} is not one of {', '.join((*BENCHES, 'all'))}")
    if config.dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype: {config.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if config.device not in DEVICES:
        raise ConfigError(f"--device: {config.device!r} is not one of {', '.join(DEVICES)}")
    for flag, field in COUNTS.items():
        value = config[field]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag}: must be an integer >= 1, got {value!r} (config field {field})")
    if config.batch is not None:
        batches = config.batch if isinstance(config.batch, (tuple, list)) else (config.batch,)
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise ConfigError(f"--batch: batch sizes must be integers >= 1, got {config.batch!r}")
    for bench in benches:
        driver.model_shape(config, bench)
        field = driver.shape_key(bench)
        checked_setting(config.worker_cpu_inline[field], f"worker_cpu_inline.{field}")
    for field in ("worker_cpu_hugepages", "peer_cpu_hugepages"):
        checked_setting(config[field], field)
    if config.forward_only and any(b not in TRAINING for b in benches):
        raise ConfigError(f"--forward-only: only for the training benches ({', '.join(TRAINING)}), "
                          f"not {', '.join(b for b in benches if b not in TRAINING)}")
    if config.peer:
        require("torch", "diffusers", "transformers", why="--peer")
        if driver.resolve_device(config.device) not in ("cpu", "gpu"):
            raise ConfigError("--peer: the PyTorch side runs on cpu or gpu")
    return benches


def run(config: Any) -> None:
    """Each bench of `config.bench` at each batch size: one JSON line per measurement."""
    from rig_jax.bench import driver

    benches = check_config(config)
    device = driver.resolve_device(config.device)
    pair = driver.Pair(config, device, peer=config.peer and any(b != "loop" for b in benches))
    try:
        for bench in benches:
            batches = driver.per_shape(config, bench, "batch")
            for batch in batches if isinstance(batches, (tuple, list)) else (batches,):
                emit(driver.measure(pair, config, bench, batch, device))
    finally:
        pair.close()


def build_parser() -> SugarParser:
    p = SugarParser("rig-benchmark", __doc__.splitlines()[0], "configs/benchmark.py:sampler")
    p.add_argument("bench", nargs="?", metavar="{" + ",".join((*BENCHES, "all")) + "}",
                   help="what to time (all: the six of issue 12); none: the config's (`--config`)")
    p.add_argument("--peer", dest="peer", action="store_const", const=True,
                   help="also run the PyTorch reference on the same weights, interleaved")
    p.add_argument("--forward-only", dest="forward_only", action="store_const", const=True,
                   help="training benches: the loss alone, no gradient (both sides)")
    p.add_argument("--shape", dest="shape",
                   help="named shape: tiny, cpu, sd15 (U-Net benches); tiny, cpu, qwen2-1.5b, "
                        "qwen2.5-vl-3b, qwen2.5-vl-7b (decode, actor-step); shapes-sg (loop)")
    p.add_argument("--batch", dest="batch", type=int, nargs="+", help="batch sizes (>= 1)")
    p.add_argument("--steps", dest="steps", type=int, help="DDIM steps (>= 1)")
    p.add_argument("--trained-steps", dest="trained_steps", type=int,
                   help="editor-step: trained steps per row")
    p.add_argument("--guidance", dest="guidance", type=float, help="CFG scale")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, help="prompt tokens (decode, actor-step)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, help="generated / completion tokens")
    p.add_argument("--dtype", dest="dtype", choices=DTYPE_NAMES, help="compute dtype")
    p.add_argument("--device", dest="device", choices=DEVICES,
                   help="where both sides run (tpu: rig_jax only; auto: gpu or tpu when present, else cpu)")
    p.add_argument("--repeats", dest="repeats", type=int, help="timed rounds per side (>= 1)")
    p.add_argument("--threads", dest="threads", type=int, help="threads per side")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`rig-benchmark`): bad input exits 2 with one line on stderr. This
    process only drives the workers: its own jax stays on the CPU (unless JAX_PLATFORMS says
    otherwise), so it never takes accelerator memory from them."""
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run_tool(run, argv, build_parser())


if __name__ == "__main__":
    main()
