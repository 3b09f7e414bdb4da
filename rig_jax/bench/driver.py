"""The driver: a bench's spec from the config, the saved weights and inputs, the two workers
timed alternately (A B / B A, so a machine whose speed drifts hits both sides alike), and the
JSON record: medians and spread, compile time apart, peak memory, model FLOP utilisation, the
ratio and the parity of the two sides' outputs."""
from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any

import numpy as np

from rig_jax import runtime
from rig_jax.bench import models
from rig_jax.bench.flops import device_peak
from rig_jax.bench.workers import Worker
from rig_jax.errors import ConfigError
from rig_jax.runtime import cpu_inline_setting

UNITS = {"sampler": "images", "inversion": "images", "decode": "tokens", "actor-step": "steps",
         "editor-step": "steps", "train-step": "steps", "loop": "images"}
PEER_NAMES = {"sampler": "diffusers", "inversion": "diffusers", "decode": "transformers",
              "actor-step": "torch", "editor-step": "torch", "train-step": "torch"}
VERSION_KEYS = ("torch", "diffusers", "transformers", "attn_processor", "attn", "torch_device",
                "torch_threads")
# parity: largest |rig_jax - peer| / largest |peer| of float outputs, the relative error of the
# losses and gradient norms; tokens: the fraction equal. fp32 tolerances (bf16 is reported only).
TOLERANCE = {"sampler": 1e-3, "inversion": 1e-3, "actor-step": 1e-4, "editor-step": 1e-4, "train-step": 1e-4}


