"""Checker / Actor templates and their lenient answer readers."""
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rig_jax.vlm.lenient_json import loads_lenient
from rig_jax.vlm.prompts import (
    CheckerVerdicts,
    EditPrompt,
    Verdict,
    actor_prompt,
    checker_prompt,
    checker_score,
    format_checker_feedback,
    parse_checker_answer,
    parse_edit_prompt,
    parse_verdict,
    render_checker_answer,
    render_edit_prompt,
)

TRIPLETS = [("red cube", "left of", "blue ball"), ("blue ball", "on", "table"), ("cat", "under", "table")]
S, V, M = Verdict.SATISFIED, Verdict.VIOLATED, Verdict.MISSING


# ---------------------------------------------------------------- templates

def test_checker_prompt_lists_every_triplet_and_asks_for_json():
    text = checker_prompt("red cube left of blue ball; blue ball on table; cat under table", TRIPLETS)
    for i, t in enumerate(TRIPLETS, start=1):
        assert f"{i}. {json.dumps(list(t))}" in text
    assert '"verdicts"' in text and '"scene_graph"' in text and "from 1 to 3" in text
    assert "{prompt}" not in text and "{{" not in text


def test_actor_prompt_carries_feedback():
    verdicts = CheckerVerdicts((S, V, None), (("red cube", "left of", "blue ball"),))
    feedback = format_checker_feedback(TRIPLETS, verdicts)
    assert "2. blue ball on table: violated" in feedback and "3. cat under table: unknown" in feedback
    assert "The image shows: red cube left of blue ball" in feedback
    text = actor_prompt("the prompt", feedback, max_words=25)
    assert feedback in text and '{"edit_prompt": "your instruction"}' in text and "25 words" in text


# ---------------------------------------------------------------- Checker answers

def test_clean_answer():
    graph = [("red cube", "left of", "blue ball")]
    parsed = parse_checker_answer(render_checker_answer([S, V, M], graph), TRIPLETS)
    assert parsed == CheckerVerdicts((S, V, M), tuple(graph), malformed=False, reason="")
    assert checker_score(parsed) == pytest.approx(1 / 3)


@pytest.mark.parametrize("answer", [
    # code fence with prose around it
    'Here is my answer:\n```json\n{"verdicts": [{"id": 1, "verdict": "satisfied"}, {"id": 2, "verdict": '
    '"violated"}, {"id": 3, "verdict": "object missing"}], "scene_graph": []}\n```\nHope this helps.',
    # single quotes, trailing commas, wrong case, Python literals
    "{'Verdicts': [{'ID': 1, 'Verdict': 'SATISFIED'}, {'id': 2, 'verdict': False}, "
    "{'id': 3, 'verdict': 'Object_Missing',},], 'Scene Graph': [],}",
    # ids as keys, underscores
    '{"verdicts": {"1": "satisfied", "2": "not satisfied", "3": "missing"}, "scene_graph": []}',
    # matched by triplet text, out of order
    '{"verdicts": [{"triplet": ["cat", "under", "table"], "verdict": "object missing"}, '
    '{"triplet": "Red cube left of blue ball", "verdict": "yes"}, '
    '{"triplet": ["blue ball", "on", "table"], "verdict": "no"}], "scene_graph": []}',
    # positional strings, 0-based ids elsewhere are not needed
    '{"verdicts": ["satisfied", "violated", "object missing"], "scene_graph": []}',
    # 0-based ids
    '{"verdicts": [{"id": 0, "verdict": "satisfied"}, {"id": 1, "verdict": "violated"}, '
    '{"id": 2, "verdict": "object missing"}], "scene_graph": []}',
])
def test_messy_but_complete_answers(answer):
    parsed = parse_checker_answer(answer, TRIPLETS)
    assert parsed.verdicts == (S, V, M)
    assert not parsed.malformed, parsed.reason


def test_truncated_answer_keeps_what_it_has():
    answer = ('{"verdicts": [{"id": 1, "verdict": "satisfied"}, {"id": 2, "verdict": "violated"}, '
              '{"id": 3, "verd')
    parsed = parse_checker_answer(answer, TRIPLETS)
    assert parsed.verdicts == (S, V, None)
    assert parsed.malformed and "triplet 3" in parsed.reason and "scene_graph" in parsed.reason
    assert checker_score(parsed) == pytest.approx(1 / 3)


def test_prose_answer_with_numbered_lines():
    answer = "1. The cube is left of the ball: satisfied\n2) violated, the ball is on the floor\n3 - no cat."
    parsed = parse_checker_answer(answer, TRIPLETS)
    assert parsed.verdicts == (S, V, V)
    assert parsed.malformed and "no JSON" in parsed.reason


