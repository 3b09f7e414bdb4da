"""What the end-to-end ShapesSG demo leaves behind: `metrics.json`, `per_record.csv`,
`report.html` and `plots/` (training curves of each Reflection-GRPO stage, SG-IoU per system).

Why this shape: the page is read by a person comparing six systems, so each prompt is one
block with a row per system and its rounds left to right (image, Checker score S and verdict
per triplet, the edit prompt on the arrow to the next image, the final image outlined).
Everything is self-contained (inline PNGs and CSS, no script) and escaped, as in
`rig_jax.eval.report`. Plots are drawn with PIL, not matplotlib, because matplotlib is not a
dependency of the package. Every file is written to a temporary name and renamed, so a
reader (the notebook, a browser) never sees half a file. A stage that did not run, or whose
log holds no rows, gets a note instead of a plot: a report is still worth having.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rig_jax.errors import ConfigError, RigError
from rig_jax.eval.report import png_bytes, to_uint8, upscale
from rig_jax.rl.systems import LABELS

if TYPE_CHECKING:
    from rig_jax.rig.loop import LoopRecord
    from rig_jax.rl.systems import SystemResult

TITLE = "RL-RIG on ShapesSG: Generate-Reflect-Edit, six systems"
GAIN = ("loop_stage2", "diffuser")        # gain_sg_iou_d_minus_a = (d) minus (a)
# (column title, metric key, format) of the systems table, in order.
TABLE_COLUMNS = (("SG-IoU attr", "sg_iou_attr", ".3f"), ("SG-IoU label", "sg_iou_label", ".3f"),
                 ("Entity-IoU attr", "entity_iou_attr", ".3f"),
                 ("Relation-IoU attr", "relation_iou_attr", ".3f"), ("all colours", "all_colours", ".3f"),
                 ("Checker S", "checker_score", ".3f"), ("rounds", "rounds_used", ".2f"),
                 ("U-Net calls", "unet_calls", ".0f"), ("VLM calls", "vlm_calls", ".2f"),
                 ("s / image", "seconds", ".3g"))
BEST_OF = ("sg_iou_attr", "sg_iou_label", "entity_iou_attr", "relation_iou_attr", "all_colours")
VERDICT_CLASS = {"satisfied": ("sat", "✓"), "violated": ("vio", "✗"), "object missing": ("mis", "∅"),
                 None: ("unk", "?")}
DISPLAY_PX = 96


# ----------------------------------------------------------------------------- files

def _check_writable(out_dir: str) -> None:
    """Fails before any work when `out_dir` cannot hold files (a file in the way, no rights)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir}: not a writable folder ({e.strerror or e})") from e


def _write_atomic(path: str, data: bytes | str) -> None:
    """Writes to a fresh temporary name beside `path` (mode 0o666 less the umask, like any
    new file), then renames it over `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_value(value: Any) -> Any:
    """Finite floats as floats, NaN / inf as None (strict JSON has neither), numpy scalars
    unwrapped, through dicts and lists; anything else JSON cannot hold becomes its str."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------- metrics and CSV

def system_metrics(results: Sequence[SystemResult]) -> dict[str, dict[str, Any]]:
    """Per system: its label, the means `score_system` computed, and the record count."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        out[r.name] = {"label": LABELS.get(r.name, r.name),
                       **{k: _json_value(float(v)) for k, v in r.metrics.items()},
                       "num_records": len(r.records)}
    return out


def _gain(systems: Mapping[str, Mapping[str, Any]]) -> float | None:
    """SG-IoU (attr) of (d) minus (a); None when either system was not run."""
    a, b = (systems.get(name, {}).get("sg_iou_attr") for name in GAIN)
    return None if a is None or b is None else float(a - b)


def _row_keys(results: Sequence[SystemResult]) -> list[str]:
    keys: dict[str, None] = {}
    for r in results:
        for row in r.rows:
            keys.update(dict.fromkeys(row))
    return list(keys)


def _csv_text(results: Sequence[SystemResult]) -> str:
    """One row per (system, record); numbers in full precision (repr), missing ones empty."""
    keys = _row_keys(results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["system", "index", "prompt", *keys, "final_index", "edit_prompts"])
    for r in results:
        for i, (record, row) in enumerate(zip(r.records, r.rows, strict=True)):
            edits = " | ".join(x.edit_prompt for x in record.rounds if x.edit_prompt is not None)
            writer.writerow([r.name, i, record.graph.prompt(),
                             *(repr(float(row[k])) if k in row else "" for k in keys),
                             record.final_index, edits])
    return buf.getvalue()


# ----------------------------------------------------------------------------- training logs

def read_metrics_log(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Train rows (those with "loss"), eval rows (those with an "eval/" key) and the number of
    unreadable lines (a job still writing may leave half a last line) of a metrics.jsonl."""
    train, evals, bad = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict) or "step" not in row:
                bad += 1
                continue
            if "loss" in row:
                train.append(row)
            if any(k.startswith("eval/") for k in row):
                evals.append(row)
    return train, evals, bad


