"""LAION-SG: record validation, the JSON loader, the TFDS array_record build and the grain reader."""
import copy
import importlib.util
import io
import json
import logging
import random
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rig_jax.data import laion_sg
from rig_jax.data.laion_sg import (
    SKIP_KINDS,
    build_laion_sg,
    load_laion_sg_json,
    make_reader,
    validate_record,
)
from rig_jax.data.scene_graph import Item, Relation, SceneGraph
from rig_jax.errors import ConfigError, DataError

LABELS = ["circle", "square", "triangle", "dog", "cat", "tree", "car", "cup"]
ATTRIBUTES = ["red", "blue", "green", "big", "small", "wooden", "shiny"]
PREDICATES = ["left of", "right of", "above", "below", "next to", "on"]
NUM_RECORDS = 1000


def random_graph(rng: random.Random) -> SceneGraph:
    n = rng.randint(2, 4)
    ids = rng.sample(range(100), n)
    items = tuple(Item(i, rng.choice(LABELS), tuple(rng.sample(ATTRIBUTES, rng.randint(0, 2)))) for i in ids)
    relations = []
    for _ in range(rng.randint(1, 3)):
        subject, obj = rng.sample(ids, 2)  # distinct: a self-relation is invalid
        relations.append(Relation(subject, rng.choice(PREDICATES), obj))
    return SceneGraph(items, tuple(relations))


def make_records(n: int, seed: int, prefix: str) -> tuple[list[dict], list[SceneGraph]]:
    rng = random.Random(seed)
    graphs = [random_graph(rng) for _ in range(n)]
    records = [g.to_laion_record(f"{prefix}{i:05d}", f"{prefix}{i:05d}.png", score=f"{rng.uniform(5, 7):.2f}",
                                 url=f"http://example.com/{i}.png")
               for i, g in enumerate(graphs)]
    return records, graphs


def valid_record() -> dict:
    return SceneGraph((Item(3, "circle", ("red",)), Item(5, "square", ("blue", "big"))),
                      (Relation(3, "left of", 5),)).to_laion_record("42", "42.png")


# ----------------------------------------------------------------------------- validation

def _set(path, value):
    def mutate(rec):
        target = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(rec):
        target = rec
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


MUTATIONS = {  # name -> (mutation, expected kind)
    "list_record": (None, "not_object"),
    "no_img_id": (_delete(["img_id"]), "missing_field"),
    "no_relations_field": (_delete(["relations"]), "missing_field"),
    "item_without_label": (_delete(["items", 0, "label"]), "missing_field"),
    "relation_without_item2": (_delete(["relations", 0, "item2"]), "missing_field"),
    "items_not_list": (_set(["items"], "circle"), "wrong_type"),
    "item_not_object": (_set(["items", 0], "circle"), "wrong_type"),
    "attributes_not_list": (_set(["items", 0, "attributes"], "red"), "wrong_type"),
    "attribute_not_str": (_set(["items", 1, "attributes"], ["blue", 7]), "wrong_type"),
    "item_id_str": (_set(["items", 0, "item_id"], "3"), "wrong_type"),
    "item_id_bool": (_set(["items", 0, "item_id"], True), "wrong_type"),
    "score_number": (_set(["score"], 6.5), "wrong_type"),
    "img_id_null": (_set(["img_id"], None), "wrong_type"),
    "empty_img_id": (_set(["img_id"], " "), "empty_img_id"),
    "empty_label": (_set(["items", 1, "label"], ""), "empty_label"),
    "blank_label": (_set(["items", 1, "label"], "  "), "empty_label"),
    "empty_attribute": (_set(["items", 1, "attributes"], ["blue", ""]), "empty_attribute"),
    "duplicate_item_id": (_set(["items", 1, "item_id"], 3), "duplicate_item_id"),
    "no_relations": (_set(["relations"], []), "no_relations"),
    "empty_predicate": (_set(["relations", 0, "relation"], ""), "empty_predicate"),
    "missing_item": (_set(["relations", 0, "item2"], 99), "missing_item"),
    "self_relation": (_set(["relations", 0, "item2"], 3), "self_relation"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_validate_record_names_the_fault(name):
    mutation, expected = MUTATIONS[name]
    record = valid_record()
    if mutation is None:
        record = [record]
    else:
        mutation(record)
    assert validate_record(record) == (None, expected)


def test_validate_record_keeps_schema_fields_only():
    raw = valid_record()
    raw["extra"] = {"anything": 1}
    raw["items"][0]["extra"] = 2
    record, reason = validate_record(raw)
    assert reason is None
    assert record == valid_record()
    assert SceneGraph.from_laion_record(record).prompt() == "red circle left of blue big square"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8), children, max_size=5)),
    max_leaves=20)
