"""Train-step throughput of the default tiny config on this machine: tokens/s, step time, MFU, HFU.

    python -m benchmarks.train_step [--steps 20 --warmup 3 --data_dir data/tfds]

The state and step are built exactly as jaxsora/train.py builds them (create_train_state,
nnx.split, make_step_fn, compiled ahead of time under the config's mesh), then run on one fixed
batch so input loading is excluded. The batch comes from the same online packer the pipeline
uses, fed synthetic examples of the pipeline's size distribution (no dataset needed); with
--data_dir it is the real pipeline's first batch instead.

MFU divides the model FLOPs of jaxsora.flops (the work the packed examples need: attention within
each segment, real tokens only) and HFU the hardware FLOPs (what the backend computes: dense
attention, padding) by the best of a few runs of `flops.measure_matmul_peak` taken in the same
process: on a shared CPU contention only ever slows a probe down, so the fastest probe is the
closest to the machine's real peak. XLA's own count of the compiled step is printed beside them.

Where the time goes (--breakdown): the forward pass alone, forward + backward without the
optimizer, the attention core alone at the step's shapes, and the same step with the blocks
unrolled instead of scanned, timed round-robin so background load falls on all alike; the share
of dense attention work that the segment mask keeps; and (--profile) XLA's own per-op trace of
a few steps, summed by op kind.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from benchmarks import common

FLAGS = flags.FLAGS


def tiny_config(arg: str | None = None):
    from experiments import tiny

    return tiny.get_config(arg or None)


def make_batch(config, data_dir: str = "", seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed batch every timed step sees."""
    if not data_dir:
        return common.synthetic_batch(config, seed)
    from jaxsora.compression import make_stage
    from jaxsora.data import pipeline

    config.data.data_dir = os.path.abspath(data_dir)
    return next(pipeline.make_batches(config, make_stage(config.model.compression)))


@dataclasses.dataclass
class JaxStep:
    """The compiled jaxsora train step and the state it threads (donated each call)."""

    compiled: object
    state: object
    batch: dict
    graphdef: object
    mesh: object
    config: object
    compile_s: float

    def __call__(self) -> float:
        """One step, blocking until its outputs exist; returns the loss."""
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)
        return float(metrics["loss"])

    def model(self):
        """The current model (a view of the state; do not keep across steps)."""
        return nnx.merge(self.graphdef, self.state).model


def build_jax_step(config, batch_np: dict[str, np.ndarray], devices=None) -> JaxStep:
    """Mesh, sharded train state, split, jitted step, AOT compile: as jaxsora.train.train does."""
    from jaxsora import sharding, train
    from jaxsora.data import pipeline

    train.validate(config)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    state_module = train.create_train_state(config, mesh, rules)
    graphdef, state = nnx.split(state_module)
    del state_module
    step_fn = train.make_step_fn(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
    batch = pipeline.to_global(batch_np, mesh, rules)
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
        compiled = step_fn.lower(state, batch).compile()
    return JaxStep(compiled, state, batch, graphdef, mesh, config, time.perf_counter() - start)


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of the compiled step, as a cross-check of the analytic one."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"])
    except Exception:  # not every backend or version reports it
        return None


def attention_useful_fraction(batch: dict[str, np.ndarray]) -> dict:
    """Share of the dense score matrices that the segment mask keeps: the xla backend computes
    L x L (self) and L x S*Lt (cross) scores per pack; only same-segment pairs are used."""
    seg, text_mask = batch["segment_ids"], batch["text_mask"]
    B, L = seg.shape
    S, Lt = text_mask.shape[1:]
    self_kept = cross_kept = 0
    for b in range(B):
        counts = np.bincount(seg[b], minlength=S + 1)
        self_kept += int((counts[1:] ** 2).sum())
        cross_kept += int((counts[1:] * text_mask[b].sum(-1)).sum())
    return {
        "self_attention": self_kept / (B * L * L),
        "cross_attention": cross_kept / (B * L * S * Lt),
    }


