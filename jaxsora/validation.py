"""Validation during training: a fixed-timestep loss on held-out packs, and the run's cumulative
model FLOPs, so that runs of any size are comparable on one axis (SD3's validation loss; the
video-DiT scaling study's loss-vs-compute curves).

The validation loss is the rectified-flow loss averaged over `eval.timesteps` equidistant times
(t_k = (k + 1/2) / K, no resolution shift), each at the same noise, on the same `eval.packs`
packs of the `eval.split` split (clips the run never trains on), built once with `eval.seed`,
text-to-video only and without caption dropout: a pure function of the weights, equal for every
run and every step whatever its own seed, task mix or schedule. It is computed every
`eval.every` steps (0: never) and written beside the training metrics as `val_loss` and
`val_loss_t<k>` (one per time).

Cumulative model FLOPs (`model_flops_total`, jaxsora/flops.py's count over real tokens) are the
sum over every batch trained on. `CountedBatches` adds up each batch's model work (token, segment
and pair counts, exact integers) as the loop takes it and keeps the sums in the data iterator's
checkpointed state, so a resumed run continues the same count (a checkpoint written before this
existed resumes its count from zero, logged).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jaxsora import flops
from jaxsora.diffusion import flow

WORK_KEY = "model_work"  # in the data iterator's saved state


class CountedBatches:
    """The training batches, counting the model work they carry (see the module docstring)."""

    def __init__(self, inner):
        self.inner = inner
        self.work = flops.Work(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        self.last_work: flops.Work | None = None  # the last batch's, for the log's interval

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.inner)
        w = self.last_work = flops.model_work(batch["segment_ids"], batch["text_mask"])
        pairs = zip(_fields(self.work), _fields(w), strict=True)
        self.work = flops.Work(*(a + float(b) for a, b in pairs))
        return batch

    def __getattr__(self, name):  # skipped, close, ...: the pipeline's own
        return getattr(self.inner, name)

    def get_state(self) -> dict:
        return {**self.inner.get_state(), WORK_KEY: dataclasses.asdict(self.work)}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        work = state.pop(WORK_KEY, None)
        self.inner.set_state(state)
        if work is None:
            logging.warning(
                "the checkpoint's data state has no model-work count (written before it "
                "existed): model_flops_total counts from this resume"
            )
            work = dataclasses.asdict(flops.Work(0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
        self.work = flops.Work(**work)

    def model_flops(self, cfg) -> float:
        """Model FLOPs of the training so far, all processes (each counts its own batches)."""
        return flops.step_flops(cfg, self.work) * jax.process_count()


def _fields(w: flops.Work) -> tuple[float, ...]:
    return tuple(getattr(w, f.name) for f in dataclasses.fields(w))


def eval_every(config) -> int:
    ev = config.get("eval") or {}
    return int(ev.get("every", 0) or 0)


def times(k: int) -> np.ndarray:
    return ((np.arange(k) + 0.5) / k).astype(np.float32)


def held_out_batch(config, stage, split: str, packs: int, seed: int) -> dict[str, np.ndarray]:
    """The first `packs` packs of `split` built with `seed`, text-to-video only and no token
    dropping: the same examples for every run on this data, whatever its own seed or task mix."""
    from jaxsora.data import pipeline

    held_out = ml_collections.ConfigDict(config.to_dict())
    held_out.seed = seed
    held_out.batch_size = packs
    held_out.data.tasks = dict(t2v=1.0)
    held_out.data.token_drop_rate = 0.0
    return next(pipeline.make_batches(held_out, stage, split=split))


class Validator:
    """The held-out packs, their noise, and one compiled forward pass for the loss sums."""

    def __init__(self, config, stage, graphdef, mesh, rules):
        from jaxsora.data import pipeline

        ev = config.eval
        batch = held_out_batch(config, stage, ev.split, ev.packs, ev.seed)
        # The same noise for every run: drawn from the eval seed, per process shard.
        rng = np.random.default_rng([ev.seed, jax.process_index()])
        batch["noise"] = rng.standard_normal(batch["tokens"].shape).astype(np.float32)
        self.times = times(ev.timesteps)
        self._batch = pipeline.to_global(batch, mesh, rules)
        self._mesh, self._rules = mesh, rules
        from jaxsora import train as trainer  # late: the trainer imports this module

        prediction = trainer.prediction(config)
        self._fn = jax.jit(
            lambda state, batch, t: validation_sums(
                nnx.merge(graphdef, state).model, batch, t, prediction
            )
        )

    def __call__(self, state) -> dict[str, float]:
        """{"val_loss", "val_loss_t<k>"} of the state's model (not its EMA)."""
        from jaxsora import sharding

        out = {}
        with jax.set_mesh(self._mesh), sharding.activation_sharding(self._mesh, self._rules):
            for k, t in enumerate(self.times):
                sums = self._fn(state, self._batch, jnp.float32(t))
                out[f"val_loss_t{k}"] = float(flow.loss_from_sums(sums))
        out["val_loss"] = float(np.mean([out[f"val_loss_t{k}"] for k in range(len(self.times))]))
        return out


def validation_sums(model, batch: dict, t, prediction: str) -> dict[str, jax.Array]:
    """The flow loss sums of `batch` with every segment at time `t` and the batch's noise; the
    captions as given (no dropout), segment-weighted whatever the run's weighting, on the
    velocity whatever the network predicts (`prediction`)."""
    from jaxsora import train as trainer  # late: the trainer imports this module

    t_BS = jnp.full(batch["grid"].shape[:2], t, jnp.float32)
    return trainer.noised_loss_sums(
        model, batch, t_BS, batch["noise"], batch["text_mask"], "segment", prediction
    )
