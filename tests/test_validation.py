"""Validation during training (jaxsora/validation.py): the fixed-timestep loss is a function of
the weights alone, a resumed run logs the uninterrupted run's validation curve and cumulative
model FLOPs (and sample-quality scores) exactly, and those FLOPs are the sum of every trained
batch's model FLOPs."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from jaxsora import flops, sharding, validation
from jaxsora import train as trainer
from jaxsora.compression import make_stage
from jaxsora.data import pipeline
from tests.conftest import randomize_params, runlocal_config

ARG = "runlocal,steps=6"


def _config(data_dir):
    config = runlocal_config(data_dir, ARG)
    config.eval.every = 2
    config.eval.quality_every = 3  # and the sample-quality score (jaxsora/evaluate.py)
    return config


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_validation_loss_is_a_function_of_the_weights_alone(data_dir):
    config = _config(data_dir)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    ts = trainer.create_train_state(config, mesh, rules)
    randomize_params(ts.model, scale=0.1)
    graphdef, state = nnx.split(ts)
    stage = make_stage(config.model)
    first = validation.Validator(config, stage, graphdef, mesh, rules)(state)
    other_seed = _config(data_dir)
    other_seed.seed, other_seed.data.tasks = 7, dict(t2v=0.5, i2v_head=0.5)  # the run's own
    again = validation.Validator(other_seed, stage, graphdef, mesh, rules)
    assert again(state) == first == again(state)
    assert len([k for k in first if k.startswith("val_loss_t")]) == config.eval.timesteps
    ends = first["val_loss_t0"], first[f"val_loss_t{config.eval.timesteps - 1}"]
    assert ends[0] != ends[1]  # the times really differ


@pytest.mark.slow
def test_a_resumed_run_logs_the_same_validation_curve_and_flops(data_dir, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    trainer.train(_config(data_dir), straight)
    stopped = _config(data_dir)
    stopped.stop_after = 3
    trainer.train(stopped, resumed)
    trainer.train(_config(data_dir), resumed)

    def curve(workdir):
        return {
            r["step"]: (r["val_loss"], r["model_flops_total"])
            for r in _rows(workdir)
            if "val_loss" in r
        }

    a, b = curve(straight), curve(resumed)
    assert sorted(a) == [2, 4, 6] and a == b, (a, b)

    def scores(workdir):
        return {
            r["step"]: (r["quality_score"], r["quality_coherence"])
            for r in _rows(workdir)
            if "quality_score" in r
        }

    assert sorted(scores(straight)) == [3, 6] and scores(straight) == scores(resumed)
    for step in (3, 6):
        for ext in ("npz", "png"):
            assert os.path.exists(os.path.join(resumed, "eval", f"quality_step{step}.{ext}"))

    # The count is every trained batch's model FLOPs (the same deterministic batches again).
    config = _config(data_dir)
    batches = pipeline.make_batches(config, make_stage(config.model))
    cfg = trainer.dit_config(config)
    total = sum(flops.train_step_flops(cfg, next(batches)).model for _ in range(6))
    assert np.isclose(a[6][1], total, rtol=1e-12), (a[6][1], total)
