"""Acceptance tests of Reflection-GRPO's learning signal, on the library's own losses:

1. `token_grpo_loss`: jax.grad against central finite differences along random directions
   (ratio != 1, clipping partly active, k3 KL on, padding at -inf);
2. stage 2's first update from the reference, on the committed Diffuser: replaying the kept
   trajectory with the rollout's params gives ratio 1 and a KL to the reference of exactly 0;
3. stage 1 sanity: the committed Actor learns to prefer one edit prompt (reward 1 for it,
   0 for anything else) from P < 0.9 to P >= 0.9 within 100 GRPO steps;
4. stage 2 sanity (DDPO's first check): the committed Diffuser's re-denoising policy raises
   the decoded images' mean brightness by >= 3 within-group standard deviations within 100 steps
   (and as many steps on the negated reward lower it).

Rollouts, advantages, losses and log-probs are the library's (`rl.rollout`, `rl.advantages`,
`rl.losses`, `VLMActor.propose` / `token_logprobs`), wired as `rl/stage_actor.py` and
`rl/stage_editor.py` wire them; only the reward and the (tiny) loop are the test's.
"""
import collections
import dataclasses
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rig_jax.data import shapes
from rig_jax.data.scene_graph import SceneGraph
from rig_jax.rl.advantages import AdvantageSettings, grpo_advantages
from rig_jax.rl.losses import DiffusionLossSettings, TokenLossSettings, diffusion_ppo_loss, token_grpo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(ROOT, "pretrained", "shapes_sg")
WORLD = shapes.ShapesConfig(image_size=32, min_objects=2, max_objects=2)
ADVANTAGE = AdvantageSettings()


def violated_scene(seed: int) -> tuple[np.ndarray, SceneGraph]:
    """(render, prompt graph) of a two-object ShapesSG scene drawn with the objects' boxes
    swapped, so the prompt's one relation is violated in the image."""
    scene = shapes.generate_scene(np.random.default_rng(seed), WORLD)
    a, b = scene.objects
    swapped = dataclasses.replace(scene, objects=(dataclasses.replace(a, box=b.box),
                                                  dataclasses.replace(b, box=a.box)))
    return shapes.render(swapped), shapes.scene_graph(scene)


# ----------------------------------------------------------------------------- 1. token loss gradient

def _tiny_policy():
    """A log-linear token policy: logits[n, t] = W x[n, t] + b over a 7-token vocabulary, and
    the log-probs of fixed sampled tokens, -inf on the padding (the loss must not look there)."""
    n, t, v, d = 6, 5, 7, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)))
    mask = np.ones((n, t), np.float32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    mask[5, :] = 0                                  # a sequence with no valid token
    mask = jnp.asarray(mask)

    def logp(params):
        logits = jnp.einsum("ntd,vd->ntv", x, params["w"]) + params["b"]
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
        return jnp.where(mask > 0, picked, -jnp.inf)

    theta = {"w": jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(v,)), jnp.float32)}
    moved = lambda scale: jax.tree.map(
        lambda a: a + jnp.asarray(scale * rng.normal(size=a.shape), jnp.float32), theta)
    old_logp, ref_logp = logp(moved(0.15)), logp(moved(0.3))
    advantages = jnp.asarray(grpo_advantages(rng.normal(size=n), 3, ADVANTAGE), jnp.float32)
    return logp, theta, old_logp, ref_logp, mask, advantages, rng


