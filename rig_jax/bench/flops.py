"""Model FLOPs from XLA's cost analysis, and the device peaks they are divided by.

XLA's `cost_analysis()` counts the body of a loop (`scan`, `while_loop`, `lax.map`) once, not
once per trip. So the benches count one model call (one U-Net forward, one teacher-forced
decoder pass, one loss gradient) and multiply by the calls a run makes; and on CPU that call is
lowered with the generic graph (`generic_graph`), because rig_jax's CPU attention runs its heads
in a `lax.map` that the count would see once. The generic graph is also the model's own
arithmetic (no CPU-specific rewrites), which is what model FLOP utilisation is about.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

# Dense peak TFLOP/s per chip from the vendors' data sheets (no sparsity): (bf16, fp32).
# fp32 on GPUs is the non-tensor-core rate. Matched against `device_kind`, first hit wins.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),            # NVIDIA H200 SXM
    ("H100", 989.0, 67.0),            # NVIDIA H100 SXM
    ("A100", 312.0, 19.5),
    ("L4", 121.0, 30.3),
    ("TPU v5 lite", 197.0, 197.0),    # TPU v5e (fp32 matmuls run through the bf16 MXU passes)
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v6", 918.0, 918.0),
    ("TPU v4", 275.0, 275.0),
)
# fp32 FLOPs per cycle of one core with two FMA ports (2 ports x lanes x 2 FLOPs), by the
# widest vector extension its /proc/cpuinfo flags name; without FMA, one add and one multiply.
CPU_FLOPS_PER_CYCLE = (("avx512f", 64, "AVX-512, 2 FMA ports"), ("avx2", 32, "AVX2, 2 FMA ports"),
                       ("sse2", 8, "SSE2, 1 add + 1 multiply"))


def _cpuinfo_first_core() -> dict[str, str]:
    """The first core's `key: value` lines of /proc/cpuinfo (empty when unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_ghz() -> float:
    """The nominal clock of this machine's first core (/proc/cpuinfo), 0 when unknown."""
    try:
        return float(_cpuinfo_first_core().get("cpu MHz", "0")) / 1000
    except ValueError:
        return 0.0


def cpu_flops_per_cycle(flags: str | None = None) -> tuple[int, str]:
    """(fp32 FLOPs per cycle per core, the extension it assumes) from the cpuinfo `flags`."""
    present = set((_cpuinfo_first_core().get("flags", "") if flags is None else flags).split())
    for flag, flops, name in CPU_FLOPS_PER_CYCLE:
        if flag in present:
            return flops, name
    return CPU_FLOPS_PER_CYCLE[-1][1], CPU_FLOPS_PER_CYCLE[-1][2] + " (assumed: no flags read)"


def device_peak(backend: str, device_kind: str, dtype: str, threads: int, override_tflops: float = 0.0
                ) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for `dtype` ("bf16" | "fp32") on one device.

    CPU: `threads` cores x nominal GHz x FLOPs/cycle of the widest vector extension the
    cores have (`cpu_flops_per_cycle`: 64 with AVX-512, 32 with AVX2; fp32, and bf16 has no
    faster path in XLA:CPU, so the same). 0 when nothing is known."""
    if override_tflops > 0:
        return override_tflops * 1e12, f"--config.peak_tflops={override_tflops}"
    if backend == "cpu":
        ghz = cpu_ghz()
        if not ghz:
            return 0.0, "unknown (no cpu MHz in /proc/cpuinfo)"
        per_cycle, extension = cpu_flops_per_cycle()
        return (threads * ghz * 1e9 * per_cycle,
                f"{threads} core(s) x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({extension})")
    for name, bf16, fp32 in DEVICE_PEAKS:
        if name.lower() in device_kind.lower():
            peak = bf16 if dtype == "bf16" else fp32
            return peak * 1e12, f"{name} data sheet, dense {dtype}: {peak:g} TFLOP/s"
    return 0.0, f"unknown device {device_kind!r} (set --config.peak_tflops)"


@contextlib.contextmanager
def generic_graph() -> Iterator[None]:
    """While tracing inside, rig_jax's models take their non-CPU code paths (they branch on
    `jax.default_backend()`), so the graph has no per-head loops for the cost analysis."""
    import jax
    real = jax.default_backend
    if real() != "cpu":
        yield
        return
    jax.default_backend = lambda: "tpu"
    try:
        yield
    finally:
        jax.default_backend = real


def call_flops(fn: Callable[..., Any], *args: Any, compile: bool = False) -> float:
    """FLOPs XLA's HLO cost analysis counts for one call of `fn(*args)` (jitted here, generic
    graph). By default of the lowered module, which skips a second compile of the model; its
    dot and convolution FLOPs are those of `.compile().cost_analysis()` (`compile=True`)."""
    import jax
    with generic_graph():
        lowered = jax.jit(fn).lower(*args)
    cost = lowered.compile().cost_analysis() if compile else lowered.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count from its current RSS (Linux: 5 into clear_refs),
    so each bench a worker loads reports its own peak; False where the system refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident set size since the last `reset_peak_rss` (VmHWM), else
    over its life (ru_maxrss, KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    return time.process_time()
