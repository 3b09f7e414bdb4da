"""What the Checker and the Actor are asked, and how their answers are read.

Both are asked for JSON. Models wrap it in code fences, add prose, use single quotes,
leave trailing commas, change case or stop mid-answer, so the readers here are lenient
(the JSON repairs are in `rig_jax.vlm.lenient_json`):
they recover whatever can be recovered, report what could not (`malformed`, `reason`,
`well_formed`), and never raise. Whether an answer was *strictly* in the asked format is
kept apart from what it said, because the Actor's GRPO reward pays for the format
(`lambda_fmt * well_formed`) while the loop only needs the content.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rig_jax.data.scene_graph import Triplet
from rig_jax.vlm.lenient_json import MAX_ANSWER_CHARS, get_field, loads_lenient, strip_fences


class Verdict(str, enum.Enum):
    """The Checker's answer for one requested relation."""
    SATISFIED = "satisfied"
    VIOLATED = "violated"
    MISSING = "object missing"


@dataclasses.dataclass(frozen=True)
class CheckerVerdicts:
    """A parsed Checker answer.

    verdicts: one per requested triplet, in order; None where the answer gave none usable;
    scene_graph: the (subject, predicate, object) triplets the Checker says the image shows;
    malformed: the answer was not the complete JSON asked for (some of it may still be used);
    reason: why it is malformed, one line ("" when it is not).
    """
    verdicts: tuple[Verdict | None, ...]
    scene_graph: tuple[Triplet, ...] = ()
    malformed: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class EditPrompt:
    """The Actor's edit instruction; `well_formed` when the answer was exactly the JSON asked for."""
    text: str
    well_formed: bool


# ---------------------------------------------------------------- templates

CHECKER_TEMPLATE = """You check whether an image matches the text prompt it was generated from.

Prompt: {prompt}

The prompt asks for these relations, each written as [subject, predicate, object]:
{numbered_triplets}

Look at the image. For each relation, give one verdict:
- "satisfied": the subject and the object are both visible and the relation holds;
- "violated": both are visible but the relation does not hold;
- "object missing": the subject or the object is not visible.
Then list the relations you actually see in the image as [subject, predicate, object] triplets,
using the prompt's names for objects and predicates where they apply.

Answer with JSON only, no other text, in this form:
{{"verdicts": [{{"id": 1, "verdict": "satisfied"}}, {{"id": 2, "verdict": "object missing"}}], \
"scene_graph": [["subject", "predicate", "object"]]}}
Give exactly one verdict per relation id, from 1 to {num_triplets}."""

ACTOR_TEMPLATE = """You improve an image so that it matches the text prompt it was generated from.

Prompt: {prompt}

A checker compared the image with the relations the prompt asks for:
{feedback}

Write one short edit instruction (at most {max_words} words) for an image editor: fix the violated \
relations and add the missing objects, and keep what is already right.

Answer with JSON only, no other text, in this form:
{{"edit_prompt": "your instruction"}}"""


def _triplet_json(triplet: Sequence[str]) -> str:
    return json.dumps(list(triplet), ensure_ascii=False)


def checker_prompt(prompt: str, triplets: Sequence[Triplet]) -> str:
    """The Checker's question for one image (the image goes before it in the chat turn)."""
    numbered = "\n".join(f"{i}. {_triplet_json(t)}" for i, t in enumerate(triplets, start=1))
    return CHECKER_TEMPLATE.format(prompt=prompt, numbered_triplets=numbered or "(none)",
                                   num_triplets=len(triplets))


def format_checker_feedback(triplets: Sequence[Triplet], verdicts: CheckerVerdicts) -> str:
    """The Checker's verdicts as numbered lines for the Actor (unknown where it gave none),
    followed by what it says the image shows."""
    lines = []
    for i, triplet in enumerate(triplets, start=1):
        v = verdicts.verdicts[i - 1] if i - 1 < len(verdicts.verdicts) else None
        lines.append(f"{i}. {' '.join(triplet)}: {v.value if v is not None else 'unknown'}")
    seen = "; ".join(" ".join(t) for t in verdicts.scene_graph)
    lines.append(f"The image shows: {seen}" if seen else "The image shows none of the relations clearly.")
    return "\n".join(lines)