@pytest.mark.parametrize("answer", ["", "I cannot tell.", "{", "[1, 2", '{"verdicts": 5}', "null", "```"])
def test_garbage_is_malformed_and_scores_zero(answer):
    parsed = parse_checker_answer(answer, TRIPLETS)
    assert parsed.malformed and parsed.reason
    assert parsed.verdicts == (None, None, None)
    assert checker_score(parsed) == 0.0


def test_scene_graph_entries_in_both_forms_and_bad_ones_flagged():
    answer = json.dumps({"verdicts": ["yes", "yes", "yes"], "scene_graph": [
        ["cat", "on", "mat"], {"subject": "dog", "predicate": "near", "object": "cat"}, ["only two", "x"]]})
    parsed = parse_checker_answer(answer, TRIPLETS)
    assert parsed.scene_graph == (("cat", "on", "mat"), ("dog", "near", "cat"))
    assert parsed.malformed and "scene_graph" in parsed.reason
    assert checker_score(parsed) == 1.0


def test_verdict_words():
    assert parse_verdict("Not satisfied.") is V
    assert parse_verdict("object-missing") is M
    assert parse_verdict(" SATISFIED ") is S
    assert parse_verdict("satisfied or violated") is None
    assert parse_verdict(3) is None


def test_no_triplets_scores_zero():
    assert checker_score(parse_checker_answer(render_checker_answer([]), [])) == 0.0


# ---------------------------------------------------------------- Actor answers

@pytest.mark.parametrize("answer,text,well_formed", [
    ('{"edit_prompt": "move the cube left of the ball"}', "move the cube left of the ball", True),
    ('```json\n{"edit_prompt": "add a cat under the table"}\n```', "add a cat under the table", True),
    ('Sure: {"edit_prompt": "add a cat"} done', "add a cat", False),
    ("{'edit_prompt': 'add a cat',}", "add a cat", False),
    ('{"Edit Prompt": "add a cat"}', "add a cat", False),
    ('{"edit_prompt": "add a cat", "reason": "missing"}', "add a cat", False),
    ('{"edit_prompt": "add a ca', "add a ca", False),
    ("Add a cat under the table.", "Add a cat under the table.", False),
    ('edit_prompt: "put the ball on the table"', "put the ball on the table", False),
    ('{"edit_prompt": ""}', "", False),
    ('{"reason": "all fine"}', "", False),
    ("", "", False),
])
def test_edit_prompts(answer, text, well_formed):
    parsed = parse_edit_prompt(answer)
    assert parsed == EditPrompt(text, well_formed)


def test_edit_prompt_word_limit():
    long = " ".join(["word"] * 41)
    assert parse_edit_prompt(render_edit_prompt(long)) == EditPrompt(long, False)
    assert parse_edit_prompt(render_edit_prompt(long), max_words=None).well_formed


# ---------------------------------------------------------------- properties

_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: s.strip() == s and s.strip())
_triplets = st.tuples(_names, _names, _names)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400), st.lists(_triplets, max_size=4))
def test_readers_never_raise(text, triplets):
    parsed = parse_checker_answer(text, triplets)
    assert len(parsed.verdicts) == len(triplets)
    assert 0.0 <= checker_score(parsed) <= 1.0
    edit = parse_edit_prompt(text)
    assert isinstance(edit.text, str) and isinstance(edit.well_formed, bool)


_jsonish = st.text(alphabet='{}[]",:\'0123456789 truefalsnul\n`verdictsidscene_graph', max_size=300)


@settings(max_examples=300, deadline=None)
@given(_jsonish, st.lists(_triplets, max_size=3))
def test_readers_never_raise_on_json_like_noise(text, triplets):
    parse_checker_answer(text, triplets)
    parse_edit_prompt(text)
    loads_lenient(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_triplets, st.sampled_from(list(Verdict))), min_size=1, max_size=5),
       st.lists(_triplets, max_size=4), st.sampled_from(["", "Answer:\n```json\n{}\n```", "{} Done."]))
def test_checker_round_trip(pairs, graph, wrapper):
    triplets = [t for t, _ in pairs]
    verdicts = tuple(v for _, v in pairs)
    answer = render_checker_answer(verdicts, graph)
    if wrapper:
        answer = wrapper.replace("{}", answer)
    parsed = parse_checker_answer(answer, triplets)
    assert parsed.verdicts == verdicts
    assert parsed.scene_graph == tuple(graph)
    assert not parsed.malformed


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=30),
       st.integers(1, 10))
def test_edit_round_trip(word, repeat):
    text = " ".join([word] * repeat)
    assert parse_edit_prompt(render_edit_prompt(text)) == EditPrompt(text, True)


def test_garbage_costs_bounded_time():
    for garbage in ["[" * 16000, "{'a': " * 3000, '{"x": [' * 2000 + '"', "{" + "1," * 8000]:
        start = time.perf_counter()
        parse_checker_answer(garbage, TRIPLETS)
        parse_edit_prompt(garbage)
        assert time.perf_counter() - start < 2.0