@dataclasses.dataclass(frozen=True)
class Series:
    """One curve: y over x, with an optional band [lo, hi] (NaN where a row lacks the value)."""
    label: str
    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    def value(row: Mapping[str, Any]) -> float:
        v = row.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    return np.array([value(r) for r in rows], np.float64)


def training_panels(train: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]
                    ) -> list[tuple[str, list[Series]]]:
    """The panels of one stage's figure: reward mean ± std, Checker S after the edit (and
    before it, for the gain), clip fraction, approx KL, and eval SG-IoU when the stage evaluated."""
    steps = _column(train, "step")
    mean, std = _column(train, "rollout/reward_mean"), _column(train, "rollout/reward_std")
    panels = [("reward (mean ± std)", [Series("reward", steps, mean, mean - std, mean + std)]),
              ("Checker S after edit", [Series("after edit", steps, _column(train, "rollout/score_after")),
                                        Series("before", steps, _column(train, "rollout/score_before"))]),
              ("clip fraction", [Series("clip", steps, _column(train, "clip_fraction"))]),
              ("approx KL", [Series("KL", steps, _column(train, "approx_kl"))])]
    if evals:
        eval_steps = _column(evals, "step")
        series = [Series(name, eval_steps, _column(evals, key))
                  for name, key in (("attr", "eval/sg_iou_attr"), ("label", "eval/sg_iou_label"))
                  if np.isfinite(_column(evals, key)).any()]
        if series:
            panels.append(("eval SG-IoU", series))
    return panels


