"""Reflection-GRPO math: advantages, the registry, token and diffusion losses, rewards.

Every expected number is worked out by hand (plain Python `math`) from method.md's formulas,
not recomputed with the code under test.
"""
import math
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rig_jax.data.scene_graph import Item, SceneGraph
from rig_jax.errors import ConfigError, RigError
from rig_jax.rl.advantages import (
    AdvantageSettings,
    compute_advantages,
    group_stats,
    grpo_advantages,
    mean_centred_advantages,
)
from rig_jax.rl.losses import (
    DiffusionLossSettings,
    TokenLossSettings,
    diffusion_ppo_loss,
    token_grpo_loss,
)
from rig_jax.rl.registry import ADVANTAGES, LOSSES, REWARDS, Registry
from rig_jax.rl.rewards import RewardBatch, RewardSettings, compute_rewards

# ----------------------------------------------------------------------------- advantages

REWARDS_3x4 = [1.0, 2.0, 3.0, 4.0,    # mean 2.5, population std sqrt(1.25)
               0.1, 0.1, 0.1, 0.1,    # all equal: no signal
               0.0, 0.0, 0.0, 10.0]   # mean 2.5, population std sqrt(18.75)


def test_grpo_advantages_by_hand_with_zero_std_group_and_clipping():
    s1, s3 = math.sqrt(1.25), math.sqrt(18.75)
    expected = ([d / (s1 + 1e-4) for d in (-1.5, -0.5, 0.5, 1.5)] + [0.0] * 4
                + [-2.5 / (s3 + 1e-4)] * 3 + [7.5 / (s3 + 1e-4)])
    adv = grpo_advantages(np.array(REWARDS_3x4), 4, AdvantageSettings())
    np.testing.assert_allclose(adv, expected, rtol=1e-12)
    assert np.all(adv[4:8] == 0.0)          # exactly 0, not rounding noise / eps

    clipped = grpo_advantages(np.array(REWARDS_3x4), 4, AdvantageSettings(clip=1.2))
    np.testing.assert_allclose(clipped, np.clip(expected, -1.2, 1.2), rtol=1e-12)
    assert clipped[11] == 1.2 and clipped[0] == -1.2   # 1.73 and -1.34 clipped


def test_mean_centred_advantages_by_hand():
    adv = mean_centred_advantages(np.array(REWARDS_3x4), 4, AdvantageSettings(clip=5.0))
    expected = [-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0, -2.5, -2.5, -2.5, 5.0]   # 7.5 clipped to 5
    np.testing.assert_allclose(adv, expected, atol=1e-12)
    assert np.all(adv[4:8] == 0.0)


