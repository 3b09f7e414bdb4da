"""The XLA:CPU host setting (rig_jax.runtime): a config's `cpu_inline` (off by default, auto for
the pretraining jobs), `RIG_CPU_INLINE` over it; on, a CPU executable's temp buffer stays in the
heap between calls (measured as minor page faults per call in a child process), and a tool
started with it runs CPU executables inline; `auto` is on exactly when jax can only run on the
CPU. Bad values and a forced late call are one-line errors. The second setting, `cpu_hugepages`
(off by default), runs a command-line tool with glibc's huge-page tunable (it executes itself
again with it): the same temp buffer then costs a few 2 MiB faults instead of 4 KiB ones."""
import json
import platform
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import pytest

from rig_jax import runtime
from rig_jax.errors import ConfigError
from tests.helpers import tool_env

# A jitted call whose intermediates (two 64 MiB cumulative sums) are one temp allocation of
# ~128 MiB, above the 64 MiB heaps of a worker thread's glibc arena; prints the median faults of five calls.
FAULTS = """
import json, resource
from rig_jax.runtime import apply_cpu_inline
applied = apply_cpu_inline()
import jax, jax.numpy as jnp
from jax._src import xla_bridge
f = jax.jit(lambda x: (jnp.cumsum(x * 2.0)[::1024] * jnp.cumsum(x[::-1])[::1024]).sum())
x = jnp.ones((1 << 24,), jnp.float32)
for _ in range(2):
    f(x).block_until_ready()
per_call = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(per_call)[2]   # the median: a small block left at the freed buffer's start now and
                               # then makes one call grow the heap anew (2 calls in 36 measured)
print(json.dumps({"applied": applied, "faults": faults,
                  "async": xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value}))
"""


def measure(inline: str, hugepages: bool = False, script: str = FAULTS) -> dict:
    env = runtime.with_hugepages(dict(tool_env(), RIG_CPU_INLINE=inline), hugepages)
    env.pop("XLA_FLAGS")   # the tests' -O0 makes the scans ten times slower; faults are the same
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting and the fault count are glibc's")
def test_inline_keeps_the_temp_buffer_between_calls():
    off, on, auto = measure(""), measure("1"), measure("auto")     # tool_env: JAX_PLATFORMS=cpu
    assert not off["applied"] and off["async"] and off["faults"] > 10_000, off
    assert on["applied"] and not on["async"] and on["faults"] < 1_000, on
    assert auto["applied"] and not auto["async"], auto


