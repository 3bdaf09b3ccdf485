"""Trains the packed video DiT with rectified flow.

    python -m jaxsora.train --config experiments/tiny.py[:args] --workdir runs/default

The run resumes by itself from the latest checkpoint in --workdir (model, optimizer, EMA, step,
RNG and the data iterator), so running the same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
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

from jaxsora import config_checks, flops, sharding, validation
from jaxsora.checkpointing import Checkpointer, abstract_like, resume_check
from jaxsora.compression import make_stage
from jaxsora.data import captions, pipeline, prefetch, tasks
from jaxsora.diffusion import flow
from jaxsora.distributed import PreemptionWatch, initialize
from jaxsora.metrics import MetricsWriter
from jaxsora.models import attention as attention_backends
from jaxsora.models.dit import POSITIONS, DiT, DiTConfig, make_model
from jaxsora.training import (
    RunVar,
    check_finite_or_wait,
    make_optimizer,
    memory_summary,
    quiet_orbax_info_logs,
)


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
    text = captions.text_spec(config)
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
        text_embed_dim=captions.embedding_dim(text),
        rope_theta=m.get("rope_theta", 10_000.0),
        num_classes=len(text.class_names) if text.encoder == captions.CLASS else 0,
        positions=m.get("positions", "rope"),
        frame_positions=m.get("frame_positions", False),
        qk_norm=m.get("qk_norm", True),
        learn_sigma=m.get("learn_sigma", False),
        time_freq_shift=m.get("time_freq_shift", 0),
        mlp_norm_eps=m.get("mlp_norm_eps", 1e-6),
        remat=m.get("remat", "none"),
        scan_layers=m.get("scan_layers", True),
        dtype=m.dtype,
        attention=m.attention,
        attention_block=m.get("attention_block", 64),
        segment_tokens=(config.data.min_tokens, config.data.max_tokens),
    )


def accum_steps(config: ml_collections.ConfigDict) -> int:
    """Micro-batches per optimizer step (configs saved before the field existed: 1)."""
    return config.optim.get("accum_steps", 1)


# Every field the DiT trainer reads and the values it accepts. Checked before the relations in
# validate(), so num_heads=0 is reported as such, not as a division by zero.
DIT_CHECKS = (
    *config_checks.RUN_CHECKS,
    config_checks.integer("batch_size", 1, why="packs per optimizer step, over all processes"),
    config_checks.number("peak_flops_per_device", 0.0, why="0 = measure it", optional=True),
    config_checks.integers("model.patch", 1, length=3, why="(p_t, p_h, p_w)"),
    config_checks.integer("model.width", 1),
    config_checks.integer("model.depth", 1),
    config_checks.integer("model.num_heads", 1),
    config_checks.number("model.mlp_ratio", 0.0, open_low=True),
    config_checks.integer("model.text_vocab", 3, why="ids 0 and 1 are padding and start"),
    config_checks.integer("model.text_len", 1, why="the start token, then text_len - 1 words"),
    config_checks.integer("model.text_width", 1),
    config_checks.integer("model.text_depth", 0),
    config_checks.integer("model.text_heads", 1),
    config_checks.number("model.rope_theta", 0.0, open_low=True, optional=True),
    config_checks.one_of("model.positions", POSITIONS, optional=True),
    config_checks.boolean("model.qk_norm", optional=True),
    config_checks.boolean("model.frame_positions", optional=True),
    config_checks.boolean("model.learn_sigma", optional=True),
    config_checks.one_of(
        "model.time_freq_shift", (0, 1), optional=True, why="0: the DiT paper's, 1: diffusers'"
    ),
    config_checks.number("model.mlp_norm_eps", 0.0, open_low=True, optional=True),
    config_checks.one_of("model.dtype", ("float32", "bfloat16")),
    config_checks.one_of("model.attention", attention_backends.BACKENDS),
    config_checks.integer(
        "model.attention_block", 1, optional=True, why="queries per window of `windowed`"
    ),
    config_checks.one_of("text.encoder", captions.ENCODERS, optional=True),
    config_checks.boolean("model.scan_layers", optional=True),
    config_checks.integer("data.seq_len", 1),
    config_checks.integer("data.max_segments", 1),
    config_checks.integer("data.min_tokens", 1),
    config_checks.integer("data.max_tokens", 1),
    config_checks.integer("data.max_frames", 1, why="0 would train on empty clips"),
    config_checks.integer("data.frame_stride", 1),
    config_checks.integer("data.buffer_size", 1, why="examples the packer chooses from"),
    config_checks.number("data.max_bad_fraction", 0.0, 1.0, why="the share of media that may fail"),
    config_checks.number("data.token_drop_rate", 0.0, 1.0, optional=True),
    config_checks.PREFETCH_CHECK,
    config_checks.number("flow.time_std", 0.0, open_low=True),
    config_checks.integer("flow.base_tokens", 1),
    config_checks.one_of("flow.loss_weighting", ("segment", "token")),
    config_checks.one_of("flow.prediction", flow.PREDICTIONS, optional=True),
    config_checks.number("flow.caption_dropout", 0.0, 1.0),
    *config_checks.OPTIM_CHECKS,
    config_checks.integer("optim.accum_steps", 1, optional=True),
    config_checks.integer("sample.steps", 1),
    config_checks.integer("sample.seq_len", 1),
    config_checks.number("sample.image_guidance", 0.0, optional=True),
    config_checks.one_of("sample.solver", flow.SOLVERS, optional=True),
    config_checks.integer(
        "eval.every", 0, why="steps between validations; 0 = never", optional=True
    ),
    config_checks.integer("eval.packs", 1, why="held-out packs, over all processes", optional=True),
    config_checks.integer("eval.timesteps", 1, optional=True),
    config_checks.integer("eval.seed", 0, optional=True),
    config_checks.integer(
        "eval.quality_every",
        0,
        why="steps between sample-quality scores; 0 = never",
        optional=True,
    ),
    config_checks.integer("eval.quality_prompts", 1, optional=True),
    config_checks.integer("eval.quality_steps", 0, why="0 = sample.steps", optional=True),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors a user can cause, raised before anything is compiled."""
    config_checks.check_fields(config, DIT_CHECKS)
    config_checks.check_sources(config.data.sources)
    tasks.check_weights(config.data.get("tasks"))
    d, m = config.data, config.model
    checks = [
        (
            d.max_tokens <= d.seq_len,
            f"data.max_tokens={d.max_tokens} must be <= data.seq_len={d.seq_len} (an example "
            "must fit in one pack)",
        ),
        (
            d.min_tokens <= d.max_tokens,
            f"data.min_tokens={d.min_tokens} must be <= data.max_tokens={d.max_tokens}",
        ),
        (
            m.width % m.num_heads == 0,
            f"model.width={m.width} must be divisible by model.num_heads={m.num_heads}",
        ),
        (
            m.get("positions", "rope") != "rope" or (m.width // m.num_heads) % 2 == 0,
            f"model.width / model.num_heads = {m.width // m.num_heads} must be even (RoPE "
            "rotates pairs of channels)",
        ),
        (
            m.get("positions", "rope") != "sincos" or m.width % 4 == 0,
            f"model.width={m.width} must be divisible by 4 for model.positions='sincos' (sines "
            "and cosines of h and w)",
        ),
        (
            not m.get("frame_positions", False) or m.width % 4 == 0,
            f"model.width={m.width} must be divisible by 4 for model.frame_positions (sines "
            "and cosines of the fractional h and w)",
        ),
        (
            m.get("positions", "rope") != "sincos" or d.max_frames == 1,
            f"model.positions='sincos' is the DiT paper's 2D image embedding, which does not "
            f"encode time, but data.max_frames={d.max_frames}; set data.max_frames=1 (images), "
            "or model.positions='rope' for video",
        ),
        (
            m.text_width % m.text_heads == 0,
            f"model.text_width={m.text_width} must be divisible by model.text_heads={m.text_heads}",
        ),
        (
            config.batch_size % accum_steps(config) == 0,
            f"batch_size={config.batch_size} must be divisible by optim.accum_steps="
            f"{accum_steps(config)} (batch_size is the packs per optimizer step, split into "
            "accum_steps micro-batches)",
        ),
    ]
    checks += class_checks(config)
    for ok, message in checks:
        if not ok:
            raise ValueError(f"bad config: {message}")
    stage = make_stage(m)  # an unknown stage or a bad model.vae_dir fails here, naming the field
    captions.embedding_dim(captions.text_spec(config))  # and a frozen encoder that won't load
    from jaxsora import evaluate  # late: the evaluation samples through jaxsora.sample

    if evaluate.quality_every(config):  # the analyzer knows the synthetic world only
        try:
            evaluate.check_synthetic(config)
            evaluate.prompt_set(config, int(config.eval.quality_prompts), stage=stage)
        except ValueError as e:
            raise ValueError(
                f"bad config: eval.quality_every={config.eval.quality_every}: {e} "
                "(or set eval.quality_every=0)"
            ) from None


def class_checks(config) -> list[tuple[bool, str]]:
    """A class-conditional run (text.encoder = "class") names its classes, one token each."""
    text = config.get("text") or {}
    if text.get("encoder") != captions.CLASS:
        return []
    names = text.get("class_names")
    ok_names = (
        isinstance(names, list | tuple)
        and bool(names)
        and all(isinstance(n, str) and n.strip() for n in names)
    )
    return [
        (
            ok_names,
            f"text.class_names={names!r} must list the class names (non-empty strings) for "
            "text.encoder='class': a caption's label is the class it names",
        ),
        (
            not ok_names or len(set(names)) == len(names),
            f"text.class_names={names!r} repeats a name; each class is named once",
        ),
        (
            config.model.text_len == 1,
            f"model.text_len={config.model.text_len} must be 1 for text.encoder='class' (a "
            "segment's caption is its one label)",
        ),
    ]


def create_train_state(config, mesh, rules) -> TrainState:
    """Weights are created already sharded: eval_shape -> shardings -> jit with constraints."""
    cfg = dit_config(config)
    tx = make_optimizer(config.optim, config.total_steps)

    def init() -> TrainState:
        return TrainState(make_model(cfg, config.seed), tx, config.seed)

    shardings = sharding.state_shardings(
        nnx.state(nnx.eval_shape(init)), mesh, rules, strict=config.get("strict_sharding", False)
    )

    @nnx.jit
    def init_sharded() -> TrainState:
        state = init()
        nnx.update(state, jax.lax.with_sharding_constraint(nnx.state(state), shardings))
        return state

    with jax.set_mesh(mesh):
        return init_sharded()


def draw_randomness(key: jax.Array, batch: dict, config) -> dict:
    """The step's times, noise and caption dropout for the whole batch, drawn once: micro-batches
    take their rows of these, so accumulating sees exactly the numbers one big batch would."""
    f = config.flow
    B, S = batch["grid"].shape[:2]
    k_time, k_noise, k_drop = jax.random.split(key, 3)
    return {
        "t_BS": flow.logit_normal(k_time, (B, S), f.time_mean, f.time_std),
        "noise": jax.random.normal(k_noise, batch["tokens"].shape, jnp.float32),
        "drop_BS": jax.random.bernoulli(k_drop, f.caption_dropout, (B, S)),
    }


def loss_sums(model: DiT, batch: dict, draws: dict, config) -> dict[str, jax.Array]:
    """Noises each segment at its own shifted time and scores the predicted velocity; returns
    the loss as sums and counts (`flow.packed_loss_sums`) so micro-batches add up exactly."""
    f = config.flow
    t_BS = flow.shift_time(draws["t_BS"], flow.resolution_shift(batch["grid"], f.base_tokens))
    text_mask = jnp.where(
        draws["drop_BS"][..., None], null_text_mask(batch["text_mask"]), batch["text_mask"]
    )
    return noised_loss_sums(
        model, batch, t_BS, draws["noise"], text_mask, f.loss_weighting, prediction(config)
    )


def noised_loss_sums(
    model: DiT, batch: dict, t_BS, noise, text_mask, weighting: str, prediction: str
) -> dict:
    """The flow loss sums of `batch` with each segment noised to its t_BS by `noise`, read with
    `text_mask`; conditioning tokens stay clean and unscored (training and validation). The
    network's output is `prediction` (flow.PREDICTIONS); the loss is on the velocity."""
    seg, S = batch["segment_ids"], batch["grid"].shape[1]
    x0 = batch["tokens"]
    t_BL = flow.per_segment(t_BS, seg)
    x_t = flow.add_noise(x0, noise, t_BL)
    x_t = jnp.where(batch["cond_mask"][..., None], x0, x_t)
    out = model(
        x_t, t_BS, seg, batch["positions"], caption_input(batch), text_mask, batch["cond_mask"]
    )
    pred = flow.velocity_from_output(out, x_t, t_BL, prediction)
    target = flow.loss_target(x0, noise, x_t, t_BL, prediction)
    return flow.packed_loss_sums(pred, target, seg, batch["cond_mask"], S, weighting)


def loss_and_metrics(model: DiT, batch: dict, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """The loss of one whole batch at once (what `train_step` computes, unsplit)."""
    sums = loss_sums(model, batch, draw_randomness(key, batch, config), config)
    loss = flow.loss_from_sums(sums)
    return loss, {"loss": loss, "segments": sums["segments"]}


def prediction(config) -> str:
    """What the run's network outputs (flow.PREDICTIONS); runs from before the choice, velocity."""
    return config.flow.get("prediction", "velocity")


def caption_input(batch: dict) -> jax.Array:
    """What the pack gives the DiT for its captions: a frozen encoder's embeddings, else ids."""
    return batch["text_emb"] if "text_emb" in batch else batch["text_ids"]


def null_text_mask(text_mask: jax.Array) -> jax.Array:
    """The unconditional caption: an all-False mask, which the model reads as its null caption
    (the start token for hashed ids, a learned token for embeddings: models/text.py)."""
    return jnp.zeros_like(text_mask)


def micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], micro-batch a holding packs a, a + k, a + 2k, ...

    Strided, not contiguous: each data-parallel device holds B/dp consecutive packs, B/(k*dp)
    of every micro-batch, so every micro-batch is spread over all devices and nothing moves.
    """
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch"))


def batch_grads(model: DiT, batch: dict, draws: dict, config) -> tuple[nnx.State, dict]:
    """Gradient of the whole batch's loss, in `optim.accum_steps` micro-batches (a scan, so
    activations are held for one micro-batch at a time), and the loss sums.

    Each micro-batch adds the gradient of its loss *sum* and its counts; one division by the
    whole batch's count at the end makes k micro-batches of B/k the same as one batch of B (an
    average of micro-batch averages would not be, with segments spread unevenly over packs).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def total(params, micro):
        sums = loss_sums(nnx.merge(graphdef, params, rest), *micro, config)
        return sums["total"], sums

    grad_fn = jax.grad(total, has_aux=True)
    k = accum_steps(config)
    if k == 1:
        grads, sums = grad_fn(params, (batch, draws))
    else:

        def add(acc, micro):
            return jax.tree.map(jnp.add, acc, grad_fn(params, micro)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        no_sums = {n: jnp.zeros((), jnp.float32) for n in ("total", "count", "segments")}
        micro = jax.tree.map(functools.partial(micro_batches, k=k), (batch, draws))
        (grads, sums), _ = jax.lax.scan(add, (zeros, no_sums), micro)
    count = jnp.maximum(sums["count"], 1.0)
    return jax.tree.map(lambda g: g / count, grads), sums


def train_step(state: TrainState, batch: dict, config) -> dict:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng[...]), state.step[...])
    grads, sums = batch_grads(state.model, batch, draw_randomness(key, batch, config), config)
    return apply_grads(state, grads, sums, config)