def test_group_stats_and_compute_advantages():
    stats = group_stats(np.array(REWARDS_3x4), 4)
    assert stats["reward_mean"] == pytest.approx((10 + 0.4 + 10) / 12)
    assert stats["reward_std"] == pytest.approx((math.sqrt(1.25) + 0 + math.sqrt(18.75)) / 3)
    assert stats["zero_std_fraction"] == pytest.approx(1 / 3)
    assert stats["zero_std_groups"] == 1 and stats["num_groups"] == 3

    adv, stats2 = compute_advantages("mean_centred", REWARDS_3x4, 4, AdvantageSettings())
    assert stats2["advantage_abs_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 2.5 * 3 + 5.0) / 12)
    assert stats2["num_groups"] == 3 and adv.shape == (12,)


def test_advantage_input_errors():
    with pytest.raises(ConfigError, match=r"^rl\.group_size: .*>= 2"):
        grpo_advantages(np.zeros(4), 1, AdvantageSettings())
    with pytest.raises(ConfigError, match=r"^rl\.group_size: 5 rewards"):
        grpo_advantages(np.zeros(5), 2, AdvantageSettings())
    with pytest.raises(RigError, match=r"rows \[1, 3\]"):
        group_stats(np.array([0.0, np.nan, 1.0, np.inf]), 2)
    with pytest.raises(ConfigError, match=r"^rl\.advantage_clip"):
        AdvantageSettings(clip=0.0)
    with pytest.raises(ConfigError) as err:
        compute_advantages("x", np.zeros(4), 2, AdvantageSettings())
    assert str(err.value) == ("rl.advantage: unknown advantage estimator 'x' "
                              f"(known: {', '.join(ADVANTAGES.names())})")
    assert {"grpo", "mean_centred"} <= set(ADVANTAGES.names())


# ----------------------------------------------------------------------------- registry

def test_registry_unknown_duplicate_and_custom():
    reg = Registry("widget", "rig_jax.rl.advantages")   # any importable module will do
    reg.register("b")(len)
    reg.register("a")(abs)
    assert reg.names() == ("a", "b") and reg.get("a", "x.widget") is abs
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(max)
    assert reg.get("a", "x.widget") is abs               # the first one is kept
    with pytest.raises(ConfigError) as err:
        reg.get("c", "x.widget")
    assert str(err.value) == "x.widget: unknown widget 'c' (known: a, b)"
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGES.register("grpo")(grpo_advantages)


@pytest.fixture
def rank_estimator():
    name = "test_rank_centred"

    @ADVANTAGES.register(name)
    def rank_centred(rewards, group_size, settings):
        groups = np.asarray(rewards, float).reshape(-1, group_size)
        ranks = groups.argsort(axis=1).argsort(axis=1).astype(float)
        return (ranks - ranks.mean(axis=1, keepdims=True)).reshape(-1)

    yield name
    del ADVANTAGES._entries[name]   # keep the shared table as other tests expect it


def test_custom_estimator_by_name(rank_estimator):
    adv, stats = compute_advantages(rank_estimator, [3.0, 1.0, 2.0, 0.0, 9.0, 5.0], 3,
                                    AdvantageSettings())
    np.testing.assert_allclose(adv, [1, -1, 0, -1, 1, 0])
    assert stats["advantage_abs_mean"] == pytest.approx(4 / 6)


def test_builtins_load_lazily_on_first_lookup():
    code = ("import sys; from rig_jax.rl.registry import ADVANTAGES, LOSSES, REWARDS; "
            "assert 'rig_jax.rl.advantages' not in sys.modules; "
            "print(ADVANTAGES.names(), REWARDS.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("('grpo', 'mean_centred') "
                                  "('checker_delta', 'checker_score', 'judge', 'sg_iou')")
    assert {"grpo_token", "ppo_diffusion"} <= set(LOSSES.names())


# ----------------------------------------------------------------------------- token loss

MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)   # lengths 3 and 1
ADV = np.array([2.0, -1.0], np.float32)
LOGP = np.array([[-1.0, -2.0, -0.5, -np.inf], [-0.3, -np.inf, 7.0, np.nan]], np.float32)


def _token(logp, old, ref, mask, adv, **kw):
    return token_grpo_loss(jnp.asarray(logp), jnp.asarray(old), None if ref is None else jnp.asarray(ref),
                           jnp.asarray(mask), jnp.asarray(adv), TokenLossSettings(**kw))


def test_token_loss_on_policy_value_and_gradient():
    # r = 1 everywhere: loss = -(2*3 + (-1)*1) / 4 valid tokens; d loss / d logp = -A_i / 4.
    loss, metrics = _token(LOGP, LOGP, None, MASK, ADV)
    assert float(loss) == pytest.approx(-5 / 4)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(metrics["clip_fraction"]) == 0 and float(metrics["kl"]) == 0
    grad = jax.grad(lambda lp: _token(lp, LOGP, None, MASK, ADV)[0])(jnp.asarray(LOGP))
    np.testing.assert_allclose(grad, [[-0.5, -0.5, -0.5, 0], [0.25, 0, 0, 0]], atol=1e-7)

    equal = np.ones((2, 3), np.float32)   # equal lengths: the loss is -mean(A)
    lp = np.zeros((2, 3), np.float32)
    assert float(_token(lp, lp, None, equal, ADV)[0]) == pytest.approx(-float(ADV.mean()))


