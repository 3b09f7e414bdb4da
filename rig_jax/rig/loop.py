"""Generate-Reflect-Edit, the inference loop of docs/method.md.

```
I_0 = D(P)                       (or the caller's initial images)
for k in 0 .. K-1:
    fb_k = C(I_k, P);  stop when every triplet holds
    e_k = A(I_k, P, fb_k)        ("" with `empty_edit`: the control without the Actor's words)
    I_{k+1} = E(I_k, e_k, P)
C(I_last) is recorded too; the result is the last image or the best-scoring one.
```

Each phase (generate, check, propose + edit) runs over its prompts in chunks of
`RoundSettings.batch_size`, the last chunk padded with copies of its last row, so the jitted
Diffuser, Editor and Actor see one batch shape whatever the number of prompts still active,
and a prompt that stopped costs nothing more. Bookkeeping (who is active, records, timings)
is host-side Python around those calls.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.diffusion.settings import EditSettings, SamplerSettings
from rig_jax.errors import ConfigError, RigError
from rig_jax.rig import diffuser, editor
from rig_jax.rig.actor import VLMActor, check_images
from rig_jax.rig.checker import Checker, CheckResult
from rig_jax.weights.mapping import to_host

FINALS = ("last", "best")


@dataclasses.dataclass(frozen=True)
class RoundSettings:
    """K = `max_rounds` edits at most; which image is the result (`final`: "last", or "best" =
    argmax_k S(I_k), earliest on ties); the compiled batch of every model call; and the
    empty-edit control (the edit prompt left empty, the Actor never called)."""

    max_rounds: int = 3
    final: str = "last"
    batch_size: int = 8
    empty_edit: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("max_rounds", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        if self.final not in FINALS:
            raise ConfigError(f"final: must be one of {', '.join(FINALS)}, got {self.final!r}")
        if not isinstance(self.empty_edit, bool):
            raise ConfigError(f"empty_edit: must be True or False, got {self.empty_edit!r}")


@dataclasses.dataclass(frozen=True)
class Round:
    """Image I_k, the Checker's reading of it, the edit prompt that made I_{k+1} from it (None
    on the last round), and the seconds per prompt spent making I_k (Diffuser for k = 0;
    Actor + Editor after) and checking it."""

    image: np.ndarray
    check: CheckResult
    edit_prompt: str | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class LoopRecord:
    """One prompt's run. `unet_generations` = 1 + edits (also when the first image was given: it
    was generated somewhere), what a generation-matched best-of-N baseline spends;
    `vlm_calls` = Checker calls when the Checker is a VLM, plus Actor calls."""

    graph: SceneGraph
    rounds: tuple[Round, ...]
    final_index: int
    unet_generations: int
    vlm_calls: int

    @property
    def final_image(self) -> np.ndarray:
        return self.rounds[self.final_index].image

    @property
    def final_check(self) -> CheckResult:
        return self.rounds[self.final_index].check

    @property
    def rounds_used(self) -> int:
        """Edits made."""
        return len(self.rounds) - 1


@dataclasses.dataclass(frozen=True)
class Models:
    """Everything the loop runs: the SD pipeline with the Diffuser's params and the Editor's
    (same layout; they differ after stage 2), their settings, the Checker and the Actor (None
    only for the empty-edit control or K = 0)."""

    diffuser_pipe: Any
    diffuser_params: Any
    editor_params: Any
    sampler: SamplerSettings
    edit: EditSettings
    checker: Checker
    actor: VLMActor | None
    actor_params: Any

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, SamplerSettings):
            raise ConfigError(f"sampler: expected SamplerSettings, got {type(self.sampler).__name__}")
        if not isinstance(self.edit, EditSettings):
            raise ConfigError(f"edit: expected EditSettings, got {type(self.edit).__name__}")
        if not callable(getattr(self.checker, "check", None)):
            raise ConfigError(f"checker: {type(self.checker).__name__} has no check method")
        if self.actor is not None and not callable(getattr(self.actor, "propose", None)):
            raise ConfigError(f"actor: {type(self.actor).__name__} has no propose method")


# ----------------------------------------------------------------------------- chunking

def chunked(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def padded(rows: Sequence[Any], size: int) -> list[Any]:
    """`rows` filled up to `size` with copies of the last one (results for those are dropped)."""
    return list(rows) + [rows[-1]] * (size - len(rows))


def timed_chunks(indices: Sequence[int], size: int, work: Callable[[int, list[int]], None],
                 seconds: dict[int, float]) -> None:
    """Runs `work(chunk_number, chunk)` per chunk, adding its wall time, shared evenly by the
    chunk's real rows, to `seconds`."""
    for c, chunk in enumerate(chunked(indices, size)):
        start = time.perf_counter()
        work(c, chunk)
        share = (time.perf_counter() - start) / len(chunk)
        for i in chunk:
            seconds[i] = seconds.get(i, 0.0) + share


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class _Track:
    """One prompt's growing record (host-side)."""
    images: list[np.ndarray]
    checks: list[CheckResult]
    edits: list[str]
    seconds: list[float]


