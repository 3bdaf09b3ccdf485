"""Trains the packed video DiT with rectified flow.

    python -m jaxsora.train --config experiments/tiny.py[:args] --workdir runs/default

The run resumes by itself from the latest checkpoint in --workdir (model, optimizer, EMA, step,
RNG and the data iterator), so running the same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as pylogging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from jaxsora import flops, sharding
from jaxsora.checkpointing import Checkpointer, abstract_like
from jaxsora.compression import make_stage
from jaxsora.data import pipeline
from jaxsora.diffusion import flow
from jaxsora.distributed import PreemptionWatch, initialize
from jaxsora.metrics import MetricsWriter
from jaxsora.models.dit import DiT, DiTConfig, make_model
from jaxsora.models.tokenizer import START_ID


class RunVar(nnx.Variable):
    """Bookkeeping that is checkpointed with the weights: step and base RNG key."""


class TrainState(nnx.Module):
    def __init__(self, model: DiT, tx: optax.GradientTransformation, seed: int):
        self.model = model
        self.ema = nnx.clone(model)
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.step = RunVar(jnp.zeros((), jnp.int32))
        self.rng = RunVar(jax.random.key_data(jax.random.key(seed)))


def dit_config(config: ml_collections.ConfigDict) -> DiTConfig:
    m = config.model
    pt, ph, pw = m.patch
    stage = make_stage(m)  # the VAE's z_dim in latent space (loaded once, then cached)
    return DiTConfig(
        patch_dim=pt * ph * pw * stage.channels,
        width=m.width,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        text_vocab=m.text_vocab,
        text_len=m.text_len,
        text_width=m.text_width,
        text_depth=m.text_depth,
        text_heads=m.text_heads,
        rope_theta=m.get("rope_theta", 10_000.0),
        remat=m.get("remat", "none"),
        scan_layers=m.get("scan_layers", True),
        dtype=m.dtype,
        attention=m.attention,
    )


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, o.warmup_steps, max(total_steps, o.warmup_steps + 1), end_value=0.1 * o.lr
    )
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors a user can cause, raised before anything is compiled."""
    d, m = config.data, config.model
    checks = [
        (
            d.max_tokens <= d.seq_len,
            "data.max_tokens must be <= data.seq_len (an example must fit in one pack)",
        ),
        (1 <= d.min_tokens <= d.max_tokens, "data.min_tokens must be in [1, data.max_tokens]"),
        (d.max_segments >= 1, "data.max_segments must be >= 1"),
        (m.width % m.num_heads == 0, "model.width must be divisible by model.num_heads"),
        ((m.width // m.num_heads) % 2 == 0, "model.width / model.num_heads must be even (RoPE)"),
        (len(m.patch) == 3, "model.patch must be (p_t, p_h, p_w)"),
        (
            config.flow.loss_weighting in ("segment", "token"),
            "flow.loss_weighting must be 'segment' or 'token'",
        ),
        (m.dtype in ("float32", "bfloat16"), "model.dtype must be 'float32' or 'bfloat16'"),
        (config.batch_size >= 1, "batch_size must be >= 1"),
        (0.0 <= config.flow.caption_dropout < 1.0, "flow.caption_dropout must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"bad config: {message}")
    make_stage(m)  # an unknown stage or a bad model.vae_dir fails here, naming the field


def create_train_state(config, mesh, rules) -> TrainState:
    """Weights are created already sharded: eval_shape -> shardings -> jit with constraints."""
    cfg = dit_config(config)
    tx = make_optimizer(config.optim, config.total_steps)

    def init() -> TrainState:
        return TrainState(make_model(cfg, config.seed), tx, config.seed)

    shardings = sharding.state_shardings(nnx.state(nnx.eval_shape(init)), mesh, rules)

    @nnx.jit
    def init_sharded() -> TrainState:
        state = init()
        nnx.update(state, jax.lax.with_sharding_constraint(nnx.state(state), shardings))
        return state

    with jax.set_mesh(mesh):
        return init_sharded()


def loss_and_metrics(model: DiT, batch: dict, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """Noises each segment at its own shifted time and scores the predicted velocity."""
    f = config.flow
    seg, grid = batch["segment_ids"], batch["grid"]
    B, S = grid.shape[:2]
    k_time, k_noise, k_drop = jax.random.split(key, 3)
    t_BS = flow.logit_normal(k_time, (B, S), f.time_mean, f.time_std)
    t_BS = flow.shift_time(t_BS, flow.resolution_shift(grid, f.base_tokens))
    x0 = batch["tokens"]
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = flow.add_noise(x0, noise, flow.per_segment(t_BS, seg))
    x_t = jnp.where(batch["cond_mask"][..., None], x0, x_t)
    drop_BS = jax.random.bernoulli(k_drop, f.caption_dropout, (B, S))
    text_mask = jnp.where(
        drop_BS[..., None], null_text_mask(batch["text_mask"]), batch["text_mask"]
    )
    pred = model(x_t, t_BS, seg, batch["positions"], batch["text_ids"], text_mask)
    return flow.packed_loss(
        pred, flow.velocity(x0, noise), seg, batch["cond_mask"], S, f.loss_weighting
    )


def null_text_mask(text_mask: jax.Array) -> jax.Array:
    """The unconditional caption: the start token alone (see models/tokenizer.py)."""
    return jnp.zeros_like(text_mask).at[..., 0].set(True)


def null_text_ids(text_ids: jax.Array) -> jax.Array:
    return jnp.zeros_like(text_ids).at[..., 0].set(START_ID)


def train_step(state: TrainState, batch: dict, config) -> dict:
    step = state.step[...]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng[...]), step)
    grad_fn = nnx.value_and_grad(
        functools.partial(loss_and_metrics, batch=batch, key=key, config=config), has_aux=True
    )
    (loss, aux), grads = grad_fn(state.model)
    state.optimizer.update(state.model, grads)
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
    ema, params = nnx.state(state.ema, nnx.Param), nnx.state(state.model, nnx.Param)
    nnx.update(state.ema, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params))
    state.step[...] = step + 1
    return {"loss": loss, "grad_norm": optax.global_norm(grads), "segments": aux["segments"]}


def make_step_fn(graphdef, config, state_shardings=None):
    """A pure jitted step over the split state, so it can be compiled ahead of time.

    The new state is pinned to `state_shardings` (the state's own): left to itself, XLA may hand
    an updated weight back sharded differently (e.g. over `context`), and the compiled step would
    then refuse it on the next call.
    """

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state, batch):
        ts = nnx.merge(graphdef, state)
        metrics = train_step(ts, batch, config)
        new_state = nnx.state(ts)
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, metrics

    return step_fn


def train(config: ml_collections.ConfigDict, workdir: str, distributed: bool = False) -> dict:
    """Runs (or resumes) training; returns the last logged metrics.

    `distributed`: this process is one of several (jaxsora.distributed.initialize said so).
    """
    validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config.data.data_dir = os.path.abspath(config.data.data_dir)
    if config.model.get("vae_dir"):  # saved absolute: the sampler may run from anywhere
        config.model.vae_dir = os.path.abspath(config.model.vae_dir)
    stage = make_stage(config.model)

    # --------------------------------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    dp = sharding.data_parallel_size(mesh, rules)
    if config.batch_size % dp:
        raise ValueError(
            f"bad config: batch_size={config.batch_size} must be divisible by the "
            f"{dp} data-parallel devices of mesh {dict(mesh.shape)}"
        )
    logging.info(
        "mesh %s over %d devices (%s), %d processes",
        dict(mesh.shape),
        mesh.size,
        jax.devices()[0].device_kind,
        jax.process_count(),
    )

    # ----------------------------------------------------------------------------- input pipeline
    batches = pipeline.make_batches(config, stage)

    # ------------------------------------------------------------------------ model and optimizer
    graphdef, state = nnx.split(create_train_state(config, mesh, rules))
    n_params = sum(x.size for x in jax.tree.leaves(state["model"].filter(nnx.Param)))
    logging.info("model: %.2fM parameters", n_params / 1e6)

    # --------------------------------------------------------------------------------- checkpoint
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        t0 = time.perf_counter()
        restored = ckpt.restore(start, checkpoint_target(state), config.model.to_dict(), batches)
        nnx.replace_by_pure_dict(state, restored)
        logging.info(
            "resumed from %s at step %d (%.1fs)", ckpt.directory, start, time.perf_counter() - t0
        )
    start = start or 0

    # --------------------------------------------------------------------------------- step (AOT)
    step_fn = make_step_fn(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
        compiled = step_fn.lower(
            state, pipeline.abstract_batch(config, stage, mesh, rules)
        ).compile()
    logging.info(
        "compiled the train step in %.1fs; memory per device: %s",
        time.perf_counter() - t0,
        memory_summary(compiled),
    )
    step_flops = flops.train_step_flops(
        dit_config(config), config.batch_size, config.data.seq_len, config.data.max_segments
    )
    peak, peak_source = flops.device_peak(config.peak_flops_per_device)
    logging.info(
        "train step: %.3g FLOPs; peak %.3g FLOP/s per device (%s)", step_flops, peak, peak_source
    )

    # --------------------------------------------------------------------------------------- loop
    writer = MetricsWriter(workdir, config.total_steps)
    preemption = PreemptionWatch(distributed)
    interval = _Interval()
    last: dict = {}
    pending = None  # metrics of the step in flight: read one step late so the host never waits
    end = min(config.total_steps, config.stop_after or config.total_steps)
    for step in range(start + 1, end + 1):
        batch = next(batches)
        interval.add_batch(batch)
        state, metrics = compiled(state, pipeline.to_global(batch, mesh, rules))
        if pending is not None:
            interval.add_metrics(check_finite(*pending))
        pending = (step, metrics)
        preempted = preemption.reached(step)
        if step % config.log_every == 0 or step == end or preempted:
            interval.add_metrics(check_finite(*pending))
            pending = None
            last = interval.summary(step_flops, peak, mesh.size, batches.packer.skipped)
            writer.write(step, last)
        if step % config.checkpoint_every == 0 or step == end or preempted:
            t0 = time.perf_counter()
            ckpt.save(step, state.to_pure_dict(), batches, config.to_json())
            logging.info("checkpoint %d: %.2fs blocking", step, time.perf_counter() - t0)
        if preempted:
            logging.warning("preempted: saved step %d on every process; exiting", step)
            break
    ckpt.wait()
    ckpt.close()
    writer.close()
    return last


def checkpoint_target(state) -> dict:
    return abstract_like(state.to_pure_dict())


def check_finite(step: int, metrics: dict) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step}: {values}. The run stopped; lower "
            "optim.lr or raise optim.warmup_steps, then rerun to resume from the last checkpoint"
        )
    return values