def _dot(a, b) -> float:
    return float(sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_token_loss_gradient_matches_finite_differences(aggregation):
    """Directional derivatives of the float32 loss along unit random directions in parameter
    space: jax.grad . d against (f(theta + h d) - f(theta - h d)) / 2h with h = 3e-3.

    Tolerance 1e-4 (absolute; the derivatives here are ~1e-2 .. 3e-1): f ~ 0.2 is evaluated in float32,
    so each value carries a rounding error of a few ulp (~3e-8 x a few), which the difference
    quotient divides by 2h: <= ~3e-5; the truncation error h^2/6 |f'''| is ~1.5e-6 |f'''| for
    this O(1)-curvature policy. The loss is only piecewise smooth (the clip and the min), so a
    direction whose segment [-h, h] moves any token across a clip boundary is drawn again.
    The same check fails by more than 10x the tolerance if the KL term or the clipping is
    dropped from the gradient (asserted), so neither passes unnoticed."""
    logp, theta, old_logp, ref_logp, mask, adv, rng = _tiny_policy()
    eps, h, tol = 0.2, 3e-3, 1e-4
    settings = TokenLossSettings(clip_epsilon=eps, kl_beta=0.5, aggregation=aggregation)
    loss = lambda p, s=settings: token_grpo_loss(logp(p), old_logp, ref_logp, mask, adv, s)[0]

    valid = np.asarray(mask) > 0
    a = np.broadcast_to(np.asarray(adv)[:, None], valid.shape)

    def clipped(p):
        """Tokens whose clipped branch is the active one (zero policy gradient there)."""
        new, old = (np.where(valid, np.asarray(x), 0.0) for x in (logp(p), old_logp))
        ratio = np.exp(new - old)
        return valid & (((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0)))

    _, metrics = token_grpo_loss(logp(theta), old_logp, ref_logp, mask, adv, settings)
    active = clipped(theta)
    assert 0 < active.sum() < valid.sum(), "clipping must be partly active"
    assert 0 < float(metrics["clip_fraction"]) < 1 and abs(float(metrics["ratio_mean"]) - 1) > 1e-3
    assert float(metrics["kl"]) > 1e-2

    grad = jax.grad(loss)(theta)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))   # -inf padding is masked
    no_kl = jax.grad(functools.partial(loss, s=dataclasses.replace(settings, kl_beta=0.0)))(theta)
    no_clip = jax.grad(functools.partial(loss, s=dataclasses.replace(settings, clip_epsilon=0.999)))(theta)

    checked, tries = 0, 0
    kl_gap, clip_gap = 0.0, 0.0
    while checked < 3:
        tries += 1
        assert tries <= 30, "no direction without a clip-boundary crossing within [-h, h]"
        d = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), theta)
        d = jax.tree.map(lambda x, n=np.sqrt(_dot(d, d)): x / n, d)
        at = lambda s, d=d: jax.tree.map(lambda x, y: x + s * y, theta, d)
        if not (np.array_equal(clipped(at(h)), active) and np.array_equal(clipped(at(-h)), active)):
            continue
        fd = (float(loss(at(h))) - float(loss(at(-h)))) / (2 * h)
        exact = _dot(grad, d)
        assert abs(exact - fd) < tol, (aggregation, exact, fd)
        print(f"  grad.d {exact:+.6f}  central difference {fd:+.6f}  error {abs(exact - fd):.1e}")
        kl_gap = max(kl_gap, abs(_dot(no_kl, d) - fd))
        clip_gap = max(clip_gap, abs(_dot(no_clip, d) - fd))
        checked += 1
    print(f"token loss ({aggregation}): {checked} directions within {tol:g} ({tries} drawn); "
          f"gap without KL {kl_gap:.2e}, without clipping {clip_gap:.2e}")
    assert kl_gap > 10 * tol and clip_gap > 10 * tol, (kl_gap, clip_gap)


# ----------------------------------------------------------------------------- the committed Diffuser

B, G = 2, 4                  # prompts per rollout, stochastic re-denoisings per prompt


@pytest.fixture(scope="module")
def diffuser(devices):
    """The committed Diffuser as stage 2's policy, with the tiny config's editor at 6 steps,
    strength 1.0 and eta 1.0 (guidance 3), two violated ShapesSG renders, and `rollout(unet,
    key)` -> (group_edit record, per-sample mean brightness)."""
    from configs import shapes_grpo
    from rig_jax.diffusion.settings import EditSettings
    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.parallel.rules import DEFAULT_RULES
    from rig_jax.rig.diffuser import encode_prompts
    from rig_jax.rl.rollout import group_edit
    from rig_jax.weights.diffusers_pipeline import load_pipeline

    config = shapes_grpo.get_config("editor_tiny")
    config.editor.sampler.num_steps = 6
    config.editor.strength = 1.0
    edit = EditSettings.from_config(config.editor)
    assert edit.sampler.eta == 1.0 and not edit.null_text.enabled
    pipe, params = load_pipeline(os.path.join(PRETRAINED, "diffuser"))
    mesh = make_mesh(types.SimpleNamespace(shape=(1, 1, 1)), devices[:1])
    pairs = [violated_scene(seed) for seed in (1, 2)]
    images = np.stack([p[0] for p in pairs])
    graphs = [p[1] for p in pairs]
    edits = ["swap the two objects"] * (B * G)

    def rollout(unet, key):
        record = group_edit(pipe, {**params, "unet": unet}, images, graphs, edits, edit, G, mesh,
                            DEFAULT_RULES, rng=key, keep_trajectory=True)
        return record, record["images"].mean(axis=(1, 2, 3)).astype(np.float64)

    # the stage-2 loss's unconditional embedding (stage_editor: encode_prompts(pipe, base, [""]))
    uncond = encode_prompts(pipe, params, [""])
    return types.SimpleNamespace(pipe=pipe, params=params, edit=edit, sampler=edit.sampler, mesh=mesh,
                                 rules=DEFAULT_RULES, rollout=rollout, uncond=uncond,
                                 timestep_fraction=config.rl.timestep_fraction)


