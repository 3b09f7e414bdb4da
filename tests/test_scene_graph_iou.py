"""SG-IoU / Entity-IoU / Relation-IoU: hand-computed cases and hypothesis properties."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rig_jax.data.scene_graph import EMPTY_GRAPH, Item, Relation, SceneGraph
from rig_jax.errors import DataError
from rig_jax.eval.scene_graph_iou import (
    METRIC_KEYS,
    entity_iou,
    iou,
    relation_iou,
    score_dataset,
    score_record,
    sg_iou,
)

RED_CIRCLE = Item(0, "circle", ("red",))
BLUE_CIRCLE = Item(1, "circle", ("blue",))
BLUE_SQUARE = Item(2, "square", ("blue",))
GREEN_TRIANGLE = Item(3, "triangle", ("green",))


def graph(*triplets, extra=()):
    return SceneGraph.from_triplets(triplets, extra_items=extra)


# ----------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize("a, b, expected", [
    ([], [], 0.0),                                    # both empty: 0 by method.md's rule
    ([], ["a"], 0.0),                                 # one side empty
    (["a"], [], 0.0),
    (["a", "b"], ["b", "a"], 1.0),                    # order does not matter
    (["a", "a", "b"], ["a", "b", "b", "b"], 1.0),     # duplicates do not matter
    (["a", "b"], ["b", "c"], 1 / 3),
    (["a", "b", "c", "d"], ["a", "b", "e"], 2 / 5),
    (["a", "b", "c"], ["a"], 1 / 3),
    (["x"], ["y"], 0.0),
    ([("a", "left of", "b")], [("b", "left of", "a")], 0.0),   # tuples: direction matters
])
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=0, rel=1e-15)


def test_triplet_direction_matters_only_for_sg_iou():
    gt = graph((RED_CIRCLE, "left of", BLUE_SQUARE))
    pred = graph((BLUE_SQUARE, "left of", RED_CIRCLE))
    for form in (True, False):
        assert sg_iou(pred, gt, form) == 0.0
        assert entity_iou(pred, gt, form) == 1.0
        assert relation_iou(pred, gt, form) == 1.0


def test_bare_labels_collapse_two_items_into_one_string():
    gt = graph((RED_CIRCLE, "left of", BLUE_CIRCLE))          # "red circle", "blue circle"
    pred = graph((BLUE_CIRCLE, "left of", RED_CIRCLE))
    assert sg_iou(pred, gt, with_attributes=True) == 0.0
    # bare: both are ("circle", "left of", "circle")
    assert sg_iou(pred, gt, with_attributes=False) == 1.0
    green = SceneGraph((Item(7, "circle", ("green",)),), ())
    assert entity_iou(green, gt, with_attributes=True) == 0.0   # {green circle} vs {red, blue circle}
    assert entity_iou(green, gt, with_attributes=False) == 1.0  # {circle} vs {circle}


def test_partial_overlap_of_graphs():
    gt = graph((RED_CIRCLE, "left of", BLUE_SQUARE), (BLUE_SQUARE, "above", GREEN_TRIANGLE))
    pred = graph((RED_CIRCLE, "left of", BLUE_SQUARE), (BLUE_SQUARE, "below", GREEN_TRIANGLE),
                 (GREEN_TRIANGLE, "right of", RED_CIRCLE))
    assert sg_iou(pred, gt) == pytest.approx(1 / 4)            # 1 shared of 4 distinct triplets
    assert entity_iou(pred, gt) == 1.0
    assert relation_iou(pred, gt) == pytest.approx(1 / 4)  # {left of} of 4 predicates
    # an extra item that is in no relation still counts as an entity
    pred_extra = graph((RED_CIRCLE, "left of", BLUE_SQUARE), extra=(Item(9, "star", ("pink",)),))
    gt_small = graph((RED_CIRCLE, "left of", BLUE_SQUARE))
    assert entity_iou(pred_extra, gt_small) == pytest.approx(2 / 3)
    assert sg_iou(pred_extra, gt_small) == 1.0


def test_empty_graphs_score_zero():
    gt = graph((RED_CIRCLE, "left of", BLUE_SQUARE))
    assert all(v == 0.0 for v in score_record(EMPTY_GRAPH, gt).values())
    assert all(v == 0.0 for v in score_record(EMPTY_GRAPH, EMPTY_GRAPH).values())


def test_score_record_and_dataset_means():
    gt1 = graph((RED_CIRCLE, "left of", BLUE_CIRCLE))
    pred1 = graph((BLUE_CIRCLE, "left of", RED_CIRCLE))
    gt2 = graph((RED_CIRCLE, "left of", BLUE_SQUARE), (BLUE_SQUARE, "above", GREEN_TRIANGLE))
    pred2 = graph((RED_CIRCLE, "left of", BLUE_SQUARE))
    r1, r2 = score_record(pred1, gt1), score_record(pred2, gt2)
    assert set(r1) == set(METRIC_KEYS) and len(METRIC_KEYS) == 6
    assert r1 == {"sg_iou_attr": 0.0, "sg_iou_label": 1.0, "entity_iou_attr": 1.0,
                  "entity_iou_label": 1.0, "relation_iou_attr": 1.0, "relation_iou_label": 1.0}
    assert r2["sg_iou_attr"] == pytest.approx(1 / 2)
    assert r2["entity_iou_attr"] == pytest.approx(2 / 3)
    assert r2["relation_iou_label"] == pytest.approx(1 / 2)
    means = score_dataset([pred1, pred2], [gt1, gt2])
    assert means["num_records"] == 2
    assert means["sg_iou_attr"] == pytest.approx((0 + 1 / 2) / 2)
    assert means["sg_iou_label"] == pytest.approx((1 + 1 / 2) / 2)
    assert means["entity_iou_attr"] == pytest.approx((1 + 2 / 3) / 2)
    assert means["relation_iou_attr"] == pytest.approx((1 + 1 / 2) / 2)


def test_score_dataset_rejects_mismatched_or_empty_input():
    gt = graph((RED_CIRCLE, "left of", BLUE_SQUARE))
    with pytest.raises(DataError, match="2 predicted graphs for 1"):
        score_dataset([gt, gt], [gt])
    with pytest.raises(DataError, match="no records"):
        score_dataset([], [])


# ----------------------------------------------------------------------------- properties

tokens = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=8)


def reference_iou(a, b):
    """Inclusion–exclusion, a different route to the same number."""
    set_a, set_b = set(a), set(b)
    inter = sum(1 for x in set_a if x in set_b)
    denom = len(set_a) + len(set_b) - inter
    return inter / denom if denom else 0.0


@settings(max_examples=300, deadline=None)
@given(tokens, tokens, st.randoms(use_true_random=False))
def test_iou_properties(a, b, rnd):
    value = iou(a, b)
    assert 0.0 <= value <= 1.0
    assert value == iou(b, a)
    assert math.isclose(value, reference_iou(a, b))
    assert (value == 1.0) == (bool(a) and set(a) == set(b))
    shuffled = list(a) * 2
    rnd.shuffle(shuffled)
    assert iou(shuffled, b) == value


labels = st.sampled_from(["circle", "square", "triangle"])
attributes = st.lists(st.sampled_from(["red", "blue", "big"]), max_size=2, unique=True).map(tuple)
predicates = st.sampled_from(["left of", "right of", "above", "below"])


@st.composite
def graphs(draw):
    n = draw(st.integers(0, 4))
    items = tuple(Item(i, draw(labels), draw(attributes)) for i in range(n))
    relations = ()
    if n >= 2:
        pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
        relations = tuple(Relation(s, draw(predicates), o) for s, o in draw(st.lists(pairs, max_size=4)))
    return SceneGraph(items, relations)


@settings(max_examples=200, deadline=None)
@given(graphs(), graphs())
def test_graph_metric_properties(pred, gt):
    for form in (True, False):
        for metric in (sg_iou, entity_iou, relation_iou):
            value = metric(pred, gt, form)
            assert 0.0 <= value <= 1.0
            assert value == metric(gt, pred, form)
        assert sg_iou(gt, gt, form) == (1.0 if gt.relations else 0.0)
        assert entity_iou(gt, gt, form) == (1.0 if gt.items else 0.0)
        # order and duplicates of items and relations do not matter
        reversed_gt = SceneGraph(gt.items[::-1], gt.relations[::-1] * 2)
        assert sg_iou(pred, reversed_gt, form) == sg_iou(pred, gt, form)
    # dropping attributes can only merge strings, never split an equal pair
    if sg_iou(pred, gt, True) == 1.0:
        assert sg_iou(pred, gt, False) == 1.0