def test_token_loss_clipping_gradient():
    old = np.zeros((2, 2), np.float32)
    logp = old + math.log(1.5)               # r = 1.5 > 1 + 0.2
    mask = np.ones((2, 2), np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    loss, metrics = _token(logp, old, None, mask, adv)
    grad = jax.grad(lambda lp: _token(lp, old, None, mask, adv)[0])(jnp.asarray(logp))
    # A > 0: -min(1.5, 1.2) = -1.2, constant in logp; A < 0: -min(-1.5, -1.2) = 1.5 = r, d/dlogp = r.
    np.testing.assert_allclose(grad[0], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(grad[1], [1.5 / 4, 1.5 / 4], rtol=1e-6)
    assert float(loss) == pytest.approx((-1.2 * 2 + 1.5 * 2) / 4, rel=1e-6)
    assert float(metrics["clip_fraction"]) == 1.0
    assert float(metrics["approx_kl"]) == pytest.approx(0.5 * math.log(1.5) ** 2, rel=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.5, rel=1e-6)


def test_token_vs_sequence_aggregation():
    lp = np.zeros((2, 4), np.float32)
    token, _ = _token(lp, lp, None, MASK, ADV, aggregation="token")
    seq, seq_metrics = _token(lp, lp, None, MASK, ADV, aggregation="sequence")
    assert float(token) == pytest.approx(-(2 * 3 - 1 * 1) / 4)      # per token
    assert float(seq) == pytest.approx(-(2 + -1) / 2)               # per sequence, then mean
    assert float(seq_metrics["policy_loss"]) == pytest.approx(-0.5)
    # a sequence with no valid token is left out of the sequence mean
    three = np.concatenate([MASK, np.zeros((1, 4), np.float32)])
    seq3, _ = _token(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32), None, three,
                     np.array([2.0, -1.0, 100.0], np.float32), aggregation="sequence")
    assert float(seq3) == pytest.approx(-0.5)


def test_token_k3_kl():
    lp = np.zeros((2, 4), np.float32)
    same, m_same = _token(lp, lp, lp, MASK, ADV, kl_beta=0.5)
    assert float(m_same["kl"]) == 0 and float(same) == pytest.approx(-5 / 4)

    d = [0.5, -1.0, 2.0, 0.0]                 # ref - logp on the valid tokens (row 0), 0.3 on row 1
    ref = np.array([d, [0.3, 9.0, 9.0, 9.0]], np.float32)
    k3 = [math.exp(x) - x - 1 for x in (*d[:3], 0.3)]
    loss, metrics = _token(lp, lp, ref, MASK, ADV, kl_beta=0.5)
    assert all(k > 0 for k in k3)
    assert float(metrics["kl"]) == pytest.approx(sum(k3) / 4, rel=1e-6)
    assert float(loss) == pytest.approx(-5 / 4 + 0.5 * sum(k3) / 4, rel=1e-6)
    assert float(metrics["policy_loss"]) == pytest.approx(-5 / 4)


def test_token_loss_all_masked_and_jit():
    mask = np.zeros_like(MASK)
    f = lambda lp: _token(lp, LOGP, LOGP, mask, ADV)[0]
    assert float(f(jnp.asarray(LOGP))) == 0.0
    grad = jax.grad(f)(jnp.asarray(LOGP))
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)

    settings = TokenLossSettings(kl_beta=0.1, aggregation="sequence")
    jitted = jax.jit(token_grpo_loss, static_argnums=5)
    args = (LOGP, LOGP * 0.9, LOGP * 1.1, MASK, ADV)
    eager, _ = token_grpo_loss(*map(jnp.asarray, args), settings)
    assert np.isfinite(float(eager))
    assert float(jitted(*map(jnp.asarray, args), settings)[0]) == pytest.approx(float(eager), rel=1e-6)


def test_token_settings_errors():
    with pytest.raises(ConfigError, match=r"^rl\.aggregation: unknown aggregation 'x'"):
        TokenLossSettings(aggregation="x")
    with pytest.raises(ConfigError, match=r"^rl\.clip_epsilon"):
        TokenLossSettings(clip_epsilon=0.0)
    with pytest.raises(ConfigError, match=r"^rl\.kl_beta"):
        DiffusionLossSettings(kl_beta=-1.0)
    with pytest.raises(ValueError, match="advantages shape"):
        _token(LOGP, LOGP, None, MASK, ADV[:1])