def actor_prompt(prompt: str, feedback: str, max_words: int = 40) -> str:
    """The Actor's question: the prompt, the Checker's feedback, and the JSON to answer with."""
    return ACTOR_TEMPLATE.format(prompt=prompt, feedback=feedback, max_words=max_words)


def render_checker_answer(verdicts: Sequence[Verdict], scene_graph: Iterable[Triplet] = ()) -> str:
    """A valid Checker answer (for tests, scripted checkers and supervised warm-up data)."""
    return json.dumps({"verdicts": [{"id": i, "verdict": v.value} for i, v in enumerate(verdicts, start=1)],
                       "scene_graph": [list(t) for t in scene_graph]}, ensure_ascii=False)


def render_edit_prompt(text: str) -> str:
    """A valid Actor answer."""
    return json.dumps({"edit_prompt": text}, ensure_ascii=False)


def normalize_text(text: Any) -> str:
    """Strings compared lower-case with single spaces and no outer quotes or punctuation."""
    s = re.sub(r"\s+", " ", str(text)).strip().strip("\"'`.,;:").strip()
    return s.lower()


# ---------------------------------------------------------------- Checker answers

_VERDICT_WORDS = {
    Verdict.SATISFIED: ("satisfied", "satisfies", "satisfy", "yes", "true", "holds", "correct", "met",
                        "fulfilled", "present"),
    Verdict.VIOLATED: ("violated", "violates", "violation", "no", "false", "not satisfied", "unsatisfied",
                       "does not hold", "not hold", "incorrect", "wrong", "not met"),
    Verdict.MISSING: ("object missing", "objects missing", "missing object", "missing objects", "missing",
                      "subject missing", "absent", "not present", "not visible", "object not found"),
}
_VERDICT_LOOKUP = {w: v for v, words in _VERDICT_WORDS.items() for w in words}
# Longest phrases first so "not satisfied" is not read as "satisfied".
_VERDICT_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _VERDICT_LOOKUP), key=len, reverse=True))
                         + r")\b", re.I)


def parse_verdict(value: Any) -> Verdict | None:
    """One verdict from a JSON value: a verdict word or phrase (any case, `_`/`-` as spaces) or a
    boolean; None if it names no verdict or more than one kind."""
    if isinstance(value, bool):
        return Verdict.SATISFIED if value else Verdict.VIOLATED
    if not isinstance(value, str):
        return None
    s = normalize_text(value.replace("_", " ").replace("-", " "))
    if s in _VERDICT_LOOKUP:
        return _VERDICT_LOOKUP[s]
    found = {_VERDICT_LOOKUP[m.group(1).lower()] for m in _VERDICT_RE.finditer(s)}
    return found.pop() if len(found) == 1 else None


