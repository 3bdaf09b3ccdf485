"""Pod-scale figures on simulated CPU devices: step time per mesh, compile time against depth,
checkpoint save time.

    python -m benchmarks.sharded_step --devices 8 --meshes "data=8;data=2,fsdp=2,tensor=2"

Simulated devices share the same 2 cores, so the step time on 8 of them measures the overhead
of sharding (collectives, partitioned programs), not a speed-up; the point is that it stays
bounded while the numbers stay those of 1 device (tests/test_sharding.py).
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np


def parse_mesh(text: str) -> dict[str, int]:
    sizes = dict(data=1, fsdp=1, context=1, tensor=1)
    for part in text.split(","):
        key, _, value = part.partition("=")
        sizes[key.strip()] = int(value)
    return sizes


def main() -> None:
    from absl import flags

    flags.DEFINE_integer("devices", 8, "Simulated CPU devices.")
    flags.DEFINE_string(
        "meshes",
        "data=1;data=8;data=2,fsdp=2,tensor=2;data=4,context=2",
        "Semicolon-separated meshes; the first uses 1 device.",
    )
    flags.DEFINE_integer("steps", 10, "Timed steps per mesh (median reported).")
    flags.DEFINE_string("depths", "4,16", "Depths whose (scanned) compile time is measured.")
    flags.FLAGS(sys.argv)
    FLAGS = flags.FLAGS
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)

    from benchmarks import common
    from benchmarks.train_step import build_jax_step, make_batch, tiny_config
    from jaxsora.checkpointing import Checkpointer

    with common.json_stdout() as emit:
        record: dict = {
            "benchmark": "sharded_step",
            "machine": common.machine_info(),
            "meshes": {},
            "compile_s_by_depth": {},
        }
        for text in FLAGS.meshes.split(";"):
            config = tiny_config()
            config.batch_size = 8  # the same global batch on every mesh, divisible by data=8
            config.mesh = parse_mesh(text)
            if "context" in text:
                config.model.attention = "context"
            size = int(np.prod(list(config.mesh.values())))
            step = build_jax_step(config, make_batch(config), jax.devices()[:size])
            times = common.timed(step, warmup=2, reps=FLAGS.steps)
            save_s, total_s = checkpoint_seconds(step, Checkpointer)
            record["meshes"][text] = {
                "devices": step.mesh.size,
                "compile_s": step.compile_s,
                "step_s": common.summary(times),
                "checkpoint_blocking_s": save_s,
                "checkpoint_total_s": total_s,
                "loss": step(),
            }
        for depth in (int(d) for d in FLAGS.depths.split(",")):
            config = tiny_config()
            config.model.depth, config.model.scan_layers = depth, True
            config.mesh = parse_mesh("data=1")
            step = build_jax_step(config, make_batch(config), jax.devices()[:1])
            record["compile_s_by_depth"][depth] = step.compile_s
        emit(common.round_floats(record))


def checkpoint_seconds(step, checkpointer_cls) -> tuple[float, float]:
    """(time the train loop is blocked, time until the save is committed) for one save."""

    class _NoData:
        def get_state(self) -> dict:
            return {}

    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpointer_cls(workdir)
        start = time.perf_counter()
        ckpt.save(1, step.state.to_pure_dict(), _NoData(), step.config.to_json())
        blocking = time.perf_counter() - start
        ckpt.wait()
        total = time.perf_counter() - start
        ckpt.close()
    return blocking, total


if __name__ == "__main__":
    main()