# A freed 1.125 GiB block allocated again (above the 1 GiB mmap threshold the setting used before
# 2026-12-06: stage 2's update has a 4.7 GiB temp buffer); prints the second allocation's faults.
LARGE = """
import ctypes, json, resource
from rig_jax.runtime import apply_cpu_inline
applied = apply_cpu_inline()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 9 << 27
def touch():
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting and the fault count are glibc's")
def test_inline_keeps_a_freed_block_of_any_size():
    """A block above any mmap threshold is not handed back to the kernel and faulted in again
    (295,000 faults without the setting)."""
    result = measure("1", script=LARGE)
    assert result["applied"] and result["faults"] < 1_000, result


@pytest.mark.parametrize("mode, platforms, accelerator, wanted", [
    ("auto", "cpu", True, True),            # the user asked jax for the CPU only
    ("auto", None, False, True),            # no TPU or GPU runtime installed
    ("auto", None, True, False),            # jax may pick an accelerator: its host is left alone
    ("auto", "cuda,cpu", False, False),
    ("auto", "tpu", False, False),
    ("1", "tpu", True, True),
    ("0", "cpu", False, False),
])
def test_auto_is_on_when_jax_can_only_run_on_the_cpu(mode, platforms, accelerator, wanted):
    assert runtime.cpu_inline_wanted(mode, platforms, accelerator) is wanted


def test_libtpu_or_a_jax_plugin_counts_as_an_accelerator(monkeypatch):
    import importlib.metadata
    import importlib.util

    found = {"libtpu": False, "plugin": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "libtpu" and found["libtpu"] else None)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: ["xla_cuda12"] if group == "jax_plugins" and found["plugin"] else [])
    assert runtime.accelerator_package_installed() is False
    for kind in found:
        found[kind] = True
        assert runtime.accelerator_package_installed() is True, kind
        found[kind] = False


def test_the_variable_overrides_the_config_field():
    setting = runtime.cpu_inline_setting
    assert {setting("0", env) for env in ({}, {"RIG_CPU_INLINE": ""})} == {("0", "cpu_inline")}
    assert setting("", {}) == ("0", "cpu_inline")
    assert setting("auto", {}) == ("auto", "cpu_inline")
    assert setting("auto", {"RIG_CPU_INLINE": "0"}) == ("0", "RIG_CPU_INLINE")
    assert setting("0", {"RIG_CPU_INLINE": "1"}) == ("1", "RIG_CPU_INLINE")


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_value_is_one_line_naming_the_variable_or_the_field(monkeypatch, value):
    monkeypatch.setenv("RIG_CPU_INLINE", value)
    with pytest.raises(ConfigError, match=rf"^RIG_CPU_INLINE: expected 0, 1 or auto, got '{value}'$"):
        runtime.apply_cpu_inline()
    monkeypatch.delenv("RIG_CPU_INLINE")
    with pytest.raises(ConfigError, match=rf"^cpu_inline: expected 0, 1 or auto, got '{value}'$"):
        runtime.apply_cpu_inline(value)


def test_after_the_backend_started_a_forced_setting_is_refused(monkeypatch):
    jnp.zeros(1).block_until_ready()     # this process's CPU backend is up
    monkeypatch.setenv("RIG_CPU_INLINE", "1")
    with pytest.raises(ConfigError, match="already started"):
        runtime.apply_cpu_inline()
    for value in ("0", "auto"):          # auto cannot apply it any more and says so by its result
        monkeypatch.setenv("RIG_CPU_INLINE", value)
        assert runtime.apply_cpu_inline() is False
    monkeypatch.delenv("RIG_CPU_INLINE")
    with pytest.raises(ConfigError, match=r"^cpu_inline=1: jax's backends are already started"):
        runtime.apply_cpu_inline("1")
    assert runtime.apply_cpu_inline("auto") is False


def test_without_glibc_auto_does_nothing_and_a_forced_setting_is_one_line():
    """A C library without mallopt (or none found, as on Windows): auto leaves jax as it is."""
    probe = ("import ctypes\n"
             "def missing(*args, **kwargs):\n    raise OSError('no libc')\n"
             "ctypes.CDLL = missing\n"
             "from rig_jax import runtime\nfrom rig_jax.errors import ConfigError\n"
             "from jax._src import xla_bridge\n"
             "try:\n    print(runtime.apply_cpu_inline(), xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)\n"
             "except ConfigError as e:\n    print('error:', e)")
    said = {}
    for value in ("auto", "1"):
        done = subprocess.run([sys.executable, "-c", probe], env=dict(tool_env(), RIG_CPU_INLINE=value),
                              capture_output=True, text=True, timeout=120)
        said[value] = done.stdout.strip()
    assert said["auto"] == "False True", said
    assert said["1"].startswith("error: RIG_CPU_INLINE=1 needs glibc's mallopt"), said


def test_a_tool_applies_its_configs_setting_before_jax_starts():
    """Every tool's entry (`run_tool`) applies the parsed config's `cpu_inline`, or
    RIG_CPU_INLINE over it, before any jax computation: probed by a mesh the devices cannot
    make, refused after the setting and before any work (exit 2, one line)."""
    probe = ("import sys; from jax._src import xla_bridge; from rig_jax.tools import {tool}\n"
             "try:\n    {tool}.main(sys.argv[1:] + ['--config.mesh.shape=(3, 1, 1)'])\n"
             "except SystemExit as e:\n"
             "    print(e.code, xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)")
    cases = [  # (tool, argv, RIG_CPU_INLINE or None, inline expected)
        ("sample", [], None, False),                                          # configs: 0
        ("sample", ["--config.cpu_inline=1"], None, True),
        ("train", ["--config=configs/shapes_train.py:diffuser_tiny", "--workdir", "{tmp}"], None, True),
        ("train", ["--config=configs/shapes_train.py:diffuser_tiny", "--workdir", "{tmp}"], "0", False),
        ("sample", [], "1", True),
    ]
    for tool, argv, variable, inline in cases:
        env = tool_env()
        env.pop("RIG_CPU_INLINE", None)
        if variable is not None:
            env["RIG_CPU_INLINE"] = variable
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-c", probe.format(tool=tool),
                                   *(a.format(tmp=tmp) for a in argv)],
                                  env=env, capture_output=True, text=True, timeout=120)
        case = (tool, argv, variable, done.stdout, done.stderr)
        assert done.stdout.split() == ["2", str(not inline)], case
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: mesh"), case


THP_USABLE = (platform.system() == "Linux" and (runtime.glibc_version() or (0,)) >= (2, 35)
              and runtime.thp_mode() in ("madvise", "always"))


@pytest.mark.skipif(not THP_USABLE, reason="needs glibc >= 2.35 and transparent huge pages")
def test_the_huge_page_tunable_makes_the_fresh_buffer_cheap_with_async_dispatch_kept():
    off, on = measure(""), measure("", hugepages=True)
    assert off["async"] and on["async"] and not on["applied"], (off, on)
    assert off["faults"] > 10_000 and on["faults"] < 1_000, (off, on)


@pytest.mark.parametrize("mode, thp, glibc, platforms, accelerator, wanted", [
    ("auto", "madvise", (2, 36), "cpu", False, True),
    ("auto", "madvise", (2, 36), None, True, False),     # jax may pick an accelerator
    ("auto", "always", (2, 36), "cpu", False, False),    # large mappings get huge pages anyway
    ("auto", "madvise", (2, 31), "cpu", False, False),   # no glibc.malloc.hugetlb before 2.35
    ("auto", "never", (2, 36), "cpu", False, False),
    ("auto", "madvise", None, "cpu", False, False),      # musl, macOS, Windows
    ("1", "always", (2, 36), "tpu", True, True),
    ("0", "madvise", (2, 36), "cpu", False, False),
])
def test_auto_wants_the_tunable_where_it_can_change_something(mode, thp, glibc, platforms, accelerator,
                                                              wanted):
    environ = {"JAX_PLATFORMS": platforms} if platforms else {}
    assert runtime.hugepages_wanted(mode, environ, thp, glibc, accelerator) is wanted


def test_a_forced_tunable_this_machine_cannot_honour_is_one_line():
    with pytest.raises(ConfigError, match=r"^cpu_hugepages=1: transparent huge pages are off here"):
        runtime.hugepages_wanted("1", {}, "never", (2, 36), False)
    with pytest.raises(ConfigError, match=r"^cpu_hugepages=1: needs glibc 2.35 or newer"):
        runtime.hugepages_wanted("1", {}, "madvise", None, False)


def test_the_tunable_joins_and_leaves_glibc_tunables_without_touching_the_others():
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/root"}
    assert runtime.with_hugepages(other, True)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert runtime.with_hugepages(runtime.with_hugepages(other, True), False) == other
    assert "GLIBC_TUNABLES" not in runtime.with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False)
    assert runtime.with_hugepages({}, True) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_the_thp_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(path)) == "madvise"
    assert runtime.thp_mode(str(tmp_path / "absent")) is None


@pytest.mark.skipif(not THP_USABLE or runtime.thp_mode() != "madvise",
                    reason="auto applies the tunable only where the THP mode is madvise")
def test_a_command_line_tool_executes_itself_again_with_the_tunable():
    """With the setting `auto`, `sample.main()` (argv None: a command-line start) comes back in
    the same process with GLIBC_TUNABLES set, before any jax computation (the mesh error is its
    config's check after the settings); by default (off), or called with an argv list (a
    notebook, a test), it is left as it is, and a forced 1 there says how to set the tunable."""
    probe = ("import os, sys\nprint('start', os.getpid(), flush=True)\n"
             "from rig_jax.tools import sample\n"
             "try:\n    sample.main({argv})\n"
             "except SystemExit as e:\n"
             "    print('end', os.getpid(), e.code, os.environ.get('GLIBC_TUNABLES', ''))")
    mesh = "--config.mesh.shape=(3, 1, 1)"
    field = "--config.cpu_hugepages=auto"
    cases = [  # (argv in the probe, RIG_CPU_HUGEPAGES, command line, starts seen, tunable at the end)
        ("", "auto", [mesh], 2, True), ("", None, [mesh, field], 2, True), ("", None, [mesh], 1, False),
        ("", "0", [mesh, field], 1, False), (f"[{mesh!r}]", "auto", [], 1, False)]
    for argv, variable, command_line, starts, tunable in cases:
        env = runtime.with_hugepages(tool_env(), False)
        env.pop("RIG_CPU_HUGEPAGES", None)
        if variable is not None:
            env["RIG_CPU_HUGEPAGES"] = variable
        done = subprocess.run([sys.executable, "-c", probe.format(argv=argv), *command_line], env=env,
                              capture_output=True, text=True, timeout=120)
        lines = done.stdout.split("\n")
        pids = {line.split()[1] for line in lines if line.startswith(("start", "end"))}
        case = (argv, variable, command_line, done.stdout, done.stderr)
        assert sum(line.startswith("start") for line in lines) == starts and len(pids) == 1, case
        end = next(line for line in lines if line.startswith("end")).split()
        assert end[2] == "2" and (runtime.TUNABLE in end[3:]) is tunable, case
        assert done.stderr.startswith("error: mesh"), case
    env = dict(runtime.with_hugepages(tool_env(), False), RIG_CPU_HUGEPAGES="1")
    done = subprocess.run([sys.executable, "-c", probe.format(argv=f"[{mesh!r}]")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stderr.strip() == ("error: RIG_CPU_HUGEPAGES=1: glibc reads its tunables at process "
                                   "start; start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"), done
