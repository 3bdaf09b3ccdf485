"""Trains the causal video VAE on mixed image/video batches of several sizes.

    python -m jaxsora.train_vae --config experiments/vae_tiny.py[:args] --workdir runs/vae

Same conventions as the DiT trainer: one jitted step per size bucket (compiled ahead of time,
memory logged), batch split over the mesh's batch axes, async Orbax checkpoints of everything
(weights, EMA, optimizer, discriminator, step, RNG, data iterator), automatic resume from
--workdir, a non-finite-loss stop, metrics.jsonl + TensorBoard. At the end it evaluates PSNR/SSIM
on held-out real videos and photos (whole files: no frame of them is trained on), measures
per-channel latent statistics and writes the VAE directory `<workdir>/vae` that the latent cache
and the latent-space DiT load.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jaxsora import config_checks, quality, sharding, vae_losses
from jaxsora.checkpointing import Checkpointer, abstract_like, resume_check
from jaxsora.data import pipeline, prefetch, vae_data
from jaxsora.distributed import PreemptionWatch, initialize
from jaxsora.metrics import MetricsWriter
from jaxsora.models.vae import VAEConfig, VideoVAE, make_vae, vae_config_from_dict
from jaxsora.training import (
    RunVar,
    check_finite_or_wait,
    make_optimizer,
    memory_summary,
    quiet_orbax_info_logs,
)
from jaxsora.vae_dir import CONFIG_FILE as VAE_CONFIG_FILE
from jaxsora.vae_dir import save_vae_dir


class VaeTrainState(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict):
        self.model = make_vae(vae_config(config), config.seed)
        self.ema = nnx.clone(self.model)
        self.optimizer = nnx.Optimizer(
            self.model, make_optimizer(config.optim, config.total_steps), wrt=nnx.Param
        )
        adversarial = config.loss.adversarial_weight > 0
        # Present only when the adversarial term is on, so plain runs carry no extra state.
        self.disc = (
            vae_losses.PatchDiscriminator(config.loss.disc_width, rngs=nnx.Rngs(config.seed + 1))
            if adversarial
            else None
        )
        self.disc_optimizer = (
            nnx.Optimizer(
                self.disc, make_optimizer(config.optim, config.total_steps), wrt=nnx.Param
            )
            if adversarial
            else None
        )
        self.step = RunVar(jnp.zeros((), jnp.int32))
        self.rng = RunVar(jax.random.key_data(jax.random.key(config.seed)))


def vae_config(config: ml_collections.ConfigDict) -> VAEConfig:
    return vae_config_from_dict(config.vae.to_dict())


# Every field the VAE trainer reads and the values it accepts; the buckets and the VAE's own
# shape rules (z_dim, one temporal flag per level) are checked in validate().
VAE_CHECKS = (
    *config_checks.RUN_CHECKS,
    config_checks.integer("latent_stats_batches", 1, why="batches the latent statistics average"),
    config_checks.integer("vae.base_dim", 1),
    config_checks.integers("vae.dim_mult", 1),
    config_checks.integer("vae.num_res_blocks", 1),
    config_checks.one_of("vae.dtype", ("float32", "bfloat16")),
    config_checks.number("data.max_bad_fraction", 0.0, 1.0, why="the share of media that may fail"),
    config_checks.number("data.max_scale", 0.0, open_low=True, optional=True),
    config_checks.PREFETCH_CHECK,
    config_checks.number("loss.l1", 0.0),
    config_checks.number("loss.ssim", 0.0),
    config_checks.number("loss.kl", 0.0),
    config_checks.number("loss.adversarial_weight", 0.0, why="0 = off"),
    config_checks.integer("loss.adversarial_start", 0),
    config_checks.integer("loss.disc_width", 1),
    *config_checks.OPTIM_CHECKS,
    config_checks.boolean("eval.enabled", optional=True),
    config_checks.integer("eval.frames", 1, optional=True),
    config_checks.integer("eval.max_side", 1, optional=True),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors a user can cause, raised before anything is compiled or read."""
    config_checks.check_fields(config, VAE_CHECKS)
    config_checks.check_sources(config.data.sources)
    try:
        cfg = vae_config(config)
    except ValueError as e:  # the VAE's own rules: z_dim, one temporal flag per level
        raise ValueError(f"bad config: {e}") from e
    buckets = vae_data.parse_buckets(list(config.data.buckets))
    for i, b in enumerate(buckets):
        try:
            cfg.latent_shape(b.frames, b.height, b.width)
        except ValueError as e:
            raise ValueError(f"bad config: data.buckets[{i}]: {e}") from e


