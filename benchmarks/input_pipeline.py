"""How much of the host input pipeline the prefetch thread (`data.prefetch`) hides behind the step.

    python -m benchmarks.input_pipeline [--data_dir data/tfds --steps 12 --rounds 5]

On the default config (experiments/tiny.py) and its real pipeline (synthetic_clips, built by
`make data`), each round times, in alternating order so background load falls on all alike:
  host        the pipeline alone: decode, resize, patchify, pack; seconds per batch
  fixed_batch the train loop fed one fixed batch: the step's own time, no input work
  prefetch_0  the train loop fed by the pipeline on the training thread
  prefetch_2  the same with data.prefetch = 2 (a background thread two batches ahead)
The train loop is jaxsora/train.py's (next batch, to_global, dispatch the compiled step, read the
previous step's loss), and the step is built as benchmarks/train_step.py builds it. Every run
starts a fresh pipeline, so all runs see the same batches.

    hidden_share = median over rounds of (prefetch_0 - prefetch_2) / host

(the two runs of a round are adjacent, so the pair shares the machine's load; `step_noise_s`
is how far the fixed-batch step alone moves between rounds). 1 means the input work costs the
step nothing, 0 that prefetching gained nothing. Beside it, `batch_wait_s` is the time the
training thread spends blocked on the next batch, and `off_training_thread_share` =
1 - wait_2 / wait_0 the share of the host work moved off that thread. The two differ on a CPU
backend, where XLA's compute threads and the pipeline thread share the same cores: work off the
training thread still slows the step. On an accelerator the host is idle while the step runs,
and the two agree.
"""

from __future__ import annotations

import itertools
import statistics
import time

import jax
from absl import app, flags, logging

from benchmarks import common, train_step

FLAGS = flags.FLAGS


def train_loop(step: train_step.JaxStep, batches, steps: int) -> tuple[float, float]:
    """Seconds per step of the trainer's loop over `steps` batches (logging left out), and of
    those, the seconds the training thread spent getting the next batch."""
    from jaxsora.data import pipeline

    rules = tuple(tuple(r) for r in step.config.sharding_rules)
    pending, waited = None, 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch_np = next(batches)
        waited += time.perf_counter() - t0
        batch = pipeline.to_global(batch_np, step.mesh, rules)
        step.state, metrics = step.compiled(step.state, batch)
        if pending is not None:
            float(pending["loss"])  # as train.py: each step's metrics are read one step late
        pending = metrics
    float(pending["loss"])
    jax.block_until_ready(step.state)
    return (time.perf_counter() - start) / steps, waited / steps


def host_only(config, steps: int) -> float:
    """Seconds per batch of the pipeline alone, on this thread."""
    batches = fresh_batches(config, depth=0)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return (time.perf_counter() - start) / steps


def fresh_batches(config, depth: int):
    """The pipeline from its first batch, through the trainer's prefetch wrapper."""
    from jaxsora.compression import make_stage
    from jaxsora.data import pipeline, prefetch

    c = config.copy_and_resolve_references()
    c.data.prefetch = depth
    return prefetch.from_config(pipeline.make_batches(c, make_stage(c.model)), c)


def timed_loop(step, config, depth: int, steps: int) -> tuple[float, float]:
    batches = fresh_batches(config, depth)
    try:
        return train_loop(step, batches, steps)
    finally:
        batches.close()


def measure(step, config, batch_np, steps: int, rounds: int) -> dict[str, list]:
    """Per run kind, one entry per round: seconds per batch (host) or (step, wait) seconds."""
    runs = {
        "host": lambda: host_only(config, steps),
        "fixed_batch": lambda: train_loop(step, itertools.repeat(batch_np), steps),
        "prefetch_0": lambda: timed_loop(step, config, 0, steps),
        "prefetch_2": lambda: timed_loop(step, config, 2, steps),
    }
    results: dict[str, list] = {name: [] for name in runs}
    timed_loop(step, config, 2, 3)  # warm-up: first executions, decoder and thread start-up
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            results[name].append(runs[name]())
            logging.info("round %d %s: %s", r, name, results[name][-1])
    return results


def summarize(results: dict[str, list]) -> dict:
    host = statistics.median(results["host"])
    step = {k: statistics.median(s for s, _ in results[k]) for k in results if k != "host"}
    wait = {k: statistics.median(w for _, w in results[k]) for k in ("prefetch_0", "prefetch_2")}
    pairs = zip(results["prefetch_0"], results["prefetch_2"], strict=True)
    gained = statistics.median(no[0] - ahead[0] for no, ahead in pairs)  # same round, adjacent
    fixed = [s for s, _ in results["fixed_batch"]]
    return {
        "host_s_per_batch": host,
        "step_s": step,
        "step_noise_s": max(fixed) - min(fixed),
        "batch_wait_s": wait,  # the training thread blocked on the next batch, per step
        "hidden_share": gained / host,
        "off_training_thread_share": 1 - wait["prefetch_2"] / wait["prefetch_0"],
        "runs": {
            k: [x if isinstance(x, float) else list(x) for x in v] for k, v in results.items()
        },
    }


def main(argv: list[str]) -> None:
    del argv
    with common.json_stdout() as emit:
        record = {"benchmark": "input_pipeline", "machine": common.machine_info()}
        load_start = common.load_average()
        config = train_step.tiny_config(FLAGS.config_arg)
        try:
            batch_np = train_step.make_batch(config, FLAGS.data_dir)
        except FileNotFoundError as e:  # a fresh clone: say what to build, as the others do
            record["skipped"] = str(e)
            emit(record)
            return
        step = train_step.build_jax_step(config, batch_np)
        results = measure(step, config, batch_np, FLAGS.steps, FLAGS.rounds)
        record["data"] = {
            "sources": [s["name"] for s in config.data.sources],
            "batch_size": config.batch_size,
            "seq_len": config.data.seq_len,
            "buffer_size": config.data.buffer_size,
        }
        record.update({"steps_per_run": FLAGS.steps, "rounds": FLAGS.rounds})
        record.update(summarize(results))
        record["load_average"] = {"start": load_start, "end": common.load_average()}
        emit(common.round_floats(record))


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir with synthetic_clips built.")
    flags.DEFINE_integer("steps", 12, "Steps (or batches) per timed run.")
    flags.DEFINE_integer("rounds", 5, "Rounds of the four runs; medians are reported.")
    flags.DEFINE_string("config_arg", "", "experiments/tiny.py variant, e.g. runlocal.")
    app.run(main)
