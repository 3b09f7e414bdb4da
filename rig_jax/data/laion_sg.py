"""LAION-SG: validate its JSON records, build a TFDS dataset (array_record), read it with grain.

Why this shape: TensorFlow is not installed, so the dataset is written in the array_record
format (the one TFDS format that needs no TensorFlow) and read back with grain, which gives
deterministic shuffling, per-host sharding and an iterator state that checkpoints can store.

Public API
- `validate_record(obj) -> (record | None, reason | None)`: one LAION-SG record checked
  against the schema of docs/method.md; `reason` is one of `SKIP_KINDS`.
- `load_laion_sg_json(path) -> (records, SkipSummary)`: a JSON list of records (LAION-SG's
  own files) or JSON lines; invalid records are skipped and counted by kind.
- `LaionSG`: the TFDS builder (reads `train.json` / `val.json` / `test.json`, any subset, from
  `json_dir`; images, when an `image_dir` is given, are looked up by the record's `name`).
- `build_laion_sg(json_dir, data_dir, image_dir=None) -> builder`: builds (or reuses) it.
- `make_reader(builder_or_data_dir, split, batch_size, seed, ...) -> grain.IterDataset`:
  batches are dicts of lists (see `decode_example` for the element fields).

Record validation, in checking order (the first failure names the kind):
`not_object`, `missing_field`, `wrong_type` (any field of the record, an item or a relation
with the wrong JSON type; ids must be int and not bool; `attributes` a list of str),
`empty_img_id`, `unsafe_name` (an absolute `name`, one with a `..` part or a NUL: images are
looked up as `image_dir/<name>`, and a record must not make a tool read a file outside
`image_dir`), `empty_label`, `empty_attribute`, `duplicate_item_id`, `no_relations`,
`empty_predicate`, `missing_item` (a relation's item1/item2 is no item's id),
`self_relation` (item1 == item2: "a left of a" cannot be drawn or judged, so the record is
dropped rather than the relation, as for `missing_item`); and, across a file,
`duplicate_img_id` (the second and later records with an already seen img_id) and, in a
JSON-lines file, `malformed_json` (a line that is not JSON: truncated, garbage, or nested
deeper than Python's parser allows); the other lines are kept. Empty or
whitespace-only strings count as empty. A valid record is returned as a fresh dict holding
exactly the schema's fields (unknown fields are dropped).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rig_jax.data.scene_graph import SceneGraph
from rig_jax.errors import ConfigError, DataError
from rig_jax.outputs import check_output_folder

if TYPE_CHECKING:
    import grain

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUILDER_NAME = "laion_sg"
# tfds builds in `<dataset>/incomplete.<random>_<version>`, then renames it to `<version>`.
INCOMPLETE_PREFIX = tfds.core.constants.INCOMPLETE_PREFIX

RECORD_FIELDS: dict[str, type] = {
    "img_id": str, "name": str, "caption_ori": str, "score": str, "url": str,
    "items": list, "relations": list,
}
ITEM_FIELDS: dict[str, type] = {"item_id": int, "label": str, "attributes": list, "global_item_id": int}
RELATION_FIELDS: dict[str, type] = {
    "triple_id": int, "item1": int, "relation": str, "item2": int, "global_relation_id": int,
}

SKIP_KINDS = (
    "not_object", "missing_field", "wrong_type", "empty_img_id", "unsafe_name", "empty_label",
    "empty_attribute", "duplicate_item_id", "no_relations", "empty_predicate", "missing_item",
    "self_relation", "duplicate_img_id", "malformed_json",
)

# Largest image (width x height) any reader here decodes: PIL's own decompression-bomb
# threshold, refused from the header, before a byte of pixels is allocated.
MAX_IMAGE_PIXELS = 89_478_485


# ---------------------------------------------------------------------------------------------
# Validation and JSON loading


def _has_type(value: Any, kind: type) -> bool:
    if kind is int:  # JSON has no bool ids: True is an int to Python, not to LAION-SG
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_fields(obj: Mapping[Any, Any], fields: Mapping[str, type]) -> str | None:
    for name in fields:
        if name not in obj:
            return "missing_field"
    for name, kind in fields.items():
        if not _has_type(obj[name], kind):
            return "wrong_type"
    return None


def _blank(text: str) -> bool:
    return not text.strip()


def unsafe_name(name: str) -> bool:
    """True for a record `name` that could address a file outside the image folder: absolute
    (POSIX or Windows), with a drive, with a `..` part, or holding a NUL."""
    if "\x00" in name or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[\\/]", name)


def image_size_problem(size: tuple[int, int]) -> str | None:
    """Why an image whose header claims `size` (width, height) is refused, or None."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        return (f"header claims {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} "
                "pixels read here (a decompression bomb or a corrupt header)")
    return None


