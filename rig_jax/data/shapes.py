"""ShapesSG: a tiny world of coloured shapes whose scene graphs can be read back from pixels.

It lets the whole RL-RIG pipeline (Diffuser, Checker, rewards, evaluation) run and be
measured on a CPU: the generator writes scenes and their graphs, `render` draws them and
`detect` (the ShapesSG Checker and Judge) reads a graph back from any image, generated
or rendered, with no model at all.

Conventions (the generator and the detector share them, so a faithful image scores 1.0):
- Coordinates: x to the right, y downwards, pixel (row y, column x) covers
  [x, x+1) x [y, y+1). A box is `(x0, y0, width, height)`; its centre `(x0 + w/2, y0 + h/2)`.
  Every shape touches all four sides of its box, so the detector's bounding box of the
  pixels is the generator's box.
- Items: one per object in scene order, `item_id` = index, `label` = shape name,
  `attributes` = `(colour,)`. In colour-only scenes (the default at image sizes <= 16,
  where 5 px shapes cannot be told apart) every object is a filled square and its label
  is `"object"`, so triplets read e.g. `"red object left of blue object"`.
- Relations: one per consecutive pair of items, subject = item k, object = item k + 1,
  read on the dominant axis of the centre offset `(dx, dy) = centre(k) - centre(k+1)`:
  `|dx| > |dy|` gives `left of` (dx < 0) or `right of`, otherwise `above` (dy < 0) or
  `below`. The generator rejects a pair with `||dx| - |dy|| < ambiguity margin`
  (2 px at 32 px, scaled), so the predicate never depends on a pixel.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np

from rig_jax.data.scene_graph import Item, Relation, SceneGraph
from rig_jax.errors import ConfigError, DataError

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
"""The colours a scene may use: corners of the RGB cube, so a per-channel threshold
names each one without ambiguity (black is the background)."""

SHAPES = ("circle", "square", "triangle")
PREDICATES = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COLOUR_ONLY_LABEL = "object"
WORLD_FILE = "shapes_config.json"   # the world a ShapesSG model was trained on, beside its files
REFERENCE_SIZE = 32   # the image size the pixel defaults below are given for


def _colour_code(rgb: Sequence[float]) -> int:
    return int(rgb[0] >= 0.5) * 4 + int(rgb[1] >= 0.5) * 2 + int(rgb[2] >= 0.5)


_CODE_TO_COLOUR = {_colour_code(v): k for k, v in PALETTE.items()}


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The ShapesSG world. Fields left None are derived from `image_size` (pixel sizes
    are given at 32 px and scaled), so `dataclasses.replace(c, image_size=64)` rescales."""
    image_size: int = 32
    min_objects: int = 2
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    min_size: int | None = None           # object box side, px (8 at 32 px)
    max_size: int | None = None           # (10 at 32 px)
    gap: int = 1                          # empty pixels at least between two boxes
    ambiguity_margin: float | None = None  # reject ||dx| - |dy|| below this (2 px at 32 px)
    colour_only: bool | None = None       # None: colour-only when image_size <= 16
    threshold: float = 0.5                # per-channel threshold of the detector
    min_area: int | None = None           # smallest component the detector accepts (10 px at 32)
    max_tries: int = 200                  # whole-scene placement restarts before giving up

    def __post_init__(self) -> None:
        if isinstance(self.shapes, str) or isinstance(self.colours, str):
            raise ConfigError("ShapesConfig.shapes and .colours must be sequences of names")
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))
        if self.image_size < 8:
            raise ConfigError(f"ShapesConfig.image_size: {self.image_size} is below 8 px")
        for s in self.shapes:
            if s not in SHAPES:
                raise ConfigError(f"ShapesConfig.shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})")
        for c in self.colours:
            if c not in PALETTE:
                raise ConfigError(f"ShapesConfig.colours: unknown colour {c!r} (known: {', '.join(PALETTE)})")
        if not self.shapes or len(set(self.colours)) != len(self.colours):
            raise ConfigError("ShapesConfig: shapes must be non-empty and colours distinct")
        if not 2 <= self.min_objects <= self.max_objects <= len(self.colours):
            raise ConfigError(f"ShapesConfig.min_objects/max_objects: need 2 <= {self.min_objects} <= "
                              f"{self.max_objects} <= {len(self.colours)} (colours are unique in a scene)")
        lo, hi = self.size_range
        if not 3 <= lo <= hi <= self.image_size // 2:
            raise ConfigError(f"ShapesConfig.min_size/max_size: {lo}..{hi} px does not fit "
                              f"3..{self.image_size // 2} px at image_size {self.image_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"ShapesConfig.threshold: {self.threshold} is not in (0, 1)")

    @property
    def scale(self) -> float:
        return self.image_size / REFERENCE_SIZE

    @property
    def size_range(self) -> tuple[int, int]:
        lo = self.min_size if self.min_size is not None else max(3, round(8 * self.scale))
        hi = self.max_size if self.max_size is not None else max(lo, round(10 * self.scale))
        return lo, hi

    @property
    def margin(self) -> float:
        return self.ambiguity_margin if self.ambiguity_margin is not None else 2.0 * self.scale

    @property
    def is_colour_only(self) -> bool:
        return self.colour_only if self.colour_only is not None else self.image_size <= 16

    @property
    def area_min(self) -> int:
        return self.min_area if self.min_area is not None else max(3, round(10 * self.scale ** 2))


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]   # x0, y0, width, height in pixels

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, w, h = self.box
        return (x0 + w / 2, y0 + h / 2)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    image_size: int
    colour_only: bool = False


