"""Opt-in host tuning for XLA:CPU: `RIG_CPU_INLINE=1` keeps each step's temp buffer in memory.

XLA:CPU allocates an executable's temp buffer afresh on every call. By default it runs the call
on a worker thread, whose glibc arena grows in heaps of at most 64 MiB, so a buffer above that is
a fresh mmap each step, faulted in (and zeroed) page by page: 32,000 faults a step on the
actor-step bench, 99,000 on the train step (docs/benchmarks.md). With the setting on, jax runs
CPU executables inline on the calling thread (`jax_cpu_enable_async_dispatch = False`), whose main
arena grows by brk, and glibc's mmap threshold is raised to 1 GiB (trim threshold 2 GiB), so the
freed buffer stays in the heap for the next call. Measured on the training-step benches, mixed
elsewhere (the loop bench 4 % slower: host work no longer overlaps the device's), hence opt-in.
Accelerator backends are untouched (the jax switch is CPU-only)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from rig_jax.errors import ConfigError

ENV = "RIG_CPU_INLINE"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 1 << 30, (1 << 31) - 1


def cpu_inline_requested(environ: dict[str, str] | None = None) -> bool:
    """`RIG_CPU_INLINE` read as a switch: unset, "" or "0" off, "1" on; anything else is a
    one-line ConfigError naming the variable."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def apply_cpu_inline() -> bool:
    """Applies the setting when `RIG_CPU_INLINE=1`, before jax starts its CPU backend; returns
    whether it did. Called by every tool's entry point and the benchmark's rig_jax worker."""
    if not cpu_inline_requested():
        return False
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError(f"{ENV}=1: jax's backends are already started; set it before the first "
                          "jax computation (it is read at tool start)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                               and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        raise ConfigError(f"{ENV}=1 needs glibc's mallopt (M_MMAP_THRESHOLD up to 1 GiB); this "
                          "C library refused it")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