def breakdown(step: JaxStep, reps: int) -> tuple[dict, float | None]:
    """Median seconds of the parts of a step, each compiled on its own, timed round-robin; and
    XLA's FLOP count of the unrolled step (a scanned step's count has the loop body once)."""
    from jaxsora import flops, train
    from jaxsora.models.attention import attention
    from jaxsora.models.dit import attention_windows

    config, graphdef = step.config, step.graphdef
    key = jax.random.key(0)

    @jax.jit
    def forward(state, batch):
        model = nnx.merge(graphdef, state).model
        return train.loss_and_metrics(model, batch, key, config)[0]

    @jax.jit
    def forward_backward(state, batch):
        model = nnx.merge(graphdef, state).model
        loss_fn = functools.partial(train.loss_and_metrics, batch=batch, key=key, config=config)
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        return loss, grads

    b = step.batch
    B, L = b["segment_ids"].shape
    S, Lt = b["text_ids"].shape[1:]
    H = config.model.num_heads
    K = config.model.width // H
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, L, H, K)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((B, S * Lt, H, K)), jnp.float32)
    seg = b["segment_ids"]
    ctx_seg = jnp.asarray(flops.caption_segment_ids(jax.device_get(b["text_mask"])))

    # The config's backend, with the windows its model would use on this batch.
    cfg = train.dit_config(config)
    self_w, cross_w = attention_windows(cfg, L, ctx_seg)

    @functools.partial(jax.jit, static_argnums=4)
    def attn_grad(q, k, v, seg_kv, window):
        def f(q, k, v):
            out = attention(
                q,
                k,
                v,
                seg,
                seg_kv,
                backend=cfg.attention,
                window=window,
                block=cfg.attention_block,
            )
            return jnp.sum(out**2)

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    depth = config.model.depth
    parts = {
        "full_step": step,
        "forward": lambda: jax.block_until_ready(forward(step.state, b)),
        "forward_backward": lambda: jax.block_until_ready(forward_backward(step.state, b)),
        "self_attention_core_fwd_bwd_all_layers": lambda: [
            jax.block_until_ready(attn_grad(q, q, q, seg, self_w)) for _ in range(depth)
        ],
        "cross_attention_core_fwd_bwd_all_layers": lambda: [
            jax.block_until_ready(attn_grad(q, ctx, ctx, ctx_seg, cross_w)) for _ in range(depth)
        ],
    }
    unrolled_flops = xla_flops(step.compiled)
    if config.model.get("scan_layers", False):
        unrolled_config = config.copy_and_resolve_references()
        unrolled_config.model.scan_layers = False
        unrolled = build_jax_step(unrolled_config, jax.device_get(step.batch))
        parts["full_step_unrolled_blocks"] = unrolled
        unrolled_flops = xla_flops(unrolled.compiled)
    times = {name: [] for name in parts}
    for fn in parts.values():  # compile and warm up
        fn()
        fn()
    for _ in range(reps):
        for name, fn in parts.items():
            times[name] += common.timed(fn, 0, 1)
    return {name: common.summary(t)["median"] for name, t in times.items()}, unrolled_flops


