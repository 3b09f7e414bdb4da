"""The ShapesSG judge: the world's pixel detector read against each ground-truth graph.

The detector itself (`rig_jax.data.shapes.detect_objects`, `graph_from_objects`) belongs to the
world, which draws and reads its own pixels; this module turns its reading into the
`JudgeResult` every judge returns, so the data layer never depends on evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.data.shapes import (
    COLOUR_ONLY_LABEL,
    PALETTE,
    SHAPES,
    DetectedObject,
    ShapesConfig,
    detect_objects,
    graph_from_objects,
)
from rig_jax.errors import DataError
from rig_jax.eval.base import JudgeResult


def shapes_vocabulary_problem(graph: SceneGraph) -> str | None:
    """Why the ShapesSG detector cannot read `graph` (an item whose label is no ShapesSG shape,
    or that names no palette colour: the detector finds objects by colour), or None."""
    labels = (*SHAPES, COLOUR_ONLY_LABEL)
    for item in graph.items:
        if item.label not in labels:
            return f"item {item.text()!r}: {item.label!r} is not one of {', '.join(labels)}"
        if not any(a in PALETTE for a in item.attributes):
            return f"item {item.text()!r} names no ShapesSG colour ({', '.join(PALETTE)})"
    return None


def describe(objects: Sequence[DetectedObject]) -> str:
    """One line per image for reports: what the detector saw."""
    return "; ".join(f"{o.colour} {o.shape} box={o.box} area={o.area}" for o in objects) or "no objects"


class ShapesJudge:
    """The ShapesSG Checker and Judge: `detect` per image, then per ground-truth triplet
    (attribute + label form) whether it is among the detected triplets. No rating.

    `config=None` infers the world from each image's size (as `detect` does)."""
    name = "shapes"

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config

    def judge(self, images: Sequence[np.ndarray], graphs: Sequence[SceneGraph]) -> list[JudgeResult]:
        if len(images) != len(graphs):
            raise DataError(f"ShapesJudge: {len(images)} images but {len(graphs)} scene graphs")
        results = []
        for image, graph in zip(images, graphs, strict=True):
            config = self.config or ShapesConfig(image_size=int(np.shape(image)[0]))
            objects = detect_objects(image, config)
            found = graph_from_objects(objects, config, graph)
            shown = set(found.triplets(with_attributes=True))
            verdicts = tuple(t in shown for t in graph.triplets(with_attributes=True))
            results.append(JudgeResult(graph=found, triplet_verdicts=verdicts, rating=None,
                                       malformed=False, raw=describe(objects)))
        return results
