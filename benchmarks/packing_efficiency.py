"""Packing efficiency of the real input pipeline: how many pack slots hold real tokens.

    python -m benchmarks.packing_efficiency --data_dir data/tfds [--batches 50]

Runs `jaxsora.data.pipeline.make_batches` with experiments/tiny.py (synthetic_clips alone, then
the `mix` variant with sample_media) and reports, per source: non-padding tokens / all tokens,
examples per pack, tokens per example, and packs/s and examples/s of the whole pipeline (decode,
resize, patchify, pack). For context it also reports what a trainer that does not pack pays on
the same examples: one example per pack, padded to seq_len. Builds the two TFDS datasets under
--data_dir first if they are missing (what `make data` does).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import common

FLAGS = flags.FLAGS


VARIANTS = {"synthetic_clips": None, "mix": "mix"}  # name -> experiments/tiny.py arg


def ensure_datasets(data_dir: str, names: list[str]) -> list[str]:
    """Builds the datasets that are not under `data_dir` yet; returns the ones it built."""
    built = []
    for name in names:
        if not os.path.isdir(os.path.join(data_dir, name)):
            from data_pipelines.build import build

            logging.info("building %s under %s", name, data_dir)
            build(name, data_dir)
            built.append(name)
    return built


def measure(config, batches: int, warmup: int, repeats: int) -> dict:
    """Efficiency of `batches` batches of the real pipeline, and its throughput (median over
    `repeats` fresh iterators: the same seed gives the same packs, so only the time varies)."""
    from jaxsora.compression import make_stage
    from jaxsora.data import packing, pipeline

    stage = make_stage(config.model.compression)
    L = config.data.seq_len
    seconds, cache = [], {}
    for _ in range(repeats):
        it = pipeline.make_batches(config, stage)
        decode = it.example_at

        def recording(i, decode=decode):
            cache[i] = ex = decode(i)
            return ex

        # Same packer, but remembering the decoded examples for the packer-only figure below.
        it.packer = packing.OnlinePacker(
            recording, pipeline.pack_shape(config, stage), config.data.buffer_size
        )
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        segs = np.concatenate([next(it)["segment_ids"] for _ in range(batches)])
        seconds.append(time.perf_counter() - start)
    real, slots, packs = int((segs > 0).sum()), segs.size, segs.shape[0]
    counts = [np.bincount(row, minlength=config.data.max_segments + 1)[1:] for row in segs]
    sizes = np.concatenate([c[c > 0] for c in counts])  # tokens of every example
    per_pack = np.asarray([int((c > 0).sum()) for c in counts])

    # The packer alone (first-fit decreasing + pack assembly) on the already decoded examples.
    shape = pipeline.pack_shape(config, stage)
    packer_s = []
    for _ in range(repeats):
        packer = packing.OnlinePacker(cache.__getitem__, shape, config.data.buffer_size)
        start = time.perf_counter()
        for _ in range(packs + warmup * config.batch_size):
            next(packer)
        packer_s.append((time.perf_counter() - start) / (packs + warmup * config.batch_size))
    median_s = statistics.median(seconds)
    return {
        "efficiency": real / slots,
        "batches": batches,
        "packs": packs,
        "examples": int(sizes.size),
        "examples_per_pack": float(per_pack.mean()),
        "examples_per_pack_min_max": [int(per_pack.min()), int(per_pack.max())],
        "tokens_per_example_mean": float(sizes.mean()),
        "tokens_per_example_min_max": [int(sizes.min()), int(sizes.max())],
        # A non-packing trainer: each example alone in a pack of L slots.
        "naive_one_per_pack_efficiency": float(sizes.sum() / (sizes.size * L)),
        "pipeline_packs_per_s": packs / median_s,
        "pipeline_examples_per_s": sizes.size / median_s,
        "pipeline_seconds": common.summary(seconds),
        "packer_only_packs_per_s": 1.0 / statistics.median(packer_s),
        "skipped_media": int(it.packer.skipped),
    }


def main(argv: list[str]) -> None:
    del argv
    from experiments import tiny

    with common.json_stdout() as emit:
        data_dir = os.path.abspath(FLAGS.data_dir)
        built = ensure_datasets(data_dir, ["synthetic_clips", "sample_media"])
        results = {}
        for name, arg in VARIANTS.items():
            config = tiny.get_config(arg)
            config.data.data_dir = data_dir
            results[name] = measure(config, FLAGS.batches, FLAGS.warmup, FLAGS.repeats)
            logging.info("%s: %s", name, results[name])
        config = tiny.get_config()
        emit(
            common.round_floats(
                {
                    "benchmark": "packing_efficiency",
                    "config": {
                        "seq_len": config.data.seq_len,
                        "max_segments": config.data.max_segments,
                        "batch_size": config.batch_size,
                        "buffer_size": config.data.buffer_size,
                        "min_tokens": config.data.min_tokens,
                        "max_tokens": config.data.max_tokens,
                    },
                    "data_dir": data_dir,
                    "built_datasets": built,
                    "load_average": common.load_average(),
                    "results": results,
                    "machine": common.machine_info(),
                }
            )
        )


def define_flags() -> None:
    """Defined only when run as a script, so importing the module never clashes on flag names."""
    flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir (built if missing).")
    flags.DEFINE_integer("batches", 50, "Batches measured per variant.")
    flags.DEFINE_integer("repeats", 3, "Timed passes per variant (median).")
    flags.DEFINE_integer("warmup", 1, "Batches drawn before timing (opens files, threads).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
