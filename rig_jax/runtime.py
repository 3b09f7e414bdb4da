"""Host tuning for XLA:CPU (`RIG_CPU_INLINE`): each step's temp buffer stays in memory.

XLA:CPU allocates an executable's temp buffer afresh on every call. By default it runs the call
on a worker thread, whose glibc arena grows in heaps of at most 64 MiB, so a buffer above that is
a fresh mmap each step, faulted in (and zeroed) page by page: 32,000 faults a step on the
actor-step bench, 99,000 on the train step (docs/benchmarks.md). With the setting on, jax runs
CPU executables inline on the calling thread (`jax_cpu_enable_async_dispatch = False`), whose main
arena grows by brk, and glibc maps no chunk with mmap and never trims the heap (`M_MMAP_MAX` 0,
`M_TRIM_THRESHOLD` -1), so a freed buffer of any size stays in the heap for the next call; the
process keeps its high-water mark of memory until it exits. (Until 2026-12-06 the mmap threshold
was raised to 1 GiB instead, which still faulted in stage 2's 4.7 GiB update buffer every step.)
Measured: the training-step benches take 12-28 % less time, the inference benches are
unchanged within their spread, but the Generate-Reflect-Edit loop is 1-2 % slower and the
whole ShapesSG demo (rollout-heavy) 3 % slower, since host work no longer overlaps XLA's.
Hence per job: the config field `cpu_inline` (every tool's, from configs/common.py) is `0` by
default and `auto` for the pretraining and SFT jobs (configs/shapes_train.py: the Diffuser's
pretraining 16-26 % more steps a second on an AMD EPYC, the Actor's SFT 6-9 %).

Values: `0` off; `1` on; `auto` on when jax can only run on the CPU (`JAX_PLATFORMS` is `cpu`,
or it is unset and no accelerator package, libtpu or a `jax_plugins` plugin, is installed), so
TPU and GPU hosts are left alone. `RIG_CPU_INLINE`, when set and not empty, overrides the
config's field for every tool.

The second setting, `cpu_hugepages` (`RIG_CPU_HUGEPAGES` over it; same values, `0` by default
for every tool), keeps async dispatch and makes those fresh pages cheaper instead: glibc's tunable
`glibc.malloc.hugetlb=1` has malloc advise transparent huge pages (`MADV_HUGEPAGE`) for the
memory it maps, so a 100 MiB temp buffer costs ~50 faults of 2 MiB instead of 25,000 of 4 KiB.
glibc reads its tunables only when a process starts, so a tool started from the command line
with the setting wanted and `GLIBC_TUNABLES` without it executes itself again at once (same pid,
arguments and environment plus the tunable), before any jax computation. `auto` applies it where
jax can only use the CPU, glibc is 2.35 or newer and the kernel's THP mode is `madvise` (with
`always` large mappings get huge pages anyway; with `never` there are none). It is off by
default because its effect depends on the host (docs/benchmarks.md): on an AMD EPYC VM the GRPO
stages' updates ran 20-30 % faster with it, on the VM of 2026-12-02 06:10 UTC the kernel's
synchronous compaction made stage 2's rollouts 75 % slower, and where a VM's balloon reports
free pages to the host, memory freed in 2 MiB blocks and reused seconds later is faulted in
again from the host. Jobs run in-process (a notebook, a test calling `main([...])`) are left as
they are; `1` there is a one-line error saying how to set the tunable."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

from rig_jax.errors import ConfigError

ENV = "RIG_CPU_INLINE"
FIELD = "cpu_inline"
HUGEPAGES_ENV = "RIG_CPU_HUGEPAGES"
HUGEPAGES_FIELD = "cpu_hugepages"
VALUES = ("", "auto", "0", "1")
TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# mallopt's parameters (malloc.h) and the values the setting gives them (module docstring)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NO_TRIM, _NO_MMAP = -1, 0


def cpu_inline_setting(configured: str = "0", environ: dict[str, str] | None = None
                       ) -> tuple[str, str]:
    """(mode "0" | "1" | "auto", where it came from): `RIG_CPU_INLINE` when set and not empty,
    else the config's `cpu_inline` (`configured`); a bad value is a one-line ConfigError naming
    the variable or the field."""
    return _setting(ENV, FIELD, configured, environ)


def cpu_hugepages_setting(configured: str = "0", environ: dict[str, str] | None = None
                          ) -> tuple[str, str]:
    """`cpu_inline_setting` for `RIG_CPU_HUGEPAGES` over the config's `cpu_hugepages`."""
    return _setting(HUGEPAGES_ENV, HUGEPAGES_FIELD, configured, environ)


