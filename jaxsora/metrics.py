"""Where training numbers go: TensorBoard events, metrics.jsonl, and a progress line with ETA."""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging


class MetricsWriter:
    """Writes from process 0 only; other processes keep quiet."""

    def __init__(self, workdir: str, total_steps: int):
        self._active = jax.process_index() == 0
        self._total = total_steps
        self._start_time, self._start_step = time.time(), None
        if self._active:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

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


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN before the rate is known
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