record_keys = st.sampled_from(list(laion_sg.RECORD_FIELDS) + list(laion_sg.ITEM_FIELDS)
                              + list(laion_sg.RELATION_FIELDS))
# near-records: the right keys with arbitrary values reach the deeper checks
near_records = st.dictionaries(record_keys, json_values | st.lists(
    st.dictionaries(record_keys, json_values | st.integers(0, 3), max_size=6), max_size=3), max_size=9)


@st.composite
def mutated_records(draw):
    record = valid_record()
    paths = [["img_id"], ["items"], ["items", 0], ["items", 1, "attributes"], ["items", 0, "item_id"],
             ["items", 1, "label"], ["relations"], ["relations", 0, "item1"], ["relations", 0, "relation"]]
    for path in draw(st.lists(st.sampled_from(paths), max_size=3)):
        try:
            _set(path, draw(json_values | st.integers(0, 6)))(record)
        except (KeyError, IndexError, TypeError):
            pass
    return record


@settings(max_examples=150, deadline=None)
@given(json_values | near_records | mutated_records())
def test_validate_record_never_raises(obj):
    record, reason = validate_record(obj)
    assert (record is None) != (reason is None)
    if record is None:
        assert reason in SKIP_KINDS
    else:
        graph = SceneGraph.from_laion_record(record)  # a valid record always makes a graph
        assert graph.prompt()
        assert json.loads(json.dumps(record)) == record


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(json_values | mutated_records(), max_size=6))
def test_loader_returns_valid_or_counts_invalid(scratch, values):
    path = scratch / "arbitrary.json"
    path.write_text(json.dumps(values))
    try:
        records, summary = load_laion_sg_json(path)
    except DataError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        assert all(validate_record(v)[0] is None for v in values)
        return
    assert summary.total == len(values)
    assert summary.kept == len(records) == summary.total - sum(summary.skipped.values())
    assert set(summary.skipped) <= set(SKIP_KINDS)


# ----------------------------------------------------------------------------- the loader

MALFORMED_COUNTS = {
    "not_object": 1, "missing_field": 2, "wrong_type": 3, "empty_label": 4, "empty_predicate": 5,
    "duplicate_item_id": 6, "missing_item": 7, "no_relations": 8, "self_relation": 9,
    "empty_attribute": 10, "duplicate_img_id": 11,
}
KIND_TO_MUTATION = {"not_object": "list_record", "missing_field": "no_img_id", "wrong_type": "item_id_str",
                    "empty_label": "empty_label", "empty_predicate": "empty_predicate",
                    "duplicate_item_id": "duplicate_item_id", "missing_item": "missing_item",
                    "no_relations": "no_relations", "self_relation": "self_relation",
                    "empty_attribute": "empty_attribute"}


def malformed_file_values():
    good, _ = make_records(20, seed=7, prefix="m")
    values = list(good)
    for kind, count in MALFORMED_COUNTS.items():
        for _ in range(count):
            if kind == "duplicate_img_id":
                values.append(copy.deepcopy(good[0]))
                continue
            mutation, _ = MUTATIONS[KIND_TO_MUTATION[kind]]
            record = valid_record()
            record = [record] if mutation is None else record
            if mutation is not None:
                mutation(record)
            values.append(record)
    random.Random(1).shuffle(values)
    return good, values


def test_loader_skips_and_counts_malformed_records(tmp_path, caplog):
    good, values = malformed_file_values()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(values))
    with caplog.at_level(logging.INFO, logger="rig_jax.data.laion_sg"):
        records, summary = load_laion_sg_json(path)
    assert sorted(r["img_id"] for r in records) == sorted(r["img_id"] for r in good)
    assert summary.skipped == MALFORMED_COUNTS
    assert summary.kept == 20 and summary.total == 20 + sum(MALFORMED_COUNTS.values())
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "rig_jax.data.laion_sg"]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"{path}: kept 20 of {summary.total} records; skipped: ")
    for kind, count in MALFORMED_COUNTS.items():
        assert f"{kind}={count}" in line.split("skipped: ")[1].split(", ")
    assert line.split("skipped: ")[1].startswith("duplicate_img_id=11, empty_attribute=10")


