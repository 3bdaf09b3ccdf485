"""Attention cost against pack length: dense `xla` against `windowed`, at fixed segment sizes.

    python -m benchmarks.attention_scaling [--lengths 1024,...,16384 --plot FILE.png]

For each pack length L, one pack of segments drawn from [--min_segment, --max_segment] tokens (the
same seed for every L, padding at the end, as the packer lays them out) with a caption of
--caption_len tokens each, and the attention of one DiT block on it: self-attention with segment
ids and cross-attention from each token to its segment's caption, forward and backward (the
gradients of q, k and v), at the default config's heads (2 x 64). Both backends run on the same
inputs, alternated, and their outputs must agree. Reported per L: seconds, the model FLOPs
(`sum n_i^2` and `sum n_i m_i` pairs: what the segments need) per second, and the pairs each
backend computes. Dense work grows with L^2; the windowed backend's with L once the window (sized
for the longest segment, jaxsora/models/windowed.py) is under half the pack. The crossover is
the shortest measured L at which windowed is faster.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import common
from jaxsora.models import windowed
from jaxsora.models.attention import attention

FLAGS = flags.FLAGS
BACKENDS = ("xla", "windowed")
HEADS, HEAD_DIM = 2, 64  # experiments/tiny.py: width 128, 2 heads


def make_pack(L: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """Segment ids [1, L]: sizes from one seeded stream, so every L starts with the same clips."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((1, L), np.int32)
    start, k = 0, 1
    while True:
        n = int(rng.integers(lo, hi + 1))
        if start + n > L:
            break
        seg[0, start : start + n] = k
        start, k = start + n, k + 1
    return seg


def attention_step(backend: str, seg, caption_seg, self_window: int, cross_window: int, block):
    """jit(grad) of a random readout of self- plus cross-attention: (outputs, dq, dk, dv, ...)."""

    def forward(q, k, v, ck, cv):
        self_out = attention(q, k, v, seg, seg, backend=backend, window=self_window, block=block)
        cross = attention(q, ck, cv, seg, caption_seg, backend=backend, window=cross_window,
                          block=block)  # fmt: skip
        return self_out + cross

    def loss(q, k, v, ck, cv, readout):
        return jnp.sum(forward(q, k, v, ck, cv) * readout)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    return jax.jit(lambda *a: (forward(*a[:5]), *grad(*a)))


def measure_length(L: int, reps: int) -> dict:
    lo, hi, Lt, block = FLAGS.min_segment, FLAGS.max_segment, FLAGS.caption_len, FLAGS.block
    seg = make_pack(L, lo, hi, FLAGS.seed)
    S = int(seg.max())
    caption_seg = np.repeat(np.arange(1, S + 1, dtype=np.int32), Lt)[None]  # [1, S * Lt]
    self_window = windowed.self_window(hi, block, L)
    cross_window = windowed.cross_window(lo, block, S, Lt)
    rng = np.random.default_rng(0)
    real = (seg > 0)[..., None, None]

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = (normal(1, L, HEADS, HEAD_DIM) for _ in range(3))
    ck, cv = (normal(1, S * Lt, HEADS, HEAD_DIM) for _ in range(2))
    readout = normal(1, L, HEADS, HEAD_DIM) * real
    args = (q, k, v, ck, cv, readout)
    steps = {
        b: attention_step(b, seg, caption_seg, self_window, cross_window, block) for b in BACKENDS
    }
    outputs = {b: jax.block_until_ready(f(*args)) for b, f in steps.items()}  # compile, warm up
    diff = max(
        float(jnp.abs(jnp.where(real, a, 0) - jnp.where(real, b, 0)).max()) if i == 0
        else float(jnp.abs(a - b).max())
        for i, (a, b) in enumerate(zip(outputs["xla"], outputs["windowed"], strict=True))
    )  # fmt: skip
    times = {b: [] for b in BACKENDS}
    for _ in range(reps):
        for b, f in steps.items():
            times[b] += common.timed(lambda f=f: jax.block_until_ready(f(*args)), 0, 1)
    n = np.bincount(seg[0], minlength=S + 1)[1:].astype(np.float64)
    D = HEADS * HEAD_DIM
    # forward: q.k and p.v, 2 FLOPs each per pair and channel; the train step's backward twice that.
    model_flops = 3 * 2 * 2 * D * ((n * n).sum() + (n * Lt).sum())
    _, self_fits = windowed.window_plan(seg, seg, block, self_window)
    _, cross_fits = windowed.window_plan(seg, caption_seg, block, cross_window)
    row = {
        "L": L,
        "segments": S,
        "real_tokens": int(n.sum()),
        "model_flops": model_flops,
        "self_window": self_window if 2 * self_window <= L and bool(self_fits) else L,
        "cross_window": cross_window if 2 * cross_window <= S * Lt and bool(cross_fits) else S * Lt,
        "max_abs_diff": diff,
    }
    for b in BACKENDS:
        t = common.summary(times[b])
        row[f"{b}_s"] = t["median"]
        row[f"{b}_model_flops_per_s"] = model_flops / t["median"]
    row["speedup"] = row["xla_s"] / row["windowed_s"]
    logging.info("L=%d: xla %.4fs, windowed %.4fs (x%.2f)", L, row["xla_s"], row["windowed_s"],
                 row["speedup"])  # fmt: skip
    return row