# ----------------------------------------------------------------------------- diffusion loss

def _diffusion(logp, old, adv, mask, msd, std, **kw):
    return diffusion_ppo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                              None if msd is None else jnp.asarray(msd), jnp.asarray(std),
                              DiffusionLossSettings(**kw))


def test_diffusion_kl_term_by_hand():
    lp = np.zeros((2, 2), np.float32)
    adv = np.array([1.0, -2.0], np.float32)
    msd = np.array([[0.02, 0.08], [0.5, 0.0]], np.float32)
    std = np.array([[0.1, 0.2], [1.0, 0.5]], np.float32)
    kl = [0.02 / (2 * 0.01), 0.08 / (2 * 0.04), 0.5 / 2, 0.0]     # = 1, 1, 0.25, 0
    loss, metrics = _diffusion(lp, lp, adv, np.ones((2, 2)), msd, std, kl_beta=0.1)
    assert float(metrics["kl"]) == pytest.approx(sum(kl) / 4, rel=1e-6)
    policy = (-1 - 1 + 2 + 2) / 4                                  # rho = 1: max(-A, -A) = -A
    assert float(metrics["policy_loss"]) == pytest.approx(policy)
    assert float(loss) == pytest.approx(policy + 0.1 * sum(kl) / 4, rel=1e-6)
    no_kl, m = _diffusion(lp, lp, adv, np.ones((2, 2)), None, std)
    assert float(no_kl) == pytest.approx(policy) and float(m["kl"]) == 0


def test_diffusion_clipping():
    old = np.zeros((1, 2), np.float32)
    logp = np.full((1, 2), 0.5, np.float32)            # rho = e^0.5 far outside 1 +- 1e-4
    for a, want_grad in ((1.0, 0.0), (-1.0, math.exp(0.5) / 2)):
        f = lambda lp, a=a: _diffusion(lp, old, np.array([a], np.float32), np.ones((1, 2)), None,
                                       np.ones((1, 2)))[0]
        np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logp)), [[want_grad] * 2], rtol=1e-6, atol=1e-8)
    _, metrics = _diffusion(logp, old, np.array([1.0], np.float32), np.ones((1, 2)), None, np.ones((1, 2)))
    assert float(metrics["clip_fraction"]) == 1.0
    assert float(metrics["approx_kl"]) == pytest.approx(0.125)


def test_diffusion_std_zero_step_is_masked_out():
    adv = np.array([1.5, -0.5], np.float32)
    logp2 = np.array([[-1.0, -2.0], [-0.5, -0.7]], np.float32)
    old2 = logp2 - np.float32(0.00005)
    msd2 = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    std2 = np.full((2, 2), 0.5, np.float32)
    base, base_metrics = _diffusion(logp2, old2, adv, np.ones((2, 2)), msd2, std2)

    # a third, deterministic step (std == 0, still marked trained) with garbage in it
    logp3 = np.concatenate([logp2, [[-np.inf], [50.0]]], axis=1)
    old3 = np.concatenate([old2, [[3.0], [np.nan]]], axis=1)
    msd3 = np.concatenate([msd2, [[7.0], [7.0]]], axis=1)
    std3 = np.concatenate([std2, [[0.0], [0.0]]], axis=1)
    loss, metrics = _diffusion(logp3, old3, adv, np.ones((2, 3)), msd3, std3)
    assert float(loss) == pytest.approx(float(base), rel=1e-6)
    for key in ("clip_fraction", "approx_kl", "ratio_mean", "kl", "policy_loss"):
        assert float(metrics[key]) == pytest.approx(float(base_metrics[key]), rel=1e-5), key

    g_logp, g_msd = jax.grad(lambda lp, d: _diffusion(lp, old3, adv, np.ones((2, 3)), d, std3)[0],
                             argnums=(0, 1))(jnp.asarray(logp3), jnp.asarray(msd3))
    assert np.all(np.isfinite(g_logp)) and np.all(np.isfinite(g_msd))
    assert np.all(g_logp[:, 2] == 0) and np.all(g_msd[:, 2] == 0)
    # KL gradient on the live steps: beta / (2 std^2) / count = 0.01 / 0.5 / 4
    np.testing.assert_allclose(g_msd[:, :2], 0.005, rtol=1e-6)


