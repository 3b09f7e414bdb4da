"""The VLM judge over a scripted generator, and `make_vlm_generate` against transformers' greedy decoding."""
import json

import numpy as np
import pytest

from rig_jax.data.scene_graph import Item, Relation, SceneGraph
from rig_jax.errors import RigError, WeightsError
from rig_jax.eval.base import JudgeResult
from rig_jax.eval.judge import (
    VLMJudge,
    extraction_prompt,
    parse_extraction,
    parse_verdicts,
    summarize,
    verdict_prompt,
)
from rig_jax.eval.scene_graph_iou import score_record

CUBE, BALL, TABLE = Item(0, "cube", ("red",)), Item(1, "ball", ("blue",)), Item(2, "table", ("wooden",))
GT = SceneGraph((CUBE, BALL, TABLE), (Relation(0, "left of", 1), Relation(1, "on", 2)))
GOOD_EXTRACTION = json.dumps({"scene_graph": [["red cube", "left of", "blue ball"],
                                              ["blue ball", "on", "wooden table"]],
                              "object_list": ["red cube", "blue ball", "wooden table"],
                              "predicate_list": ["left of", "on"]})
GOOD_VERDICTS = '{"verdicts": [{"id": 1, "answer": "yes"}, {"id": 2, "answer": "no"}], "rating": 6}'


class ScriptedVLM:
    """Answers the two judge questions from scripts, one answer per image, and records calls."""

    def __init__(self, extraction_answers, verdict_answers):
        self.answers = {"extract": list(extraction_answers), "verdict": list(verdict_answers)}
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append(len(prompts))
        assert len(images) == len(prompts)
        out = []
        for prompt in prompts:
            kind = "extract" if prompt.startswith("Describe the image as a scene graph") else "verdict"
            out.append(self.answers[kind].pop(0))
        return out


def _images(n):
    return [np.full((32, 32, 3), i / max(n, 1), np.float32) for i in range(n)]


def test_prompts_carry_vocabulary_and_triplets():
    text = extraction_prompt(GT)
    assert '["red cube", "blue ball", "wooden table"]' in text and '["left of", "on"]' in text
    assert '["cube", "ball", "table"]' in extraction_prompt(GT, with_attributes=False)
    text = verdict_prompt(GT)
    assert GT.prompt() in text and '1. ["red cube", "left of", "blue ball"]' in text
    assert '2. ["blue ball", "on", "wooden table"]' in text and "from 1 to 2" in text


def test_good_answers():
    vlm = ScriptedVLM([GOOD_EXTRACTION], [GOOD_VERDICTS])
    [result] = VLMJudge(vlm).judge(_images(1), [GT])
    assert isinstance(result, JudgeResult) and not result.malformed
    assert result.triplet_verdicts == (True, False) and result.judge_score == 0.5 and result.rating == 6.0
    scores = score_record(result.graph, GT)
    assert scores["sg_iou_attr"] == scores["sg_iou_label"] == scores["entity_iou_attr"] == 1.0
    assert GOOD_EXTRACTION in result.raw and GOOD_VERDICTS in result.raw


def test_fenced_messy_answers_are_read_and_mapped_to_ground_truth_spelling():
    extraction = ("Sure!\n```json\n{'Scene_Graph': [['Red Cube', 'LEFT OF', 'blue  ball'], "
                  "['blue ball', 'under', 'wooden table'], ['cat', 'on', 'wooden table'],], "
                  "'Object_List': ['red cube', 'cat', 7], 'predicate_list': ['left of', 'under']}"
                  "\n```\nDone.")
    verdicts = "```\n{\"verdicts\": {\"1\": \"Yes\", \"2\": \"YES\"}, \"rating\": \"9/10\"}\n```"
    [result] = VLMJudge(ScriptedVLM([extraction], [verdicts])).judge(_images(1), [GT])
    assert not result.malformed
    assert result.graph.triplets() == [("red cube", "left of", "blue ball")]
    assert result.graph.triplets(with_attributes=False) == [("cube", "left of", "ball")]
    assert sorted(result.graph.objects()) == ["blue ball", "red cube"]
    assert result.triplet_verdicts == (True, True) and result.rating == 9.0
    assert parse_extraction(extraction, GT).dropped == 5  # 2 triplets, 2 objects, 1 predicate


@pytest.mark.parametrize("extraction,verdicts", [
    ("I see a red cube.", "The cube is left of the ball."),
    ("", ""),
    ("{", "[1, 2"),
    ('{"objects": ["red cube"]}', '{"rating": 11}'),
    ("null", "true"),
])
def test_garbage_is_malformed_and_scores_zero(extraction, verdicts):
    [result] = VLMJudge(ScriptedVLM([extraction], [verdicts])).judge(_images(1), [GT])
    assert result.malformed
    assert result.graph.triplets() == [] and result.graph.objects() == []
    assert result.triplet_verdicts == (None, None) and result.judge_score == 0.0 and result.rating is None
    assert score_record(result.graph, GT)["sg_iou_attr"] == 0.0


def test_partial_answers_keep_what_they_have():
    extraction = '{"scene_graph": [["red cube", "left of", "blue ball"], ["blue ball", "on", "woo'
    verdicts = '{"verdicts": [{"id": 1, "answer": "yes"}, {"id": 2, "ans'
    [result] = VLMJudge(ScriptedVLM([extraction], [verdicts])).judge(_images(1), [GT])
    assert result.graph.triplets() == [("red cube", "left of", "blue ball")]
    assert result.triplet_verdicts == (True, None) and result.judge_score == 0.5
    assert result.rating is None and result.malformed
    parsed = parse_verdicts(verdicts, GT.triplets())
    assert "triplet 2" in parsed.reason and "rating" in parsed.reason