def op_profile(step: JaxStep, steps: int = 3, top: int = 12) -> dict | None:
    """XLA's per-op trace of a few steps, summed by op kind (the HLO name without its number),
    as a share of all op time: which kinds of work the step spends its time on."""
    try:
        from jax.profiler import ProfileData

        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                for _ in range(steps):
                    step()
            path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
            data = ProfileData.from_file(path)
        kinds: collections.Counter = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "XLAEigen" not in line.name:  # XLA:CPU's compute threads
                    continue
                for ev in line.events:
                    if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                        kinds[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns
        total = sum(kinds.values())
        if not total:
            return None
        return {
            "op_seconds_per_step": total / steps / 1e9,
            "share_by_kind": {k: v / total for k, v in kinds.most_common(top)},
        }
    except Exception as e:  # the profiler API is young; never fail the benchmark over it
        logging.warning("op profile unavailable: %s", e)
        return None


def matmul_peak(probes: int) -> tuple[float, list[float]]:
    from jaxsora import flops

    runs = [flops.measure_matmul_peak(seconds=1.0) for _ in range(probes)]
    return max(runs), runs


def config_summary(config) -> dict:
    m, d = config.model, config.data
    return {
        "batch_size": config.batch_size,
        "seq_len": d.seq_len,
        "max_segments": d.max_segments,
        "width": m.width,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "text_len": m.text_len,
        "text_width": m.text_width,
        "text_depth": m.text_depth,
        "dtype": m.dtype,
        "attention": m.attention,
        "patch": list(m.patch),
        "scan_layers": m.get("scan_layers", None),
        "remat": m.get("remat", None),
    }


def main(argv: list[str]) -> None:
    del argv
    from jaxsora import flops, train

    with common.json_stdout() as emit:
        load_start = common.load_average()
        config = tiny_config(FLAGS.config_arg)
        try:
            batch_np = make_batch(config, FLAGS.data_dir)
        except FileNotFoundError as e:  # --data_dir without the dataset: say so, as one line
            emit({"benchmark": "train_step", "skipped": str(e), "machine": common.machine_info()})
            return
        stats = common.batch_stats(batch_np)
        step = build_jax_step(config, batch_np)
        logging.info("compiled the step in %.1fs", step.compile_s)
        t = common.summary(common.timed(step, FLAGS.warmup, FLAGS.steps))
        step_flops = flops.train_step_flops(train.dit_config(config), batch_np)
        peak, probes = matmul_peak(FLAGS.peak_probes)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(step.model(), nnx.Param)))
        record = {
            "benchmark": "train_step",
            "config": config_summary(config),
            "batch": "pipeline" if FLAGS.data_dir else "synthetic (online packer)",
            "batch_stats": stats,
            "params": int(n_params),
            "compile_s": step.compile_s,
            "step_s": t,
            "tokens_per_s": stats["real_tokens"] / t["median"],
            "slots_per_s": stats["slots"] / t["median"],
            "examples_per_s": stats["examples"] / t["median"],
            "model_flops_per_step": step_flops.model,
            "hardware_flops_per_step": step_flops.hardware,
            # per-token time (t and 0 per segment): its share of both counts
            "per_token_time_flops_per_step": dataclasses.asdict(
                flops.per_token_time_flops(train.dit_config(config), batch_np)
            ),
            "xla_cost_analysis_flops_per_step": xla_flops(step.compiled),
            "model_flops_per_s": step_flops.model / t["median"],
            "hardware_flops_per_s": step_flops.hardware / t["median"],
            "matmul_peak_flops_per_s": peak,
            "matmul_peak_probes": probes,
            "mfu": step_flops.model / t["median"] / peak,
            "hfu": step_flops.hardware / t["median"] / peak,
            "attention_useful_fraction": attention_useful_fraction(batch_np),
            "last_loss": step(),
        }
        if FLAGS.breakdown:
            record["breakdown_s"], record["flops_per_step_xla"] = breakdown(
                step, reps=FLAGS.breakdown_reps
            )
        if FLAGS.profile:
            record["xla_op_profile"] = op_profile(step)
        record["load_average"] = {"start": load_start, "end": common.load_average()}
        record["machine"] = common.machine_info()
        emit(common.round_floats(record))


def define_flags() -> None:
    """Defined only when run as a script, so torch_peer can import this module."""
    flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
    flags.DEFINE_string("data_dir", "", "Take the batch from the real pipeline here.")
    flags.DEFINE_integer("peak_probes", 3, "1 s matmul probes; the best one is used.")
    flags.DEFINE_bool("breakdown", True, "Also time forward, backward, attention, unrolled.")
    flags.DEFINE_integer("breakdown_reps", 7, "Round-robin repetitions of the breakdown.")
    flags.DEFINE_bool("profile", True, "Also sum XLA's per-op trace of a few steps by op kind.")
    flags.DEFINE_string("config_arg", "", "experiments/tiny.py variant, e.g. runlocal.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