def test_diffusion_all_masked_is_finite():
    std = np.array([[0.0, 0.3]], np.float32)
    f = lambda lp, d: _diffusion(lp, np.zeros((1, 2)), np.ones(1), np.array([[1.0, 0.0]]), d, std)[0]
    lp, d = jnp.array([[1.0, 2.0]]), jnp.array([[5.0, 5.0]])
    assert float(f(lp, d)) == 0.0
    grads = jax.grad(f, argnums=(0, 1))(lp, d)
    assert all(np.all(g == 0) for g in grads)


# ----------------------------------------------------------------------------- rewards

RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE = (Item(0, "circle", ("red",)), Item(1, "square", ("blue",)),
                                           Item(2, "triangle", ("green",)))
GRAPH = SceneGraph.from_triplets([(RED_CIRCLE, "left of", BLUE_SQUARE),
                                  (BLUE_SQUARE, "above", GREEN_TRIANGLE)])


def check(score, *triplets):
    return SimpleNamespace(score=score, verdicts=SimpleNamespace(scene_graph=tuple(triplets)))


class StandInJudge:
    def __init__(self, verdicts):
        self.verdicts, self.calls = verdicts, []

    def judge(self, images, graphs):
        self.calls.append((images.shape, len(graphs)))
        return [SimpleNamespace(triplet_verdicts=v) for v in self.verdicts]


def batch(**kw):
    fields = dict(graphs=[GRAPH, GRAPH, GRAPH],
                  checks_before=[check(0.5), check(0.0), check(1.0)],
                  checks_after=[check(0.75, ("red circle", "left of", "blue square")),
                                check(0.5, ["red circle", "left of", "blue square"],
                                      ("blue square", "above", "green triangle")),
                                check(0.0, ("circle", "left of", "square"))])
    fields.update(kw)
    return RewardBatch(**fields)


def test_checker_rewards():
    delta, stats = compute_rewards(batch(), RewardSettings("checker_delta"))
    np.testing.assert_allclose(delta, [0.25, 0.5, -1.0])
    assert stats == {"reward_checker_delta_mean": pytest.approx(-0.25 / 3), "reward_nonfinite": 0.0}
    score, stats = compute_rewards(batch(), RewardSettings("checker_score"))
    np.testing.assert_allclose(score, [0.75, 0.5, 0.0])
    assert delta.dtype == np.float64 and score.shape == (3,)


def test_sg_iou_reward():
    # gt has 2 triplets; 1 of 2 | 2 of 2 (a list triplet counts) | 0 of 3 (bare labels do not match)
    rewards, stats = compute_rewards(batch(), RewardSettings("sg_iou"))
    np.testing.assert_allclose(rewards, [0.5, 1.0, 0.0])
    assert stats["reward_sg_iou_mean"] == pytest.approx(0.5)


def test_judge_reward():
    judge = StandInJudge([(True, None), (True, True), ()])
    images = np.zeros((3, 4, 4, 3), np.float32)
    rewards, _ = compute_rewards(batch(judge=judge, images_after=images), RewardSettings("judge"))
    np.testing.assert_allclose(rewards, [0.5, 1.0, 0.0])
    assert judge.calls == [((3, 4, 4, 3), 3)]
    with pytest.raises(ConfigError, match=r"^rl\.reward: 'judge' needs"):
        compute_rewards(batch(judge=judge), RewardSettings("judge"))
    with pytest.raises(ConfigError, match=r"^rl\.reward: 'judge' needs"):
        compute_rewards(batch(images_after=images), RewardSettings("judge"))


