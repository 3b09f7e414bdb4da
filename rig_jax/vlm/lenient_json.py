"""The JSON value in a model's answer, found and repaired without ever raising.

Models wrap JSON in code fences, add prose around it, use single quotes and Python literals,
leave trailing commas or bare keys, and stop mid-answer. `loads_lenient` tries strict JSON
first and then bounded repairs (a fixed number of openings, parses and truncation points per
answer), so garbage costs bounded time; `strict` tells whether the answer was exactly JSON,
which the Actor's format reward pays for.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

# Longest answer the lenient readers look at: model answers are short, and this bounds the
# work spent on garbage.
MAX_ANSWER_CHARS = 16_000

_FENCE_RE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.S)
_WHOLE_FENCE_RE = re.compile(r"\A\s*```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)\r?\n?```\s*\Z", re.S)
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_PY_LITERAL_RE = re.compile(r"\b(True|False|None)\b")
_BARE_KEY_RE = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_ \-]*?)(\s*:)")
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")
_MAX_OPENINGS = 20   # starts of a JSON value tried per text region
_MAX_ATTEMPTS = 24   # parses tried per answer, truncation points included
_MAX_CUTS = 8        # truncation points tried per value (the last complete element is near the end)


@dataclasses.dataclass(frozen=True)
class LenientJSON:
    """A JSON value found in model text: `strict` when the text (or its one code fence) was exactly it."""
    value: Any
    strict: bool


def _strict_loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except Exception:  # any failure, RecursionError included, means "not strict JSON"
        return False, None


def _scan(text: str, start: int) -> tuple[int | None, list[tuple[int, str]]]:
    """Walks a JSON-ish value from the bracket at `start` (strings in ' or " quotes).

    Returns (end index past the matching bracket or None if the text ends first,
    the last truncation points: (index, closing brackets needed) after complete elements).
    """
    closer = {"{": "}", "[": "]"}
    closing = ""  # the brackets that would close everything open, innermost first
    cuts: collections.deque[tuple[int, str]] = collections.deque(maxlen=_MAX_CUTS)
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None, list(cuts)
            i = j + 1
            cuts.append((i, closing))
            continue
        if ch in "{[":
            closing = closer[ch] + closing
        elif ch in "}]":
            if not closing or closing[0] != ch:
                return None, list(cuts)
            closing = closing[1:]
            if not closing:
                return i + 1, list(cuts)
            cuts.append((i + 1, closing))
        elif ch == "," and closing:
            cuts.append((i, closing))
        i += 1
    return None, list(cuts)


_STRING_RE = re.compile(r"\"(?P<d>(?:[^\"\\]|\\.)*)\"?|'(?P<s>(?:[^'\\]|\\.)*)'?", re.S)


def _repair_raw(segment: str) -> str:
    segment = _PY_LITERAL_RE.sub(lambda m: _PY_LITERALS[m.group(1)], segment)
    return _BARE_KEY_RE.sub(lambda m: f'{m.group(1)}"{m.group(2).strip()}"{m.group(3)}', segment)


def _repair(text: str) -> str:
    """Single-quoted strings to double-quoted, Python literals to JSON, bare keys quoted,
    trailing commas dropped, an unterminated last string closed; string contents kept."""
    out: list[str] = []
    pos = 0
    for m in _STRING_RE.finditer(text):
        out.append(_repair_raw(text[pos:m.start()]))
        if m.group("d") is not None:
            body = m.group("d")
        else:
            body = re.sub(r'(?<!\\)"', r'\\"', m.group("s").replace("\\'", "'"))
        out.append(f'"{body}"')
        pos = m.end()
    out.append(_repair_raw(text[pos:]))
    return _TRAILING_COMMA_RE.sub(r"\1", "".join(out))


def _loads_repaired(text: str) -> tuple[bool, Any]:
    ok, value = _strict_loads(text)
    return (ok, value) if ok else _strict_loads(_repair(text))


def _loads_from(text: str, start: int, budget: list[int]) -> tuple[bool, Any, int | None]:
    """The JSON-ish value beginning at `start`, repaired, or the longest complete prefix of a
    truncated one. Returns (ok, value, end of the value in `text` if it closed). `budget` is
    the number of parse attempts left for the whole answer, so garbage costs bounded time."""
    end, cuts = _scan(text, start)
    if end is not None:
        budget[0] -= 1
        ok, value = _loads_repaired(text[start:end])
        if ok:
            return ok, value, end
    for cut, closing in reversed(cuts):
        if budget[0] <= 0:
            break
        budget[0] -= 1
        ok, value = _loads_repaired(text[start:cut] + closing)
        if ok:
            return ok, value, end
    return False, None, end


def loads_lenient(text: str, prefer: type = dict) -> LenientJSON | None:
    """The JSON value a model answer holds, or None.

    Tries, in order: the whole answer as strict JSON (one code fence around it allowed);
    then each code fence's content, then each `{`/`[` in the text, repaired (quotes, trailing
    commas, Python literals, bare keys) and, if cut off, closed after its last complete element.
    Values of type `prefer` win over others found at the same step.
    """
    if not isinstance(text, str):
        return None
    text = text[:MAX_ANSWER_CHARS]
    whole = _WHOLE_FENCE_RE.match(text)
    ok, value = _strict_loads(whole.group(1) if whole else text.strip())
    if ok and isinstance(value, (dict, list)):
        return LenientJSON(value, strict=True)
    regions = [m.group(1) for m in _FENCE_RE.finditer(text)][:_MAX_OPENINGS] + [text]
    fallback = None
    budget = [_MAX_ATTEMPTS]
    for region in regions:
        covered = 0  # openings inside an already-parsed value are its parts: skip them
        openings = [m.start() for m in re.finditer(r"[{\[]", region)][:_MAX_OPENINGS]
        for start in openings:
            if start < covered or budget[0] <= 0:
                continue
            ok, value, end = _loads_from(region, start, budget)
            if not ok or not isinstance(value, (dict, list)):
                continue
            covered = end if end is not None else len(region)
            if isinstance(value, prefer):
                return LenientJSON(value, strict=False)
            fallback = fallback or LenientJSON(value, strict=False)
    return fallback


def strip_fences(text: str) -> str:
    """The text with every code fence replaced by its content (for answers read as prose)."""
    return _FENCE_RE.sub(lambda m: m.group(1), text)


def normalize_key(key: Any) -> str:
    """Keys compared as lower-case words joined by underscores ("Scene Graph" == "scene_graph")."""
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def get_field(mapping: Mapping[str, Any], *names: str) -> Any:
    """The first of `names` present in `mapping`, keys compared by `normalize_key`; None if absent."""
    keys = {normalize_key(k): k for k in mapping}
    for name in names:
        if name in keys:
            return mapping[keys[name]]
    return None
