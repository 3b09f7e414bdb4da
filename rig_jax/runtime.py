"""Host tuning for XLA:CPU (`RIG_CPU_INLINE`): each step's temp buffer stays in memory.

XLA:CPU allocates an executable's temp buffer afresh on every call. By default it runs the call
on a worker thread, whose glibc arena grows in heaps of at most 64 MiB, so a buffer above that is
a fresh mmap each step, faulted in (and zeroed) page by page: 32,000 faults a step on the
actor-step bench, 99,000 on the train step (docs/benchmarks.md). With the setting on, jax runs
CPU executables inline on the calling thread (`jax_cpu_enable_async_dispatch = False`), whose main
arena grows by brk, and glibc's mmap threshold is raised to 1 GiB (trim threshold 2 GiB), so the
freed buffer stays in the heap for the next call. Measured: the training-step benches take 12-28 %
less time, the inference benches are unchanged within their spread, but the Generate-Reflect-Edit
loop is 1-2 % slower and the whole ShapesSG demo (rollout-heavy) 3 % slower, since host work no
longer overlaps XLA's. Hence per job: the config field `cpu_inline` (every tool's, from
configs/common.py) is `0` by default and `auto` for the pretraining and SFT jobs
(configs/shapes_train.py: the Diffuser's pretraining 16-26 % more steps a second on an AMD
EPYC, the Actor's SFT 6-9 %).

Values: `0` off; `1` on; `auto` on when jax can only run on the CPU (`JAX_PLATFORMS` is `cpu`,
or it is unset and no accelerator package, libtpu or a `jax_plugins` plugin, is installed), so
TPU and GPU hosts are left alone. `RIG_CPU_INLINE`, when set and not empty, overrides the
config's field for every tool."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

from rig_jax.errors import ConfigError

ENV = "RIG_CPU_INLINE"
FIELD = "cpu_inline"
VALUES = ("", "auto", "0", "1")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 1 << 30, (1 << 31) - 1


def cpu_inline_setting(configured: str = "0", environ: dict[str, str] | None = None
                       ) -> tuple[str, str]:
    """(mode "0" | "1" | "auto", where it came from): `RIG_CPU_INLINE` when set and not empty,
    else the config's `cpu_inline` (`configured`); a bad value is a one-line ConfigError naming
    the variable or the field."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    source = ENV if value else FIELD
    return checked_setting(value or str(configured), source), source


def checked_setting(value: str, where: str) -> str:
    """`value` as "0" | "1" | "auto" ("" reads as "0"); anything else is a one-line
    ConfigError naming `where` (the variable or the config field it came from)."""
    if value not in VALUES:
        raise ConfigError(f"{where}: expected 0, 1 or auto, got {value!r}")
    return value or "0"


def accelerator_package_installed() -> bool:
    """Whether jax could find a TPU or GPU runtime here: libtpu, or a PJRT plugin (the
    `jax_plugins` entry points and namespace package jax discovers its plugins from)."""
    if any(importlib.util.find_spec(name) for name in ("libtpu", "libtpu_nightly")):
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return bool(spec and any(pkgutil.iter_modules(spec.submodule_search_locations or [])))


def cpu_inline_wanted(mode: str, platforms: str | None, accelerator_installed: bool) -> bool:
    """The decision, from the mode, jax's `jax_platforms` setting and the installed packages."""
    if mode != "auto":
        return mode == "1"
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not accelerator_installed


def _cannot(mode: str, source: str, message: str) -> bool:
    """`auto` quietly leaves things as they are; a forced `1` is a one-line error."""
    if mode == "auto":
        return False
    raise ConfigError(f"{source}=1{message}")


def apply_cpu_inline(configured: str = "0") -> bool:
    """Applies the setting when `RIG_CPU_INLINE`, or else the config's `cpu_inline`
    (`configured`), asks for it (module docstring), before jax starts its CPU backend; returns
    whether it did. `1` after the backend started is an error; `auto` then leaves things as
    they are. Called by every tool's entry point (after parsing its config, before any jax
    computation) and the benchmark's rig_jax worker."""
    mode, source = cpu_inline_setting(configured)
    if mode == "0":
        return False
    import jax
    from jax._src import xla_bridge

    if mode == "auto" and not cpu_inline_wanted(mode, jax.config.jax_platforms,
                                                accelerator_package_installed()):
        return False
    if xla_bridge.backends_are_initialized():
        return _cannot(mode, source, ": jax's backends are already started; set it before the first jax "
                             "computation (it is read at tool start)")
    try:
        mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:                      # no C library by that name (e.g. Windows)
        mallopt = None
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                               and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return _cannot(mode, source, " needs glibc's mallopt (M_MMAP_THRESHOLD up to 1 GiB); this C "
                             "library refused it")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
