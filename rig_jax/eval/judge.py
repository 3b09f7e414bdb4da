"""VLM-as-a-Judge: a vision-language model reads each generated image against its scene graph.

Two questions per image, over any text generator
`generate(images: list[np.ndarray], prompts: list[str]) -> list[str]` (the Flax VLM through
`make_vlm_generate`, or a scripted fake in tests):
1. vocabulary-constrained scene-graph extraction (LAION-SG's protocol): the judge sees the
   ground-truth object and predicate strings and answers
   `{"scene_graph": [[s, p, o], ...], "object_list": [...], "predicate_list": [...]}`;
   entries outside the vocabulary are dropped, strings are matched case- and space-insensitively
   and mapped back to the ground-truth spelling (so the extracted graph keeps each item's
   label and attributes, and both node forms of the IoU metrics work);
2. per-triplet yes/no verdicts and a 1-10 overall spatial-consistency rating.
Answers are read leniently (`rig_jax.vlm.lenient_json`); an unusable answer never raises: it is
flagged `malformed` and what it could not give scores 0 (empty graph, no verdicts, no rating).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rig_jax.data.scene_graph import Item, Relation, SceneGraph, Triplet
from rig_jax.errors import RigError
from rig_jax.eval.base import JudgeResult
from rig_jax.vlm.lenient_json import get_field, loads_lenient
from rig_jax.vlm.prompts import Verdict, as_triplet, match_verdicts, normalize_text, verdicts_from_lines

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from rig_jax.parallel.rules import LogicalRules
    from rig_jax.vlm.pipeline import VLMPipeline

GenerateFn = Callable[[list[np.ndarray], list[str]], list[str]]

EXTRACT_TEMPLATE = """Describe the image as a scene graph, using only the vocabulary below.

Objects: {objects}
Predicates: {predicates}

List every relation [subject, predicate, object] that the image shows between these objects, \
every listed object that the image shows, and every listed predicate you used. Write the \
names exactly as listed; leave out anything the image does not show.

Answer with JSON only, no other text, in this form:
{{"scene_graph": [["object", "predicate", "object"]], "object_list": ["object"], \
"predicate_list": ["predicate"]}}"""

VERDICT_TEMPLATE = """You judge whether an image shows what its text prompt asks for.

Prompt: {prompt}

The prompt asks for these relations, each written as [subject, predicate, object]:
{numbered_triplets}

For each relation answer "yes" if the image clearly shows it and "no" otherwise. Then rate from \
1 to 10 how well the spatial layout of the whole image matches the prompt (10: every relation \
holds; 1: none does).

