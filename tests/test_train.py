"""The train core: optimizer, NaN guard, EMA, checkpoints and exact resume, sharded steps,
rig-train's one-line errors, and a tiny ShapesSG pretraining run whose loss falls."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rig_jax.errors import ConfigError
from rig_jax.train.optimizer import OptimizerSettings, learning_rate_schedule, make_optimizer
from rig_jax.train.state import create_state, ema_decay
from rig_jax.train.step import StepSettings, make_train_step
from tests.helpers import tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_train.py")


def _config(variant, **overrides):
    from rig_jax.config import load_config_file

    c = load_config_file(f"{CONFIG}:{variant}")
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]


_env = tool_env


def _rig_train(args, **kw):
    return subprocess.run([sys.executable, "-m", "rig_jax.tools.train", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240, **kw)


# ----------------------------------------------------------------------------- pure pieces

def test_schedule_warms_up_then_follows_cosine():
    s = OptimizerSettings(learning_rate=1.0, warmup_steps=10, schedule="cosine", decay_steps=100,
                          final_lr_fraction=0.1)
    lr = learning_rate_schedule(s)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_bad_optimizer_fields_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"optimizer\.schedule"):
        OptimizerSettings(learning_rate=1e-3, schedule="linear")
    with pytest.raises(ConfigError, match="unknown field 'lr'"):
        OptimizerSettings.from_config({"lr": 1e-3})


def test_ema_decay_is_warm_up_corrected():
    assert float(ema_decay(jnp.asarray(0), 0.999)) == pytest.approx(0.1)
    assert float(ema_decay(jnp.asarray(90), 0.999)) == pytest.approx(0.91)
    assert float(ema_decay(jnp.asarray(10 ** 6), 0.999)) == pytest.approx(0.999)


def _quadratic_step(accumulate=1, ema=0.0):
    target = jnp.arange(4.0)

    def loss_fn(params, frozen, batch, rng):
        loss = jnp.sum(jnp.square(params["w"] * batch["scale"] - target))
        return loss, {"scale": batch["scale"]}

    settings = OptimizerSettings(learning_rate=0.1, clip_norm=1.0, accumulate_steps=accumulate)
    tx = make_optimizer(settings)
    state = create_state({"w": jnp.zeros(4)}, tx, 0, use_ema=ema > 0)
    return jax.jit(make_train_step(loss_fn, tx, StepSettings(ema_decay=ema))), state


def test_non_finite_loss_skips_the_update_and_is_counted():
    step, state = _quadratic_step(ema=0.9)
    state, m = step(state, None, {"scale": jnp.float32(1.0)})
    assert int(m["finite"]) == 1 and int(state.bad_steps) == 0
    good = jax.tree.map(np.asarray, state)
    state, m = step(state, None, {"scale": jnp.float32(np.nan)})
    state, m = step(state, None, {"scale": jnp.float32(np.inf)})
    assert int(m["finite"]) == 0 and int(state.bad_steps) == 2 and int(state.skipped) == 2
    np.testing.assert_array_equal(np.asarray(state.params["w"]), good.params["w"])
    np.testing.assert_array_equal(np.asarray(state.ema_params["w"]), good.ema_params["w"])
    state, m = step(state, None, {"scale": jnp.float32(1.0)})
    assert int(state.bad_steps) == 0 and int(state.skipped) == 2
    assert not np.array_equal(np.asarray(state.params["w"]), good.params["w"])


def test_gradient_accumulation_applies_every_k_steps():
    step, state = _quadratic_step(accumulate=2)
    state, _ = step(state, None, {"scale": jnp.float32(1.0)})
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.zeros(4))
    state, _ = step(state, None, {"scale": jnp.float32(1.0)})
    assert np.all(np.asarray(state.params["w"])[1:] > 0)


# ----------------------------------------------------------------------------- the loop

@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny ShapesSG VAE trained for a few steps through the loop (the diffuser job's input)."""
    from rig_jax.jobs import job_builder
    from rig_jax.parallel.mesh import mesh_context
    from rig_jax.train.loop import LoopSettings, run_training

    workdir = str(tmp_path_factory.mktemp("tiny_vae"))
    config = _config("vae_tiny", **{"optimizer.learning_rate": 3e-3})
    with mesh_context(config) as (mesh, rules):
        job = job_builder(config.job)(config, workdir, mesh, rules)
        run_training(job, LoopSettings(total_steps=30, checkpoint_every=1000, progress=False), workdir, mesh,
                     rules, 0)
    return os.path.join(workdir, "vae")