# ----------------------------------------------------------------------------- PIL plots

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL_W, PANEL_H = 300, 210


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):       # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 4, integer: bool = False) -> list[float]:
    """About `n` round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]; whole numbers
    only with `integer` (training steps)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, step)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_tick(t: float) -> str:
    return f"{t:.3g}"


def _text_width(draw: Any, text: str, font: Any) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


def _runs(finite: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where `finite` holds (a missing value breaks the line)."""
    runs, start = [], None
    for i, ok in enumerate(list(finite) + [False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    return runs


def draw_panel(draw: Any, box: tuple[int, int, int, int], title: str, series: Sequence[Series]) -> None:
    """One line chart in `box` (x0, y0, x1, y1): title, ticks, curves, bands, legend."""
    font, small = _font(13), _font(11)
    series = [s for s in series if (np.isfinite(s.y) & np.isfinite(s.x)).any()]
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 50, x1 - 10, y0 + 24, y1 - 34
    draw.text(((x0 + x1 - _text_width(draw, title, font)) // 2, y0 + 4), title, fill=(20, 20, 20), font=font)
    xs = np.concatenate([s.x[np.isfinite(s.y)] for s in series] or [np.zeros(0)])
    ys = np.concatenate([v for s in series for v in (s.y, s.lo, s.hi) if v is not None] or [np.zeros(0)])
    ys = ys[np.isfinite(ys)]
    xs = xs[np.isfinite(xs)]
    if not len(xs) or not len(ys):
        draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        msg = "not logged"
        draw.text(((left + right - _text_width(draw, msg, small)) // 2, (top + bottom) // 2 - 6), msg,
                  fill=(120, 120, 120), font=small)
        return
    xlo, xhi = float(xs.min()), float(xs.max())
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = float(ys.min()), float(ys.max())
    pad = (yhi - ylo) * 0.08 or max(abs(yhi) * 0.1, 0.05)
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    for t in nice_ticks(ylo, yhi):
        y = py(t)
        draw.line((left, y, right, y), fill=(232, 232, 232))
        label = _fmt_tick(t)
        draw.text((left - 4 - _text_width(draw, label, small), y - 6), label, fill=(60, 60, 60), font=small)
    for t in nice_ticks(xlo, xhi, 5, integer=True):
        x = px(t)
        draw.line((x, bottom, x, bottom + 3), fill=(120, 120, 120))
        label = _fmt_tick(t)
        draw.text((x - _text_width(draw, label, small) / 2, bottom + 4), label, fill=(60, 60, 60), font=small)
    draw.text(((left + right - _text_width(draw, "step", small)) // 2, bottom + 18), "step",
              fill=(60, 60, 60), font=small)
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    for k, s in reversed(list(enumerate(series))):       # the first series ends on top
        colour = COLOURS[k % len(COLOURS)]
        if s.lo is not None and s.hi is not None:
            light = tuple(int(c + (255 - c) * 0.7) for c in colour)
            for a, b in _runs(np.isfinite(s.lo) & np.isfinite(s.hi) & np.isfinite(s.x)):
                if b - a > 1:
                    upper = [(px(s.x[i]), py(s.hi[i])) for i in range(a, b)]
                    lower = [(px(s.x[i]), py(s.lo[i])) for i in reversed(range(a, b))]
                    draw.polygon(upper + lower, fill=light)
        for a, b in _runs(np.isfinite(s.y) & np.isfinite(s.x)):
            points = [(px(s.x[i]), py(s.y[i])) for i in range(a, b)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points if len(points) <= 12 else ():
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if len(series) > 1:
            draw.text((left + 6, top + 4 + 13 * k), s.label, fill=colour, font=small)


def figure_png(title: str, panels: Sequence[tuple[str, Sequence[Series]]]) -> bytes:
    """A row of panels under a title, as PNG bytes."""
    from PIL import Image, ImageDraw

    width, height = PANEL_W * max(1, len(panels)), PANEL_H + 30
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill=(0, 0, 0), font=_font(16))
    for k, (name, series) in enumerate(panels):
        draw_panel(draw, (k * PANEL_W, 30, (k + 1) * PANEL_W, 30 + PANEL_H), name, series)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bars_png(title: str, names: Sequence[str], values: Sequence[float | None]) -> bytes:
    """A bar chart (one bar per name, its value above it, None as "-"), as PNG bytes."""
    from PIL import Image, ImageDraw

    font, small = _font(16), _font(12)
    bar_w, gap, left, top, bottom_pad = 70, 40, 50, 52, 40
    width = left + len(names) * (bar_w + gap) + gap
    height = 300
    bottom = height - bottom_pad
    finite = [v for v in values if v is not None and math.isfinite(v)]
    yhi = max([1.0, *finite])
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=(0, 0, 0), font=font)

    def py(y: float) -> float:
        return bottom - y / yhi * (bottom - top)

    for t in nice_ticks(0.0, yhi, 5):
        y = py(t)
        draw.line((left, y, width - 10, y), fill=(230, 230, 230))
        label = _fmt_tick(t)
        draw.text((left - 4 - _text_width(draw, label, small), y - 7), label, fill=(60, 60, 60), font=small)
    draw.line((left, bottom, width - 10, bottom), fill=(120, 120, 120))
    for k, (name, value) in enumerate(zip(names, values, strict=True)):
        x = left + gap + k * (bar_w + gap)
        ok = value is not None and math.isfinite(value)
        if ok:
            draw.rectangle((x, py(value), x + bar_w, bottom), fill=COLOURS[k % len(COLOURS)])
        label = f"{value:.3f}" if ok else "-"
        draw.text((x + (bar_w - _text_width(draw, label, small)) / 2, (py(value) if ok else bottom) - 16),
                  label, fill=(0, 0, 0), font=small)
        draw.text((x + (bar_w - _text_width(draw, name, small)) / 2, bottom + 6), name, fill=(0, 0, 0),
                  font=small)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class StagePlot:
    """One training stage in the report: its plot file (None when there is none) or why not."""
    name: str
    file: str
    png: bytes | None
    note: str


def stage_plots(training_logs: Mapping[str, str]) -> list[StagePlot]:
    """`plots/stage<k>.png` for the k-th log (k from 1, in the mapping's order, so a skipped
    stage 1 leaves stage 2 named stage2); a note instead when the log is absent or empty."""
    plots = []
    for k, (name, path) in enumerate(training_logs.items(), start=1):
        file = f"plots/stage{k}.png"
        if not path or not os.path.isfile(path):
            plots.append(StagePlot(name, file, None, f"stage {k} ({name}): not run, no log at {path}"))
            continue
        try:
            train, evals, bad = read_metrics_log(path)
        except (OSError, UnicodeDecodeError) as e:
            plots.append(StagePlot(name, file, None, f"stage {k} ({name}): unreadable log {path} ({e})"))
            continue
        if not train:
            plots.append(StagePlot(name, file, None, f"stage {k} ({name}): no training rows in {path}"))
            continue
        last = int(max(r["step"] for r in train))
        note = f"stage {k} ({name}): {len(train)} logged steps up to step {last}, {len(evals)} eval rows"
        if bad:
            note += f", {bad} unreadable lines skipped"
        png = figure_png(f"stage {k}: {name}", training_panels(train, evals))
        plots.append(StagePlot(name, file, png, note))
    return plots


# ----------------------------------------------------------------------------- HTML

_STYLE = """
.rig-report{font-family:sans-serif;color:#222}
.rig-report table{border-collapse:collapse}
.rig-report td,.rig-report th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle;text-align:left}
.rig-report .num{text-align:right;font-family:monospace}
.rig-report .best{font-weight:bold;background:#eef7ee}
.rig-report .note{color:#a05000}
.rig-report .prompt{margin:1.2em 0;border-top:2px solid #888;padding-top:.4em}
.rig-report .prompt ol{margin:.2em 0 .5em;padding-left:2em;font-size:90%}
.rig-report .label{width:11em;font-size:90%}
.rig-report .label small{color:#555}
.rig-report .rounds{display:flex;align-items:flex-start;gap:2px}
.rig-report figure{margin:0;padding:3px;width:auto;text-align:center}
.rig-report figure img{image-rendering:pixelated;display:block;margin:auto;border:4px solid #ddd}
.rig-report figure.final img{border-color:#e69500}
.rig-report figcaption{font-size:75%;line-height:1.3}
.rig-report .edit{align-self:center;width:9em;font-size:75%;color:#333;text-align:center}
.rig-report .edit .arrow{font-size:180%;color:#777;line-height:1}
.rig-report .edit .empty{color:#999;font-style:italic}
.rig-report .sat{color:#080;font-weight:bold}.rig-report .vio{color:#c00;font-weight:bold}
.rig-report .mis{color:#c60;font-weight:bold}.rig-report .unk{color:#888}
.rig-report img.plot{max-width:100%;height:auto}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _img_tag(png: bytes, alt: str, width: int, height: int, attrs: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="{width}" '
            f'height="{height}"{attrs}>')


def _info_html(info: Mapping[str, Any]) -> str:
    esc = html.escape
    def text(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else _fmt(v)

    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(text(v))}</td></tr>" for k, v in info.items())
    return f'<table class="info">{rows}</table>'


def _systems_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per system, best value per IoU column in bold."""
    esc = html.escape
    best: dict[str, float] = {}
    for key in BEST_OF:
        values = [m[key] for m in systems.values() if isinstance(m.get(key), float)]
        if values:
            best[key] = max(values)
    head = "".join(f"<th>{esc(title)}</th>" for title, _, _ in TABLE_COLUMNS)
    body = []
    for name, m in systems.items():
        cells = []
        for _, key, form in TABLE_COLUMNS:
            value = m.get(key)
            cls = "num best" if key in best and value == best[key] else "num"
            text = "-" if value is None else format(value, form)
            cells.append(f'<td class="{cls}">{esc(text)}</td>')
        body.append(f'<tr data-system="{esc(name)}"><td>{esc(str(m["label"]))}</td>'
                    f'<td class="num">{m["num_records"]}</td>{"".join(cells)}</tr>')
    return (f'<table class="systems"><tr><th>system</th><th>prompts</th>{head}</tr>'
            f'{"".join(body)}</table>')


def _verdict_name(v: Any) -> str | None:
    return None if v is None else str(getattr(v, "value", v))


def _round_figure(system: str, prompt: int, k: int, image: np.ndarray, check: Any, final: bool,
                  label: str) -> str:
    esc = html.escape
    arr = to_uint8(image)
    scale = max(1, -(-DISPLAY_PX // max(arr.shape[0], arr.shape[1])))
    big = upscale(arr, scale)
    chips = []
    for j, (triplet, v) in enumerate(zip(check.triplets, check.verdicts.verdicts, strict=False), start=1):
        name = _verdict_name(v)
        cls, symbol = VERDICT_CLASS.get(name, VERDICT_CLASS[None])
        tip = f"{' '.join(triplet)}: {name or 'no verdict'}"
        chips.append(f'<span class="{cls}" title="{esc(tip)}">{j}{symbol}</span>')
    attrs = f' class="round" data-system="{esc(system)}" data-prompt="{prompt}" data-round="{k}"'
    tag = _img_tag(png_bytes(big), f"{system} round {k}", big.shape[1], big.shape[0], attrs)
    caption = f"{label} S={check.score:.2f}" + (" (final)" if final else "")
    return (f'<figure class="{"final" if final else "step"}">{tag}<figcaption>{caption}<br>'
            f'{" ".join(chips) or "(no triplets)"}</figcaption></figure>')


def _edit_arrow(text: str) -> str:
    body = (f'<span class="text">{html.escape(text)}</span>' if text.strip()
            else '<span class="text empty">(empty edit prompt)</span>')
    return f'<div class="edit"><div class="arrow">→</div>{body}</div>'


def _record_rounds(system: str, prompt: int, record: LoopRecord) -> str:
    """A loop's rounds I_0 -> I_1 -> ..., each arrow with its edit prompt; a record whose every
    round has no edit prompt (best-of-N) holds independent draws, shown side by side as such."""
    draws = len(record.rounds) > 1 and all(r.edit_prompt is None for r in record.rounds)
    parts = []
    for k, r in enumerate(record.rounds):
        label = f"draw {k + 1}" if draws else f"I<sub>{k}</sub>"
        parts.append(_round_figure(system, prompt, k, r.image, r.check, k == record.final_index, label))
        if k + 1 < len(record.rounds) and not draws:
            parts.append(_edit_arrow(r.edit_prompt or ""))
    return f'<div class="rounds">{"".join(parts)}</div>'


def _prompt_block(i: int, total: int, results: Sequence[SystemResult]) -> str:
    esc = html.escape
    graph = next(r.records[i].graph for r in results if i < len(r.records))
    triplets = "".join(f"<li>{esc(' '.join(t))}</li>" for t in graph.triplets(with_attributes=True))
    rows = []
    for r in results:
        if i >= len(r.records):
            continue
        score = r.rows[i].get("sg_iou_attr")
        scored = "" if score is None else f"<br><small>SG-IoU {score:.2f}</small>"
        rows.append(f'<tr data-system="{esc(r.name)}"><td class="label">{esc(LABELS.get(r.name, r.name))}'
                    f"{scored}</td><td>{_record_rounds(r.name, i, r.records[i])}</td></tr>")
    return (f"<!-- rig-report:prompt {i} -->\n"
            f'<div class="prompt" data-prompt="{i}"><h3>Prompt {i + 1} of {total}: '
            f'<span class="text">{esc(graph.prompt())}</span></h3>'
            f"<ol>{triplets}</ol><table>{''.join(rows)}</table></div>\n")


def _html_page(systems: Mapping[str, Mapping[str, Any]], gain: float | None, info: Mapping[str, Any],
               plots: Sequence[StagePlot], bars: bytes, results: Sequence[SystemResult], shown: int) -> str:
    esc = html.escape
    total = max(len(r.records) for r in results)
    training = []
    for p in plots:
        training.append(f'<p class="{"" if p.png else "note"}">{esc(p.note)}</p>')
        if p.png:
            training.append(_img_tag(p.png, p.file, *_png_size(p.png), ' class="plot"'))
    gain_text = ("-" if gain is None else f"{gain:+.3f}")
    legend = " ".join(f'<span class="{c}">{s}</span> {esc(name or "no verdict")}'
                      for name, (c, s) in VERDICT_CLASS.items())
    blocks = "".join(_prompt_block(i, total, results) for i in range(shown))
    bar_tag = _img_tag(bars, "SG-IoU per system", *_png_size(bars), ' class="plot"')
    training_html = "".join(training) or '<p class="note">no training logs given</p>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(TITLE)}</title>'
            f'<style>{_STYLE}</style></head><body>\n<div class="rig-report">\n<h1>{esc(TITLE)}</h1>\n'
            f"{_info_html(info)}\n<h2>Systems</h2>\n{_systems_table(systems)}\n"
            f"<p>SG-IoU gain (d) minus (a): <b>{esc(gain_text)}</b></p>\n"
            f"{bar_tag}\n<h2>Training</h2>\n{training_html}\n"
            f"<!-- rig-report:prompts -->\n<h2>Prompts ({shown} of {total} shown)</h2>\n"
            f"<p>Each row: one system's rounds left to right; S is the Checker's score; per triplet "
            f"(numbered as under the prompt): {legend}. The arrow carries the edit prompt that made "
            f"the next image; the outlined image is the system's result (best-of-N: the Checker's pick of "
            f"its independent draws).</p>\n"
            f"{blocks}<!-- rig-report:end -->\n</div></body></html>\n")


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return width, height


# ----------------------------------------------------------------------------- entry point

def _check_results(results: Sequence[SystemResult]) -> None:
    if not results:
        raise RigError("write_demo_outputs: no system results")
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise RigError(f"write_demo_outputs: system names repeat: {', '.join(names)}")
    for r in results:
        if not r.records or len(r.records) != len(r.rows):
            raise RigError(f"write_demo_outputs: system {r.name}: {len(r.records)} records for "
                           f"{len(r.rows)} rows (need the same number, at least one)")


def write_demo_outputs(out_dir: str, results: Sequence[SystemResult], training_logs: Mapping[str, str],
                       info: Mapping[str, Any], report_prompts: int) -> dict[str, Any]:
    """Writes `metrics.json`, `per_record.csv`, `report.html` (the first `report_prompts`
    prompts), `plots/stage<k>.png` per training log and `plots/systems.png` under `out_dir`;
    returns what metrics.json holds. `training_logs` maps a stage name to its metrics.jsonl."""
    _check_writable(out_dir)
    results = list(results)
    _check_results(results)
    systems = system_metrics(results)
    info = {str(k): _json_value(v) for k, v in info.items()}
    metrics = {"systems": systems, "gain_sg_iou_d_minus_a": _gain(systems), "info": info}
    _write_atomic(os.path.join(out_dir, "per_record.csv"), _csv_text(results))

    plots = stage_plots(training_logs)
    for p in plots:
        if p.png is not None:
            _write_atomic(os.path.join(out_dir, p.file), p.png)
    bars = bars_png("SG-IoU (attribute form) per system", [r.name for r in results],
                    [systems[r.name].get("sg_iou_attr") for r in results])
    _write_atomic(os.path.join(out_dir, "plots", "systems.png"), bars)
    shown = max(0, min(int(report_prompts), max(len(r.records) for r in results)))
    _write_atomic(os.path.join(out_dir, "report.html"),
                  _html_page(systems, metrics["gain_sg_iou_d_minus_a"], info, plots, bars, results, shown))
    # last: its presence says every other output of this evaluation was written (a rerun skips it)
    _write_atomic(os.path.join(out_dir, "metrics.json"),
                  json.dumps(metrics, indent=2, default=str, allow_nan=False) + "\n")
    return metrics
