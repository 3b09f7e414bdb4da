"""Evaluation outputs: metrics JSON, a per-record CSV, and what a person reads: one
self-contained HTML page and a PNG grid.

Why self-contained: the page is copied off machines and attached to results, so images are
inlined as base64 PNGs (nearest-neighbour upscaled: a 32x32 render is unreadable at 1:1)
and there is no script or external stylesheet. Every piece of text is HTML-escaped, since
prompts and raw judge answers are arbitrary strings.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rig_jax.data.scene_graph import SceneGraph, Triplet
from rig_jax.errors import DataError
from rig_jax.eval.base import JudgeResult
from rig_jax.outputs import replace_file


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One image of the report and what the judge made of it.

    triplets: the ground-truth triplets, in prompt order; verdicts: the judge's verdict per
    ground-truth triplet (True shown, False not shown, None no usable verdict);
    extracted: the triplets of the graph the judge extracted; objects: its objects;
    scores: per-record numbers (None is printed as "-"); raw: the judge's raw answer.
    """
    name: str
    image: np.ndarray
    prompt: str
    triplets: Sequence[Triplet] = ()
    verdicts: Sequence[bool | None] = ()
    extracted: Sequence[Triplet] = ()
    objects: Sequence[str] = ()
    scores: Mapping[str, float | int | str | None] = dataclasses.field(default_factory=dict)
    raw: str = ""


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HxWx3 (or HxW) uint8 from a float image in [0, 1] or a uint8 image."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():   # NaN would be written as black: a plausible wrong image
            raise DataError(f"image of shape {arr.shape} holds NaN or Inf; not written")
        arr = np.clip(np.rint(np.asarray(arr, np.float32) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor (pixels stay sharp squares)."""
    scale = max(1, int(scale))
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def save_png_grid(path: str, images: Sequence[np.ndarray], ncols: int = 8, scale: int = 4,
                  pad: int = 2, pad_value: int = 64) -> np.ndarray:
    """Tiles images (same size) row-major into one PNG, `pad` grey pixels between tiles,
    each upscaled `scale` times; returns the grid as uint8."""
    if not len(images):
        raise ValueError("save_png_grid: no images")
    tiles = [upscale(to_uint8(im), scale) for im in images]
    h, w, _ = tiles[0].shape
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError("save_png_grid: images differ in size")
    ncols = max(1, min(int(ncols), len(tiles)))
    nrows = -(-len(tiles) // ncols)
    grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), 3), pad_value, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = tile
    with replace_file(path, "wb") as f:
        f.write(png_bytes(grid))
    return grid


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _triplet_text(t: Triplet) -> str:
    return " ".join(t)


_VERDICT = {True: ("ok", "✓"), False: ("bad", "✗"), None: ("unk", "?")}

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.metrics td:nth-child(2){text-align:right;font-family:monospace}
.rec img{image-rendering:pixelated;display:block}
.ok{color:#080;font-weight:bold}.bad{color:#c00;font-weight:bold}.unk{color:#888}
.raw{font-family:monospace;font-size:80%;color:#555;white-space:pre-wrap;max-width:40em}
ul{margin:0;padding-left:1.2em}
"""


def _row_html(row: ReportRow, display_px: int) -> str:
    image = to_uint8(row.image)
    scale = max(1, display_px // max(image.shape[0], image.shape[1]))
    data = base64.b64encode(png_bytes(upscale(image, scale))).decode("ascii")
    esc = html.escape
    verdicts = list(row.verdicts) + [None] * (len(row.triplets) - len(row.verdicts))
    gt = "".join(f'<li><span class="{_VERDICT[v][0]}">{_VERDICT[v][1]}</span> {esc(_triplet_text(t))}</li>'
                 for t, v in zip(row.triplets, verdicts, strict=False))
    extracted = "".join(f"<li>{esc(_triplet_text(t))}</li>" for t in row.extracted) or "<li>(none)</li>"
    objects = esc(", ".join(row.objects)) or "(none)"
    scores = "<br>".join(f"{esc(str(k))}: {esc(_fmt(v))}" for k, v in row.scores.items())
    raw = f'<div class="raw">{esc(row.raw)}</div>' if row.raw else ""
    return (f'<tr class="rec"><td><img src="data:image/png;base64,{data}" alt="{esc(row.name)}" '
            f'width="{image.shape[1] * scale}" height="{image.shape[0] * scale}"><br>{esc(row.name)}</td>'
            f"<td><b>{esc(row.prompt)}</b><ul>{gt}</ul></td>"
            f"<td><ul>{extracted}</ul>objects: {objects}{raw}</td>"
            f"<td>{scores}</td></tr>")


def write_html_report(path: str, rows: Sequence[ReportRow], title: str,
                      metrics: Mapping[str, object], display_px: int = 128) -> None:
    """Writes the page: the dataset metrics table, then one row per image (image, prompt
    with ✓/✗ per ground-truth triplet, the extracted graph, the record's scores)."""
    esc = html.escape
    metric_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>"
                          for k, v in metrics.items())
    body = "".join(_row_html(r, display_px) for r in rows)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            f'<h2>Dataset metrics</h2>\n<table class="metrics">{metric_rows}</table>\n'
            f"<h2>Records ({len(rows)} shown)</h2>\n<table>"
            "<tr><th>image</th><th>prompt and ground-truth triplets (judge verdict)</th>"
            "<th>extracted graph</th><th>scores</th></tr>\n"
            f"{body}</table>\n</body></html>\n")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def _triplets_text(triplets: Sequence[tuple[str, str, str]]) -> str:
    return "; ".join(" ".join(t) for t in triplets)


def _verdicts_text(verdicts: Sequence[bool | None]) -> str:
    return "".join({True: "1", False: "0", None: "?"}[v] for v in verdicts)


def write_evaluation(out: str, records: Sequence[dict[str, Any]], graphs: Sequence[SceneGraph],
                  results: Sequence[JudgeResult], images: Sequence[np.ndarray], judge_name: str,
                  judge_seconds: float, report_rows: int, grid_size: int, title: str,
                  extra: dict[str, Any] | None = None, shown_out: str | None = None) -> dict[str, Any]:
    """Scores judge results against their graphs and writes `metrics.json`,
    `per_record.csv`, `report.html` (the first `report_rows` of `images`) and `grid.png`.
    `shown_out`: the folder named in the printed line when `out` is a staging folder that
    will take its place."""
    from rig_jax.eval.scene_graph_iou import score_dataset, score_record

    preds = [r.graph for r in results]
    ratings = [r.rating for r in results if r.rating is not None]
    metrics: dict[str, Any] = {"judge": judge_name, **score_dataset(preds, graphs)}
    metrics.update({
        "judge_score": float(np.mean([r.judge_score for r in results])),
        "rating_mean": float(np.mean(ratings)) if ratings else None,
        "num_rated": len(ratings),
        "malformed": sum(r.malformed for r in results),
        "seconds_per_image": judge_seconds / len(results),
        **(extra or {}),
    })
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    per_record = [score_record(p, g) for p, g in zip(preds, graphs, strict=True)]
    with open(os.path.join(out, "per_record.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        keys = list(per_record[0])
        writer.writerow(["img_id", "name", "prompt", "judge_score", "rating", "malformed", *keys,
                         "verdicts", "extracted"])
        for rec, g, r, s in zip(records, graphs, results, per_record, strict=True):
            writer.writerow([rec["img_id"], rec["name"], g.prompt(), f"{r.judge_score:.4f}",
                             "" if r.rating is None else r.rating, int(r.malformed),
                             *(f"{s[k]:.4f}" for k in keys), _verdicts_text(r.triplet_verdicts),
                             _triplets_text(r.graph.triplets())])

    rows = [ReportRow(name=rec["name"], image=img, prompt=g.prompt(), triplets=g.triplets(),
                      verdicts=r.triplet_verdicts, extracted=r.graph.triplets(), objects=r.graph.objects(),
                      scores={"judge": r.judge_score, "rating": r.rating, "malformed": r.malformed, **s},
                      raw=r.raw)
            for rec, g, r, s, img in zip(records, graphs, results, per_record, images[:report_rows],
                                         strict=False)]
    write_html_report(os.path.join(out, "report.html"), rows, title, metrics)
    if grid_size > 0 and images:
        save_png_grid(os.path.join(out, "grid.png"), images[:grid_size], ncols=8,
                      scale=max(1, 128 // images[0].shape[0]))

    print(f"{metrics['num_records']} records: SG-IoU {metrics['sg_iou_attr']:.4f} (labels "
          f"{metrics['sg_iou_label']:.4f}), Entity-IoU {metrics['entity_iou_attr']:.4f}, "
          f"Relation-IoU {metrics['relation_iou_attr']:.4f}, judge {metrics['judge_score']:.4f}; "
          f"wrote {shown_out or out}/metrics.json, per_record.csv, report.html, grid.png")
    return metrics