def test_prose_verdicts_fall_back_to_numbered_lines():
    parsed = parse_verdicts("1. yes, the cube is left of the ball\n2. no\nRating: 4", GT.triplets())
    assert parsed.shown == (True, False) and parsed.rating == 4.0 and parsed.malformed


def test_batches_and_summary():
    graphs = [GT] * 5
    vlm = ScriptedVLM([GOOD_EXTRACTION] * 4 + ["garbage"], [GOOD_VERDICTS] * 4 + ["garbage"])
    results = VLMJudge(vlm, batch_size=2).judge(_images(5), graphs)
    assert vlm.calls == [2, 2, 1, 2, 2, 1]
    stats = summarize(results)
    assert stats == {"judge_score": pytest.approx(0.4), "judge_rating": 6.0, "judge_rated": 4.0,
                     "judge_malformed": 1.0, "num_records": 5.0}


def test_errors_are_one_line():
    with pytest.raises(RigError, match="2 images for 1"):
        VLMJudge(ScriptedVLM([], [])).judge(_images(2), [GT])
    with pytest.raises(RigError, match="returned 0 answers for 1"):
        VLMJudge(lambda images, prompts: []).judge(_images(1), [GT])
    with pytest.raises(RigError, match="batch_size"):
        VLMJudge(ScriptedVLM([], []), batch_size=0)


# ---------------------------------------------------------------- the Flax VLM as the generator

@pytest.fixture(scope="module")
def tiny_vlm_folder(tmp_path_factory):
    """A tiny random Qwen2.5-VL (every weight perturbed) with a tokenizer and image processor
    config, in one HF folder."""
    pytest.importorskip("torch")
    from tests.helpers import save_tiny_vlm_folder

    folder = tmp_path_factory.mktemp("tiny_vlm")
    model, fast = save_tiny_vlm_folder(
        folder, ["a red cube left of a blue ball on a wooden table", '{"scene_graph": []}'], vocab_size=320,
        initializer_range=0.2)
    return str(folder), model, fast


def test_make_vlm_generate_matches_transformers_greedy(tiny_vlm_folder):
    import jax.numpy as jnp
    import torch

    from rig_jax.eval.judge import make_vlm_generate
    from rig_jax.vlm.processor import ImageProcessorConfig, prepare_batch

    folder, hf, tokenizer = tiny_vlm_folder
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), rng.random((56, 56, 3)).astype(np.float32)]
    prompts = ["a red cube left of a blue ball", "a wooden table"]
    new_tokens = 6
    ours = make_vlm_generate(folder, max_new_tokens=new_tokens, dtype=jnp.float32, pad_to_multiple_of=16)(
        images, prompts)

    batch = prepare_batch(tokenizer, prompts, [[im] for im in images],
                          ImageProcessorConfig.from_folder(folder))
    ids = torch.tensor(batch["input_ids"]).long()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]).long(),
                          pixel_values=torch.tensor(batch["pixel_values"]),
                          image_grid_thw=torch.tensor(batch["image_grid_thw"]),
                          mm_token_type_ids=(ids == hf.config.image_token_id).long(),
                          max_new_tokens=new_tokens, do_sample=False)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for row in out[:, ids.shape[1]:].tolist():
        row = row[:row.index(stop)] if stop in row else row
        expected.append(tokenizer.decode(row, skip_special_tokens=True))
    assert ours == expected
    assert any(text for text in ours)  # the comparison is not between two empty strings


def test_make_vlm_generate_missing_folder(tmp_path):
    from rig_jax.eval.judge import make_vlm_generate
    with pytest.raises(WeightsError, match="folder not found"):
        make_vlm_generate(str(tmp_path / "nope"))


def test_vlm_pipeline_on_a_mesh(tiny_vlm_folder):
    """load_vlm_pipeline places every leaf with the rules' sharding; the judge's generator runs
    under the mesh and answers exactly as on one device."""
    import types

    import jax
    import jax.numpy as jnp

    from rig_jax.eval.judge import vlm_generate_fn
    from rig_jax.parallel.mesh import make_mesh
    from rig_jax.parallel.rules import DEFAULT_RULES, param_shardings
    from rig_jax.vlm.pipeline import load_vlm_pipeline
    from rig_jax.weights.mapping import flatten
    from rig_jax.weights.qwen2_5_vl import qwen_vl_boxed_params

    folder = tiny_vlm_folder[0]
    mesh = make_mesh(types.SimpleNamespace(shape=(2, 2, 2)))
    pipe, params = load_vlm_pipeline(folder, jnp.float32, mesh=mesh, rules=DEFAULT_RULES)
    want = flatten(param_shardings(qwen_vl_boxed_params(pipe.model), mesh, DEFAULT_RULES))
    got = flatten(params)
    assert set(got) == set(want)
    assert all(isinstance(leaf, jax.Array) and leaf.sharding == want[path] for path, leaf in got.items())
    assert any(any(axis is not None for axis in s.spec) for s in want.values())

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)]
    prompts = ["a red cube left of a blue ball"]
    host_pipe, host_params = load_vlm_pipeline(folder, jnp.float32)
    on_mesh = vlm_generate_fn(pipe, params, 5, 16, mesh=mesh, rules=DEFAULT_RULES)(images, prompts)
    assert on_mesh == vlm_generate_fn(host_pipe, host_params, 5, 16)(images, prompts)
