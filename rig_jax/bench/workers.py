"""Worker processes: one per side, so XLA's and torch's thread pools never meet.

The driver writes one JSON command a line on a worker's stdin and reads one JSON answer:
`load` (build a bench's task from its spec, run it twice untimed; the rig_jax side lowers and
compiles ahead of time first, so compile time is reported apart), `time` (one timed call, the
result materialised: wall and CPU seconds of the process), `outputs` (the last result as an
.npz for the parity check), `stats` (peak RSS, peak device memory), `quit`. A worker times its
own calls; the driver times nothing."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from rig_jax.bench.flops import cpu_seconds, peak_rss_mib, reset_peak_rss
from rig_jax.errors import RigError
from rig_jax.runtime import ENV, apply_cpu_inline, hugepages_active, with_hugepages

WORKER = "import sys; from rig_jax.bench.workers import serve; serve(sys.argv[1])"


def worker_env(threads: int, device: str, compile_cache: str = "", cpu_inline: str = "",
               hugepages: bool = False) -> dict[str, str]:
    """Both workers' environment. CPU: `threads` for torch's OpenMP/MKL and XLA's pool (and the
    cores each worker is pinned to: `pin_to_cores`), one host device; with one thread XLA's
    Eigen pool is off too, so no worker spins while it waits (CPU seconds count work only).
    GPU: each side may take under half the card's memory; TPU: rig_jax alone. `cpu_inline`:
    the rig_jax worker's `RIG_CPU_INLINE` (rig_jax.runtime), when not empty; `hugepages`: glibc's
    huge-page tunable in `GLIBC_TUNABLES` or, False, taken out of it (the driver's own process
    may have it: a tool started from the command line adds it)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               RIG_BENCH_THREADS=str(threads),
               TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cpu_inline:
        env[ENV] = cpu_inline
    env = with_hugepages(env, hugepages)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if device == "cpu":
        flags = "--xla_force_host_platform_device_count=1"
        if threads == 1:
            flags += " --xla_cpu_multi_thread_eigen=false"
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, CUDA_VISIBLE_DEVICES="")
    else:  # the accelerator: the driver's JAX_PLATFORMS=cpu must not reach the worker
        for name in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
            env.pop(name, None)
        if device == "gpu":
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.45"
    return env


class _Side:
    """One side's loaded task: how to run it, its warm-up figures, its last result."""

    def __init__(self, side: str, bench: str, spec: dict[str, Any], cpu_inline: bool = False):
        import numpy as np
        self.side, self.last = side, None
        data = dict(np.load(spec["inputs"])) if spec.get("inputs") else {}
        t0 = time.perf_counter()
        ready: dict[str, Any] = {}
        if side == "rig_jax":
            import jax

            from rig_jax.bench import jax_side
            if bench == "loop":
                from rig_jax.bench.loop import loop as build
            else:
                build = jax_side.BUILDERS[bench]
            task = build(spec, data)
            ready["load_s"] = time.perf_counter() - t0
            if task.fn is None:  # compiles inside its first call: compile_s is first minus second call
                self.call = task.call
            else:
                t0 = time.perf_counter()
                compiled = task.fn.lower(*task.args).compile()
                ready["compile_s"] = time.perf_counter() - t0
                self.call = lambda: jax.block_until_ready(compiled(*task.args))
            self.outputs = task.outputs
            flops_t0 = time.perf_counter()
            ready["flops_per_call"] = task.flops()
            ready["flops_s"] = time.perf_counter() - flops_t0
            ready.update(task.info, **jax_side.device_info(), cpu_inline=cpu_inline)
            self.peak = jax_side.device_peak_mib
        else:
            from rig_jax.bench import peers
            run, self.outputs, info = peers.BUILDERS[bench](spec, data)
            ready["load_s"] = time.perf_counter() - t0
            self.call = run
            ready.update(info, **peers.device_info(spec))
            self.peak = lambda: peers.device_peak_mib(spec)
        ready["cpu_hugepages"] = hugepages_active()
        t0 = time.perf_counter()
        self.last = self.call()
        ready["first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.last = self.call()
        ready["second_call_s"] = time.perf_counter() - t0
        ready.setdefault("compile_s", ready["first_call_s"] - ready["second_call_s"])
        self.ready = ready

    def time(self) -> dict[str, float]:
        c0, t0 = cpu_seconds(), time.perf_counter()
        self.last = self.call()
        return {"s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


def pin_to_cores(threads: int) -> list[int]:
    """Restrict this process to the first `threads` cores it may use, before jax or torch start
    their pools: a side then never computes on more cores than it was given (XLA:CPU runs
    independent ops on extra threads even with a one-thread intra-op pool). Both workers take
    the same cores; they run one at a time."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def serve(side: str) -> None:
    """The worker loop of `side` ("rig_jax" | "torch") over stdin/stdout."""
    cores = pin_to_cores(int(os.environ.get("RIG_BENCH_THREADS", "1")))
    # the tools' host setting (rig_jax.runtime, RIG_CPU_INLINE), so the bench measures what they run
    cpu_inline = side == "rig_jax" and apply_cpu_inline()
    import numpy as np
    out = sys.stdout
    sys.stdout = sys.stderr       # libraries' prints must not break the protocol
    current: _Side | None = None

    def say(**record: Any) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    say(started=True, pid=os.getpid(), cores=cores)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            what = command["cmd"]
            if what == "load":
                current = None
                gc.collect()
                rss_scope = "bench" if reset_peak_rss() else "process"
                current = _Side(side, command["bench"], command["spec"], cpu_inline)
                say(**current.ready, peak_rss_scope=rss_scope)
            elif what == "time":
                say(**current.time())
            elif what == "outputs":
                np.savez(command["path"], **current.outputs(current.last))
                say(path=command["path"])
            elif what == "stats":
                say(peak_rss_mib=round(peak_rss_mib(), 1),
                    device_peak_mib=current.peak() if current else None)
            else:
                return
        except RigError as e:
            say(error=str(e), kind="rig")
        except Exception as e:
            traceback.print_exc()
            say(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", kind="crash")


class Worker:
    """The driver's handle on one worker process; a worker that dies or crashes is a
    RuntimeError with its stderr tail, a RigError inside it the same RigError here."""

    def __init__(self, side: str, threads: int, device: str, compile_cache: str = "", cpu_inline: str = "",
                 hugepages: bool = False):
        self.side, self.cpu_inline = side, cpu_inline
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, side], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=worker_env(threads, device, compile_cache, cpu_inline, hugepages))
        self.read()

    def _tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark {self.side} worker died (rc {self.proc.wait()}):\n{self._tail()}")
        answer = json.loads(line)
        if "error" in answer:
            if answer["kind"] == "rig":
                raise RigError(f"{self.side} side: {answer['error']}")
            raise RuntimeError(f"benchmark {self.side} worker: {answer['error']}\n{self._tail()}")
        return answer

    def ask(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