@pytest.mark.heavy(seconds=200)
def test_tiny_unet_pretraining_loss_falls(tiny_vae_dir, tmp_path):
    from rig_jax.jobs import job_builder
    from rig_jax.parallel.mesh import mesh_context
    from rig_jax.train.loop import LoopSettings, run_training
    from rig_jax.weights.diffusers_pipeline import load_pipeline

    config = _config("diffuser_tiny", **{"diffuser.vae_path": tiny_vae_dir, "eval.num_prompts": 4,
                                         "eval.batch_size": 4, "optimizer.learning_rate": 3e-3})
    workdir = str(tmp_path)
    with mesh_context(config) as (mesh, rules):
        job = job_builder(config.job)(config, workdir, mesh, rules)
        run_training(job, LoopSettings(total_steps=60, log_every=1, checkpoint_every=1000, progress=False),
                     workdir, mesh, rules, 0)
    losses = [r["loss"] for r in _records(workdir) if "loss" in r]
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.85 * np.mean(losses[:15]), losses  # measured 0.79
    # the export is a diffusers folder the SD loader reads like SD-1.5, with the world beside it
    pipe, params = load_pipeline(os.path.join(workdir, "pipeline"))
    assert pipe.unet_config.sample_size == 8 and set(params) == {"unet", "vae", "text_encoder"}
    with open(os.path.join(workdir, "pipeline", "shapes_config.json")) as f:
        assert json.load(f)["world"]["max_objects"] == 2

    # a half-precision copy loads the same way, and warm-starts a run: its first loss (same seed,
    # so the same batch and timesteps) is below the cold start's
    from rig_jax.weights.io import to_half_variant
    for component in ("unet", "vae", "text_encoder"):
        assert to_half_variant(os.path.join(workdir, "pipeline", component)).endswith(".fp16.safetensors")
    _, half = load_pipeline(os.path.join(workdir, "pipeline"))
    np.testing.assert_allclose(np.asarray(half["unet"]["conv_in"]["kernel"]),
                               np.asarray(params["unet"]["conv_in"]["kernel"]), rtol=1e-3, atol=1e-4)
    warm_dir = str(tmp_path / "warm")
    config.diffuser.init_from = os.path.join(workdir, "pipeline")
    with mesh_context(config) as (mesh, rules):
        job = job_builder(config.job)(config, warm_dir, mesh, rules)
        job = dataclasses.replace(job, evaluate=None, export=None)      # its first loss is all we read
        run_training(job, LoopSettings(total_steps=1, log_every=1, progress=False), warm_dir, mesh, rules, 0)
    assert _records(warm_dir)[0]["loss"] < losses[0]


@pytest.mark.heavy(seconds=90)
def test_sharded_train_step_equals_single_device(devices, tmp_path):
    import flax.linen as nn

    from rig_jax.jobs import job_builder
    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.parallel.rules import rules_from_config
    from rig_jax.train.loop import LoopSettings, run_training

    finals, losses = [], []
    for shape, devs in (((1, 1, 1), devices[:1]), ((2, 2, 2), devices)):
        # Adam's eps 1e-8 would turn gradients that are zero in exact arithmetic (a conv bias
        # right before a GroupNorm: ~1e-9 of summation-order noise) into +-lr steps whose sign
        # depends on the reduction order; at 1e-6 such noise moves a weight by < 1e-6.
        config = _config("vae_tiny", **{"mesh.shape": shape, "optimizer.eps": 1e-6})
        mesh, rules = make_mesh(config.mesh, devs), rules_from_config(config.mesh.rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            workdir = str(tmp_path / f"mesh_{'x'.join(map(str, shape))}")
            job = job_builder(config.job)(config, workdir, mesh, rules)
            job = dataclasses.replace(job, evaluate=None, export=None)  # the step, not the VAE's export
            loop = LoopSettings(total_steps=1, progress=False)
            state, last = run_training(job, loop, workdir, mesh, rules, 0)
        losses.append(last["loss"])
        if shape == (2, 2, 2):
            assert any(len(leaf.sharding.device_set) > 1 for leaf in jax.tree.leaves(state.params))
        finals.append(jax.tree.map(np.asarray, state.params))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.heavy(seconds=90)
def test_sigkill_and_resume_logs_the_same_metrics(tmp_path):
    args = ["--config", f"{CONFIG}:vae_tiny", "--config.train.total_steps=14", "--config.train.log_every=1",
            "--config.train.checkpoint_every=3"]
    straight = str(tmp_path / "straight")
    done = _rig_train([*args, "--workdir", straight])
    assert done.returncode == 0, done.stderr[-2000:]

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "rig_jax.tools.train", *args, "--workdir", killed],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(os.path.join(killed, "metrics.jsonl")) and len(_records(killed)) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_records(killed)) < 15
    resumed = _rig_train([*args, "--workdir", killed])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _without_time(_records(killed)) == _without_time(_records(straight))


