"""Shared pieces of the benchmarks: the machine description, one-JSON-line output, timing, and a
synthetic pack batch shaped like the real pipeline's.

Every benchmark prints exactly one JSON line on stdout so `make bench > results.jsonl` collects
comparable records; everything else (JAX, XLA, TFDS, absl) is routed to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from jaxsora.data import captions, packing, video

_WORDS = (
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "on",
    "background",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "diamond",
    "cross",
    "photo",
    "of",
    "cat",
    "street",
)


@contextlib.contextmanager
def json_stdout() -> Iterator[Callable[[dict], None]]:
    """Points fd 1 at stderr for the duration and yields a writer to the real stdout.

    XLA and TFDS write to fd 1 from C++ and tqdm; redirecting the descriptor, not just
    `sys.stdout`, is what keeps the benchmark's stdout to one parseable line.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    lines: list[str] = []
    try:
        yield lambda record: lines.append(json.dumps(record, sort_keys=True))
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        for line in lines:
            print(line, flush=True)


def _cpuinfo_field(name: str) -> str | None:
    """The first `name: value` line of /proc/cpuinfo (None off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """`platform.processor()` is empty on most Linux builds; /proc/cpuinfo has the name."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...]) -> list[str]:
    """Which of the `wanted` instruction-set extensions (e.g. amx_bf16) this CPU lists."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [w for w in wanted if w in have]


def load_average() -> list[float] | None:
    """Other processes' load is what moves timings on a shared machine; records carry it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> str | None:
    """The commit measured, with "+dirty" when the working tree differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            text=True,
            capture_output=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            text=True,
            capture_output=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty.strip() else "")) or None


def machine_info() -> dict:
    import jax

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device_kind": jax.devices()[0].device_kind,
        "jax_devices": jax.device_count(),
        "git": git_revision(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def timed(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Wall times of `reps` calls after `warmup` calls; `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    """Median (the figure to quote on a shared, noisy machine), plus spread for judging it."""
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


def synthetic_example(rng: np.random.Generator, spec, patch_dim: int) -> packing.Example:
    """An example with the size distribution of the pipeline on synthetic_clips (see
    data_pipelines/synthetic_clips): ~10% stills, 2-16 frames, aspect 9:16 to 21:9, resized by
    `video.fit_grid` to a token budget drawn from [min_tokens, max_tokens] like `make_example`.
    """
    frames = 1 if rng.random() < 0.1 else int(rng.integers(2, 17))
    frames = min(frames, spec.max_frames)
    aspect_w, aspect_h = ((9, 16), (3, 4), (1, 1), (4, 3), (16, 9), (21, 9))[rng.integers(6)]
    height = 2 * int(rng.integers(16, 49))
    width = max(2, 2 * round(height * aspect_w / aspect_h / 2))
    budget = int(rng.integers(spec.min_tokens, spec.max_tokens + 1))
    t, h, w = video.fit_grid(frames, height, width, tuple(spec.patch), budget)
    n = t * h * w
    positions = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    caption = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))
    if spec.text.encoder == captions.CLASS:  # a class-conditional model: one of its classes
        caption = str(rng.choice(spec.text.class_names))
    return {
        "patches": rng.uniform(-1, 1, (n, patch_dim)).astype(np.float32),
        "positions": positions.reshape(n, 3).astype(np.int32),
        "grid": np.asarray([t, h, w], np.int32),
        **captions.text_fields(caption, spec.text),  # ids, or the frozen encoder's embeddings
    }


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """`config.batch_size` packs from the same online packer the pipeline uses, fed synthetic
    examples, so a benchmark needs no dataset and still sees realistic packs (fill, segments)."""
    from jaxsora.compression import make_stage
    from jaxsora.data import pipeline

    stage = make_stage(config.model.compression)
    spec = pipeline.example_spec(config)
    shape = pipeline.pack_shape(config, stage)

    def example_at(i: int) -> packing.Example:
        return synthetic_example(np.random.default_rng([seed, i]), spec, shape.patch_dim)

    packer = packing.OnlinePacker(example_at, shape, config.data.buffer_size)
    # First-fit decreasing emits a round's fullest packs of the biggest examples first; every
    # `spread`-th pack gives a batch like the average one rather than like a round's first.
    spread = 4
    packs = [next(packer) for _ in range(config.batch_size * spread)]
    return packing.stack_packs(packs[::spread])


def batch_stats(batch: dict[str, np.ndarray]) -> dict:
    seg = batch["segment_ids"]
    return {
        "real_tokens": int((seg > 0).sum()),
        "slots": int(seg.size),
        "efficiency": float((seg > 0).mean()),
        "examples": int(sum(len(np.unique(s[s > 0])) for s in seg)),
    }


def round_floats(record: dict, digits: int = 5) -> dict:
    """Significant digits, not decimals: FLOP counts and step times share a record."""

    def fix(v):
        if isinstance(v, float) and math.isfinite(v) and v != 0:
            return float(f"{v:.{digits}g}")
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return fix(record)


def measure_trained_run(name: str, workdir: str, measure: Callable) -> None:
    """Prints the one JSON line of benchmark `name` on the run in `workdir`: `measure(model,
    config, record)` fills the record in; a workdir with nothing trained yet gives a `skipped`
    line instead, as every benchmark does when what it measures is missing."""
    from jaxsora.sample import load_run

    with json_stdout() as emit:
        record = {"benchmark": name, "machine": machine_info()}
        try:
            model, config = load_run(workdir)
        except FileNotFoundError as e:
            record["skipped"] = str(e)
            emit(record)
            return
        record["workdir"] = workdir
        measure(model, config, record)
        emit(round_floats(record))


def define_held_out_flags(clips: int, steps: int, steps_help: str = "Sampling steps.") -> None:
    """The flags of a benchmark that samples a trained run on held-out clips."""
    from absl import flags

    flags.DEFINE_string("workdir", "runs/default", "A trained run (make train).")
    flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir with synthetic_clips built.")
    flags.DEFINE_string("source", "synthetic_clips", "Dataset whose validation clips are used.")
    flags.DEFINE_integer("clips", clips, "Held-out clips.")
    flags.DEFINE_integer("steps", steps, steps_help)
