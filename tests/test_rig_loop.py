"""The Checker, the Actor and Generate-Reflect-Edit on the committed ShapesSG models (CPU).

The ShapesSG Checker is read on renders it must get right; the VLM Checker and the Actor run
the committed Actor folder (float32) end to end; the loop runs the committed Diffuser and
Editor at 4 DDIM steps with scripted Checkers that fix when each prompt stops."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rig_jax.data import shapes
from rig_jax.data.scene_graph import Item, SceneGraph
from rig_jax.diffusion.settings import EditSettings, InversionSettings, NullTextSettings, SamplerSettings
from rig_jax.errors import ConfigError, RigError
from rig_jax.rig.actor import GRID_KEY, ActorSettings, VLMActor, token_logprobs
from rig_jax.rig.checker import ShapesChecker, VLMChecker, VLMCheckerSettings, check_result
from rig_jax.rig.loop import Models, RoundSettings, generate_reflect_edit
from rig_jax.vlm import decode, prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTOR_DIR = os.path.join(ROOT, "pretrained", "shapes_sg", "actor")
DIFFUSER_DIR = os.path.join(ROOT, "pretrained", "shapes_sg", "diffuser")
BATCH = 4
S, V = prompts.Verdict.SATISFIED, prompts.Verdict.VIOLATED


def _read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


WORLD = shapes.ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in _read(DIFFUSER_DIR, "shapes_config.json")["world"].items()})


def graph(c1, s1, pred, c2, s2, pred2=None, c3=None, s3=None):
    """A prompt graph of two (or three) coloured shapes in a chain."""
    items = [Item(0, s1, (c1,)), Item(1, s2, (c2,))] + ([Item(2, s3, (c3,))] if c3 else [])
    triplets = [(items[0], pred, items[1])] + ([(items[1], pred2, items[2])] if c3 else [])
    return SceneGraph.from_triplets(triplets)


# one template, different colours: every question of the loop tests has one token length
GRAPHS = [graph("red", "circle", "left of", "blue", "square"),
          graph("green", "circle", "left of", "yellow", "square"),
          graph("magenta", "circle", "left of", "cyan", "square"),
          graph("blue", "circle", "left of", "red", "square")]


@pytest.fixture(scope="module")
def vlm():
    from rig_jax.vlm.pipeline import load_vlm_pipeline
    return load_vlm_pipeline(ACTOR_DIR, dtype=jnp.float32)


@pytest.fixture(scope="module")
def actor(vlm):
    tau = _read(ACTOR_DIR, "generation_config.json")["temperature"]
    return VLMActor(vlm[0], ActorSettings(temperature=tau, max_new_tokens=32))


@pytest.fixture(scope="module")
def sd():
    from rig_jax.weights.diffusers_pipeline import load_pipeline
    return load_pipeline(DIFFUSER_DIR)


@pytest.fixture(scope="module")
def models(sd, vlm, actor):
    defaults = _read(DIFFUSER_DIR, "shapes_config.json")["sampler"]
    sampler = SamplerSettings(**{**defaults, "num_steps": 4})
    edit = EditSettings(0.5, sampler, InversionSettings(1.0, 0), NullTextSettings(False, 0, 0.0, 0.0, 0.0))
    pipe, params = sd
    return Models(pipe, params, params, sampler, edit, ScriptedChecker(lambda g, k: [V] * len(g.relations)),
                  actor, vlm[1])


def renders(graphs):
    """Images that satisfy each two-object graph: the first object left of the second."""
    out = []
    for g in graphs:
        (a, b) = g.items
        objs = (shapes.SceneObject(a.label, a.attributes[0], (3, 12, 9, 9)),
                shapes.SceneObject(b.label, b.attributes[0], (19, 12, 9, 9)))
        out.append(shapes.render(shapes.Scene(objs, 32)))
    return np.stack(out)


class ScriptedChecker:
    """Verdicts `script(graph, k)` for the k-th check of each prompt; counts calls."""
    name = "scripted"

    def __init__(self, script, is_vlm=False):
        self.script, self.is_vlm, self.seen = script, is_vlm, {}

    def check(self, images, graphs):
        assert len(images) == len(graphs) <= BATCH
        out = []
        for g in graphs:
            k = self.seen[g.prompt()] = self.seen.get(g.prompt(), -1) + 1
            out.append(check_result(g, prompts.CheckerVerdicts(tuple(self.script(g, k)))))
        return out


class SpyActor(VLMActor):
    def __init__(self, actor):
        super().__init__(actor.pipe, actor.settings)
        self.calls = []

    def propose(self, params, images, graphs, feedbacks, rng, num_samples=1, greedy=False):
        self.calls.append((len(graphs), num_samples, greedy))
        return super().propose(params, images, graphs, feedbacks, rng, num_samples, greedy)


# ----------------------------------------------------------------------------- Checkers

def test_shapes_checker_reads_true_broken_and_missing_scenes():
    world3 = shapes.ShapesConfig(min_objects=3, max_objects=3)
    scene = shapes.generate_scene(np.random.default_rng(3), world3)
    g = shapes.scene_graph(scene)
    checker = ShapesChecker(world3)
    a, b, c = scene.objects
    swapped = shapes.Scene((shapes.SceneObject(a.shape, a.colour, b.box),
                            shapes.SceneObject(b.shape, b.colour, a.box), c), 32)
    dropped = shapes.Scene((a, b), 32)
    true, broken, missing = checker.check(np.stack([shapes.render(s) for s in (scene, swapped, dropped)]),
                                          [g, g, g])
    triplets = tuple(g.triplets(with_attributes=True))
    assert true.triplets == triplets and true.all_satisfied and true.score == 1.0
    assert broken.verdicts.verdicts[0] is V and broken.score < 1 and not broken.all_satisfied
    assert f"1. {' '.join(triplets[0])}: violated" in broken.feedback
    assert missing.verdicts.verdicts == (S, prompts.Verdict.MISSING) and missing.score == 0.5
    assert f"2. {' '.join(triplets[1])}: object missing" in missing.feedback
    with pytest.raises(RigError, match="images"):
        checker.check(np.zeros((2, 32, 32, 3)), [g])


def test_vlm_checker_gives_one_flagged_result_per_image(vlm):
    pipe, params = vlm
    checker = VLMChecker(pipe, params, VLMCheckerSettings(max_new_tokens=4, batch_size=BATCH))
    images = renders(GRAPHS[:3])       # 3 images: the decoder's chunk is padded to 4 rows
    results = checker.check(images, GRAPHS[:3])
    assert len(results) == 3 and checker.is_vlm
    for r, g in zip(results, GRAPHS, strict=False):
        assert r.triplets == tuple(g.triplets(with_attributes=True))
        assert len(r.verdicts.verdicts) == len(r.triplets) and 0.0 <= r.score <= 1.0
        assert r.verdicts.malformed and "max_new_tokens" in r.verdicts.reason   # 4 tokens cannot finish
    with pytest.raises(ConfigError, match="batch_size"):
        VLMCheckerSettings(max_new_tokens=4, batch_size=0)


# ----------------------------------------------------------------------------- Actor

def violated_feedback(g):
    return check_result(g, prompts.CheckerVerdicts((V,) * len(g.relations))).feedback


def test_actor_samples_grouped_rows_and_token_logprobs_match(vlm, actor):
    pipe, params = vlm
    graphs, group = GRAPHS[:2], 2
    out = actor.propose(params, renders(graphs), graphs, [violated_feedback(g) for g in graphs],
                        jax.random.PRNGKey(3), num_samples=group)
    n, t = 4, actor.settings.max_new_tokens
    assert len(out.texts) == len(out.edits) == n
    assert out.tokens.shape == (n, t) and out.tokens.dtype == np.int32
    assert out.valid.shape == (n, t) and out.valid.dtype == bool
    assert out.policy_logprobs.dtype == np.float32 and np.all(out.policy_logprobs[~out.valid] == 0)
    assert np.all(out.policy_logprobs[out.valid] < 0)
    b = out.batch
    length = b["input_ids"].shape[1]
    assert b["attention_mask"].shape == (n, length) and b["position_ids"].shape == (n, 3, length)
    assert b["rope_deltas"].shape == (n,) and b["pixel_values"].shape == (n, 16, 3 * 2 * 8 * 8)
    for key in ("input_ids", "pixel_values"):       # row i * G + g asks input i
        np.testing.assert_array_equal(b[key][0], b[key][1])
        np.testing.assert_array_equal(b[key][2], b[key][3])
        assert not np.array_equal(b[key][0], b[key][2])
    for row, keep, edit in zip(out.tokens, out.valid, out.edits, strict=True):
        k = int(keep.sum())
        assert keep[:k].all() and not keep[k:].any()           # valid is a prefix
        if edit.well_formed:
            assert row[k - 1] in pipe.stop_token_ids
    assert sum(e.well_formed for e in out.edits) >= 3           # the committed Actor answers in format

    grid = b[GRID_KEY]
    arrays = {k: v for k, v in b.items() if k != GRID_KEY}
    tau = actor.settings.temperature

    def total(p, arrays, tokens, valid):
        logp = token_logprobs(pipe, p, {**arrays, GRID_KEY: grid}, tokens, valid, tau)
        return jnp.sum(logp), logp

    (_, logp), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params, arrays, out.tokens, out.valid)
    np.testing.assert_allclose(np.asarray(logp), out.policy_logprobs, atol=1e-4, rtol=0)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(grads))
    mixed = {**b, GRID_KEY: np.concatenate([grid[:1] * [1, 2, 1], grid[1:]])}
    with pytest.raises(RigError, match="one patch grid"):
        token_logprobs(pipe, params, mixed, out.tokens, out.valid, tau)
    with pytest.raises(RigError, match="host data"):
        jax.jit(lambda batch: token_logprobs(pipe, params, batch, out.tokens, out.valid, tau))(b)


def test_settings_refuse_bad_fields():
    for kwargs, field in (({"temperature": 0.0, "max_new_tokens": 8}, "temperature"),
                          ({"temperature": 1.0, "max_new_tokens": 0}, "max_new_tokens"),
                          ({"temperature": 1.0, "max_new_tokens": 8, "top_p": 0.0}, "top_p")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            ActorSettings(**kwargs)
    for kwargs, field in (({"final": "first"}, "final"), ({"batch_size": 0}, "batch_size"),
                          ({"max_rounds": -1}, "max_rounds")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            RoundSettings(**kwargs)


# ----------------------------------------------------------------------------- the loop

def test_loop_stops_after_round_zero_when_all_satisfied(models):
    spy = SpyActor(models.actor)
    checker = ScriptedChecker(lambda g, k: [S] * len(g.relations))
    records = generate_reflect_edit(
        Models(**{**vars(models), "checker": checker, "actor": spy}), GRAPHS[:3], jax.random.PRNGKey(0),
        RoundSettings(max_rounds=3, batch_size=BATCH))
    assert len(records) == 3 and not spy.calls
    for r, g in zip(records, GRAPHS, strict=False):
        assert r.graph == g and len(r.rounds) == 1 and r.rounds_used == 0 and r.unet_generations == 1
        assert r.rounds[0].edit_prompt is None and r.final_check.score == 1.0 and r.vlm_calls == 0
        image = r.final_image
        assert image.shape == (32, 32, 3) and image.dtype == np.float32
        assert 0 <= image.min() <= image.max() <= 1
        assert r.rounds[0].seconds > 0          # the Diffuser's time is counted
    with pytest.raises(ConfigError, match=r"^models\.actor"):
        generate_reflect_edit(Models(**{**vars(models), "actor": None}), GRAPHS[:1], jax.random.PRNGKey(0),
                              RoundSettings(batch_size=BATCH))


def test_empty_edit_never_calls_the_actor_and_best_picks_the_highest_score(models):
    three = [graph("red", "circle", "left of", "blue", "square", "above", "green", "triangle"),
             graph("cyan", "circle", "left of", "yellow", "square", "above", "magenta", "triangle")]
    plans = {three[0].prompt(): [(V, V), (S, V), (V, V)], three[1].prompt(): [(S, V), (V, V), (V, S)]}
    spy = SpyActor(models.actor)
    images = renders(GRAPHS[:2])
    got = {}
    for final in ("best", "last"):
        checker = ScriptedChecker(lambda g, k: plans[g.prompt()][k])
        m = Models(**{**vars(models), "checker": checker, "actor": spy})
        got[final] = generate_reflect_edit(m, three, jax.random.PRNGKey(1),
                                           RoundSettings(max_rounds=2, final=final, batch_size=BATCH,
                                                         empty_edit=True), initial_images=images)
    assert not spy.calls
    best, last = got["best"], got["last"]
    assert [r.final_index for r in best] == [1, 0]       # prompt 1 ties 0.5 at rounds 0 and 2: earliest
    assert [r.final_index for r in last] == [2, 2]
    assert [r.final_check.score for r in best] == [0.5, 0.5]
    for r in best:
        assert [x.edit_prompt for x in r.rounds] == ["", "", None]
        want = [sum(v is S for v in p) / 2 for p in plans[r.graph.prompt()]]
        assert [x.check.score for x in r.rounds] == want
        assert r.unet_generations == 3 and r.rounds_used == 2 and r.vlm_calls == 0
    np.testing.assert_array_equal(best[0].rounds[0].image, images[0])
    assert not np.array_equal(best[0].rounds[1].image, images[0])                # the Editor ran
    np.testing.assert_array_equal(best[0].rounds[1].image, last[0].rounds[1].image)  # same rng, same edit


def _compiled(models):
    """Jit cache entries of the Diffuser / Editor programs and of the decoder."""
    sizes = {k: f._cache_size() for k, f in models.diffuser_pipe.jit_cache.items()}
    return sizes, decode._generate._cache_size()


def test_shrinking_active_set_compiles_nothing_new_and_records_every_round(models):
    spy = SpyActor(models.actor)
    rng = jax.random.PRNGKey(2)
    warm = Models(**{**vars(models), "actor": spy})
    generate_reflect_edit(warm, GRAPHS, rng, RoundSettings(max_rounds=1, batch_size=BATCH))
    before = _compiled(models)
    spy.calls.clear()
    # prompt i is satisfied from its i-th check on: 4, 3, 2, 1 prompts active
    order = {g.prompt(): i for i, g in enumerate(GRAPHS)}
    checker = ScriptedChecker(lambda g, k: [S if k >= order[g.prompt()] else V], is_vlm=True)
    records = generate_reflect_edit(Models(**{**vars(warm), "checker": checker}), GRAPHS, rng,
                                    RoundSettings(max_rounds=3, batch_size=BATCH))
    assert _compiled(models) == before
    assert spy.calls == [(BATCH, 1, False)] * 3            # every chunk padded to the bucket
    for i, r in enumerate(records):
        assert len(r.rounds) == i + 1 and r.rounds_used == i and r.unet_generations == i + 1
        assert r.final_index == i and r.final_check.all_satisfied
        assert all(isinstance(x.edit_prompt, str) for x in r.rounds[:-1]) and r.rounds[-1].edit_prompt is None
        assert r.vlm_calls == (i + 1) + i                  # checks (a VLM here) + Actor calls
        assert all(x.seconds > 0 for x in r.rounds)
