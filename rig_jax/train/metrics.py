"""Metrics out of a run: JSON lines, TensorBoard event files (tensorboardX: no TensorFlow)
and a progress bar with the loss and steps/s. Only process 0 writes files.

`metrics.jsonl` holds one object per logged step. On resume it is cut back to the restored
step (rewritten atomically), so a resumed run's log equals an uninterrupted one's line for line.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    value = np.asarray(value)
    if value.dtype.kind in "iub":
        return int(value)
    f = float(value)
    return f if math.isfinite(f) else repr(f)   # NaN/Inf stay visible and the line stays JSON


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the lines of `path` whose `step` is at most `last_step`."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0, progress: bool = True,
                 tensorboard: bool = True):
        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        self._bar = None
        self._last = (time.perf_counter(), resume_step)
        if not self.is_writer:
            return
        truncate_jsonl(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes the scalars of `metrics` for `step`; returns them as plain numbers."""
        record = {"step": int(step), **{k: _plain(v) for k, v in sorted(metrics.items())}}
        if not self.is_writer:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        return record

    def progress(self, step: int, loss: float | None = None) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        then, last_step = self._last
        if now > then:
            rate = (step - last_step) / (now - then)
            self._bar.set_postfix_str(f"loss {loss:.4f} {rate:.2f} steps/s" if loss is not None
                                      else f"{rate:.2f} steps/s")
        self._bar.n = step
        self._bar.refresh()
        self._last = (now, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