@dataclasses.dataclass
class _Interval:
    """Sums over the steps since the last log line."""

    steps: int = 0
    real_tokens: int = 0
    slots: int = 0
    losses: list = dataclasses.field(default_factory=list)
    grad_norm: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add_batch(self, batch):
        self.steps += 1
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        self.slots += batch["segment_ids"].size

    def add_metrics(self, m):
        self.losses.append(m["loss"])
        self.grad_norm = m["grad_norm"]

    def summary(self, step_flops, peak, n_devices, skipped) -> dict:
        dt = time.perf_counter() - self.start
        step_time = dt / max(self.steps, 1)
        achieved = step_flops / step_time / n_devices
        out = {
            "loss": float(np.mean(self.losses)),
            "grad_norm": self.grad_norm,
            "step_time_s": step_time,
            "tokens_per_s": self.real_tokens * jax.process_count() / dt,
            "tflops_per_device": achieved / 1e12,
            "mfu": achieved / peak,
            "pack_efficiency": self.real_tokens / max(self.slots, 1),
            "skipped_media": float(skipped),
        }
        self.__init__()
        return out


def memory_summary(compiled) -> str:
    try:
        m = compiled.memory_analysis()
        return (
            f"arguments {m.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
            f"{m.temp_size_in_bytes / 2**20:.1f} MiB, "
            f"outputs {m.output_size_in_bytes / 2**20:.1f} MiB"
        )
    except Exception as e:  # some backends do not report it
        return f"unavailable ({e})"


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    quiet_orbax_info_logs()
    distributed = initialize()  # before anything starts a JAX backend
    train(FLAGS.config, FLAGS.workdir, distributed)


def quiet_orbax_info_logs() -> None:
    """Orbax logs a dozen INFO lines per save through absl; keep its warnings, drop the chatter."""

    def keep(record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname

    pylogging.getLogger("absl").addFilter(keep)


if __name__ == "__main__":
    # Flags live here, not at import time, so other entry points can import this module.
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file[:args].", lock_config=False
    )
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events.")
    app.run(main)