def growth_exponent(rows: list[dict], key: str, min_length: int) -> float | None:
    """Slope of log(time) against log(L) over the rows from `min_length` on."""
    pts = [(r["L"], r[key]) for r in rows if r["L"] >= min_length]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot(path: str, rows: list[dict], record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = np.array([r["L"] for r in rows], float)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b, style in (("xla", "o-"), ("windowed", "s-")):
        ax_t.plot(L, [r[f"{b}_s"] for r in rows], style, label=b)
        ax_f.plot(L, [r[f"{b}_model_flops_per_s"] / 1e9 for r in rows], style, label=b)
    ref = rows[0]["xla_s"]
    ax_t.plot(L, ref * (L / L[0]) ** 2, ":", color="gray", label="~L^2")
    ax_t.plot(L, ref * (L / L[0]), "--", color="gray", label="~L")
    ax_t.set(xscale="log", yscale="log", xlabel="pack length L (tokens)",
             ylabel="self + cross attention, fwd + bwd (s)")  # fmt: skip
    ax_f.set(xscale="log", xlabel="pack length L (tokens)", ylabel="model GFLOP/s")
    cross = record.get("crossover_length")
    title = f"segments {FLAGS.min_segment}-{FLAGS.max_segment} tokens"
    if cross:
        title += f"; windowed faster from L = {cross}"
        for ax in (ax_t, ax_f):
            ax.axvline(cross, color="gray", lw=0.8)
    fig.suptitle(title)
    for ax in (ax_t, ax_f):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    with common.json_stdout() as emit:
        load_start = common.load_average()
        start = time.perf_counter()
        rows = [measure_length(int(L), FLAGS.reps) for L in FLAGS.lengths]
        faster = [r["L"] for r in rows if r["speedup"] > 1.0]
        record = {
            "benchmark": "attention_scaling",
            "what": "self + cross attention of one block, forward + backward, B=1, 2 heads x 64",
            "segment_tokens": [FLAGS.min_segment, FLAGS.max_segment],
            "caption_len": FLAGS.caption_len,
            "block": FLAGS.block,
            "rows": rows,
            # From the first length where the windows are in use (half the pack or less).
            "growth_exponent": {
                b: growth_exponent(rows, f"{b}_s", FLAGS.fit_from) for b in BACKENDS
            },
            "crossover_length": min(faster) if faster else None,
            # Below this the window (2 x max_segment + block) is over half the pack, so
            # windowed takes its dense route: faster than xla there only by its backward.
            "windows_from_length": min(
                (r["L"] for r in rows if r["self_window"] < r["L"]), default=None
            ),
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "wall_s": time.perf_counter() - start,
        }
        if FLAGS.plot:
            plot(FLAGS.plot, rows, record)
            record["plot"] = FLAGS.plot
        record["load_average"] = {"start": load_start, "end": common.load_average()}
        record["machine"] = common.machine_info()
        emit(common.round_floats(record))


def define_flags() -> None:
    flags.DEFINE_list(
        "lengths", ["1024", "2048", "4096", "6144", "8192", "12288", "16384"], "Pack lengths L."
    )
    flags.DEFINE_integer("min_segment", 128, "Smallest segment, tokens.")
    flags.DEFINE_integer("max_segment", 1024, "Largest segment, tokens.")
    flags.DEFINE_integer("caption_len", 16, "Caption tokens per segment.")
    flags.DEFINE_integer("block", windowed.DEFAULT_BLOCK, "Queries per window block.")
    flags.DEFINE_integer("reps", 3, "Alternated repetitions per length (median reported).")
    flags.DEFINE_integer("seed", 0, "Segment sizes.")
    flags.DEFINE_integer("fit_from", 8192, "Growth exponents from this L on.")
    flags.DEFINE_string("plot", "", "Write the two-panel PNG here.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