def world_from_config(section) -> ShapesConfig:
    """A config's `world` section (image_size, min/max_objects, colours, shapes) as a world."""
    return ShapesConfig(image_size=section.image_size, min_objects=section.min_objects,
                        max_objects=section.max_objects, colours=tuple(section.colours),
                        shapes=tuple(section.shapes))


def relation_between(subject_centre: Sequence[float], object_centre: Sequence[float]) -> str:
    """The predicate for `subject <pred> object`: the dominant axis of the centre offset
    (ties go to the vertical axis; the generator never makes near-ties)."""
    dx = subject_centre[0] - object_centre[0]
    dy = subject_centre[1] - object_centre[1]
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def generate_scene(rng: np.random.Generator | int, config: ShapesConfig = ShapesConfig()) -> Scene:
    """A random scene: 2-4 objects of unique colours, boxes `gap` px apart, consecutive
    pairs never ambiguous. The same seed (or generator state) gives the same scene."""
    rng = _as_generator(rng)
    size = config.image_size
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    colours = [config.colours[i] for i in rng.choice(len(config.colours), n, replace=False)]
    if config.is_colour_only:
        shapes = ["square"] * n
    else:
        shapes = [config.shapes[i] for i in rng.integers(0, len(config.shapes), n)]
    lo, hi = config.size_range
    sides = rng.integers(lo, hi + 1, n)
    candidates = 64
    for _ in range(config.max_tries):
        boxes: list[tuple[int, int, int, int]] = []
        for k in range(n):
            s = int(sides[k])
            xs = rng.integers(0, size - s + 1, candidates)
            ys = rng.integers(0, size - s + 1, candidates)
            ok = np.ones(candidates, bool)
            for bx, by, bw, bh in boxes:
                ok &= ((xs >= bx + bw + config.gap) | (bx >= xs + s + config.gap)
                       | (ys >= by + bh + config.gap) | (by >= ys + s + config.gap))
            if boxes:
                px, py, pw, ph = boxes[-1]
                dx = (xs + s / 2) - (px + pw / 2)
                dy = (ys + s / 2) - (py + ph / 2)
                ok &= np.abs(np.abs(dx) - np.abs(dy)) >= config.margin
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            j = hits[0]
            boxes.append((int(xs[j]), int(ys[j]), s, s))
        if len(boxes) == n:
            objects = tuple(SceneObject(sh, c, b) for sh, c, b in zip(shapes, colours, boxes, strict=True))
            return Scene(objects, size, config.is_colour_only)
    raise ConfigError(f"ShapesConfig: could not place {n} objects of {lo}..{hi} px in a {size} px image "
                      f"after {config.max_tries} tries (lower max_objects or the sizes)")


def generate_scenes(seed: int, n: int, config: ShapesConfig = ShapesConfig()) -> list[Scene]:
    """`n` scenes drawn in turn from one generator seeded with `seed` (same seed, same list)."""
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, config) for _ in range(n)]