def test_rig_train_errors_are_one_line(tmp_path):
    bad_field = _rig_train(["--config", f"{CONFIG}:vae_tiny", "--config.train.nonexistent=1",
                            "--workdir", str(tmp_path / "a")])
    assert bad_field.returncode == 2 and bad_field.stderr.strip().count("\n") == 0
    assert "nonexistent" in bad_field.stderr

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    unwritable = _rig_train(["--config", f"{CONFIG}:vae_tiny", "--workdir", str(blocker / "run")])
    assert unwritable.returncode == 2 and unwritable.stderr.strip().count("\n") == 0
    assert str(blocker / "run") in unwritable.stderr

    workdir = str(tmp_path / "other_model")
    first = _rig_train(["--config", f"{CONFIG}:vae_tiny", "--config.train.total_steps=3",
                        "--workdir", workdir])
    assert first.returncode == 0, first.stderr[-2000:]
    other = _rig_train(["--config", f"{CONFIG}:vae_tiny", "--config.train.total_steps=6",
                        "--config.vae.block_out_channels=(8, 8, 8)", "--workdir", workdir])
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0, other.stderr[-2000:]
    assert "checkpoint of another model" in other.stderr and os.path.join("checkpoints", "3") in other.stderr


def test_optimizer_state_follows_param_shardings(devices):
    from jax.sharding import NamedSharding, PartitionSpec

    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.train.loop import state_shardings

    mesh = make_mesh(_config("vae_tiny", **{"mesh.shape": (2, 2, 2)}).mesh, devices)
    params = {"w": jnp.zeros((4, 8))}
    shard = {"w": NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))}
    tx = make_optimizer(OptimizerSettings(learning_rate=1e-3, clip_norm=1.0))
    abstract = jax.eval_shape(lambda p: create_state(p, tx, 0, True), params)
    s = state_shardings(shard, tx, abstract, mesh)
    adam = s.opt_state[1][0]
    assert adam.mu["w"] == shard["w"] and adam.nu["w"] == shard["w"]
    assert adam.count.spec == PartitionSpec() and s.ema_params["w"] == shard["w"]
    counts = optax.tree_utils.tree_get_all_with_path(s.opt_state, "count")
    assert counts and all(c.spec == PartitionSpec() for _, c in counts)


def test_warm_start_adds_coordinate_channels_without_changing_the_output():
    """A U-Net trained without coordinate channels starts one with them: conv_in gains zero
    input weights, so the first step computes what the source did."""
    import dataclasses

    import flax.linen as nn

    from rig_jax.jobs.shapes_diffuser import with_coordinate_inputs
    from rig_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs

    source = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 1),
                        norm_num_groups=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                        transformer_layers_per_block=(1, 1), attention_heads=(2, 2))
    target = dataclasses.replace(source, in_channels=6, coordinate_channels=2)
    boxed = UNet2DConditionModel(source).init(jax.random.PRNGKey(0), *example_inputs(source))
    params = nn.meta.unbox(boxed)["params"]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    t, ctx = jnp.array([10, 900]), jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
    widened = with_coordinate_inputs(params, source, target, "src")
    assert widened["conv_in"]["kernel"].shape == (3, 3, 6, 16)
    out = UNet2DConditionModel(target).apply({"params": widened}, x, t, ctx)
    ref = UNet2DConditionModel(source).apply({"params": params}, x, t, ctx)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert with_coordinate_inputs(params, source, source, "src") is params
    with pytest.raises(ConfigError, match=r"diffuser\.init_from: the U-Net of src"):
        with_coordinate_inputs(params, source, dataclasses.replace(target, norm_num_groups=4), "src")


