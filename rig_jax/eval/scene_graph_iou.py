"""LAION-SG's set-IoU metrics between a predicted and a ground-truth scene graph.

Definitions (docs/method.md, Evaluation): `IoU(A, B) = |A ∩ B| / |A ∪ B|` over *sets* with
exact string match, and **0 when both sets are empty** (method.md's rule: an image with
nothing to find scores nothing, rather than a free 1). Duplicates and order never matter.
- SG-IoU: over `(subject, predicate, object)` triplets (direction matters: "a left of b"
  and "b left of a" are different triplets);
- Entity-IoU: over object (node) strings;
- Relation-IoU: over predicate strings.
Node strings come in two forms: attributes + label ("red circle", `with_attributes=True`)
or the bare label ("circle"); in the bare form two items with one label collapse into one
string. Relation-IoU does not depend on the node form but is reported for both, so tables
stay square. The dataset score is the plain mean over records.

Public API: `iou`, `sg_iou`, `entity_iou`, `relation_iou`, `score_record(pred, gt)` (the six
numbers of one record) and `score_dataset(preds, gts)` (their means, plus `num_records`).
Keys: `METRIC_KEYS`, e.g. `"sg_iou_attr"` (attributes + label) and `"sg_iou_label"` (bare).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import DataError

NODE_FORMS = {"attr": True, "label": False}  # key suffix -> with_attributes
METRIC_KEYS = tuple(f"{metric}_{form}" for metric in ("sg_iou", "entity_iou", "relation_iou")
                    for form in NODE_FORMS)


def iou(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """`|A ∩ B| / |A ∪ B|` of the two collections taken as sets; 0.0 when both are empty."""
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    if not union:
        return 0.0
    return len(set_a & set_b) / len(union)


def sg_iou(pred: SceneGraph, gt: SceneGraph, with_attributes: bool = True) -> float:
    """IoU of the `(subject, predicate, object)` triplet sets."""
    return iou(pred.triplets(with_attributes), gt.triplets(with_attributes))


def entity_iou(pred: SceneGraph, gt: SceneGraph, with_attributes: bool = True) -> float:
    """IoU of the object (node) string sets."""
    return iou(pred.objects(with_attributes), gt.objects(with_attributes))


def relation_iou(pred: SceneGraph, gt: SceneGraph, with_attributes: bool = True) -> float:
    """IoU of the predicate string sets (`with_attributes` is accepted for symmetry and ignored)."""
    del with_attributes
    return iou(pred.predicates(), gt.predicates())


_METRICS = {"sg_iou": sg_iou, "entity_iou": entity_iou, "relation_iou": relation_iou}


def score_record(pred: SceneGraph, gt: SceneGraph) -> dict[str, float]:
    """The six numbers (3 metrics × 2 node forms) of one predicted graph against its ground truth."""
    return {f"{name}_{form}": fn(pred, gt, with_attributes)
            for name, fn in _METRICS.items() for form, with_attributes in NODE_FORMS.items()}


def score_dataset(preds: Sequence[SceneGraph], gts: Sequence[SceneGraph]) -> dict[str, float]:
    """Means over records of `score_record`, plus `num_records`. `preds[i]` pairs with `gts[i]`."""
    if len(preds) != len(gts):
        raise DataError(f"score_dataset: {len(preds)} predicted graphs for {len(gts)} ground-truth graphs")
    if not gts:
        raise DataError("score_dataset: no records to score")
    per_record = [score_record(p, g) for p, g in zip(preds, gts, strict=True)]
    means = {key: math.fsum(r[key] for r in per_record) / len(per_record) for key in METRIC_KEYS}
    means["num_records"] = len(per_record)
    return means