def _triplet_key(value: Any) -> str | None:
    """A triplet given as a list of three strings, a {subject, predicate, object} object or a
    phrase, as one normalised string."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value):
        return normalize_text(" ".join(value))
    if isinstance(value, Mapping):
        t = as_triplet(value)
        return normalize_text(" ".join(t)) if t else None
    if isinstance(value, str):
        return normalize_text(value)
    return None


def as_triplet(value: Any) -> Triplet | None:
    """A (subject, predicate, object) of strings from `[s, p, o]` or `{"subject", "predicate",
    "object"}` (outer whitespace stripped); None for anything else."""
    if isinstance(value, Mapping):
        parts = [get_field(value, "subject", "s", "head"), get_field(value, "predicate", "relation", "p"),
                 get_field(value, "object", "o", "tail")]
    elif isinstance(value, (list, tuple)) and len(value) == 3:
        parts = list(value)
    else:
        return None
    if not all(isinstance(p, str) and p.strip() for p in parts):
        return None
    return (parts[0].strip(), parts[1].strip(), parts[2].strip())


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*#?\d+\s*", value):
        return int(value.strip().lstrip("#"))
    return None


def _entries(raw: Any) -> list[tuple[int | None, str | None, Verdict | None]]:
    """(id, triplet key, verdict) for each verdict entry, in answer order."""
    out: list[tuple[int | None, str | None, Verdict | None]] = []
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            verdict = parse_verdict(v if not isinstance(v, Mapping) else get_field(
                v, "verdict", "status", "answer", "result", "label"))
            out.append((_as_int(k), None if _as_int(k) is not None else normalize_text(k), verdict))
        return out
    if not isinstance(raw, list):
        return out
    for entry in raw:
        if isinstance(entry, Mapping):
            out.append((_as_int(get_field(entry, "id", "index", "number", "relation_id", "triplet_id")),
                        _triplet_key(get_field(entry, "triplet", "relation", "triple")),
                        parse_verdict(get_field(entry, "verdict", "status", "answer", "result", "label"))))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            out.append((_as_int(entry[0]), _triplet_key(entry[0]), parse_verdict(entry[1])))
        elif isinstance(entry, (list, tuple)) and len(entry) == 4:
            out.append((None, _triplet_key(list(entry[:3])), parse_verdict(entry[3])))
        else:
            out.append((None, None, parse_verdict(entry)))
    return out


def _assign(entries: list[tuple[int | None, str | None, Verdict | None]],
            triplets: Sequence[Triplet]) -> list[Verdict | None]:
    """Places entries on triplets by id (1-based, or 0-based if an id 0 appears), else by the
    triplet's text, else by position."""
    n = len(triplets)
    verdicts: list[Verdict | None] = [None] * n
    ids = [e[0] for e in entries if e[0] is not None]
    offset = 0 if ids and min(ids) == 0 else 1
    by_text = {}
    for i, t in enumerate(triplets):
        by_text.setdefault(normalize_text(" ".join(t)), i)
    for position, (entry_id, key, verdict) in enumerate(entries):
        if entry_id is not None:
            index = entry_id - offset
        elif key is not None and key in by_text:
            index = by_text[key]
        elif key is None:
            index = position
        else:
            continue
        if 0 <= index < n and verdicts[index] is None:
            verdicts[index] = verdict
    return verdicts


_LINE_ID_RE = re.compile(r"^\W*(?:relation|triplet|id)?\s*#?(\d+)\s*[\].:)\-]", re.I)


def match_verdicts(raw: Any, triplets: Sequence[Triplet]) -> list[Verdict | None]:
    """Verdicts for `triplets` from a JSON value holding them: a list of entries (objects with
    an id and/or the triplet and a verdict, `[id, verdict]`, `[s, p, o, verdict]`, or bare
    verdicts in order) or an object keyed by id or triplet text. None where none matched."""
    return _assign(_entries(raw), triplets)


def verdicts_from_lines(text: str, triplets: Sequence[Triplet]) -> list[Verdict | None]:
    """Last resort for prose answers: numbered lines ("2. ... violated") or lines naming a triplet."""
    entries: list[tuple[int | None, str | None, Verdict | None]] = []
    by_text = [normalize_text(" ".join(t)) for t in triplets]
    for line in text.splitlines():
        verdict = parse_verdict(line)
        if verdict is None:
            continue
        m = _LINE_ID_RE.match(line)
        if m:
            entries.append((int(m.group(1)), None, verdict))
            continue
        low = normalize_text(line)
        for key in by_text:
            if key and key in low:
                entries.append((None, key, verdict))
                break
    return _assign(entries, triplets) if entries else [None] * len(triplets)


def parse_scene_graph(raw: Any) -> tuple[list[Triplet], bool]:
    """Triplets from a JSON list of `[s, p, o]` / `{subject, predicate, object}`; the flag is
    False when the value is not a list or some entries were unusable."""
    if not isinstance(raw, list):
        return [], False
    triplets = [as_triplet(x) for x in raw]
    return [t for t in triplets if t is not None], all(t is not None for t in triplets)


