"""What a stopped run leaves behind: no checkpoint of a step whose loss was not checked, and
metrics.jsonl and TensorBoard that show every step once after a resume."""

import glob
import json
import os
import struct
import time

import jax.numpy as jnp
import pytest
from tensorboardX.proto import event_pb2

from jaxsora import metrics
from jaxsora import train as trainer
from tests.conftest import runlocal_config


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def jsonl_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def tensorboard_steps(logdir) -> dict[str, list[int]]:
    """The steps TensorBoard shows per scalar: event files in order, and a SessionLog START at
    step s hides every earlier event at steps >= s (what `purge_step` writes)."""
    shown: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            while header := f.read(12):  # TFRecord: length, its CRC, data, data CRC
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                if event.session_log.status == event_pb2.SessionLog.START:
                    shown = {k: [s for s in v if s < event.step] for k, v in shown.items()}
                for value in event.summary.value:
                    shown.setdefault(value.tag, []).append(event.step)
    return shown


def test_a_non_finite_step_is_never_checkpointed_and_stale_rows_are_dropped(
    data_dir, tmp_path, monkeypatch
):
    """Step 4 is a checkpoint step but not a log step, so its loss is read late; it is made
    non-finite. Checkpoint 4 must not exist, 2 must. The workdir already holds rows and events of
    an attempt that stopped before its first checkpoint: the run starts from 0, so they go."""
    workdir = str(tmp_path)
    earlier = metrics.MetricsWriter(workdir, 9, resumed_at=0)
    for step in range(1, 10):
        earlier.write(step, {"loss": 9.0})
    earlier.close()
    real_apply_grads = trainer.apply_grads

    def non_finite_at_step_4(state, grads, sums, config):
        step = state.step[...]  # 0-based: 3 is the loop's step 4
        out = real_apply_grads(state, grads, sums, config)
        return {**out, "loss": jnp.where(step == 3, jnp.nan, out["loss"])}

    config = runlocal_config(data_dir, "runlocal,steps=6")
    config.checkpoint_every, config.log_every = 2, 3
    config.peak_flops_per_device = 1e12  # no start-up matmul measurement
    monkeypatch.setattr(trainer, "apply_grads", non_finite_at_step_4)
    with pytest.raises(FloatingPointError, match="at step 4"):
        trainer.train(config, workdir)
    assert checkpoint_steps(workdir) == [2]
    assert jsonl_steps(workdir) == [3]
    # (TensorBoard's purge is checked below: tensorboardX queues events, and this crashed
    # writer was never closed.)


def test_a_resumed_writer_drops_the_rows_and_events_after_its_step(tmp_path):
    workdir = str(tmp_path)
    first = metrics.MetricsWriter(workdir, 4, resumed_at=0)
    for step in range(1, 5):
        first.write(step, {"loss": 1.0, "grad_norm": 2.0})
    first.close()
    time.sleep(1.1)  # event files are named by the second: a new one, as a restarted run makes
    resumed = metrics.MetricsWriter(workdir, 4, resumed_at=2)  # checkpoint 2 was restored
    for step in (3, 4):
        resumed.write(step, {"loss": 0.5, "grad_norm": 2.0})
    resumed.close()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]
    shown = tensorboard_steps(os.path.join(workdir, "tensorboard"))
    assert shown == {"loss": [1, 2, 3, 4], "grad_norm": [1, 2, 3, 4]}, shown


def test_a_torn_last_line_is_dropped_with_the_rows_past_the_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)))
        f.write('{"step": 8, "lo')  # the run was killed mid-write
    metrics.drop_rows_after(path, 4)
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # the temporary file was renamed