def _stage2_batch(record, advantages, fraction, rng):
    from rig_jax.rl.rollout import gather_steps, trained_steps

    steps = trained_steps(record["log_probs"].shape[1], fraction, B * G, rng)
    return {**gather_steps(record, steps), "edit_cond": record["edit_cond"],
            "advantages": np.asarray(advantages, np.float32), "step_mask": np.ones(steps.shape, np.float32)}


# ----------------------------------------------------------------------------- 2. stage 2, first update

def test_diffusion_loss_first_update_is_on_policy_with_zero_kl(diffuser):
    """The stage-2 loss as `stage_editor` builds it, on the first update (params = the rollout's
    = the reference): exp(logp - old_logp) is 1 to float32 precision at every trained step and
    the KL |mu_theta - mu_ref|^2 / (2 sigma^2) is exactly 0. With the U-Net moved by 1e-3 noise
    both move clearly (the check can fail)."""
    from rig_jax.rl.rollout import reference_means, step_log_probs

    d = diffuser
    unet = d.params["unet"]
    record, reward = d.rollout(unet, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(d.uncond), record["uncond"])
    batch = _stage2_batch(record, grpo_advantages(reward, G, ADVANTAGE), d.timestep_fraction,
                          np.random.default_rng(0))
    assert batch["old_logp"].shape == (B * G, 3)     # round(0.6 * 5) of the 6 steps, never the last
    replay = jax.jit(lambda p, b, u: step_log_probs(d.pipe, d.sampler, p, b, u))
    settings = DiffusionLossSettings(clip_range=1e-4, kl_beta=0.01)

    def loss_terms(policy_unet, ref_unet):
        logp, mean, std = replay(policy_unet, batch, d.uncond)
        ref_mean = reference_means(d.pipe, d.sampler, ref_unet, batch, record["uncond"], d.mesh, d.rules)
        dist = jnp.mean(jnp.square(mean - ref_mean), axis=tuple(range(2, mean.ndim)))
        _, metrics = diffusion_ppo_loss(logp, batch["old_logp"], batch["advantages"], batch["step_mask"],
                                        dist, std, settings)
        return np.exp(np.asarray(logp, np.float64) - batch["old_logp"]), np.asarray(dist), metrics, std

    ratio, dist, metrics, std = loss_terms(unet, unet)
    assert np.all(np.asarray(std) > 0)
    assert np.max(np.abs(ratio - 1)) < 1e-5, np.max(np.abs(ratio - 1))
    assert np.max(dist) < 1e-12 and float(metrics["kl"]) < 1e-12, (np.max(dist), float(metrics["kl"]))
    assert float(metrics["clip_fraction"]) == 0.0 and abs(float(metrics["ratio_mean"]) - 1) < 1e-5

    leaves, tree = jax.tree.flatten(unet)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    moved = jax.tree.unflatten(tree, [x + 1e-3 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys, strict=True)])
    ratio_moved, dist_moved, _, _ = loss_terms(moved, unet)
    print(f"first update: max |ratio - 1| {np.max(np.abs(ratio - 1)):.2e}, max dist {np.max(dist):.1e}, "
          f"kl {float(metrics['kl']):.1e}; moved U-Net: max |ratio - 1| "
          f"{np.max(np.abs(ratio_moved - 1)):.2e}, min dist {np.min(dist_moved):.1e}")
    assert np.max(np.abs(ratio_moved - 1)) > 1e-3 and np.min(dist_moved) > 1e-10