def scene_graph(scene: Scene) -> SceneGraph:
    """The prompt's graph: items in scene order, one relation per consecutive pair."""
    items = tuple(Item(k, COLOUR_ONLY_LABEL if scene.colour_only else o.shape, (o.colour,))
                  for k, o in enumerate(scene.objects))
    relations = tuple(Relation(k, relation_between(a.centre, b.centre), k + 1)
                      for k, (a, b) in enumerate(itertools.pairwise(scene.objects)))
    return SceneGraph(items, relations)


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Filled mask of a shape in its box; it touches all four sides of the box.
    Circle (ellipse): pixel centres inside the inscribed ellipse. Triangle: apex up, row r
    (0 = top) spans the pixel centres within `(w/2) * (r+1)/h` of the middle, base full."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    cx, cy = width / 2, height / 2
    if shape == "square":
        mask = np.ones((height, width), bool)
    elif shape == "circle":
        mask = ((x - cx) / cx) ** 2 + ((y - cy) / cy) ** 2 <= 1.0 + 1e-9
    elif shape == "triangle":
        half = cx * (np.floor(y) + 1) / height
        mask = np.abs(x - cx) <= half + 1e-9
    else:
        raise ConfigError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    mask.setflags(write=False)
    return mask


def render(scene: Scene, config: ShapesConfig | None = None) -> np.ndarray:
    """float32 HxWx3 in [0, 1]: filled pure-colour shapes on black, no anti-aliasing."""
    if config is not None and config.image_size != scene.image_size:
        raise ConfigError(f"ShapesConfig.image_size {config.image_size} differs from the scene's "
                          f"{scene.image_size}")
    image = np.zeros((scene.image_size, scene.image_size, 3), np.float32)
    for o in scene.objects:
        x0, y0, w, h = o.box
        region = image[y0:y0 + h, x0:x0 + w]
        region[shape_mask(o.shape, w, h)] = PALETTE[o.colour]
    return image


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """NHWC float32 renders of scenes of one size."""
    return np.stack([render(s) for s in scenes])


# ----------------------------------------------------------------------------- detector

