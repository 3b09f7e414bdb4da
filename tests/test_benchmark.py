"""rig-benchmark: every bench prints one JSON line per measurement with the fields
docs/benchmarks.md describes, beside its PyTorch peer where one exists; bad counts are one
line and exit 2. The figures themselves are not checked (this is the harness, not speed);
parity is: both sides read the same saved weights, so their outputs must agree."""
import json
import os

import pytest

from rig_jax.tools import benchmark

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache")
SIDE_FIELDS = {"median_s", "min_s", "max_s", "iqr_s", "median_cpu_s", "first_call_s", "load_s",
               "peak_rss_mib", "peak_rss_scope", "peak_device_mib", "mfu"}
UNITS = {"sampler": "images", "inversion": "images", "decode": "tokens", "actor-step": "steps",
         "editor-step": "steps", "loop": "images"}
PEERS = {"sampler": "diffusers", "inversion": "diffusers", "decode": "transformers", "actor-step": "torch",
         "editor-step": "torch"}


def test_every_bench_with_its_peer_prints_json_lines(capsys):
    """`all --peer` at the tiny shapes, one round: the six benches in one pair of workers (the
    rig_jax worker uses the tests' persistent compilation cache, so reruns are quick)."""
    for module in ("torch", "diffusers", "transformers"):
        pytest.importorskip(module)
    benchmark.main(["all", "--peer", "--shape", "tiny", "--repeats", "1",
                    f"--config.cache_dir={os.path.join(CACHE, 'benchmark_models')}",
                    f"--config.compile_cache={os.path.join(CACHE, 'jax_bench_workers')}"])
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["bench"] for r in records] == list(benchmark.ALL)
    from configs.benchmark import get_config
    from rig_jax.bench import driver
    hugepages = driver.worker_hugepages(get_config("all").worker_cpu_hugepages, "cpu", "worker_cpu_hugepages")
    for r in records:
        bench, unit = r["bench"], UNITS[r["bench"]]
        assert r["shape"] == "tiny" and r["batch"] >= 1 and r["dtype"] == "fp32" and r["repeats"] == 1
        assert r["backend"] == "cpu" and r["device"] and r["threads"] == 1 and r["unit"] == f"{unit}/s"
        # these benches' setting is the loop's and the GRPO stages' (off) unless RIG_CPU_INLINE
        # says 1, or auto (on for the tests' CPU-only jax, tests/test_runtime.py)
        assert r["cpu_inline"] is (os.environ.get("RIG_CPU_INLINE", "") in ("1", "auto"))
        assert r["cpu_hugepages"] is hugepages     # the jobs' tunable; the peer as users run torch
        assert SIDE_FIELDS | {f"{unit}_per_s", "compile_s"} <= set(r["rig_jax"]), bench
        assert r["rig_jax"][f"{unit}_per_s"] > 0 and r["rig_jax"]["peak_rss_mib"] > 0
        assert r["rig_jax"]["peak_rss_scope"] == "bench"    # Linux: each bench's own peak
        assert r["peak_flops"] > 0 and r["peak_flops_source"]
        if bench == "loop":
            assert r["peer"] is None and "no PyTorch implementation" in r["no_peer"]
            assert r["prompts"] == r["batch"] and r["edits_per_run"] >= 0 and r["rig_jax"]["mfu"] is None
            continue
        assert r["model_flops_per_call"] > 0 and 0 < r["rig_jax"]["mfu"] < 1, bench
        assert r["peer_cpu_hugepages"] is False
        assert r["peer"] == PEERS[bench] and SIDE_FIELDS | {f"{unit}_per_s"} <= set(r["torch"])
        assert r["ratio"] > 0 and len(r["per_round_ratio"]) == 1 and r["versions"]["torch"]
        assert r["summary"] == f"cpu {bench} vs {PEERS[bench]}: {r['ratio']:.2f}x"
        assert r["parity"]["ok"], (bench, r["parity"])
    by_bench = {r["bench"]: r for r in records}
    assert by_bench["decode"]["parity"]["tokens_equal_frac"] == 1.0
    for bench in ("actor-step", "editor-step"):
        assert by_bench[bench]["parity"]["grad_norm_rel_err"] < 1e-4
        assert by_bench[bench]["parity"]["grad_norm_torch"] > 0


