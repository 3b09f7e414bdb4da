"""The edit-prompt forms of the ShapesSG Actor, as plain text functions of scene-graph triplets.

The Actor is warm-started on several forms per feedback, so its sampled prompts differ and
stage 1 has something to choose between; the Diffuser is trained on `P + ". " + e` with `e`
in these forms (true of its image), so an edit condition is in distribution for the Editor.
"""
from __future__ import annotations

from collections.abc import Sequence

from rig_jax.data.scene_graph import SceneGraph

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
EDIT_FORMS = ("restate", "move", "swap", "whole")
# The Actor's forms: the Diffuser's four plus three more written with the same words (so the
# text encoders' vocabularies and the Diffuser's draw over EDIT_FORMS stay as they are). With
# one relation per prompt "restate" equals "whole"; the extra forms keep 6 distinct texts.
ACTOR_FORMS = EDIT_FORMS + ("converse", "put", "move_object")

Triplet = tuple[str, str, str]


def graph_triplets(graph: SceneGraph) -> list[Triplet]:
    """(subject, predicate, object) node texts (attribute form) of the graph's relations."""
    items = {i.item_id: i for i in graph.items}
    return [(items[r.subject].text(), r.predicate, items[r.object].text()) for r in graph.relations]


def edit_text(form: str, triplets: Sequence[Triplet], prompt: str) -> str:
    """One edit prompt of `form` for the relations `triplets` (the ones to fix)."""
    if form == "whole":
        return prompt
    clauses = []
    for s, p, o in triplets:
        if form == "restate":
            clauses.append(f"{s} {p} {o}")
        elif form == "move":
            clauses.append(f"move the {s} {p} the {o}")
        elif form == "swap":
            clauses.append(f"put the {o} {OPPOSITE.get(p, p)} the {s}")
        elif form == "converse":
            clauses.append(f"{o} {OPPOSITE.get(p, p)} {s}")
        elif form == "put":
            clauses.append(f"put the {s} {p} the {o}")
        elif form == "move_object":
            clauses.append(f"move the {o} {OPPOSITE.get(p, p)} the {s}")
        else:
            raise ValueError(f"unknown edit form {form!r} (known: {', '.join(ACTOR_FORMS)})")
    return "; ".join(clauses)


def vocabulary(colours: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Every word a ShapesSG prompt or edit prompt uses (the text encoders' vocabularies)."""
    words = list(colours) + list(labels) + ["left", "right", "of", "above", "below", "move", "the", "put"]
    return list(dict.fromkeys(words))
