"""The Checker C of docs/method.md: `(I, P, triplets) -> per-triplet verdicts, extracted scene
graph, S(I) and the feedback text the Actor reads`.

One interface (`Checker.check`), two implementations: `ShapesChecker`, the ShapesSG pixel
detector (exact, no model), and `VLMChecker`, greedy decoding of a Qwen2.5-VL folder asked
`checker_prompt` and read by the lenient `parse_checker_answer`. The loop and the trainers see
only `CheckResult`, so either can stand in for the other.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from rig_jax.data import shapes
from rig_jax.data.scene_graph import SceneGraph, Triplet
from rig_jax.errors import ConfigError, RigError
from rig_jax.rig.actor import check_images, decode_texts, question_batch
from rig_jax.vlm import decode, prompts
from rig_jax.vlm.pipeline import VLMPipeline


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The Checker's reading of one image against its prompt's triplets (attribute + label form)."""

    triplets: tuple[Triplet, ...]
    verdicts: prompts.CheckerVerdicts
    score: float
    feedback: str

    @property
    def all_satisfied(self) -> bool:
        """Every triplet satisfied: the loop's stopping rule. A prompt with no triplets has
        nothing to fix, so it is satisfied (its score is still 0, as `checker_score` gives)."""
        return all(v is prompts.Verdict.SATISFIED for v in self.verdicts.verdicts)


def check_result(graph: SceneGraph, verdicts: prompts.CheckerVerdicts) -> CheckResult:
    """Score and feedback of parsed verdicts for `graph`'s triplets."""
    triplets = tuple(graph.triplets(with_attributes=True))
    return CheckResult(triplets=triplets, verdicts=verdicts, score=prompts.checker_score(verdicts),
                       feedback=prompts.format_checker_feedback(triplets, verdicts))


class Checker(Protocol):
    """`check(images (B, H, W, 3) float in [0, 1], graphs)` -> one result per image. `is_vlm`
    says whether a call costs a VLM call (counted in `LoopRecord.vlm_calls`)."""

    name: str
    is_vlm: bool

    def check(self, images: np.ndarray, graphs: Sequence[SceneGraph]) -> list[CheckResult]: ...


def _inputs(images: Any, graphs: Sequence[SceneGraph]) -> tuple[np.ndarray, list[SceneGraph]]:
    graphs = list(graphs)
    if not graphs:
        raise RigError("graphs: need at least one scene graph")
    return check_images(images, len(graphs)), graphs


# ----------------------------------------------------------------------------- ShapesSG

def checker_verdicts(image: np.ndarray, graph: SceneGraph, world: shapes.ShapesConfig
                     ) -> prompts.CheckerVerdicts:
    """The ShapesSG Checker's answer for `image` against the prompt's `graph`: per triplet
    (attribute form) "object missing" when its subject or object node (colour and shape) is
    not detected, "satisfied" when the detector reads the triplet, else "violated"; the scene
    graph is what the detector reads for the prompt's pairs."""
    found = shapes.graph_from_objects(shapes.detect_objects(image, world), world, graph)
    shown = set(found.triplets(with_attributes=True))
    present = set(found.objects(with_attributes=True))
    verdicts = []
    for s, p, o in graph.triplets(with_attributes=True):
        if s not in present or o not in present:
            verdicts.append(prompts.Verdict.MISSING)
        elif (s, p, o) in shown:
            verdicts.append(prompts.Verdict.SATISFIED)
        else:
            verdicts.append(prompts.Verdict.VIOLATED)
    return prompts.CheckerVerdicts(tuple(verdicts), tuple(found.triplets(with_attributes=True)))


class ShapesChecker:
    """The ShapesSG Checker: the world's pixel detector, exact on renders."""

    name = "shapes"
    is_vlm = False

    def __init__(self, world: shapes.ShapesConfig):
        if not isinstance(world, shapes.ShapesConfig):
            raise ConfigError(f"world: expected a ShapesConfig, got {type(world).__name__}")
        self.world = world

    def check(self, images: np.ndarray, graphs: Sequence[SceneGraph]) -> list[CheckResult]:
        images, graphs = _inputs(images, graphs)
        return [check_result(g, checker_verdicts(im, g, self.world))
                for im, g in zip(images, graphs, strict=True)]


# ----------------------------------------------------------------------------- VLM

@dataclasses.dataclass(frozen=True)
class VLMCheckerSettings:
    """Greedy answers of at most `max_new_tokens`, `batch_size` images per decoder call (the
    last chunk padded, so one compiled shape), question length padded to `pad_to_multiple_of`."""

    max_new_tokens: int
    batch_size: int
    pad_to_multiple_of: int = 16

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "pad_to_multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


class VLMChecker:
    """The Checker as a VLM (Qwen2.5-VL folder), greedy: deterministic verdicts for a given image.
    An answer cut at `max_new_tokens` is marked malformed (what it held is still used)."""

    name = "vlm"
    is_vlm = True

    def __init__(self, pipe: VLMPipeline, params: Any, settings: VLMCheckerSettings):
        if not isinstance(settings, VLMCheckerSettings):
            raise ConfigError(f"checker settings: expected VLMCheckerSettings, got {type(settings).__name__}")
        self.pipe, self.params, self.settings = pipe, params, settings

    def check(self, images: np.ndarray, graphs: Sequence[SceneGraph]) -> list[CheckResult]:
        images, graphs = _inputs(images, graphs)
        size = self.settings.batch_size
        results: list[CheckResult] = []
        for start in range(0, len(graphs), size):
            results += self._check_chunk(images[start:start + size], graphs[start:start + size])
        return results

    def _check_chunk(self, images: np.ndarray, graphs: list[SceneGraph]) -> list[CheckResult]:
        s, pipe = self.settings, self.pipe
        questions = [prompts.checker_prompt(g.prompt(), g.triplets(with_attributes=True)) for g in graphs]
        batch = question_batch(pipe, questions, images, 1, s.batch_size, s.pad_to_multiple_of)
        out = decode.generate(pipe.model, self.params, batch, jax.random.PRNGKey(0), s.max_new_tokens,
                              greedy=True, stop_token_ids=pipe.stop_token_ids, pad_id=pipe.pad_id)
        n = len(graphs)
        texts, stopped = decode_texts(pipe, np.asarray(out["tokens"])[:n], np.asarray(out["valid"])[:n])
        results = []
        for graph, text, ended in zip(graphs, texts, stopped, strict=True):
            verdicts = prompts.parse_checker_answer(text, graph.triplets(with_attributes=True))
            if not ended:
                reason = "; ".join(r for r in (verdicts.reason, "answer cut at max_new_tokens") if r)
                verdicts = dataclasses.replace(verdicts, malformed=True, reason=reason)
            results.append(check_result(graph, verdicts))
        return results