def test_counts_below_one_are_one_line_naming_the_flag(capsys):
    for argv, flag in ((["sampler", "--repeats", "0"], "--repeats"), (["sampler", "--batch", "0"], "--batch"),
                       (["sampler", "--steps", "-1"], "--steps"),
                       (["decode", "--batch", "2", "0"], "--batch"),
                       (["sampler", "--config.repeats=0"], "--repeats"),
                       (["--config=configs/benchmark.py:sd15", "--config.batch=(1, 0)"], "--batch")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: {flag}: "), (argv, err)


def test_unknown_shape_and_fields_no_bench_reads_are_refused(capsys):
    for argv, message in ((["sampler", "--shape", "sdxl"], "unknown unet shape 'sdxl'"),
                          (["all", "--forward-only"], "--forward-only: only for the training benches"),
                          (["sampler", "--device", "tpu", "--peer"], "--peer: the PyTorch side runs on cpu")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_peer_without_torch_is_one_line(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["decode", "--shape", "tiny", "--peer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "torch not installed" in err


def test_gpu_summary_reads_the_prepared_scripts_lines(tmp_path):
    """tools/gpu_bench.sh's last step: the issue's three GPU lines from the JSON lines of one
    run (synthetic here: no GPU is lent to the tests), and `not measured` where one is missing."""
    from rig_jax.bench.gpu_summary import summary

    def write(name, records):
        (tmp_path / name).write_text("noise\n" + "\n".join(json.dumps(r) for r in records) + "\n")

    side = lambda ips, unit="images": {f"{unit}_per_s": ips}
    write("sampler.jsonl", [{"bench": "sampler", "batch": b, "dtype": "bf16", "ratio": ratio,
                             "parity": {"ok": True}, "rig_jax": side(ips), "torch": side(ips / ratio)}
                            for b, ips, ratio in ((8, 6.0, 1.5), (32, 8.0, 2.0))])
    assert summary(str(tmp_path))[:1] == ["sampler vs diffusers eager: 2.00x"]
    assert any(line.startswith("sampler vs torch.compile: not measured") for line in summary(str(tmp_path)))
    assert "decode vs transformers: not measured (no decode line with --peer)" in summary(str(tmp_path))
    write("peer_baseline.jsonl", [{"event": "ddim", "label": "diffusers-compile-fp16", "batch": 8,
                                   "s_sampling": 2.0, "s_vae": 0.5}])
    write("decode.jsonl", [{"bench": "decode", "batch": 64, "ratio": 5.25, "parity": {"ok": True},
                            "rig_jax": side(6300.0, "tokens"), "torch": side(1200.0, "tokens")}])
    lines = summary(str(tmp_path))
    assert "sampler vs torch.compile: 1.50x" in lines       # 6 img/s over 8 / 2.0 s
    assert "decode vs transformers: 5.25x" in lines


def test_cpu_peak_follows_the_vector_extension_the_cores_have():
    from rig_jax.bench import flops

    assert flops.cpu_flops_per_cycle("fpu sse2 avx avx2 fma avx512f avx512bw") == (64, "AVX-512, 2 FMA ports")
    assert flops.cpu_flops_per_cycle("fpu sse2 avx avx2 fma") == (32, "AVX2, 2 FMA ports")
    assert flops.cpu_flops_per_cycle("fpu sse2")[0] == 8
    peak, source = flops.device_peak("cpu", "cpu", "fp32", threads=2)
    if peak:  # /proc/cpuinfo names a clock on this machine
        per_cycle, extension = flops.cpu_flops_per_cycle()
        assert peak == pytest.approx(2 * flops.cpu_ghz() * 1e9 * per_cycle)
        assert extension in source


def test_train_step_runs_with_the_pretraining_jobs_host_setting(capsys):
    """train-step times pretraining's step as rig-train runs it: configs/shapes_train.py's
    `cpu_inline` (auto: on for the tests' CPU-only jax) unless RIG_CPU_INLINE says otherwise."""
    for module in ("torch", "diffusers"):
        pytest.importorskip(module)
    benchmark.main(["train-step", "--peer", "--shape", "tiny", "--repeats", "1",
                    f"--config.cache_dir={os.path.join(CACHE, 'benchmark_models')}",
                    f"--config.compile_cache={os.path.join(CACHE, 'jax_bench_workers')}"])
    (r,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert r["bench"] == "train-step" and r["peer"] == "torch" and r["parity"]["ok"], r
    assert r["cpu_inline"] is (os.environ.get("RIG_CPU_INLINE", "") in ("", "1", "auto"))
    assert r["summary"] == f"cpu train-step vs torch: {r['ratio']:.2f}x"


def test_the_rig_jax_worker_restarts_only_when_the_setting_changes(monkeypatch):
    from configs.benchmark import get_config
    from rig_jax.bench import driver

    started, closed = [], []

    class FakeWorker:
        def __init__(self, side, threads, device, compile_cache="", cpu_inline="", hugepages=False):
            self.side, self.cpu_inline = side, cpu_inline
            started.append((side, cpu_inline))

        def close(self):
            closed.append((self.side, self.cpu_inline))

    monkeypatch.setattr(driver, "Worker", FakeWorker)
    monkeypatch.delenv("RIG_CPU_INLINE", raising=False)
    pair = driver.Pair(get_config("all"), "cpu", peer=True)
    assert set(pair.for_bench("sampler")) == {"torch", "rig_jax"}
    assert set(pair.for_bench("loop")) == {"rig_jax"}
    assert set(pair.for_bench("train-step")) == {"torch", "rig_jax"}
    assert started == [("torch", ""), ("rig_jax", "0"), ("rig_jax", "auto")]
    assert closed == [("rig_jax", "0")]
    monkeypatch.setenv("RIG_CPU_INLINE", "1")     # the variable overrides every bench's setting
    pair.for_bench("sampler")
    pair.for_bench("train-step")
    assert started[3:] == [("rig_jax", "1")]
    pair.close()


def test_a_bad_worker_setting_is_one_line_naming_the_field(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["train-step", "--shape", "tiny", "--config.worker_cpu_inline.train_step=yes"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: worker_cpu_inline.train_step: expected 0, 1 or auto, got 'yes'")


def test_the_workers_huge_page_tunable_follows_their_settings(monkeypatch):
    """The rig_jax worker gets glibc's tunable as the jobs do (RIG_CPU_HUGEPAGES over the field);
    the peer only when asked, whatever the driver's own environment holds."""
    from rig_jax import runtime
    from rig_jax.bench import driver, workers

    monkeypatch.setattr(runtime, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(runtime, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "accelerator_package_installed", lambda: False)
    monkeypatch.delenv("RIG_CPU_HUGEPAGES", raising=False)
    assert driver.worker_hugepages("auto", "cpu", "worker_cpu_hugepages") is True
    assert driver.worker_hugepages("auto", "gpu", "worker_cpu_hugepages") is False
    monkeypatch.setenv("RIG_CPU_HUGEPAGES", "0")
    assert driver.worker_hugepages("auto", "cpu", "worker_cpu_hugepages") is False
    assert driver.worker_hugepages("1", "cpu", "peer_cpu_hugepages", variable_overrides=False) is True
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2")
    assert workers.worker_env(1, "cpu", hugepages=False)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert workers.worker_env(1, "cpu", hugepages=True)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    monkeypatch.setattr(runtime, "thp_mode", lambda: "never")
    with pytest.raises(runtime.ConfigError, match=r"^peer_cpu_hugepages=1: transparent huge pages are off"):
        driver.worker_hugepages("1", "cpu", "peer_cpu_hugepages", variable_overrides=False)


def test_a_bad_huge_page_setting_is_one_line_naming_the_field(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["sampler", "--shape", "tiny", "--config.peer_cpu_hugepages=on"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: peer_cpu_hugepages: expected 0, 1 or auto, got 'on'"
