"""What every judge returns, so metrics and reports need not know which judge ran.

Judges: the ShapesSG pixel detector (`rig_jax.eval.shapes_judge`) and the VLM judge
(`rig_jax.eval.judge`). Both read an image against the scene graph it should show.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from rig_jax.data.scene_graph import EMPTY_GRAPH, SceneGraph


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """One image read against its ground-truth graph.

    graph: the scene graph the judge extracted (empty when the answer was malformed);
    triplet_verdicts: per ground-truth relation, in order, whether the image shows it
        (None where the judge gave no usable verdict; counted as not shown);
    rating: the 1-10 overall spatial-consistency rating, or None if the judge gives none;
    malformed: the judge's answer could not be parsed (it then scores 0);
    raw: the judge's raw answer, for reports.
    """
    graph: SceneGraph = EMPTY_GRAPH
    triplet_verdicts: tuple[bool | None, ...] = ()
    rating: float | None = None
    malformed: bool = False
    raw: str = ""

    @property
    def judge_score(self) -> float:
        """Fraction of ground-truth triplets judged shown (0 when there are none)."""
        if not self.triplet_verdicts:
            return 0.0
        return sum(v is True for v in self.triplet_verdicts) / len(self.triplet_verdicts)


class Judge(Protocol):
    """Reads images (HWC float32 in [0, 1] or uint8) against their ground-truth graphs."""
    name: str

    def judge(self, images: Sequence[np.ndarray], graphs: Sequence[SceneGraph]) -> list[JudgeResult]:
        ...
