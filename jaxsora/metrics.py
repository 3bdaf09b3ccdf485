"""Where training numbers go: TensorBoard events, metrics.jsonl, and a progress line with ETA."""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging


class MetricsWriter:
    """Writes from process 0 only; other processes keep quiet.

    `resumed_at` is the step the run continues from (0 for a fresh start). Rows and events past
    it were written by a run that stopped before its next checkpoint; the steps after
    `resumed_at` are trained again, so those rows are dropped and TensorBoard's are purged, and
    every step appears once.
    """

    def __init__(self, workdir: str, total_steps: int, resumed_at: int):
        self._active = jax.process_index() == 0
        self._total = total_steps
        self._start_time, self._start_step = time.time(), None
        if self._active:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            drop_rows_after(path, resumed_at)
            # TensorBoard hides every earlier event at steps >= purge_step.
            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=resumed_at + 1
            )
            self._jsonl = open(path, "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        done = step - self._start_step
        rate = done / max(time.time() - self._start_time, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        logging.info("step %d/%d  %s  eta %s", step, self._total, shown, _hms(eta))

    def close(self) -> None:
        if self._active:
            self._tb.close()
            self._jsonl.close()


def drop_rows_after(path: str, step: int) -> None:
    """Keeps the rows of a metrics.jsonl with `step` <= step, rewritten atomically (a crash leaves
    the old file or the new one). A torn last line from a killed run is dropped too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line.rstrip("\n") + "\n" for line in lines if _row_step(line) <= step]
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info(
        "%s: dropped %d rows past step %d (they are trained again)",
        path,
        len(lines) - len(kept),
        step,
    )


def _row_step(line: str) -> float:
    """The row's step; infinity for a line that is not a row (never kept)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN before the rate is known
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
