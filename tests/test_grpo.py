"""Reflection-GRPO: the train loop's rollout hook, the rollout pieces, and both stages run by
rig-train on the committed ShapesSG models (tiny variants): metrics, exact resume, one-line
errors (either stage on a (2, 2, 2) mesh against one device: tests/test_grpo_multihost.py).
Both stages in order, with LoRA, and skipped when done: tests/test_shapes_demo.py (the README's
main job runs them)."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rig_jax.errors import ConfigError
from rig_jax.rl.learner import check_total_steps, choose_prompts, score_groups
from rig_jax.rl.rollout import GroupSettings, gather_steps, minibatches, trained_steps
from tests.helpers import tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_grpo.py")
LOGGED = ("rollout/reward_mean", "rollout/reward_std", "rollout/zero_std_fraction", "clip_fraction",
          "approx_kl", "ratio_mean", "grad_norm", "time/rollout_s")


_env = tool_env


def _rig_train(variant, workdir, *overrides, devices=1):
    args = [sys.executable, "-m", "rig_jax.tools.train", f"--config={CONFIG}:{variant}",
            f"--workdir={workdir}", *overrides]
    out = subprocess.run(args, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_rows(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "wall_seconds"}
            for r in _records(workdir) if "loss" in r]


# ----------------------------------------------------------------------------- pure pieces

def test_zero_eval_prompts_means_no_evaluation_hook_and_negative_is_an_error():
    from rig_jax.rl.evaluation import loop_evaluator

    config = lambda n: types.SimpleNamespace(eval=types.SimpleNamespace(num_prompts=n))
    assert loop_evaluator(config(0), "", None, None, lambda s: s, None) is None
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match=r"eval.num_prompts"):
            loop_evaluator(config(bad), "", None, None, lambda s: s, None)


def test_group_settings_refuse_what_cannot_be_cut():
    with pytest.raises(ConfigError, match=r"rl.group_size"):
        GroupSettings(prompts=2, group_size=1, candidates=2)
    with pytest.raises(ConfigError, match=r"rl.minibatches"):
        GroupSettings(prompts=2, group_size=3, candidates=2, minibatches=4)
    with pytest.raises(ConfigError, match=r"rl.candidates"):
        GroupSettings(prompts=4, group_size=2, candidates=2)
    with pytest.raises(ConfigError, match=r"train.total_steps"):
        check_total_steps(5, GroupSettings(prompts=2, group_size=2, candidates=2, minibatches=2))


def test_trained_steps_never_the_last_and_gathered_per_row():
    steps = trained_steps(10, 0.6, rows=50, rng=np.random.default_rng(0))
    assert steps.shape == (50, 5) and steps.max() <= 8 and steps.min() >= 0
    assert all(len(set(r)) == 5 for r in steps)
    assert len({tuple(r) for r in steps}) > 1                      # drawn per sample
    record = {"latents": np.arange(50 * 10 * 2, dtype=np.float32).reshape(50, 10, 2),
              "next_latents": -np.arange(50 * 10 * 2, dtype=np.float32).reshape(50, 10, 2),
              "log_probs": np.arange(500, dtype=np.float32).reshape(50, 10),
              "timesteps": np.arange(10)[::-1] * 100, "prev_timesteps": np.arange(10)[::-1] * 100 - 100}
    got = gather_steps(record, steps)
    np.testing.assert_array_equal(got["old_logp"][3], record["log_probs"][3, steps[3]])
    np.testing.assert_array_equal(got["latents"][7], record["latents"][7, steps[7]])
    np.testing.assert_array_equal(got["t"][7], record["timesteps"][steps[7]])
    with pytest.raises(ConfigError, match="timestep_fraction"):
        trained_steps(10, 0.0, 2, np.random.default_rng(0))


def test_choose_prompts_takes_wrong_images_first():
    np.testing.assert_array_equal(choose_prompts([1.0, 0.5, 1.0, 0.0, 0.5], 3), [1, 3, 4])
    np.testing.assert_array_equal(choose_prompts([1.0, 0.0, 1.0], 3), [1, 0, 2])


def test_a_nan_reward_drops_its_group_and_is_counted():
    """A reward that returns NaN (here: a Checker score) skips that group, never a gradient."""
    from rig_jax.data.scene_graph import Item, Relation, SceneGraph
    from rig_jax.rl.rewards import RewardBatch

    graph = SceneGraph((Item(0, "circle", ("red",)), Item(1, "square", ("blue",))),
                       (Relation(0, "left of", 1),))
    after = [types.SimpleNamespace(score=s, verdicts=types.SimpleNamespace(scene_graph=()))
             for s in (0.0, 1.0, float("nan"), 1.0, 0.0, 0.0)]
    rl = types.SimpleNamespace(reward="checker_score", format_weight=0.0, advantage="grpo",
                               advantage_clip=5.0, advantage_eps=1e-4)
    counts = {}
    group = GroupSettings(prompts=3, group_size=2, candidates=3)
    rewards = RewardBatch(graphs=[graph] * 6, checks_before=None, checks_after=after)
    advantages, metrics = score_groups(rewards, rl, group, counts)
    assert advantages[2] == advantages[3] == 0.0 and advantages[0] < 0 < advantages[1]
    assert np.all(advantages[4:] == 0.0) and np.all(np.isfinite(advantages))
    assert metrics["rollout/nonfinite_groups"] == 1 and metrics["rollout/reward_nonfinite"] == 1
    assert counts["nonfinite_groups"] == 1 and counts["zero_std_groups"] == 2


def test_minibatches_cover_every_row_once_per_epoch():
    settings = GroupSettings(prompts=3, group_size=2, candidates=3, minibatches=3, epochs=2)
    batch = {"x": np.arange(6)}
    pieces = minibatches(batch, settings, np.random.default_rng(1))
    assert len(pieces) == settings.updates == 6
    for epoch in (pieces[:3], pieces[3:]):
        assert sorted(np.concatenate([p["x"] for p in epoch]).tolist()) == list(range(6))


def test_loop_rollout_hook_saves_only_between_rollouts(tmp_path, devices):
    """A toy RL job: each rollout (pi_old = the state's params) yields two minibatches; a run
    stopped after step 2 and resumed gives the same metrics as one run of 4 steps, and no
    checkpoint ever falls inside a rollout."""
    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.parallel.rules import DEFAULT_RULES
    from rig_jax.train.loop import LoopSettings, TrainJob, run_training
    from rig_jax.train.optimizer import OptimizerSettings
    from rig_jax.train.state import TrainState
    from rig_jax.train.step import StepSettings

    def job(log):
        import grain

        def rollout(state: TrainState, raw, step):
            w = np.asarray(state.params["w"])
            log.append((step, float(w.sum())))
            x = np.full((2, 4), float(raw["i"][0]), np.float32) + w[None]
            return [{"x": x[:1]}, {"x": x[1:]}], {"rollout/w_sum": float(w.sum())}

        def loss_fn(params, frozen, batch, rng):
            return jnp.mean(jnp.square(params["w"] - 0.1 * batch["x"])), {}

        data = grain.MapDataset.range(100).batch(1).map(lambda i: {"i": np.asarray(i)}).to_iter_dataset()
        return TrainJob(name="toy_rl", init_params=lambda rng: {"w": jnp.ones((4,), jnp.float32)},
                        loss_fn=loss_fn, optimizer=OptimizerSettings(learning_rate=0.1),
                        step=StepSettings(), dataset=lambda: data, frozen={}, rollout=rollout,
                        host_state={"seen": 0})

    mesh = make_mesh(types.SimpleNamespace(shape=(1, 1, 1)), devices[:1])
    one_log, two_log = [], []
    quiet = {"log_every": 1, "checkpoint_every": 1, "progress": False, "async_checkpoints": False}
    straight = LoopSettings(total_steps=4, **quiet)
    run_training(job(one_log), straight, str(tmp_path / "a"), mesh, DEFAULT_RULES, seed=0)
    half = LoopSettings(total_steps=2, **quiet)
    run_training(job(two_log), half, str(tmp_path / "b"), mesh, DEFAULT_RULES, seed=0)
    run_training(job(two_log), straight, str(tmp_path / "b"), mesh, DEFAULT_RULES, seed=0)
    assert [s for s, _ in one_log] == [1, 3] and [s for s, _ in two_log] == [1, 3]
    assert one_log == two_log
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["2", "4"]     # keep 3, only rollout ends
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]
    assert strip(_records(tmp_path / "a")) == strip(_records(tmp_path / "b"))


# ----------------------------------------------------------------------------- the stages, end to end

@pytest.mark.heavy(seconds=130)
def test_actor_stage_logs_and_resumes_exactly_after_sigkill(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    steps = "--config.train.total_steps=6"                                       # 3 rollouts of 2 updates
    _rig_train("actor_tiny", whole, steps, "--config.eval.num_prompts=0")       # resume, not evaluation
    rows = _train_rows(whole)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in LOGGED:
        assert key in _records(whole)[0], key
    first = rows[0]
    assert abs(first["ratio_mean"] - 1.0) < 1e-4 and first["approx_kl"] < 1e-8   # pi_old is the policy
    args = [sys.executable, "-m", "rig_jax.tools.train", f"--config={CONFIG}:actor_tiny",
            f"--workdir={killed}", steps, "--config.eval.num_prompts=0"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").is_file() and len(_train_rows(killed)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)                     # mid-rollout: step 3 of the rollout of 3-4
    proc.wait()
    assert len(_train_rows(killed)) < 6
    _rig_train("actor_tiny", killed, steps, "--config.eval.num_prompts=0")
    assert _train_rows(killed) == rows
    from rig_jax.vlm.pipeline import load_vlm_pipeline

    pipe, _ = load_vlm_pipeline(str(whole / "actor"))
    assert pipe.config.vision is not None


def test_stage_errors_are_one_line(tmp_path):
    env = _env()
    args = [sys.executable, "-m", "rig_jax.tools.train", f"--config={CONFIG}:editor_tiny",
            f"--workdir={tmp_path / 'w'}", "--config.editor.sampler.eta=0.0"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "editor.sampler.eta" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    args[-1] = "--config.rl.minibatches=3"
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "rl.minibatches" in out.stderr