def parse_checker_answer(text: str, triplets: Sequence[Triplet]) -> CheckerVerdicts:
    """Reads a Checker answer against the triplets it was asked about. Never raises."""
    triplets = list(triplets)
    found = loads_lenient(text)
    problems: list[str] = []
    scene_graph: list[Triplet] = []
    if found is None:
        verdicts = verdicts_from_lines(text if isinstance(text, str) else "", triplets)
        problems.append("no JSON object in the answer")
    else:
        value = found.value
        if isinstance(value, Mapping):
            raw_verdicts = get_field(value, "verdicts", "verdict", "results", "relations", "answers",
                                     "triplets")
            raw_graph = get_field(value, "scene_graph", "scenegraph", "graph", "extracted_scene_graph")
        else:
            raw_verdicts, raw_graph = value, None
        verdicts = match_verdicts(raw_verdicts, triplets)
        if raw_verdicts is None:
            problems.append("no 'verdicts' field")
        scene_graph, graph_ok = parse_scene_graph(raw_graph)
        if raw_graph is None:
            problems.append("no 'scene_graph' field")
        elif not graph_ok:
            problems.append("unusable 'scene_graph' entries")
    missing = [str(i + 1) for i, v in enumerate(verdicts) if v is None]
    if missing and not (found is None and len(missing) == len(triplets)):
        problems.append(f"no verdict for triplet {', '.join(missing)}")
    return CheckerVerdicts(tuple(verdicts), tuple(scene_graph), malformed=bool(problems),
                           reason="; ".join(problems))


def checker_score(verdicts: CheckerVerdicts) -> float:
    """S(I) = satisfied triplets / all triplets (missing and unparsed count as not satisfied;
    0 when there are no triplets)."""
    if not verdicts.verdicts:
        return 0.0
    return sum(v is Verdict.SATISFIED for v in verdicts.verdicts) / len(verdicts.verdicts)


# ---------------------------------------------------------------- Actor answers

_EDIT_KEYS = ("edit_prompt", "edit", "prompt", "instruction", "edit_instruction")
_EDIT_FIELD_RE = re.compile(r"""["']?edit[_ ]?prompt["']?\s*[:=]\s*(["'])(.*?)(?:\1|$)""", re.I | re.S)
_MAX_EDIT_CHARS = 1000


def _clean_edit_text(text: str) -> str:
    s = strip_fences(text)
    s = re.sub(r"\s+", " ", s).strip().strip("{}[]").strip().strip("\"'`").strip()
    return s[:_MAX_EDIT_CHARS]


def parse_edit_prompt(text: str, max_words: int | None = 40) -> EditPrompt:
    """Reads an Actor answer. Never raises.

    well_formed: the answer is exactly `{"edit_prompt": "<non-empty text>"}` (one code fence
    around it allowed) and the text has at most `max_words` words. Otherwise the best text found
    is still returned (JSON field, `edit_prompt: ...` line, or the answer itself with fences
    and quotes stripped) with well_formed False; it is empty when the answer is a JSON object
    with no usable edit field, or empty itself.
    """
    if not isinstance(text, str):
        return EditPrompt("", False)
    found = loads_lenient(text)
    if found is not None and isinstance(found.value, Mapping):
        value = get_field(found.value, *_EDIT_KEYS)
        if isinstance(value, str) and value.strip():
            edit = re.sub(r"\s+", " ", value).strip()[:_MAX_EDIT_CHARS]
            strict = (found.strict and list(found.value) == ["edit_prompt"]
                      and (max_words is None or len(edit.split()) <= max_words))
            return EditPrompt(edit, strict)
        return EditPrompt("", False)  # a JSON object without an edit instruction
    m = _EDIT_FIELD_RE.search(text[:MAX_ANSWER_CHARS])
    if m and m.group(2).strip():
        return EditPrompt(_clean_edit_text(m.group(2)), False)
    return EditPrompt(_clean_edit_text(text[:MAX_ANSWER_CHARS]), False)