def validate_record(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Checks one LAION-SG record; returns `(normalised record, None)` or `(None, kind)`.

    Never raises: a corpus of 480k records should lose its bad records, not the run.
    The returned record is safe for `SceneGraph.from_laion_record`.
    """
    if not isinstance(obj, Mapping):
        return None, "not_object"
    reason = _check_fields(obj, RECORD_FIELDS)
    if reason:
        return None, reason
    items, relations = obj["items"], obj["relations"]
    for entries, fields in ((items, ITEM_FIELDS), (relations, RELATION_FIELDS)):
        for entry in entries:
            if not isinstance(entry, Mapping):
                return None, "wrong_type"
            reason = _check_fields(entry, fields)
            if reason:
                return None, reason
    if not all(isinstance(a, str) for it in items for a in it["attributes"]):
        return None, "wrong_type"

    if _blank(obj["img_id"]):
        return None, "empty_img_id"
    if unsafe_name(obj["name"]):
        return None, "unsafe_name"
    if any(_blank(it["label"]) for it in items):
        return None, "empty_label"
    if any(_blank(a) for it in items for a in it["attributes"]):
        return None, "empty_attribute"
    item_ids = [it["item_id"] for it in items]
    if len(set(item_ids)) != len(item_ids):
        return None, "duplicate_item_id"
    if not relations:
        return None, "no_relations"
    if any(_blank(r["relation"]) for r in relations):
        return None, "empty_predicate"
    known = set(item_ids)
    if any(r["item1"] not in known or r["item2"] not in known for r in relations):
        return None, "missing_item"
    if any(r["item1"] == r["item2"] for r in relations):
        return None, "self_relation"

    record = {name: obj[name] for name in RECORD_FIELDS if name not in ("items", "relations")}
    record["items"] = [{"item_id": it["item_id"], "label": it["label"],
                        "attributes": list(it["attributes"]), "global_item_id": it["global_item_id"]}
                       for it in items]
    record["relations"] = [{name: r[name] for name in RELATION_FIELDS} for r in relations]
    return record, None


@dataclasses.dataclass(frozen=True)
class SkipSummary:
    """What loading one file kept and skipped; `str()` is the one line that gets logged."""
    path: str
    total: int
    kept: int
    skipped: dict[str, int]  # kind -> count, only kinds that occurred

    def __str__(self) -> str:
        ordered = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        skipped = ", ".join(f"{kind}={count}" for kind, count in ordered) or "none"
        return f"{self.path}: kept {self.kept} of {self.total} records; skipped: {skipped}"


def _json_value(text: str) -> tuple[bool, Any, str]:
    """(ok, value, why not): strict JSON; nesting beyond Python's recursion limit is a
    failure like any other, never a RecursionError."""
    try:
        return True, json.loads(text), ""
    except json.JSONDecodeError as err:
        return False, None, f"{err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        return False, None, "nested deeper than the JSON parser allows"


def _parse_json_file(path: Path) -> tuple[list[Any], int]:
    """The file's top-level values (a JSON list, a single JSON object, or JSON lines) and the
    number of JSON-lines lines that are not JSON (skipped, like any other malformed record)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    ok, value, where = _json_value(text)
    if not ok:
        # A file that opens a list is one JSON document (LAION-SG's own format): truncated or
        # broken, it has no record boundaries to recover. Anything else is read as JSON lines.
        lines = [line for line in text.splitlines() if line.strip()]
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: not JSON ({where})")
        values = []
        for line in lines:
            line_ok, line_value, _ = _json_value(line)
            if line_ok:
                values.append(line_value)
        if not values:
            raise DataError(f"{path}: not JSON ({where}) nor JSON lines (no line is a JSON value)")
        return values, len(lines) - len(values)
    if isinstance(value, list):
        return value, 0
    if isinstance(value, dict):
        return [value], 0
    raise DataError(f"{path}: top level is a JSON {type(value).__name__}, expected a list of records")


def load_laion_sg_json(path: str | os.PathLike) -> tuple[list[dict[str, Any]], SkipSummary]:
    """Loads the valid records of one LAION-SG JSON file and logs its `SkipSummary` line.

    Raises DataError (one line, naming the file) when the file is missing, is not JSON
    (e.g. truncated) or holds no valid record.
    """
    path = Path(path)
    values, bad_lines = _parse_json_file(path)
    records: list[dict[str, Any]] = []
    skipped: collections.Counter[str] = collections.Counter()
    if bad_lines:
        skipped["malformed_json"] = bad_lines
    seen_ids: set[str] = set()
    for value in values:
        record, reason = validate_record(value)
        if record is not None and record["img_id"] in seen_ids:
            record, reason = None, "duplicate_img_id"
        if record is None:
            skipped[str(reason)] += 1
            continue
        seen_ids.add(record["img_id"])
        records.append(record)
    summary = SkipSummary(str(path), len(values) + bad_lines, len(records), dict(skipped))
    if not records:
        raise DataError(f"{path}: no valid LAION-SG record ({str(summary).split('; ', 1)[1]})")
    logger.log(logging.WARNING if skipped else logging.INFO, "%s", summary)
    return records, summary


# ---------------------------------------------------------------------------------------------
# The TFDS builder


def _split_file(json_dir: Path, split: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        candidate = json_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _split_files(json_dir: Path, image_dir: Path | None) -> dict[str, Path]:
    """The split files present in `json_dir`; DataError if the folders or all the files are missing."""
    if not json_dir.is_dir():
        raise DataError(f"{json_dir}: no such folder")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such image folder")
    files = {split: _split_file(json_dir, split) for split in SPLITS}
    files = {split: path for split, path in files.items() if path is not None}
    if not files:
        raise DataError(f"{json_dir}: holds none of {', '.join(s + '.json' for s in SPLITS)}")
    return files


def _read_image_bytes(image_dir: Path, split: str, name: str) -> bytes | None:
    """Encoded bytes of `image_dir/name` (or `image_dir/split/name`), None if absent or unreadable."""
    from PIL import Image

    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    for candidate in (image_dir / name, image_dir / split / name):
        if candidate.is_file():
            data = candidate.read_bytes()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
                    with Image.open(io.BytesIO(data)) as img:
                        problem = image_size_problem(img.size)
                        if problem is None:
                            img.verify()
            except Exception:  # PIL raises many types for corrupt files; a bad image is just absent
                logger.warning("%s: unreadable image, stored as absent", candidate)
                return None
            if problem is not None:
                logger.warning("%s: %s; stored as absent", candidate, problem)
                return None
            return data
    return None


class LaionSG(tfds.core.GeneratorBasedBuilder):
    """LAION-SG as TFDS array_record files; one example per valid record.

    Features: `img_id`, `name`, `prompt` (`SceneGraph.prompt()`), `caption` (`caption_ori`),
    `record` (the validated record as JSON, so the whole graph survives) and `image` (the
    encoded PNG/JPEG bytes, empty when no image was found). `json_dir` and `image_dir` are
    needed only to build; reading a built dataset needs just `data_dir`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Validated LAION-SG records, prompt, record JSON and encoded image.",
    }

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves the code path of a builder inside a package through
        # `importlib_resources`, a backport it no longer installs on Python >= 3.9.
        return epath.Path(__file__)

    def __init__(self, *, json_dir: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._json_dir = Path(json_dir) if json_dir is not None else None
        self._image_dir = Path(image_dir) if image_dir is not None else None
        self.skip_summaries: dict[str, SkipSummary] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not via dataset_info_from_configs), which needs a package layout.
        return tfds.core.DatasetInfo(
            builder=self,
            description="LAION-SG scene-graph records (validated), the prompt built from each "
                        "graph, and the image bytes when available.",
            features=tfds.features.FeaturesDict({
                "img_id": tfds.features.Text(),
                "name": tfds.features.Text(),
                "prompt": tfds.features.Text(),
                "caption": tfds.features.Text(),
                "record": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        if self._json_dir is None:
            raise DataError(f"{BUILDER_NAME}: building needs json_dir (a folder with train.json, "
                            "val.json and/or test.json)")
        files = _split_files(self._json_dir, self._image_dir)
        return {split: self._generate_examples(split, path) for split, path in files.items()}

    def _generate_examples(self, split: str, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        records, summary = load_laion_sg_json(path)
        self.skip_summaries[split] = summary
        missing_images = 0
        for record in records:
            image = b""
            if self._image_dir is not None:
                found = _read_image_bytes(self._image_dir, split, record["name"])
                missing_images += found is None
                image = found or b""
            yield record["img_id"], {
                "img_id": record["img_id"],
                "name": record["name"],
                "prompt": SceneGraph.from_laion_record(record).prompt(),
                "caption": record["caption_ori"],
                "record": json.dumps(record, ensure_ascii=False),
                "image": image,
            }
        if missing_images:
            logger.warning("%s: %d of %d records have no readable image in %s",
                           split, missing_images, len(records), self._image_dir)


@contextlib.contextmanager
def _build_lock(data_dir: Path) -> Iterator[None]:
    """Holds an exclusive lock on `data_dir` for one build (waiting for a live one to end).
    The kernel drops the lock when its process dies, so while it is held every tfds
    `incomplete.*` folder there belongs to a dead run."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".{BUILDER_NAME}.build.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def remove_stale_incomplete(dataset_dir: Path) -> list[str]:
    """Deletes the `incomplete.*` folders tfds left in `dataset_dir` (`data_dir/laion_sg`) when
    a build was killed; call it only under `_build_lock`. Returns the names removed."""
    if not dataset_dir.is_dir():
        return []
    stale = sorted(p for p in dataset_dir.iterdir()
                   if p.name.startswith(INCOMPLETE_PREFIX) and p.is_dir() and not p.is_symlink())
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        logger.warning("%s: removed %d incomplete build folder(s) of killed runs: %s", dataset_dir,
                       len(stale), ", ".join(p.name for p in stale))
    return [p.name for p in stale]


def build_laion_sg(json_dir: str | os.PathLike, data_dir: str | os.PathLike,
                   image_dir: str | os.PathLike | None = None, overwrite: bool = False) -> LaionSG:
    """Builds LAION-SG under `data_dir/laion_sg/<version>` (reused if already built, unless
    `overwrite`) and returns the builder, ready for `make_reader`.

    Builds of one `data_dir` take turns (a file lock), and each first removes the
    `incomplete.*` folders of killed builds, which tfds itself never deletes."""
    # Checked before tfds creates any folder, so a typo leaves nothing behind.
    _split_files(Path(json_dir), Path(image_dir) if image_dir is not None else None)
    check_output_folder(os.fspath(data_dir), "data_dir", allow_existing=True)
    builder = LaionSG(json_dir=json_dir, image_dir=image_dir, data_dir=os.fspath(data_dir))
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    with _build_lock(Path(data_dir)):
        remove_stale_incomplete(Path(data_dir) / BUILDER_NAME)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


# ---------------------------------------------------------------------------------------------
# The grain reader


def _open_builder(source: Any) -> tfds.core.DatasetBuilder:
    if isinstance(source, tfds.core.DatasetBuilder):
        return source
    path = Path(source)
    if (path / "dataset_info.json").is_file():
        return tfds.builder_from_directory(os.fspath(path))
    versions = sorted((p for p in (path / BUILDER_NAME).glob("*")
                       if tfds.core.Version.is_valid(p.name) and (p / "dataset_info.json").is_file()),
                      key=lambda p: tfds.core.Version(p.name))
    if not versions:
        raise DataError(f"{path}: no built LAION-SG dataset (expected {BUILDER_NAME}/<version>/"
                        "dataset_info.json; run build_laion_sg first)")
    return tfds.builder_from_directory(os.fspath(versions[-1]))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """One stored example as Python values.

    Fields: `img_id`, `name`, `prompt`, `caption` (str); `record` (the LAION-SG record dict);
    `graph` (its SceneGraph); `image` (HWC uint8 RGB array, or None when none was stored).
    """
    from PIL import Image

    record = json.loads(_text(example["record"]))
    encoded = example["image"]
    image = None
    if encoded is not None and len(encoded):
        with Image.open(io.BytesIO(bytes(encoded))) as img:
            image = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return {
        "img_id": _text(example["img_id"]), "name": _text(example["name"]),
        "prompt": _text(example["prompt"]), "caption": _text(example["caption"]),
        "record": record, "graph": SceneGraph.from_laion_record(record), "image": image,
    }


def collate(elements: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """A batch as a dict of lists: strings, graphs and images of different sizes don't stack."""
    return {key: [element[key] for element in elements] for key in elements[0]}


def make_reader(builder_or_data_dir: Any, split: str, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, drop_remainder: bool = True,
                num_threads: int = 4) -> grain.IterDataset:
    """A grain IterDataset of `collate`d batches of `decode_example` elements.

    `builder_or_data_dir`: a LaionSG builder, the TFDS root `data_dir` it was built in, or the
    `data_dir/laion_sg/<version>` folder. Sharding defaults to this JAX process among all
    (`jax.process_index()` of `jax.process_count()`): host `i` reads records `i, i + n, ...` of
    the first `n * (N // n)` records, so shards are disjoint and of equal length and all hosts
    take the same number of steps. Each host then shuffles its shard with `seed`, reshuffled
    per epoch (`num_epochs=None` repeats forever). `iter(reader)` gives an iterator whose
    `get_state()` / `set_state(state)` save and restore the position (checkpoints store it).
    """
    import grain
    import jax

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, shard_count), got {shard_index} of {shard_count}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None, got {num_epochs}")

    builder = _open_builder(builder_or_data_dir)
    available = sorted(builder.info.splits.keys())
    if split not in available:
        raise DataError(f"{builder.data_dir}: no split {split!r} (has {', '.join(available) or 'none'})")
    source = builder.as_data_source(split=split)
    per_shard = len(source) // shard_count
    if per_shard == 0:
        raise DataError(f"{builder.data_dir}: split {split!r} has {len(source)} records, "
                        f"fewer than shard_count={shard_count}")
    dataset = grain.MapDataset.source(source)
    dataset = dataset.slice(slice(shard_index, per_shard * shard_count, shard_count))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs).map(decode_example)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, 16))
    return dataset.to_iter_dataset(read_options).batch(batch_size, drop_remainder=drop_remainder,
                                                       batch_fn=collate)