def test_loader_accepts_json_lines(tmp_path):
    good, _ = make_records(5, seed=3, prefix="l")
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n" + json.dumps({"img_id": "x"}) + "\n")
    records, summary = load_laion_sg_json(path)
    assert records == good
    assert summary.skipped == {"missing_field": 1}


def test_truncated_or_empty_files_fail_with_one_line_naming_the_file(tmp_path):
    good, _ = make_records(30, seed=3, prefix="t")
    text = json.dumps(good, indent=1)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    nothing_valid = tmp_path / "nothing_valid.json"
    nothing_valid.write_text(json.dumps([{"img_id": "1"}, 3]))
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    for path, fragment in [(truncated, "not JSON"), (nothing_valid, "no valid LAION-SG record"),
                           (scalar, "top level is a JSON int"), (tmp_path / "absent.json", "no such file")]:
        with pytest.raises(DataError) as info:
            load_laion_sg_json(path)
        message = str(info.value)
        assert str(path) in message and fragment in message and "\n" not in message
    with pytest.raises(DataError, match="not_object=1"):
        load_laion_sg_json(nothing_valid)


# ----------------------------------------------------------------------------- TFDS + grain


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion_sg")
    json_dir = root / "json"
    json_dir.mkdir()
    train_records, train_graphs = make_records(NUM_RECORDS, seed=0, prefix="tr")
    (json_dir / "train.json").write_text(json.dumps(train_records))
    _, val_values = malformed_file_values()
    (json_dir / "val.json").write_text(json.dumps(val_values))
    builder = build_laion_sg(json_dir, root / "tfds")
    return {"builder": builder, "root": root, "records": train_records, "graphs": train_graphs}


def read_all(reader):
    return [element for batch in reader for element in (dict(zip(batch, values, strict=True))
                                                         for values in zip(*batch.values(), strict=True))]


def test_tensorflow_is_absent(built):
    assert importlib.util.find_spec("tensorflow") is None
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    make_reader(built["builder"], "train", 4, seed=0, num_epochs=1)
    assert "tensorflow" not in sys.modules


def test_build_writes_array_record_and_counts_skips(built):
    builder = built["builder"]
    files = sorted(p.name for p in (built["root"] / "tfds" / "laion_sg" / "1.0.0").iterdir())
    assert any(".array_record-" in name for name in files)
    assert not any("tfrecord" in name for name in files)
    assert builder.info.splits["train"].num_examples == NUM_RECORDS
    assert builder.info.splits["val"].num_examples == 20
    assert builder.skip_summaries["val"].skipped == MALFORMED_COUNTS


def test_read_back_equals_what_was_written(built):
    reader = make_reader(built["builder"], "train", batch_size=64, seed=0, shuffle=False, num_epochs=1,
                         drop_remainder=False)
    elements = read_all(reader)
    assert len(elements) == NUM_RECORDS
    written = {r["img_id"]: (r, g) for r, g in zip(built["records"], built["graphs"], strict=True)}
    assert {e["img_id"] for e in elements} == set(written)
    for element in elements:
        record, graph = written[element["img_id"]]
        assert element["record"] == record
        assert element["graph"] == graph
        assert element["prompt"] == graph.prompt()
        assert element["caption"] == record["caption_ori"]
        assert element["name"] == record["name"]
        assert element["image"] is None


def test_reader_accepts_data_dir_or_version_dir(built):
    def ids(source):
        return [e["img_id"] for e in read_all(make_reader(source, "val", 8, seed=5, num_epochs=1))]
    expected = ids(built["builder"])
    for source in (built["root"] / "tfds", built["root"] / "tfds" / "laion_sg" / "1.0.0"):
        assert ids(source) == expected
    assert len(expected) == 16  # 20 records, drop_remainder