@dataclasses.dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]   # bounding box of the component: x0, y0, width, height
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, w, h = self.box
        return (x0 + w / 2, y0 + h / 2)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(f"ShapesSG detector needs an HxWx3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32, copy=False)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one component cropped to its bounding box. A triangle (apex up) holds
    ~30% of its mass above the box's middle (circles and squares 50%); a square fills
    its box (circles ~80%, triangles ~60%)."""
    h, w = mask.shape
    area = mask.sum()
    row_centres = np.arange(h) + 0.5
    row_weight = np.where(row_centres < h / 2, 1.0, np.where(row_centres == h / 2, 0.5, 0.0))
    top = float(row_weight @ mask.sum(axis=1)) / area
    if top < 0.42:
        return "triangle"
    return "square" if area / (h * w) >= 0.92 else "circle"


def detect_objects(image: np.ndarray, config: ShapesConfig) -> list[DetectedObject]:
    """The largest 4-connected component of each of the config's colours, if it has at
    least `config.area_min` pixels, in palette (config) order."""
    from scipy import ndimage

    img = _as_float_image(image)
    h, w, _ = img.shape
    if h != w or h != config.image_size:
        raise DataError(f"ShapesSG detector: image is {h}x{w}, config.image_size is {config.image_size}")
    bits = img > config.threshold
    code = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]
    present = set(np.unique(code).tolist())
    found = []
    for colour in config.colours:
        c = _colour_code(PALETTE[colour])
        if c not in present:
            continue
        labels, count = ndimage.label(code == c)   # default structure: 4-connectivity
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        best = int(sizes.argmax())
        area = int(sizes[best])
        if area < config.area_min:
            continue
        rows = np.flatnonzero((labels == best).any(axis=1))
        cols = np.flatnonzero((labels == best).any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = labels[y0:y1, x0:x1] == best
        shape = "square" if config.is_colour_only else classify_shape(crop)
        found.append(DetectedObject(colour, shape, (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), area))
    return found


def _item_colour(item: Item) -> str | None:
    for a in item.attributes:
        if a in PALETTE:
            return a
    return None


def detect(image: np.ndarray, config: ShapesConfig | None = None,
           graph: SceneGraph | None = None) -> SceneGraph:
    """Reads a scene graph from pixels alone.

    With `graph` (the prompt's graph): detected objects whose colour an item of the prompt
    names take that item's id; the relation of each prompt pair whose two colours are found
    is read from the geometry (same convention as the generator). Without it: objects in
    palette order, one relation per consecutive pair. `config` defaults to the default
    world at the image's size."""
    if config is None:
        config = ShapesConfig(image_size=int(np.shape(image)[0]))
    return graph_from_objects(detect_objects(image, config), config, graph)


def graph_from_objects(objects: Sequence[DetectedObject], config: ShapesConfig,
                       graph: SceneGraph | None = None) -> SceneGraph:
    """The scene graph `detect` reports for already detected objects."""
    by_colour = {o.colour: o for o in objects}

    def label(o: DetectedObject) -> str:
        return COLOUR_ONLY_LABEL if config.is_colour_only else o.shape

    if graph is None:
        items = tuple(Item(k, label(o), (o.colour,)) for k, o in enumerate(objects))
        relations = tuple(Relation(k, relation_between(a.centre, b.centre), k + 1)
                          for k, (a, b) in enumerate(itertools.pairwise(objects)))
        return SceneGraph(items, relations)

    id_of_colour: dict[str, int] = {}
    for it in graph.items:
        colour = _item_colour(it)
        if colour is not None and colour in by_colour:
            id_of_colour.setdefault(colour, it.item_id)
    next_id = max((it.item_id for it in graph.items), default=-1) + 1
    for o in objects:      # objects the prompt does not name get fresh ids after the prompt's
        if o.colour not in id_of_colour:
            id_of_colour[o.colour] = next_id
            next_id += 1
    items = tuple(Item(item_id, label(by_colour[colour]), (colour,))
                  for colour, item_id in sorted(id_of_colour.items(), key=lambda kv: kv[1]))
    relations = []
    for r in graph.relations:
        s_colour, o_colour = _item_colour(graph.item(r.subject)), _item_colour(graph.item(r.object))
        if s_colour in by_colour and o_colour in by_colour and s_colour != o_colour:
            predicate = relation_between(by_colour[s_colour].centre, by_colour[o_colour].centre)
            relations.append(Relation(id_of_colour[s_colour], predicate, id_of_colour[o_colour]))
    return SceneGraph(items, tuple(relations))


# ----------------------------------------------------------------------------- files

def record_name(index: int) -> str:
    return f"shapes_{index:06d}.png"


def write_png(path: str, image: np.ndarray) -> None:
    """An HxWx3 float image in [0, 1] (or uint8) as an 8-bit RGB PNG."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def write_records(path: str, n: int, seed: int, config: ShapesConfig = ShapesConfig(),
                  image_dir: str | None = None) -> list[dict]:
    """Writes `n` scenes as a LAION-SG JSON file (a list of records) and, when `image_dir`
    is given, their renders as PNGs named by each record's `name`. Returns the records."""
    scenes = generate_scenes(seed, n, config)
    records = [scene_graph(s).to_laion_record(img_id=str(i), name=record_name(i))
               for i, s in enumerate(scenes)]
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    if image_dir is not None:
        os.makedirs(image_dir, exist_ok=True)
        for scene, record in zip(scenes, records, strict=True):
            write_png(os.path.join(image_dir, record["name"]), render(scene))
    return records


def shapes_demo(out_dir: str, n: int = 64, seed: int = 0, config: ShapesConfig = ShapesConfig(),
                split: str = "test") -> tuple[str, str]:
    """Writes `out_dir/<split>.json` and `out_dir/images/*.png` (renders of `n` scenes) and
    returns both paths: the input of `rig-eval --judge shapes`, and a `json_dir` /
    `image_dir` pair the LAION-SG builder (`rig_jax.data.laion_sg`) reads as is."""
    records_path = os.path.join(out_dir, f"{split}.json")
    image_dir = os.path.join(out_dir, "images")
    write_records(records_path, n, seed, config, image_dir=image_dir)
    return records_path, image_dir