# ------------------------------------------------------------------------------------------- loss


def group_loss(model: VideoVAE, video: jax.Array, key: jax.Array, config) -> tuple:
    """Loss of one same-shaped group (the videos, or the images) and its reconstruction."""
    recon, mean, logvar = model(video, key)
    terms = vae_losses.reconstruction_terms(recon, video)
    terms["kl"] = vae_losses.kl_divergence(mean, logvar)
    loss = (
        config.loss.l1 * terms["l1"]
        + config.loss.ssim * (1.0 - terms["ssim"])
        + config.loss.kl * terms["kl"]
    )
    return loss, terms, recon


def vae_objective(model, disc, batch, key, step, config):
    """Videos and images are scored separately and averaged, so neither drowns the other."""
    losses, terms, fakes = [], {}, []
    for i, name in enumerate(("video", "image")):
        if batch[name].shape[0] == 0:
            continue
        loss, t, recon = group_loss(model, batch[name], jax.random.fold_in(key, i), config)
        losses.append(loss)
        fakes.append(recon)
        terms.update({f"{name}_{k}": v for k, v in t.items()})
    loss = sum(losses) / len(losses)
    if disc is not None:
        ramp = vae_losses.adversarial_ramp(step, config.loss.adversarial_start)
        g_adv = sum(vae_losses.generator_adversarial_loss(disc(f)) for f in fakes) / len(fakes)
        loss = loss + ramp * config.loss.adversarial_weight * g_adv
        terms["g_adv"] = g_adv
    return loss, (terms, fakes)


def discriminator_objective(disc, batch, fakes):
    reals = [batch[n] for n in ("video", "image") if batch[n].shape[0]]
    losses = [
        vae_losses.hinge_discriminator_loss(disc(r), disc(jax.lax.stop_gradient(f)))
        for r, f in zip(reals, fakes, strict=True)
    ]
    return sum(losses) / len(losses)


def train_step(state: VaeTrainState, batch: dict, config) -> dict:
    step = state.step[...]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng[...]), step)
    grad_fn = nnx.value_and_grad(
        lambda model: vae_objective(model, state.disc, batch, key, step, config), has_aux=True
    )
    (loss, (terms, fakes)), grads = grad_fn(state.model)
    state.optimizer.update(state.model, grads)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **terms}
    if state.disc is not None:
        d_loss, d_grads = nnx.value_and_grad(discriminator_objective)(state.disc, batch, fakes)
        state.disc_optimizer.update(state.disc, d_grads)
        metrics["d_loss"] = d_loss
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
    ema, params = nnx.state(state.ema, nnx.Param), nnx.state(state.model, nnx.Param)
    nnx.update(state.ema, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params))
    state.step[...] = step + 1
    return metrics


def make_step_fn(graphdef, config, state_shardings):
    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state, batch):
        ts = nnx.merge(graphdef, state)
        metrics = train_step(ts, batch, config)
        return jax.lax.with_sharding_constraint(nnx.state(ts), state_shardings), metrics

    return step_fn


# ------------------------------------------------------------------------------------------- eval


def make_reconstruct_fn(graphdef):
    """Whole-clip reconstruction from the posterior mean (one compile per eval shape)."""

    @jax.jit
    def reconstruct(model_state, video):
        model = nnx.merge(graphdef, model_state)
        mean, _ = model.encode(video)
        return jnp.clip(model.decode(mean), -1.0, 1.0)

    return reconstruct


def evaluate(reconstruct, model_state, examples: list[dict]) -> dict[str, float]:
    """PSNR/SSIM over the held-out set (only each clip's real frames count), by kind and all."""
    scores: dict[str, list[tuple[float, float]]] = {"video": [], "image": []}
    for ex in examples:
        pixels = jnp.asarray(ex["pixels"])
        recon = reconstruct(model_state, pixels)
        n = ex.get("valid_frames", pixels.shape[1])
        p = float(quality.psnr(recon[:, :n], pixels[:, :n])[0])
        s = float(quality.ssim(recon[:, :n], pixels[:, :n])[0])
        scores[ex["kind"]].append((p, s))
    out = {}
    for kind, values in [*scores.items(), ("all", scores["video"] + scores["image"])]:
        if values:
            out[f"eval_{kind}_psnr"] = float(np.mean([v[0] for v in values]))
            out[f"eval_{kind}_ssim"] = float(np.mean([v[1] for v in values]))
    return out