Answer with JSON only, no other text, in this form:
{{"verdicts": [{{"id": 1, "answer": "yes"}}, {{"id": 2, "answer": "no"}}], "rating": 7}}
Give exactly one answer per relation id, from 1 to {num_triplets}."""


def _unique(strings: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(strings))


def extraction_prompt(graph: SceneGraph, with_attributes: bool = True) -> str:
    """The scene-graph question, its vocabulary taken from the ground-truth graph."""
    objects = _unique(graph.objects(with_attributes))
    predicates = _unique(graph.predicates())
    return EXTRACT_TEMPLATE.format(objects=json.dumps(objects, ensure_ascii=False),
                                   predicates=json.dumps(predicates, ensure_ascii=False))


def verdict_prompt(graph: SceneGraph, with_attributes: bool = True) -> str:
    """The per-triplet yes/no and rating question."""
    triplets = graph.triplets(with_attributes)
    numbered = "\n".join(f"{i}. {json.dumps(list(t), ensure_ascii=False)}" for i, t in enumerate(triplets, 1))
    return VERDICT_TEMPLATE.format(prompt=graph.prompt(), numbered_triplets=numbered or "(none)",
                                   num_triplets=len(triplets))


@dataclasses.dataclass(frozen=True)
class Extraction:
    """A parsed extraction answer: the in-vocabulary graph, what was dropped, and whether the
    answer was usable at all."""
    graph: SceneGraph
    dropped: int
    malformed: bool
    reason: str = ""


def parse_extraction(text: str, gt: SceneGraph, with_attributes: bool = True) -> Extraction:
    """Reads a scene-graph answer against the ground-truth vocabulary. Never raises.

    Malformed (empty graph) when there is no JSON object with a `scene_graph` list. Out-of-
    vocabulary objects, predicates and triplets, and entries that are not strings or
    `[s, p, o]`, are dropped and counted. `predicate_list` is read for the count of dropped
    entries only: a SceneGraph's predicates are those of its relations.
    """
    empty = SceneGraph((), ())
    found = loads_lenient(text)
    if found is None or not isinstance(found.value, Mapping):
        return Extraction(empty, 0, True, "no JSON object in the answer")
    raw_graph = get_field(found.value, "scene_graph", "scenegraph", "graph", "relations", "triplets")
    if not isinstance(raw_graph, list):
        return Extraction(empty, 0, True, "no 'scene_graph' list")

    vocab_items: dict[str, Item] = {}
    for it in gt.items:
        vocab_items.setdefault(normalize_text(it.text(with_attributes)), it)
    vocab_predicates = {normalize_text(p): p for p in gt.predicates()}
    items: dict[str, Item] = {}  # normalised text -> item of the extracted graph

    def in_vocab(name: Any) -> str | None:
        key = normalize_text(name) if isinstance(name, str) else None
        return key if key in vocab_items else None

    def node(key: str) -> Item:
        if key not in items:
            src = vocab_items[key]
            items[key] = Item(len(items), src.label, src.attributes if with_attributes else ())
        return items[key]

    dropped = 0
    raw_objects = get_field(found.value, "object_list", "objects")
    for name in raw_objects if isinstance(raw_objects, list) else []:
        key = in_vocab(name)
        if key is None:
            dropped += 1
        else:
            node(key)
    raw_predicates = get_field(found.value, "predicate_list", "predicates")
    for pred in raw_predicates if isinstance(raw_predicates, list) else []:
        dropped += not (isinstance(pred, str) and normalize_text(pred) in vocab_predicates)
    relations: dict[tuple[int, str, int], Relation] = {}
    for entry in raw_graph:
        t = as_triplet(entry)
        s_key, o_key = (in_vocab(t[0]), in_vocab(t[2])) if t else (None, None)
        p = vocab_predicates.get(normalize_text(t[1])) if t else None
        if s_key is None or o_key is None or p is None:
            dropped += 1  # a triplet with any out-of-vocabulary part is dropped whole
            continue
        s, o = node(s_key), node(o_key)
        relations.setdefault((s.item_id, p, o.item_id), Relation(s.item_id, p, o.item_id))
    return Extraction(SceneGraph(tuple(items.values()), tuple(relations.values())), dropped, False)


@dataclasses.dataclass(frozen=True)
class Verdicts:
    """A parsed verdict answer: shown / not shown / None per triplet, and the 1-10 rating."""
    shown: tuple[bool | None, ...]
    rating: float | None
    malformed: bool
    reason: str = ""


_RATING_RE = re.compile(r"\b(?:rating|score)\b\W{0,5}(\d+(?:\.\d+)?)", re.I)


def _rating(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        m = re.match(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$", value)
        value = float(m.group(1)) if m else None
    if isinstance(value, (int, float)) and math.isfinite(value) and 1 <= value <= 10:
        return float(value)
    return None


def parse_verdicts(text: str, triplets: Sequence[Triplet]) -> Verdicts:
    """Reads a yes/no + rating answer. Never raises. Malformed when the JSON, a triplet's answer
    or the rating is missing; what is missing counts as not shown / no rating."""
    problems: list[str] = []
    found = loads_lenient(text)
    if found is None:
        source = text if isinstance(text, str) else ""
        verdicts = verdicts_from_lines(source, triplets)
        m = _RATING_RE.search(source)
        rating = _rating(m.group(1)) if m else None
        problems.append("no JSON object in the answer")
    else:
        value = found.value
        raw = value
        rating = None
        if isinstance(value, Mapping):
            raw = get_field(value, "verdicts", "answers", "results", "relations", "triplets")
            rating = _rating(get_field(value, "rating", "score", "overall_rating", "spatial_consistency"))
        verdicts = match_verdicts(raw, triplets)
        if rating is None:
            problems.append("no rating from 1 to 10")
    missing = [str(i + 1) for i, v in enumerate(verdicts) if v is None]
    if missing:
        problems.append(f"no answer for triplet {', '.join(missing)}")
    shown = tuple(None if v is None else v is Verdict.SATISFIED for v in verdicts)
    return Verdicts(shown, rating, bool(problems), "; ".join(problems))


class VLMJudge:
    """The `Judge` of `rig_jax.eval.base` over a VLM text generator.

    with_attributes: node strings in the prompts are attributes + label (LAION-SG's full form)
    or bare labels; batch_size: images per `generate` call.
    """
    name = "vlm"

    def __init__(self, generate: GenerateFn, with_attributes: bool = True, batch_size: int = 8):
        if batch_size < 1:
            raise RigError(f"VLMJudge: batch_size must be >= 1, got {batch_size}")
        self.generate = generate
        self.with_attributes = with_attributes
        self.batch_size = batch_size

    def _ask(self, images: list[np.ndarray], prompts: list[str]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            chunk = self.generate(images[start:stop], prompts[start:stop])
            if len(chunk) != len(prompts[start:stop]):
                raise RigError(f"VLMJudge: generate returned {len(chunk)} answers for "
                               f"{len(prompts[start:stop])} prompts")
            answers.extend(a if isinstance(a, str) else "" for a in chunk)
        return answers

    def judge(self, images: Sequence[np.ndarray], graphs: Sequence[SceneGraph]) -> list[JudgeResult]:
        """One JudgeResult per (image, ground-truth graph)."""
        if len(images) != len(graphs):
            raise RigError(f"VLMJudge: {len(images)} images for {len(graphs)} scene graphs")
        images = list(images)
        extract_answers = self._ask(images, [extraction_prompt(g, self.with_attributes) for g in graphs])
        verdict_answers = self._ask(images, [verdict_prompt(g, self.with_attributes) for g in graphs])
        results = []
        for gt, extract_answer, verdict_answer in zip(graphs, extract_answers, verdict_answers, strict=True):
            extraction = parse_extraction(extract_answer, gt, self.with_attributes)
            verdicts = parse_verdicts(verdict_answer, gt.triplets(self.with_attributes))
            results.append(JudgeResult(
                graph=extraction.graph, triplet_verdicts=verdicts.shown, rating=verdicts.rating,
                malformed=extraction.malformed or verdicts.malformed,
                raw=f"[scene graph]\n{extract_answer}\n[verdicts]\n{verdict_answer}"))
        return results


def summarize(results: Sequence[JudgeResult]) -> dict[str, float]:
    """Dataset numbers of the judge: mean judge score, mean rating (over rated images),
    malformed count."""
    ratings = [r.rating for r in results if r.rating is not None]
    return {"judge_score": math.fsum(r.judge_score for r in results) / len(results) if results else 0.0,
            "judge_rating": math.fsum(ratings) / len(ratings) if ratings else 0.0,
            "judge_rated": float(len(ratings)),
            "judge_malformed": float(sum(r.malformed for r in results)),
            "num_records": float(len(results))}


# ---------------------------------------------------------------- the Flax VLM as a generator

def vlm_generate_fn(pipe: VLMPipeline, params: Any, max_new_tokens: int = 512, pad_to_multiple_of: int = 64,
                    system: str | None = None, *, mesh: Mesh | None = None,
                    rules: LogicalRules | None = None) -> GenerateFn:
    """Greedy text generation with a loaded VLM bundle, one image per prompt.

    Prompt lengths are padded to a multiple of `pad_to_multiple_of` so batches of similar
    prompts reuse one compiled program. Decoding stops at the bundle's stop tokens. `system`
    replaces the chat template's default system message. With `mesh` every call runs under
    it and the logical axis rules (`rules`, else those active when this was built), where
    the params placed by `load_vlm_pipeline` live.
    """
    import flax.linen as nn
    import jax

    from rig_jax.vlm.decode import generate
    from rig_jax.vlm.processor import prepare_batch
    from rig_jax.weights.placement import resolve_rules

    rules = resolve_rules(rules) if mesh is not None else None

    def vlm_generate(images: list[np.ndarray], prompts: list[str]) -> list[str]:
        if len(images) != len(prompts):
            raise RigError(f"vlm_generate: {len(images)} images for {len(prompts)} prompts")
        if not prompts:
            return []
        batch = prepare_batch(pipe.tokenizer, prompts, [[im] for im in images], pipe.image_config,
                              system=system, pad_to_multiple_of=pad_to_multiple_of)
        with contextlib.ExitStack() as stack:
            if mesh is not None:
                stack.enter_context(jax.set_mesh(mesh))
                stack.enter_context(nn.logical_axis_rules(rules))
            out = generate(pipe.model, params, batch, jax.random.PRNGKey(0), max_new_tokens, greedy=True,
                           stop_token_ids=list(pipe.stop_token_ids), pad_id=pipe.pad_id)
            tokens, valid = np.asarray(out["tokens"]), np.asarray(out["valid"])
        stops = set(pipe.stop_token_ids)
        texts = []
        for row, keep in zip(tokens, valid, strict=True):
            ids = [int(t) for t in row[keep] if int(t) not in stops]
            texts.append(pipe.tokenizer.decode(ids, skip_special_tokens=True))
        return texts

    return vlm_generate


def make_vlm_generate(folder: str, max_new_tokens: int = 512, dtype: Any = None, param_dtype: Any = None,
                      pad_to_multiple_of: int = 64, system: str | None = None, *, mesh: Mesh | None = None,
                      rules: LogicalRules | None = None) -> GenerateFn:
    """`vlm_generate_fn` over the VLM bundle of a local HF folder (`load_vlm_pipeline`: weights,
    config.json, tokenizer files, preprocessor_config.json), its params placed on `mesh`.

    dtype: compute dtype (default bfloat16); param_dtype: stored weights (default: dtype, as
    nothing is trained here).
    """
    from rig_jax.vlm.pipeline import load_vlm_pipeline

    pipe, params = load_vlm_pipeline(folder, dtype, param_dtype, mesh=mesh, rules=rules)
    return vlm_generate_fn(pipe, params, max_new_tokens, pad_to_multiple_of, system, mesh=mesh, rules=rules)