def _setting(variable: str, field: str, configured: str, environ: dict[str, str] | None
             ) -> tuple[str, str]:
    value = (os.environ if environ is None else environ).get(variable, "")
    source = variable if value else field
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
    if mallopt is None or not (mallopt(_M_MMAP_MAX, _NO_MMAP) and mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)):
        return _cannot(mode, source, " needs glibc's mallopt (M_MMAP_MAX 0, M_TRIM_THRESHOLD -1); this C "
                             "library refused it")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`; None: no THP)."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), None)


def glibc_version() -> tuple[int, ...] | None:
    """glibc's version, e.g. (2, 36); None for another C library (musl, macOS, Windows)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    parts = version.split(".")[:2]
    return tuple(int(p) for p in parts) if name == "glibc" and all(p.isdigit() for p in parts) else None


def with_hugepages(environ: dict[str, str], on: bool) -> dict[str, str]:
    """A copy of `environ` whose `GLIBC_TUNABLES` has the huge-page tunable (`on`) or not."""
    entries = [e for e in environ.get("GLIBC_TUNABLES", "").split(":")
               if e and not e.startswith("glibc.malloc.hugetlb=")]
    env = dict(environ)
    entries += [TUNABLE] if on else []
    if entries:
        env["GLIBC_TUNABLES"] = ":".join(entries)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def hugepages_active(environ: dict[str, str] | None = None) -> bool:
    """Whether `environ` (this process's by default) carries the huge-page tunable."""
    return TUNABLE in (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "").split(":")


def hugepages_wanted(mode: str, environ: dict[str, str], thp: str | None, glibc: tuple[int, ...] | None,
                     accelerator_installed: bool, source: str = HUGEPAGES_FIELD) -> bool:
    """Whether a process started with `environ` should run with the tunable (module docstring);
    a forced `1` that this machine cannot honour is a one-line ConfigError naming `source`."""
    if mode == "0":
        return False
    if glibc is None or glibc < (2, 35) or thp in (None, "never"):
        why = (f"transparent huge pages are off here ({THP_ENABLED}: {thp or 'absent'})"
               if glibc and glibc >= (2, 35) else "needs glibc 2.35 or newer (glibc.malloc.hugetlb)")
        if mode == "1":
            raise ConfigError(f"{source}=1: {why}")
        return False
    if mode == "1":
        return True
    return thp == "madvise" and cpu_inline_wanted("auto", environ.get("JAX_PLATFORMS"),
                                                  accelerator_installed)


def apply_cpu_hugepages(configured: str = "0", restart: bool = False) -> bool:
    """Runs the process with glibc's huge-page tunable when the setting (`RIG_CPU_HUGEPAGES`, else
    the config's `cpu_hugepages`) wants it: returns True when it is already in effect; executes
    this process again with the tunable when `restart` (a command-line tool, before any jax
    computation); else leaves things as they are (a forced `1` is then a one-line error)."""
    mode, source = cpu_hugepages_setting(configured)
    environ = dict(os.environ)
    if not hugepages_wanted(mode, environ, thp_mode(), glibc_version(),
                            accelerator_package_installed() if mode == "auto" else False, source):
        return False
    if hugepages_active(environ):
        return True
    if restart and "jax" in sys.modules:
        from jax._src import xla_bridge
        restart = not xla_bridge.backends_are_initialized()   # this process has state to keep
    if not restart:
        if mode == "1":
            raise ConfigError(f"{source}=1: glibc reads its tunables at process start; start Python "
                              f"with GLIBC_TUNABLES={TUNABLE}")
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_hugepages(environ, True))
    return True   # not reached: execve replaces the process
