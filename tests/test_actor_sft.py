"""The ShapesSG Actor: its tokenizer and chat template through transformers, the SFT data
(detector-Checker feedback, answers in every form, exact resume of the data stream), a few
`actor_tiny` steps through the one train loop, and the exported folder read by the VLM loader."""
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_train.py")


def _config(variant="actor_tiny"):
    from rig_jax.config import load_config_file
    return load_config_file(f"{CONFIG}:{variant}")


def _settings(config):
    from rig_jax.jobs.shapes_actor import ExampleSettings
    from rig_jax.jobs.shapes_diffuser import world_from_config

    return ExampleSettings(world_from_config(config.world), tuple(config.actor.forms),
                           tuple(config.actor.corruption_weights))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from rig_jax.jobs.shapes_actor import tokenizer_folder

    workdir = str(tmp_path_factory.mktemp("actor_tok"))
    return tokenizer_folder(workdir, _settings(_config()), 0, 1024)


def test_tokenizer_round_trips_through_transformers_and_renders_the_chat(tokenizer_dir):
    from transformers import AutoTokenizer

    from rig_jax.jobs import actor_text
    from rig_jax.jobs.shapes_actor import example_at
    from rig_jax.vlm.processor import IMAGE_TOKEN, build_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert tok.eos_token == actor_text.IM_END and tok.pad_token == actor_text.PAD
    for special in actor_text.SPECIAL_TOKENS:          # each special is one token
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    ex = example_at(0, 3, _settings(_config()))
    for text in (ex.question, ex.answer, "Ünïcode 123 {'x': [1, 2]} never seen"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
    assert len(answer_ids) <= 16                       # every world word is one token
    chat = build_prompt(tok, ex.question)
    image = f"{actor_text.VISION_START}{IMAGE_TOKEN}{actor_text.VISION_END}"
    assert chat == (f"{actor_text.IM_START}user\n{image}{ex.question}{actor_text.IM_END}\n"
                    f"{actor_text.IM_START}assistant\n")
    assert len(tok(chat, add_special_tokens=False)["input_ids"]) <= 160


def test_examples_carry_detector_feedback_and_one_form_of_the_fix():
    from rig_jax.data import shapes
    from rig_jax.jobs.shapes_actor import checker_verdicts, example_at, valid_answers
    from rig_jax.vlm import prompts

    settings = _settings(_config())
    world = settings.world
    scene = shapes.generate_scene(np.random.default_rng(5), world)
    graph = shapes.scene_graph(scene)
    clean = checker_verdicts(shapes.render(scene, world), graph, world)
    assert set(clean.verdicts) == {prompts.Verdict.SATISFIED}
    forms, kinds = set(), set()
    for i in range(60):
        ex = example_at(0, i, settings)
        assert ex.bad_triplets and prompts.parse_edit_prompt(ex.answer).well_formed
        assert prompts.parse_edit_prompt(ex.answer).text in valid_answers(ex, settings.forms)
        assert ex.question == prompts.actor_prompt(ex.prompt, ex.feedback)
        forms.add(ex.form)
        kinds.add("violated" if ": violated" in ex.feedback else "missing")
    assert kinds == {"violated", "missing"} and len(forms) >= 5
    assert len(valid_answers(ex, settings.forms)) == 6  # one relation: restate == whole
    again = example_at(0, 7, settings)
    assert again.answer == example_at(0, 7, settings).answer       # (seed, index) fixes it


def test_sft_data_stream_resumes_exactly(tokenizer_dir):
    from rig_jax.jobs.shapes_actor import Encoder, preprocessor_config_dict, sft_dataset
    from rig_jax.vlm.pipeline import load_tokenizer
    from rig_jax.vlm.processor import ImageProcessorConfig

    config = _config()
    settings = _settings(config)
    image_config = ImageProcessorConfig.from_dict(preprocessor_config_dict(config.actor, 32))
    encoder = Encoder(load_tokenizer(tokenizer_dir), image_config, config.actor.max_prompt_tokens,
                      config.actor.max_answer_tokens, 32)
    it = iter(sft_dataset(settings, encoder, 0, 4))
    next(it)
    state = it.get_state()
    want = next(it)
    resumed = iter(sft_dataset(settings, encoder, 0, 4))
    resumed.set_state(json.loads(json.dumps(state)))
    got = next(resumed)
    assert set(got) == {"input_ids", "attention_mask", "position_ids", "pixel_values", "labels", "label_mask"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    lp = config.actor.max_prompt_tokens
    assert got["input_ids"].shape == (4, lp + config.actor.max_answer_tokens)
    assert got["pixel_values"].shape == (4, 16, 3 * 2 * 8 * 8)     # 32 px in 8 px patches
    # the answer slots' positions continue the question's M-RoPE positions
    assert np.all(got["position_ids"][:, :, lp] == got["position_ids"][:, :, lp - 1].max(axis=1)[:, None] + 1)


def test_actor_tiny_sft_loss_falls_and_the_export_loads(tmp_path):
    import jax
    import jax.numpy as jnp

    from rig_jax.jobs import job_builder
    from rig_jax.jobs.shapes_actor import example_at
    from rig_jax.parallel.mesh import mesh_context
    from rig_jax.train.loop import LoopSettings, run_training
    from rig_jax.vlm import prompts
    from rig_jax.vlm.decode import generate
    from rig_jax.vlm.pipeline import load_vlm_pipeline
    from rig_jax.vlm.processor import prepare_batch

    config = _config()
    workdir = str(tmp_path)
    with mesh_context(config) as (mesh, rules):
        job = job_builder(config.job)(config, workdir, mesh, rules)
        state, last = run_training(job, LoopSettings(total_steps=30, log_every=1, checkpoint_every=1000,
                                                     progress=False), workdir, mesh, rules, 0)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    for key in ("well_formed", "distinct_ge3", "mean_distinct", "valid_edit", "stopped"):
        assert 0.0 <= last[f"eval/{key}"] <= 8.0
    folder = os.path.join(workdir, "actor")
    pipe, params = load_vlm_pipeline(folder, dtype=jnp.float32)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["temperature"] == config.actor.temperature
    with open(os.path.join(folder, "shapes_config.json")) as f:
        record = json.load(f)
    assert record["eval"]["seed"] == config.eval.seed and record["trained_steps"] == 30
    ex = [example_at(config.eval.seed, i, _settings(config)) for i in range(2)]
    batch = prepare_batch(pipe.tokenizer, [e.question for e in ex], [[e.image] for e in ex],
                          pipe.image_config)
    out = generate(pipe.model, params, batch, jax.random.PRNGKey(0), 8, greedy=True,
                   stop_token_ids=pipe.stop_token_ids, pad_id=pipe.pad_id)
    texts = pipe.tokenizer.batch_decode(np.asarray(out["tokens"]), skip_special_tokens=True)
    # 30 tiny steps already open the answer the way it was taught
    assert all(t.startswith('{"') for t in texts), texts
    assert all(isinstance(prompts.parse_edit_prompt(t), prompts.EditPrompt) for t in texts)