def test_shapes_tokenizer_is_the_same_in_every_process_and_warm_starts_reuse_theirs(tmp_path):
    """The BPE trainer numbers equal-count tokens in hash-map order (a different vocab.json per
    process before the ids were fixed); a warm start copies the source's tokenizer, whose ids
    its text encoder was trained with."""
    from rig_jax.data import shapes
    from rig_jax.jobs.shapes_diffuser import tokenizer_folder

    code = ("import sys; from rig_jax.jobs.shapes_text import write_clip_tokenizer; "
            "write_clip_tokenizer(sys.argv[1], ['red', 'blue', 'circle', 'left', 'of', 'above'], 16)")
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    texts = [(tmp_path / n / "vocab.json").read_text() for n in ("a", "b", "c")]
    assert texts[0] == texts[1] == texts[2]
    assert list(json.loads(texts[0]))[:2] == ["<|startoftext|>", "<|endoftext|>"]

    source = tmp_path / "pipeline"
    (source / "tokenizer").mkdir(parents=True)
    (source / "tokenizer" / "vocab.json").write_text('{"marker": 0}')
    folder = tokenizer_folder(str(tmp_path / "run"), shapes.ShapesConfig(), 16, str(source))
    assert json.loads(open(os.path.join(folder, "vocab.json")).read()) == {"marker": 0}
    with pytest.raises(ConfigError, match=r"has no tokenizer/vocab\.json"):
        tokenizer_folder(str(tmp_path / "run2"), shapes.ShapesConfig(), 16, str(tmp_path / "nothing"))


def test_micro_batches_average_the_parts_gradients():
    """step.micro_batches = 2 or 4 splits the rows, averages their gradients and gives the step of the
    whole batch for a per-row mean loss; a count that does not divide the rows, or below 1, is a
    one-line error naming the field."""
    from rig_jax.errors import ConfigError

    rows = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    batch = {"x": jnp.asarray(rows), "y": jnp.asarray(rows @ np.array([1.0, -2.0, 0.5], np.float32))}

    def loss_fn(params, frozen, b, rng):
        err = b["x"] @ params["w"] - b["y"]
        return jnp.mean(jnp.square(err)), {"max_err": jnp.max(jnp.abs(err))}

    def run(parts):
        tx = make_optimizer(OptimizerSettings(learning_rate=0.1, clip_norm=10.0))
        state = create_state({"w": jnp.zeros(3)}, tx, 0, use_ema=False)
        step = jax.jit(make_train_step(loss_fn, tx, StepSettings(micro_batches=parts)))
        state, metrics = step(state, None, batch)
        return np.asarray(state.params["w"]), {k: float(v) for k, v in metrics.items()}

    whole, metrics = run(1)
    for parts in (2, 4):
        w, m = run(parts)
        np.testing.assert_allclose(w, whole, rtol=1e-6, atol=1e-7)
        assert m["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"step.micro_batches: 3 does not divide the rows .* \(8, 3\)"):
        run(3)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match=r"step\.micro_batches: must be an integer >= 1"):
            StepSettings(micro_batches=bad)


def test_micro_batches_only_for_jobs_whose_rows_are_first(tmp_path):
    """A job whose batches hold token positions or image patches on axis 0 (rows_first False)
    refuses step.micro_batches > 1 before it touches its workdir."""
    from rig_jax.errors import ConfigError
    from rig_jax.train.loop import LoopSettings, TrainJob, run_training

    job = TrainJob(name="grpo_actor", init_params=None, loss_fn=None,
                   optimizer=OptimizerSettings(learning_rate=1e-3), step=StepSettings(micro_batches=2),
                   dataset=None)
    with pytest.raises(ConfigError, match=r"step\.micro_batches: grpo_actor's batches do not all hold"):
        run_training(job, LoopSettings(total_steps=1), str(tmp_path / "w"), None, None, 0)
    assert not (tmp_path / "w").exists()
