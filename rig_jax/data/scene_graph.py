"""Scene graphs: the items and relations a prompt asks for, and the prompt built from them.

One convention everywhere (generator, detector, judges, metrics): a node is named by
its text, either the bare label (`"circle"`) or attributes then label (`"red circle"`),
and a triplet is `(subject node, predicate, object node)` compared as exact strings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Triplet = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: int
    label: str
    attributes: tuple[str, ...] = ()

    def text(self, with_attributes: bool = True) -> str:
        """Node text: LAION-SG's `" ".join(attributes) + " " + label`, without the
        leading space that rule leaves when there are no attributes."""
        return " ".join((*self.attributes, self.label)) if with_attributes else self.label


@dataclasses.dataclass(frozen=True)
class Relation:
    subject: int   # item_id
    predicate: str
    object: int    # item_id


@dataclasses.dataclass(frozen=True)
class SceneGraph:
    items: tuple[Item, ...]
    relations: tuple[Relation, ...]

    def item(self, item_id: int) -> Item:
        for it in self.items:
            if it.item_id == item_id:
                return it
        raise KeyError(f"no item with item_id {item_id}")

    def triplets(self, with_attributes: bool = True) -> list[Triplet]:
        """Triplets in relation order (duplicates kept; metrics take sets)."""
        return [(self.item(r.subject).text(with_attributes), r.predicate,
                 self.item(r.object).text(with_attributes)) for r in self.relations]

    def objects(self, with_attributes: bool = True) -> list[str]:
        return [it.text(with_attributes) for it in self.items]

    def predicates(self) -> list[str]:
        return [r.predicate for r in self.relations]

    def prompt(self) -> str:
        """The prompt of method.md: `"; "`-joined `"<subject> <predicate> <object>"`
        clauses in triplet order, then the nodes of items that are in no relation."""
        related = {r.subject for r in self.relations} | {r.object for r in self.relations}
        clauses = [f"{s} {p} {o}" for s, p, o in self.triplets(with_attributes=True)]
        clauses += [it.text() for it in self.items if it.item_id not in related]
        return "; ".join(clauses)

    def to_laion_record(self, img_id: str, name: str, caption: str | None = None,
                        score: str = "", url: str = "") -> dict[str, Any]:
        """A LAION-SG JSON record (ids as LAION-SG writes them)."""
        return {
            "img_id": str(img_id), "name": name, "caption_ori": caption or self.prompt(),
            "score": score, "url": url,
            "items": [{"item_id": it.item_id, "label": it.label, "attributes": list(it.attributes),
                       "global_item_id": it.item_id} for it in self.items],
            "relations": [{"triple_id": i, "item1": r.subject, "relation": r.predicate,
                           "item2": r.object, "global_relation_id": i}
                          for i, r in enumerate(self.relations)],
        }

    @classmethod
    def from_laion_record(cls, record: Mapping[str, Any]) -> SceneGraph:
        """Builds a graph from an already validated LAION-SG record
        (see `rig_jax.data.laion_sg` for validation)."""
        items = tuple(Item(int(it["item_id"]), str(it["label"]),
                           tuple(str(a) for a in it.get("attributes") or ()))
                      for it in record["items"])
        relations = tuple(Relation(int(r["item1"]), str(r["relation"]), int(r["item2"]))
                          for r in record["relations"])
        return cls(items, relations)

    @classmethod
    def from_triplets(cls, triplets: Iterable[tuple[Item, str, Item]],
                      extra_items: Sequence[Item] = ()) -> SceneGraph:
        """A graph from `(Item, predicate, Item)` triplets; items are deduplicated by id."""
        items: dict[int, Item] = {}
        relations = []
        for s, p, o in triplets:
            items.setdefault(s.item_id, s)
            items.setdefault(o.item_id, o)
            relations.append(Relation(s.item_id, p, o.item_id))
        for it in extra_items:
            items.setdefault(it.item_id, it)
        return cls(tuple(items.values()), tuple(relations))


EMPTY_GRAPH = SceneGraph((), ())