def test_two_hosts_read_disjoint_halves(built):
    shards = [read_all(make_reader(built["builder"], "train", 50, seed=3, num_epochs=1,
                                   shard_index=i, shard_count=2)) for i in range(2)]
    ids = [[e["img_id"] for e in shard] for shard in shards]
    assert len(ids[0]) == len(ids[1]) == NUM_RECORDS // 2
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == {r["img_id"] for r in built["records"]}


def test_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch(built):
    def order(seed, shuffle=True, epochs=1):
        return [e["img_id"] for e in read_all(make_reader(built["builder"], "train", 100, seed=seed,
                                                          shuffle=shuffle, num_epochs=epochs))]
    first = order(11)
    assert first == order(11)
    assert first != order(12)
    assert first != order(0, shuffle=False)
    assert sorted(first) == sorted(order(0, shuffle=False))
    two_epochs = order(11, epochs=2)
    assert two_epochs[:NUM_RECORDS] == first
    assert sorted(two_epochs[NUM_RECORDS:]) == sorted(first) and two_epochs[NUM_RECORDS:] != first


def test_saved_state_restores_in_a_fresh_reader(built):
    def ids(batch):
        return batch["img_id"]
    reader = make_reader(built["builder"], "train", 64, seed=21)
    iterator = iter(reader)
    for _ in range(13):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # checkpoints store it as JSON
    continued = [ids(next(iterator)) for _ in range(6)]  # crosses the epoch boundary (1000 / 64)
    fresh = iter(make_reader(built["root"] / "tfds", "train", 64, seed=21))
    fresh.set_state(state)
    assert [ids(next(fresh)) for _ in range(6)] == continued
    other_seed = iter(make_reader(built["builder"], "train", 64, seed=22))
    other_seed.set_state(state)
    assert ids(next(other_seed)) != continued[0]


def test_reader_errors_are_one_line(built, tmp_path):
    with pytest.raises(DataError, match="no split 'test'"):
        make_reader(built["builder"], "test", 4, seed=0)
    with pytest.raises(DataError, match=str(tmp_path)):
        make_reader(tmp_path, "train", 4, seed=0)
    with pytest.raises(ConfigError, match="shard_index"):
        make_reader(built["builder"], "train", 4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ConfigError, match="batch_size"):
        make_reader(built["builder"], "train", 0, seed=0)
    with pytest.raises(DataError, match="missing: no such folder"):
        build_laion_sg(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(DataError, match=r"holds none of train\.json, val\.json, test\.json"):
        build_laion_sg(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_images_are_stored_and_decoded(tmp_path):
    records, graphs = make_records(5, seed=9, prefix="im")
    json_dir, image_dir = tmp_path / "json", tmp_path / "images"
    json_dir.mkdir()
    image_dir.mkdir()
    (json_dir / "test.json").write_text(json.dumps(records))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), 8, 0), 8, 1)
    gray = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    (image_dir / records[0]["name"]).write_bytes(encode(rgb, "PNG"))
    jpeg_bytes = encode(smooth, "JPEG")
    (image_dir / records[1]["name"]).write_bytes(jpeg_bytes)
    (image_dir / "test").mkdir()
    (image_dir / "test" / records[2]["name"]).write_bytes(encode(gray, "PNG"))
    (image_dir / records[3]["name"]).write_bytes(b"not an image")
    # records[4] has no image file
    build_laion_sg(json_dir, tmp_path / "tfds", image_dir=image_dir)
    elements = {e["img_id"]: e for e in read_all(make_reader(tmp_path / "tfds", "test", 5, seed=0,
                                                             num_epochs=1))}
    assert len(elements) == 5
    np.testing.assert_array_equal(elements[records[0]["img_id"]]["image"], rgb)
    jpeg = elements[records[1]["img_id"]]["image"]
    # the stored bytes are the file's: decoding them directly gives the same pixels
    np.testing.assert_array_equal(jpeg, np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")))
    assert jpeg.dtype == np.uint8 and jpeg.shape == smooth.shape
    assert np.abs(jpeg.astype(int) - smooth.astype(int)).mean() < 16
    np.testing.assert_array_equal(elements[records[2]["img_id"]]["image"], np.stack([gray] * 3, -1))
    assert elements[records[3]["img_id"]]["image"] is None
    assert elements[records[4]["img_id"]]["image"] is None
    assert elements[records[4]["img_id"]]["graph"] == graphs[4]