def _first_images(models: Models, graphs: list[SceneGraph], rng: jax.Array, size: int
                  ) -> tuple[list[np.ndarray], dict[int, float]]:
    images: list[np.ndarray] = [np.empty(0)] * len(graphs)
    seconds: dict[int, float] = {}

    def work(c: int, chunk: list[int]) -> None:
        texts = padded([graphs[i].prompt() for i in chunk], size)
        out = diffuser.generate(models.diffuser_pipe, models.diffuser_params, texts, models.sampler,
                                rng=jax.random.fold_in(rng, c))
        out = to_host(out).astype(np.float32)
        for j, i in enumerate(chunk):
            images[i] = out[j]

    timed_chunks(range(len(graphs)), size, work, seconds)
    return images, seconds


def _check(models: Models, tracks: list[_Track], graphs: list[SceneGraph], active: list[int], size: int
           ) -> dict[int, float]:
    seconds: dict[int, float] = {}

    def work(c: int, chunk: list[int]) -> None:
        images = np.stack([tracks[i].images[-1] for i in chunk])
        results = models.checker.check(images, [graphs[i] for i in chunk])
        if len(results) != len(chunk):
            raise RigError(f"checker {models.checker.name}: {len(results)} results for {len(chunk)} images")
        for i, result in zip(chunk, results, strict=True):
            tracks[i].checks.append(result)

    timed_chunks(active, size, work, seconds)
    return seconds


def _edit(models: Models, tracks: list[_Track], graphs: list[SceneGraph], todo: list[int], rng: jax.Array,
          settings: RoundSettings) -> dict[int, float]:
    size = settings.batch_size
    seconds: dict[int, float] = {}

    def work(c: int, chunk: list[int]) -> None:
        images = np.stack(padded([tracks[i].images[-1] for i in chunk], size))
        rows = padded(chunk, size)
        if settings.empty_edit:
            edit_prompts = [""] * size
        else:
            samples = models.actor.propose(models.actor_params, images, [graphs[i] for i in rows],
                                           [tracks[i].checks[-1].feedback for i in rows],
                                           jax.random.fold_in(jax.random.fold_in(rng, 0), c))
            edit_prompts = [e.text for e in samples.edits]
        out = editor.edit(models.diffuser_pipe, models.editor_params, images, edit_prompts,
                          [graphs[i].prompt() for i in rows], models.edit,
                          rng=jax.random.fold_in(jax.random.fold_in(rng, 1), c))
        out = to_host(out).astype(np.float32)
        for j, i in enumerate(chunk):
            tracks[i].images.append(out[j])
            tracks[i].edits.append(edit_prompts[j])

    timed_chunks(todo, size, work, seconds)
    return seconds


def _record(track: _Track, graph: SceneGraph, settings: RoundSettings, is_vlm: bool) -> LoopRecord:
    rounds = tuple(Round(image=track.images[k], check=track.checks[k],
                         edit_prompt=track.edits[k] if k < len(track.edits) else None,
                         seconds=track.seconds[k]) for k in range(len(track.checks)))
    scores = [r.check.score for r in rounds]
    final = len(rounds) - 1 if settings.final == "last" else int(np.argmax(scores))   # argmax: first max
    actor_calls = 0 if settings.empty_edit else len(track.edits)
    return LoopRecord(graph=graph, rounds=rounds, final_index=final, unet_generations=1 + len(track.edits),
                      vlm_calls=(len(track.checks) if is_vlm else 0) + actor_calls)


def generate_reflect_edit(models: Models, graphs: Sequence[SceneGraph], rng: jax.Array,
                          settings: RoundSettings, initial_images: np.ndarray | None = None
                          ) -> list[LoopRecord]:
    """Runs the loop for every prompt graph; one record per graph, in order. `initial_images`
    (B, H, W, 3) in [0, 1] replace the Diffuser's I_0 (their generation time is not counted).
    Round k's Actor and Editor draw from `rng` folded with k + 1 (the Diffuser with 0)."""
    if not isinstance(settings, RoundSettings):
        raise ConfigError(f"settings: expected RoundSettings, got {type(settings).__name__}")
    graphs = list(graphs)
    if not graphs or not all(isinstance(g, SceneGraph) for g in graphs):
        raise RigError("graphs: expected a non-empty list of SceneGraph")
    if settings.max_rounds and not settings.empty_edit and models.actor is None:
        raise ConfigError("models.actor: None, but edits need the Actor (or set settings.empty_edit)")
    size = settings.batch_size
    if initial_images is None:
        images, first = _first_images(models, graphs, jax.random.fold_in(rng, 0), size)
    else:
        images = list(check_images(initial_images, len(graphs), "initial_images").astype(np.float32))
        first = {}
    tracks = [_Track([images[i]], [], [], [first.get(i, 0.0)]) for i in range(len(graphs))]
    active = list(range(len(graphs)))
    for k in range(settings.max_rounds + 1):
        for i, s in _check(models, tracks, graphs, active, size).items():
            tracks[i].seconds[k] += s
        active = [i for i in active if not tracks[i].checks[k].all_satisfied]
        if k == settings.max_rounds or not active:
            break
        for i, s in _edit(models, tracks, graphs, active, jax.random.fold_in(rng, k + 1), settings).items():
            tracks[i].seconds.append(s)
    is_vlm = bool(getattr(models.checker, "is_vlm", False))
    return [_record(t, g, settings, is_vlm) for t, g in zip(tracks, graphs, strict=True)]