def apply_grads(state: TrainState, grads: nnx.State, sums: dict, config) -> dict:
    """The optimizer and EMA updates and the step count; the step's metrics."""
    step = state.step[...]
    state.optimizer.update(state.model, grads)
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
    ema, params = nnx.state(state.ema, nnx.Param), nnx.state(state.model, nnx.Param)
    nnx.update(state.ema, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params))
    state.step[...] = step + 1
    return {
        "loss": flow.loss_from_sums(sums),
        "grad_norm": optax.global_norm(grads),
        "segments": sums["segments"],
    }


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
    sharding.check_batch_spans_processes(mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    if config.batch_size % (accum_steps(config) * dp):
        raise ValueError(
            f"bad config: batch_size={config.batch_size} must be divisible by "
            f"optim.accum_steps={accum_steps(config)} x the {dp} data-parallel devices of mesh "
            f"{dict(mesh.shape)} (every micro-batch is split over them)"
        )
    logging.info(
        "mesh %s over %d devices (%s), %d processes",
        dict(mesh.shape),
        mesh.size,
        jax.devices()[0].device_kind,
        jax.process_count(),
    )

    # ----------------------------------------------------------------------------- input pipeline
    # Counted as the loop takes them: the run's cumulative model FLOPs (jaxsora/validation.py).
    batches = validation.CountedBatches(
        prefetch.from_config(pipeline.make_batches(config, stage), config)
    )

    # ------------------------------------------------------------------------ model and optimizer
    graphdef, state = nnx.split(create_train_state(config, mesh, rules))
    n_params = sum(x.size for x in jax.tree.leaves(state["model"].filter(nnx.Param)))
    logging.info("model: %.2fM parameters", n_params / 1e6)

    # --------------------------------------------------------------------------------- checkpoint
    # The newest step that loads; a damaged one gives way to the previous (jaxsora/checkpointing.py)
    # and the saved config must agree with this one (the table in jaxsora/resume.py).
    ckpt = Checkpointer.for_run(workdir, config)
    t0 = time.perf_counter()
    resumed = ckpt.restore_latest(checkpoint_target(state), batches, resume_check(config))
    start = 0
    if resumed is not None:
        start, restored = resumed
        nnx.replace_by_pure_dict(state, restored)
        logging.info(
            "resumed from %s at step %d (%.1fs)", ckpt.directory, start, time.perf_counter() - t0
        )

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
    peak, peak_source = flops.device_peak(config.peak_flops_per_device)
    logging.info("peak %.3g FLOP/s per device (%s)", peak, peak_source)

    every = validation.eval_every(config)
    validator = validation.Validator(config, stage, graphdef, mesh, rules) if every else None
    from jaxsora import evaluate

    rater = None
    if evaluate.quality_every(config):
        if jax.process_count() == 1:
            rater = evaluate.QualityEvaluator(config, workdir, stage)
        else:  # the sampler packs on one host; a pod run scores its checkpoints offline
            logging.warning(
                "eval.quality_every is off on %d processes: score a checkpoint with "
                "`python -m jaxsora.evaluate --workdir %s`",
                jax.process_count(),
                workdir,
            )

    # --------------------------------------------------------------------------------------- loop
    writer = MetricsWriter(workdir, config.total_steps, resumed_at=start)
    preemption = PreemptionWatch(distributed)
    cfg = dit_config(config)
    interval = _Interval(cfg)
    finite = functools.partial(check_finite_or_wait, ckpt)
    last: dict = {}
    pending = None  # metrics of the step in flight: read one step late so the host never waits
    end = min(config.total_steps, config.stop_after or config.total_steps)
    for step in range(start + 1, end + 1):
        batch = next(batches)
        interval.add_batch(batch, batches.last_work)
        state, metrics = compiled(state, pipeline.to_global(batch, mesh, rules))
        if pending is not None:
            interval.add_metrics(finite(*pending))
        pending = (step, metrics)
        preempted = preemption.reached(step)
        log = step % config.log_every == 0 or step == end or preempted
        save = step % config.checkpoint_every == 0 or step == end or preempted
        if log or save:  # a checkpoint is written only once its own step passed the check
            interval.add_metrics(finite(*pending))
            pending = None
        val = {}
        if every and (step % every == 0 or step == config.total_steps):  # not at a stop
            t0 = time.perf_counter()
            val = validator(state)
            interval.start += time.perf_counter() - t0  # step_time_s is the training's alone
        if rater is not None and rater.due(step):
            t0 = time.perf_counter()
            with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
                val.update(rater(nnx.merge(graphdef, state).ema, step))
            interval.start += time.perf_counter() - t0
        if val or log:
            val["model_flops_total"] = batches.model_flops(cfg)
        if log:
            last = {**interval.summary(peak, mesh.size, batches.skipped), **val}
            writer.write(step, last)
        elif val:  # a validation step between log lines: its own row
            writer.write(step, val)
        if save:
            t0 = time.perf_counter()
            ckpt.save(step, state.to_pure_dict(), batches, config.to_json())
            logging.info("checkpoint %d: %.2fs blocking", step, time.perf_counter() - t0)
        if preempted:
            logging.warning("preempted: saved step %d on every process; exiting", step)
            break
    batches.close()
    ckpt.wait()
    ckpt.close()
    preemption.close()
    writer.close()
    return last


def checkpoint_target(state) -> dict:
    return abstract_like(state.to_pure_dict())


@dataclasses.dataclass
class _Interval:
    """Sums over the steps since the last log line (this process's batches)."""

    cfg: DiTConfig
    steps: int = 0
    real_tokens: int = 0
    slots: int = 0
    step_flops: flops.StepFlops = flops.StepFlops(0.0, 0.0)
    losses: list = dataclasses.field(default_factory=list)
    grad_norm: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add_batch(self, batch, work: flops.Work):
        self.steps += 1
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        self.slots += batch["segment_ids"].size
        # Model FLOPs follow the packs' contents (segment sizes, caption lengths), so they are
        # counted per batch on the host (`work`: CountedBatches' bincount of the batch's ids).
        self.step_flops += flops.train_step_flops(self.cfg, batch, work)

    def add_metrics(self, m):
        self.losses.append(m["loss"])
        self.grad_norm = m["grad_norm"]

    def summary(self, peak, n_devices, skipped) -> dict:
        """Every process sees its own packs; the global FLOPs are this process's times the process
        count (hosts get equal shards of the same distribution, and stay in lockstep)."""
        dt = time.perf_counter() - self.start
        scale = jax.process_count() / dt / n_devices
        model, hardware = self.step_flops.model * scale, self.step_flops.hardware * scale
        out = {
            "loss": float(np.mean(self.losses)),
            "grad_norm": self.grad_norm,
            "step_time_s": dt / max(self.steps, 1),
            "tokens_per_s": self.real_tokens * jax.process_count() / dt,
            "model_tflops_per_device": model / 1e12,
            "hardware_tflops_per_device": hardware / 1e12,
            "mfu": model / peak,
            "hfu": hardware / peak,
            "pack_efficiency": self.real_tokens / max(self.slots, 1),
            "skipped_media": float(skipped),
        }
        self.__init__(self.cfg)
        return out


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    quiet_orbax_info_logs()
    distributed = initialize()  # before anything starts a JAX backend
    train(FLAGS.config, FLAGS.workdir, distributed)


if __name__ == "__main__":
    # Flags live here, not at import time, so other entry points can import this module.
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file[:args].", lock_config=False
    )
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events.")
    app.run(main)