def latent_statistics(graphdef, model_state, batches, num_batches: int) -> tuple:
    """Per-channel mean and std of posterior means over training batches: the DiT's latent
    normalisation (a latent of unit scale per channel suits its noise schedule)."""

    @jax.jit
    def moments(state, video):
        mean, _ = nnx.merge(graphdef, state).encode(video)
        flat = mean.reshape(-1, mean.shape[-1])
        return flat.sum(0), jnp.square(flat).sum(0), flat.shape[0]

    s1 = s2 = 0.0
    count = 0
    for i in range(num_batches):
        batch = batches.batch_at(10**9 + i)  # steps no training run reaches: fresh draws
        for name in ("video", "image"):
            if batch[name].shape[0]:
                a, b, n = moments(model_state, jnp.asarray(batch[name]))
                s1, s2, count = s1 + np.asarray(a), s2 + np.asarray(b), count + int(n)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


# ------------------------------------------------------------------------------------------- main


def train(config: ml_collections.ConfigDict, workdir: str, distributed: bool = False) -> dict:
    """Runs (or resumes) VAE training; returns the last logged metrics (with the evaluation)."""
    validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config.data.data_dir = os.path.abspath(config.data.data_dir)
    buckets = vae_data.parse_buckets(list(config.data.buckets))

    # --------------------------------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    sharding.check_batch_spans_processes(mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    for i, b in enumerate(buckets):
        if b.videos % dp or b.images % dp:
            raise ValueError(
                f"bad config: data.buckets[{i}] has videos={b.videos}, images={b.images}; each "
                f"must be divisible by the {dp} data-parallel devices of mesh {dict(mesh.shape)}"
            )
    logging.info(
        "mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
    )

    # ----------------------------------------------------------------------------- input pipeline
    batches = prefetch.from_config(vae_data.make_vae_batches(config), config)
    if config.eval.enabled:  # before any compile: the eval set must be files it never trains on
        vae_data.check_held_out(batches.inner.shards, config.data.data_dir)

    # ------------------------------------------------------------------------ model and optimizer
    # The VAE's weights are small and unannotated: replicated; the batch is data-parallel.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VaeTrainState(config)))
    # Made inside jit: every leaf gets its own buffer (the step donates them all).
    state = jax.jit(lambda: nnx.state(VaeTrainState(config)), out_shardings=replicated)()
    n_params = sum(x.size for x in jax.tree.leaves(state["model"].filter(nnx.Param)))
    logging.info("VAE: %.2fM parameters, %s", n_params / 1e6, vae_config(config))

    # --------------------------------------------------------------------------------- checkpoint
    # As the DiT trainer: the newest step that loads, its config checked by jaxsora/resume.py.
    ckpt = Checkpointer.for_run(workdir, config)
    resumed = ckpt.restore_latest(
        abstract_like(state.to_pure_dict()), batches, resume_check(config)
    )
    start = 0
    if resumed is not None:
        start, restored = resumed
        nnx.replace_by_pure_dict(state, restored)
        logging.info("resumed from %s at step %d", ckpt.directory, start)

    # --------------------------------------------------------------------------------- step (AOT)
    step_fn = make_step_fn(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
    compiled, step_flops = [], []
    for i, b in enumerate(buckets):
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            c = step_fn.lower(state, abstract_batch(b, mesh, rules)).compile()
        compiled.append(c)
        step_flops.append(_flops(c))
        logging.info(
            "compiled bucket %d %s in %.1fs; %.3g FLOPs/step; memory: %s",
            i,
            vae_data.global_shapes(b),
            time.perf_counter() - t0,
            step_flops[-1],
            memory_summary(c),
        )

    # --------------------------------------------------------------------------------------- loop
    writer = MetricsWriter(workdir, config.total_steps, resumed_at=start)
    preemption = PreemptionWatch(distributed)
    interval = _Interval()
    finite = functools.partial(check_finite_or_wait, ckpt)
    last: dict = {}
    preempted = False
    pending = None  # the step in flight, read one step late so the host never waits on it
    end = min(config.total_steps, config.stop_after or config.total_steps)
    for step in range(start + 1, end + 1):
        bucket = (step - 1) % len(buckets)
        batch = next(batches)
        state, metrics = compiled[bucket](state, pipeline.to_global(batch, mesh, rules))
        if pending is not None:
            interval.add(finite(*pending[:2]), *pending[2:])
        pending = (step, metrics, step_flops[bucket], batch)
        preempted = preemption.reached(step)
        log = step % config.log_every == 0 or step == end or preempted
        save = step % config.checkpoint_every == 0 or step == end or preempted
        if log or save:  # a checkpoint is written only once its own step passed the check
            interval.add(finite(*pending[:2]), *pending[2:])
            pending = None
        if log:
            last = interval.summary(mesh.size, batches.skipped)
            writer.write(step, last)
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

    # ------------------------------------------------------------------- evaluation and export
    finished = end == config.total_steps and not preempted
    if finished and (start < end or not _exported(workdir)):
        ema_graphdef, ema_state = nnx.split(nnx.merge(graphdef, state).ema)
        if config.eval.enabled:
            examples = vae_data.eval_set(
                config.data.data_dir, frames=config.eval.frames, max_side=config.eval.max_side
            )
            t0 = time.perf_counter()
            scores = evaluate(make_reconstruct_fn(ema_graphdef), ema_state, examples)
            logging.info(
                "held-out reconstruction (%d clips and photos, %.1fs): %s",
                len(examples),
                time.perf_counter() - t0,
                scores,
            )
            last = {**last, **scores}
            writer.write(end, scores)
        mean, std = latent_statistics(
            ema_graphdef, ema_state, batches.inner, config.latent_stats_batches
        )
        logging.info("latent statistics per channel: mean %s std %s", mean.round(3), std.round(3))
        export_vae(nnx.merge(ema_graphdef, ema_state), (mean, std), workdir)
        logging.info("wrote the VAE (EMA weights + latent statistics) to %s/vae", workdir)
    writer.close()
    return last


def _exported(workdir: str) -> bool:
    """`vae/` appears only whole (see export_vae); its JSON, written last, is checked too, so a
    partial folder left by an older version counts as absent."""
    return os.path.exists(os.path.join(workdir, "vae", VAE_CONFIG_FILE))


def export_vae(model: VideoVAE, stats: tuple, workdir: str) -> None:
    """Writes `<workdir>/vae` atomically: into `vae.partial`, renamed once complete, so a crash
    mid-export leaves no `vae/` and the rerun exports again.

    Collective: every process writes its shards (Orbax); process 0 writes the JSON and renames.
    """
    final = os.path.join(workdir, "vae")
    partial, old = final + ".partial", final + ".old"
    if jax.process_index() == 0:
        for leftover in (partial, old):  # from an export that crashed
            shutil.rmtree(leftover, ignore_errors=True)
    _sync("vae_export_start")
    save_vae_dir(model, stats, partial)
    _sync("vae_export_written")
    if jax.process_index() == 0:
        if os.path.exists(final):  # a VAE from an earlier end of training: replaced
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    _sync("vae_export_renamed")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def abstract_batch(bucket, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32, sharding=sharding.batch_sharding(mesh, rules, len(shape))
        )
        for k, shape in vae_data.global_shapes(bucket).items()
    }


def _flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # not every backend reports it
        return 0.0


@dataclasses.dataclass
class _Interval:
    """Sums over the steps since the last log line."""

    steps: int = 0
    pixels: int = 0
    flops: float = 0.0
    sums: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=dict)  # a bucket may lack videos or images
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, metrics: dict, flops: float, batch: dict) -> None:
        self.steps += 1
        self.flops += flops
        self.pixels += sum(int(np.prod(v.shape[:4])) for v in batch.values())
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def summary(self, n_devices: int, skipped: int) -> dict:
        dt = time.perf_counter() - self.start
        out = {k: v / self.counts[k] for k, v in self.sums.items()}
        out.update(
            step_time_s=dt / self.steps,
            pixels_per_s=self.pixels * jax.process_count() / dt,
            tflops_per_device=self.flops / dt / n_devices / 1e12,
            skipped_media=float(skipped),
        )
        self.__init__()
        return out


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    quiet_orbax_info_logs()
    distributed = initialize()
    train(FLAGS.config, FLAGS.workdir, distributed)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file[:args].", lock_config=False
    )
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, the VAE export.")
    app.run(main)