def shape_key(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def family(bench: str) -> str:
    return {"decode": "decoder", "actor-step": "decoder", "loop": "loop"}.get(bench, "unet")


def shape_name(config: Any, bench: str) -> str:
    return config.shape or ("shapes-sg" if bench == "loop" else "cpu")


def model_shape(config: Any, bench: str) -> Any:
    """The named shape of `bench`'s family; an unknown name is a ConfigError listing the known."""
    shapes, name = config.models[family(bench)], shape_name(config, bench)
    if shape_key(name) not in shapes:
        known = ", ".join(sorted(shapes[k].get("name", k.replace("_", "-")) if isinstance(shapes[k], dict)
                                 else k.replace("_", "-") for k in shapes))
        raise ConfigError(f"--shape: unknown {family(bench)} shape {name!r} for {bench} "
                          f"(expected one of {known})")
    return shapes[shape_key(name)]


def per_shape(config: Any, bench: str, field: str) -> Any:
    """`config.<field>` unless None, else the shape's value from `config.per_shape.<bench>`."""
    if config[field] is not None:
        return config[field]
    table = config.per_shape[bench.replace("-", "_")]
    key = shape_key(shape_name(config, bench))
    return (table[key] if key in table else table["default"]).get(field)


def resolve_device(name: str) -> str:
    """`--device`; auto: gpu when an NVIDIA device node exists, tpu when a TPU's does, else cpu
    (decided without starting an accelerator backend in the driver)."""
    if name != "auto":
        return name
    if os.path.exists("/dev/nvidia0"):
        return "gpu"
    return "tpu" if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") else "cpu"


def dtype_name(config: Any, device: str) -> str:
    return ("fp32" if device == "cpu" else "bf16") if config.dtype == "auto" else config.dtype


def build_spec(config: Any, bench: str, batch: int, device: str) -> dict[str, Any]:
    """Everything a worker needs to build `bench` at `batch`: the saved folder, the inputs file,
    the shape's sizes, the dtype and threads. Saves the weights and draws the inputs if absent."""
    from rig_jax.models.unet import UNetConfig
    root = models.cache_root(config.cache_dir)
    shape = model_shape(config, bench)
    spec: dict[str, Any] = {"bench": bench, "shape": shape_name(config, bench), "batch": batch,
                            "dtype": dtype_name(config, device), "device": device, "threads": config.threads,
                            "guidance": config.guidance, "seed": config.seed,
                            "forward_only": bool(config.forward_only)}
    if family(bench) == "unet":
        from rig_jax.weights.unet import unet_config_to_diffusers
        unet = UNetConfig(**shape.unet.to_dict())
        spec.update(latent_size=shape.latent_size, context_length=shape.context_length,
                    in_channels=unet.in_channels, cross_attention_dim=unet.cross_attention_dim,
                    steps=per_shape(config, bench, "steps") or 0,
                    trained_steps=per_shape(config, bench, "trained_steps") or 0)
        spec["folder"] = models.unet_folder(root, unet_config_to_diffusers(unet), config.seed)
    elif family(bench) == "decoder":
        text = dict(shape)
        vision = dict(config.models.vision[shape_key(shape_name(config, bench))])
        kwargs = models.qwen_config_dict(text, vision)
        spec.update(vocab_size=text["vocab_size"], prompt_len=per_shape(config, bench, "prompt_len"),
                    new_tokens=per_shape(config, bench, "new_tokens"))
        spec["folder"] = models.qwen_folder(root, kwargs, config.seed)
    else:
        spec.update(steps=per_shape(config, bench, "steps"), max_rounds=shape.max_rounds,
                    diffuser=shape.diffuser, actor=shape.actor)
        return spec
    name = f"{os.path.basename(spec['folder'])}_{bench}_b{batch}_" + "_".join(
        str(spec.get(k, "")) for k in ("steps", "trained_steps", "prompt_len", "new_tokens"))
    spec["inputs"] = models.make_inputs(os.path.join(root, name + ".npz"), bench, batch, spec, config.seed)
    return spec


def _spread(values: list[float]) -> dict[str, float]:
    q = np.percentile(values, [25, 75]) if len(values) > 1 else (values[0], values[0])
    return {"median_s": round(statistics.median(values), 6), "min_s": round(min(values), 6),
            "max_s": round(max(values), 6), "iqr_s": round(float(q[1] - q[0]), 6)}


def parity(bench: str, paths: dict[str, str]) -> dict[str, Any]:
    """How far the two sides' outputs are apart (the check that they did the same work)."""
    a, b = (dict(np.load(paths[side])) for side in ("rig_jax", "torch"))
    out: dict[str, Any] = {}
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.shape != y.shape:
            out[key] = {"shape_rig_jax": list(x.shape), "shape_torch": list(y.shape)}
        elif np.issubdtype(x.dtype, np.integer):
            out[f"{key}_equal_frac"] = round(float(np.mean(x == y)), 6)
        elif x.ndim == 0:
            out[f"{key}_rig_jax"], out[f"{key}_torch"] = float(x), float(y)
            out[f"{key}_rel_err"] = float(abs(x - y) / max(abs(float(y)), 1e-30))
        else:
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            out[f"{key}_max_rel_err"] = float(np.max(np.abs(x64 - y64)) / max(np.max(np.abs(y64)), 1e-30))
    errors = [v for k, v in out.items() if k.endswith("rel_err")]
    fracs = [v for k, v in out.items() if k.endswith("equal_frac")]
    ok = all(e <= TOLERANCE.get(bench, 1e-3) for e in errors) and all(f >= 0.9 for f in fracs)
    out["ok"] = bool(ok and (errors or fracs))
    return out


def worker_hugepages(configured: str, device: str, field: str, variable_overrides: bool = True) -> bool:
    """Whether a worker on `device` runs with glibc's huge-page tunable: `configured` (the
    config's `field`; `RIG_CPU_HUGEPAGES` over it when `variable_overrides`, as for the tools)
    decided for the worker's environment."""
    mode, source = runtime.cpu_hugepages_setting(configured, None if variable_overrides else {})
    env = {"JAX_PLATFORMS": "cpu"} if device == "cpu" else {}
    return runtime.hugepages_wanted(mode, env, runtime.thp_mode(), runtime.glibc_version(),
                                    device != "cpu" or runtime.accelerator_package_installed(),
                                    field if source == runtime.HUGEPAGES_FIELD else source)


class Pair:
    """The workers of one run: rig_jax always, torch with `--peer`; kept across benches, except
    that the rig_jax worker starts again when a bench's host setting (`worker_cpu_inline`)
    differs from the one it was started with (it is applied before jax starts). Each side's
    huge-page tunable (`worker_cpu_hugepages`, `peer_cpu_hugepages`) is fixed for the run."""

    def __init__(self, config: Any, device: str, peer: bool):
        self.config, self.device = config, device
        self.workers: dict[str, Worker] = {}
        self.hugepages = worker_hugepages(config.worker_cpu_hugepages, device, "worker_cpu_hugepages")
        peer_hugepages = peer and worker_hugepages(config.peer_cpu_hugepages, device, "peer_cpu_hugepages",
                                                   variable_overrides=False)
        try:
            if peer:
                self.workers["torch"] = Worker("torch", config.threads, device, hugepages=peer_hugepages)
        except BaseException:
            self.close()
            raise

    def for_bench(self, bench: str) -> dict[str, Worker]:
        """The workers for `bench`, the rig_jax one running with its host setting:
        `RIG_CPU_INLINE` when set, else `config.worker_cpu_inline.<bench>`."""
        setting, _ = cpu_inline_setting(self.config.worker_cpu_inline[shape_key(bench)])
        current = self.workers.get("rig_jax")
        if current is None or current.cpu_inline != setting:
            if current is not None:
                del self.workers["rig_jax"]
                current.close()
            self.workers["rig_jax"] = Worker("rig_jax", self.config.threads, self.device,
                                             self.config.compile_cache, setting, self.hugepages)
        return {side: w for side, w in self.workers.items() if side == "rig_jax" or bench in PEER_NAMES}

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def measure(pair: Pair, config: Any, bench: str, batch: int, device: str) -> dict[str, Any]:
    """One bench at one batch size: load each side alone (torch first, then rig_jax's compile),
    then `repeats` rounds alternating the order, then outputs and memory."""
    spec = build_spec(config, bench, batch, device)
    repeats = per_shape(config, bench, "repeats")
    workers = pair.for_bench(bench)
    ready = {side: w.ask("load", bench=bench, spec=spec) for side, w in workers.items()}
    sides = list(workers)
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    ratios = []
    for r in range(repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        got = {side: workers[side].ask("time") for side in order}
        for side, t in got.items():
            wall[side].append(t["s"])
            cpu[side].append(t["cpu_s"])
        if "torch" in got:
            ratios.append(got["torch"]["s"] / got["rig_jax"]["s"])
    stats = {side: w.ask("stats") for side, w in workers.items()}
    per_call = batch * (spec.get("new_tokens") or 1) if bench == "decode" else batch
    unit = UNITS[bench]
    jax_ready = ready["rig_jax"]
    dtype = spec["dtype"]
    peak, peak_source = device_peak(jax_ready["backend"], jax_ready["device"], dtype, config.threads,
                                    config.peak_tflops)
    flops = jax_ready.get("flops_per_call", 0.0)
    sides_record = {}
    for side in sides:
        med = statistics.median(wall[side])
        rec = {**_spread(wall[side]), "median_cpu_s": round(statistics.median(cpu[side]), 6),
               f"{unit}_per_s": round(per_call / med, 4),
               "first_call_s": round(ready[side]["first_call_s"], 3),
               "load_s": round(ready[side]["load_s"], 3), "peak_rss_mib": stats[side]["peak_rss_mib"],
               "peak_rss_scope": ready[side]["peak_rss_scope"],
               "peak_device_mib": stats[side]["device_peak_mib"],
               "mfu": round(flops / med / peak, 5) if peak and flops else None}
        if side == "rig_jax":
            rec["compile_s"] = round(jax_ready["compile_s"], 3)
        sides_record[side] = rec
    record: dict[str, Any] = {
        "bench": bench, "shape": spec["shape"], "batch": batch, "dtype": dtype,
        "backend": jax_ready["backend"], "device": jax_ready["device"], "jax": jax_ready["jax"],
        "threads": config.threads, "repeats": repeats, "unit": f"{unit}/s",
        "cpu_inline": bool(jax_ready.get("cpu_inline")), "cpu_hugepages": jax_ready["cpu_hugepages"],
        **{k: spec[k] for k in ("steps", "trained_steps", "prompt_len", "new_tokens") if spec.get(k)},
        **({"guidance": spec["guidance"]} if bench in ("sampler", "editor-step") else {}),
        **({"forward_only": True} if spec["forward_only"] else {}),
        "rig_jax": sides_record["rig_jax"], "model_flops_per_call": flops,
        "peak_flops": peak, "peak_flops_source": peak_source,
        "loadavg_1m": round(os.getloadavg()[0], 2)}
    if "no_peer" in jax_ready:
        with tempfile.TemporaryDirectory() as tmp:
            path = workers["rig_jax"].ask("outputs", path=os.path.join(tmp, "rig_jax.npz"))["path"]
            edits = int(np.load(path)["edits"].sum())
        record.update(peer=None, no_peer=jax_ready["no_peer"], prompts=jax_ready["prompts"],
                      max_rounds=spec["max_rounds"], edits_per_run=edits)
    if "torch" in workers:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {side: os.path.join(tmp, f"{side}.npz") for side in sides}
            for side, w in workers.items():
                w.ask("outputs", path=paths[side])
            record["parity"] = parity(bench, paths)
        ratio = statistics.median(ratios)
        torch_ready, ours, theirs = ready["torch"], sides_record["rig_jax"], sides_record["torch"]
        record.update(
            peer=PEER_NAMES[bench], peer_cpu_hugepages=torch_ready["cpu_hugepages"], torch=theirs,
            ratio=round(ratio, 4),
            ratio_of_medians=round(theirs["median_s"] / ours["median_s"], 4),
            ratio_of_mins=round(theirs["min_s"] / ours["min_s"], 4),
            cpu_s_ratio=round(theirs["median_cpu_s"] / ours["median_cpu_s"], 4),
            per_round_ratio=[round(x, 3) for x in ratios],
            versions={k: torch_ready[k] for k in VERSION_KEYS if k in torch_ready},
            summary=f"{jax_ready['backend']} {bench}{' (forward only)' if spec['forward_only'] else ''} "
                    f"vs {PEER_NAMES[bench]}: {ratio:.2f}x")
    return record