def test_format_term_and_errors():
    wf = [True, False, True]
    rewards, stats = compute_rewards(batch(well_formed=wf), RewardSettings("checker_delta", 0.1))
    np.testing.assert_allclose(rewards, [0.35, 0.5, -0.9])
    assert stats["well_formed_rate"] == pytest.approx(2 / 3)
    assert stats["reward_checker_delta_mean"] == pytest.approx(-0.25 / 3)   # before the format term
    no_wf, stats = compute_rewards(batch(), RewardSettings("checker_delta", 0.1))
    np.testing.assert_allclose(no_wf, [0.25, 0.5, -1.0])
    assert "well_formed_rate" not in stats

    with pytest.raises(ConfigError, match=r"^rl\.reward: 'checker_delta' needs .*checks_before"):
        compute_rewards(batch(checks_before=None), RewardSettings("checker_delta"))
    with pytest.raises(ConfigError) as err:
        compute_rewards(batch(), RewardSettings("nope"))
    assert str(err.value) == f"rl.reward: unknown reward 'nope' (known: {', '.join(REWARDS.names())})"
    with pytest.raises(ConfigError, match=r"^rl\.format_weight"):
        RewardSettings(format_weight=-1.0)
    rewards, stats = compute_rewards(batch(checks_after=[check(0.0), check(math.nan), check(0.0)]),
                                     RewardSettings("checker_score"))
    assert np.isnan(rewards[1]) and stats["reward_nonfinite"] == 1.0
    with pytest.raises(ValueError, match="checks_before"):
        batch(checks_before=[check(0.0)])


# ----------------------------------------------------------------------------- numpy, random inputs

def _np_grpo_advantages(rewards, group_size, clip=5.0, eps=1e-4):
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, group_size):
        out.extend(np.clip((group - group.mean()) / (group.std() + eps), -clip, clip))
    return np.asarray(out)


def _np_token_loss(logp, old, ref, mask, adv, eps, beta, aggregation):
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    per_token += beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if aggregation == "token":
        return np.sum(per_token * mask) / np.sum(mask)
    rows = np.sum(mask, axis=1) > 0
    return np.mean(np.sum(per_token * mask, axis=1)[rows] / np.sum(mask, axis=1)[rows])


def _np_diffusion_loss(logp, old, adv, mask, msd, std, clip, beta):
    valid = (mask > 0) & (std > 0)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per_step = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip, 1 + clip))
    per_step += beta * msd / (2 * np.where(valid, std, 1.0) ** 2)
    return np.sum(np.where(valid, per_step, 0.0)) / np.sum(valid)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_and_losses_equal_numpy_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=24)
    rewards[8:12] = 0.3                                       # one group with equal rewards
    np.testing.assert_allclose(grpo_advantages(rewards, 4, AdvantageSettings()),
                               _np_grpo_advantages(rewards, 4), rtol=1e-12, atol=1e-12)
    n, t = 6, 9
    old = rng.normal(-2.0, 0.5, (n, t))
    logp = old + rng.normal(0, 0.3, (n, t))                   # ratios well outside 1 +- 0.2
    ref = old + rng.normal(0, 0.3, (n, t))
    mask = (rng.random((n, t)) < 0.8).astype(np.float64)
    adv = rng.normal(size=n)
    for aggregation in ("token", "sequence"):
        settings = TokenLossSettings(clip_epsilon=0.2, kl_beta=0.04, aggregation=aggregation)
        arrays = (jnp.asarray(x, jnp.float32) for x in (logp, old, ref, mask, adv))
        got, _ = token_grpo_loss(*arrays, settings)
        want = _np_token_loss(logp, old, ref, mask, adv, 0.2, 0.04, aggregation)
        np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    k = 5
    dold = rng.normal(1.0, 0.2, (n, k))
    dlogp = dold + rng.normal(0, 2e-4, (n, k))                # around the 1e-4 clip range
    std = np.abs(rng.normal(0.5, 0.2, (n, k)))
    std[:, -1] = 0.0                                          # the last step: deterministic
    msd = np.abs(rng.normal(0, 0.01, (n, k)))
    dmask = (rng.random((n, k)) < 0.9).astype(np.float64)
    got, _ = diffusion_ppo_loss(*(jnp.asarray(x, jnp.float32) for x in (dlogp, dold, adv, dmask, msd, std)),
                                DiffusionLossSettings(clip_range=1e-4, kl_beta=0.01))
    want = _np_diffusion_loss(dlogp, dold, adv, dmask, msd, std, 1e-4, 0.01)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