# ----------------------------------------------------------------------------- 3. stage 1 sanity

def test_actor_learns_to_prefer_one_edit_prompt():
    """The committed Actor on one fixed (violated render, Checker feedback): G = 8 samples per
    step from `VLMActor.propose` at the folder's temperature, reward 1 for answers whose parsed
    edit text is the target (the most frequent text of 32 first samples that is not already at
    0.9), 0 otherwise; GRPO advantages, one Adam (lr 1e-3) step of `token_grpo_loss` through
    `token_logprobs` per rollout (pi_old = the current policy), no KL.

    P(target) is measured as the fraction of 32 fresh samples, before and after. Training stops
    once an exact lower bound of P(target) reaches 0.97: the summed sequence probabilities
    (token_logprobs) of the distinct sampled token sequences that parse to the target."""
    from rig_jax.rig.actor import GRID_KEY, ActorSettings, VLMActor, static_grid, token_logprobs
    from rig_jax.rig.checker import ShapesChecker
    from rig_jax.vlm.pipeline import load_vlm_pipeline

    folder = os.path.join(PRETRAINED, "actor")
    pipe, params = load_vlm_pipeline(folder, jnp.float32, jnp.float32)
    with open(os.path.join(folder, "generation_config.json")) as f:
        tau = float(json.load(f).get("temperature") or 1.0)
    actor = VLMActor(pipe, ActorSettings(temperature=tau, max_new_tokens=32, max_words=40))
    image, graph = violated_scene(0)
    check = ShapesChecker(WORLD).check(image[None], [graph])[0]
    assert check.score < 1 and "violated" in check.feedback
    group = 8

    def propose(p, seed):
        return actor.propose(p, image[None], [graph], [check.feedback], jax.random.PRNGKey(seed),
                             num_samples=group)

    def sample_texts(p, seed):
        """32 samples as 4 calls of 8 rows (one compiled decoder)."""
        return [e.text for i in range(4) for e in propose(p, seed + i).edits]

    counts = collections.Counter(sample_texts(params, 1000))
    target = next(t for t, c in counts.most_common() if t and c / 32 < 0.9)
    p_before = np.mean([t == target for t in sample_texts(params, 2000)])
    assert p_before < 0.9, (target, p_before)

    first = propose(params, 0)
    grid = static_grid(first.batch)
    questions = {k: v for k, v in first.batch.items() if k != GRID_KEY}     # 8 copies of the one question
    settings = TokenLossSettings(clip_epsilon=0.2, kl_beta=0.0)
    optimizer = optax.adam(1e-3)

    def update(p, opt_state, batch):
        def loss_fn(q):
            logp = token_logprobs(pipe, q, {**batch, GRID_KEY: grid}, batch["tokens"], batch["valid"], tau)
            return token_grpo_loss(logp, batch["old_logp"], None, batch["valid"].astype(jnp.float32),
                                   batch["advantages"], settings)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    update = jax.jit(update)
    sequence_logp = jax.jit(lambda p, tokens, valid: jnp.sum(
        token_logprobs(pipe, p, {**questions, GRID_KEY: grid}, tokens, valid, tau), axis=1))
    seen: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def target_lower_bound(p) -> float:
        rows = list(seen.values())[:group]
        rows += [rows[0]] * (group - len(rows))
        logp = sequence_logp(p, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        return float(np.sum(np.exp(np.asarray(logp, np.float64))[:min(len(seen), group)]))

    opt_state = optimizer.init(params)
    bound, steps = 0.0, 0
    for steps in range(1, 101):
        samples = first if steps == 1 else propose(params, steps)
        reward = np.array([float(e.text == target) for e in samples.edits])
        for i in np.flatnonzero(reward):
            seen.setdefault(tuple(samples.tokens[i][samples.valid[i]].tolist()),
                            (samples.tokens[i], samples.valid[i]))
        batch = {**questions, "tokens": samples.tokens, "valid": samples.valid,
                 "old_logp": samples.policy_logprobs,
                 "advantages": grpo_advantages(reward, group, ADVANTAGE).astype(np.float32)}
        params, opt_state, metrics = update(params, opt_state, batch)
        assert abs(float(metrics["ratio_mean"]) - 1) < 1e-4      # on-policy: pi_old is the policy
        if seen:
            bound = target_lower_bound(params)
            if bound >= 0.97:
                break
    p_after = np.mean([t == target for t in sample_texts(params, 3000)])
    print(f"actor: target {target!r} (first 32: {counts[target]}/32), P before {p_before:.3f}, "
          f"after {p_after:.3f} in {steps} steps (lower bound {bound:.3f}, {len(seen)} token sequences)")
    assert p_after >= 0.9, (target, p_before, p_after, bound, steps)


# ----------------------------------------------------------------------------- 4. stage 2 sanity

def test_editor_learns_brightness(diffuser):
    """DDPO's first sanity check on the committed Diffuser's U-Net (6 M params): reward = mean
    brightness of the decoded edit, G = 4 stochastic re-denoisings (eta 1) of each of B = 2
    prompts from one inversion, GRPO advantages, `diffusion_ppo_loss` on a random 0.6 of the
    steps (rl.timestep_fraction) replayed through `step_log_probs`, one Adam step per rollout,
    kl_beta 0.

    Settings of the test's own: lr 3e-4 (the stage's 3e-5 would need ~10x the steps) and the
    stage's clip_range 1e-4, which one on-policy update per rollout never reaches (ratio = 1
    at the update, clip_fraction asserted 0). The mean reward of two fixed-noise evaluation
    rollouts must rise by >= 3 of their initial mean within-group standard deviations; as many
    steps on the negated reward (a control) must lower it."""
    d = diffuser
    from rig_jax.rl.rollout import step_log_probs

    settings = DiffusionLossSettings(clip_range=1e-4, kl_beta=0.0)
    optimizer = optax.adam(3e-4)

    def update(unet, opt_state, batch):
        def loss_fn(u):
            logp, _, std = step_log_probs(d.pipe, d.sampler, u, batch, d.uncond)
            return diffusion_ppo_loss(logp, batch["old_logp"], batch["advantages"], batch["step_mask"], None,
                                      std, settings)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(unet)
        updates, opt_state = optimizer.update(grads, opt_state, unet)
        return optax.apply_updates(unet, updates), opt_state, metrics

    update = jax.jit(update)

    def evaluate(unet) -> tuple[float, float]:
        rewards = np.concatenate([d.rollout(unet, jax.random.PRNGKey(10_000 + i))[1] for i in range(2)])
        return float(rewards.mean()), float(rewards.reshape(-1, G).std(axis=1).mean())

    def train(sign: float, max_steps: int, check_every: int) -> tuple[float, int]:
        """Up to `max_steps` rollouts + updates on reward = sign x brightness; the rise (in
        initial within-group stds) of the evaluation mean, checked every `check_every` steps."""
        unet, opt_state = d.params["unet"], optimizer.init(d.params["unet"])
        host_rng = np.random.default_rng(0)
        rise = 0.0
        for step in range(1, max_steps + 1):
            record, reward = d.rollout(unet, jax.random.PRNGKey(step))
            advantages = grpo_advantages(sign * reward, G, ADVANTAGE)
            batch = _stage2_batch(record, advantages, d.timestep_fraction, host_rng)
            unet, opt_state, metrics = update(unet, opt_state, batch)
            assert float(metrics["clip_fraction"]) == 0.0
            if step % check_every == 0 or step == max_steps:
                after = evaluate(unet)[0]
                rise = (after - before) / group_std
                print(f"editor (reward {sign:+g} x brightness) step {step}: mean brightness {before:.4f} -> "
                      f"{after:.4f} (within-group std {group_std:.4f}), rise {rise:+.2f} std")
                if sign > 0 and rise >= 3:
                    return rise, step
        return rise, max_steps

    before, group_std = evaluate(d.params["unet"])
    assert group_std > 0
    rise, steps = train(+1.0, 100, 5)
    assert rise >= 3, (before, group_std, rise, steps)
    # control: as many steps on the opposite reward darken the images, so the rise is the reward's doing
    fall, _ = train(-1.0, steps, steps)
    assert fall < 0, (before, group_std, fall, steps)
