"""Rectified flow on packs: x_t = (1 - t) x_0 + t * noise, the model predicts v = noise - x_0.

t = 0 is data and t = 1 is noise (SD3, Open-Sora 1.2+, Movie Gen). Every segment of a pack is
its own example: it gets its own t, its own resolution-dependent shift, and its own loss average.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def logit_normal(key: jax.Array, shape: tuple[int, ...], mean: float, std: float) -> jax.Array:
    """Times concentrated in the middle, where the velocity is hardest to predict (SD3)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))


def resolution_shift(grid: jax.Array, base_tokens: float) -> jax.Array:
    """Shift factor per segment from its token count n: sqrt(max(n, base) / base).

    SD3's rule is sqrt(n / base): more tokens carry more redundant signal, so the same noise
    level destroys less of the content, and shifting t towards 1 keeps the signal-to-noise
    ratio comparable across sizes. Clamped at 1 from below on purpose: a clip smaller than
    `base_tokens` is not shifted towards less noise (a shift < 1 would train small images at
    lower noise than the base resolution), so n <= base gives exactly 1 and n = 4 * base gives 2.
    `grid` is [..., 3]; empty segments (a zero grid) get shift 1.
    """
    tokens = jnp.prod(grid, axis=-1).astype(jnp.float32)
    return jnp.sqrt(jnp.maximum(tokens, base_tokens) / base_tokens)


def shift_time(t: jax.Array, shift: jax.Array) -> jax.Array:
    return shift * t / (1.0 + (shift - 1.0) * t)


def add_noise(x0: jax.Array, noise: jax.Array, t_tok: jax.Array) -> jax.Array:
    """`t_tok` broadcasts against x0's leading axes (one t per token)."""
    t = t_tok[..., None]
    return (1.0 - t) * x0 + t * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


# What the network's output is: the velocity itself, or the clean data x0 (JiT, "Back to Basics:
# Let Denoising Generative Models Denoise", 2025), turned into the velocity it implies. A small
# pixel-space model cannot carry every pixel's noise through its width to predict v, and the noise
# it drops comes out of the sampler as speckles (README, Evaluation); clean frames are simple.
PREDICTIONS = ("velocity", "data")
# In training x0 -> v divides by max(t, this) (JiT's t_eps): near the data end 1 / t would give
# the few samples there unbounded weight. The network is still asked for x0 there (loss_target).
DATA_PREDICTION_MIN_T = 0.05
# In sampling it divides by t itself, so that Euler's last step lands on the prediction exactly;
# this floor only keeps an evaluation at t = 0 finite (the samplers never make one for x0).
SAMPLING_MIN_T = 1e-6


def velocity_from_output(
    out_BLP: jax.Array,
    x_BLP: jax.Array,
    t_BL: jax.Array,
    prediction: str,
    min_t: float = DATA_PREDICTION_MIN_T,
) -> jax.Array:
    """The velocity the network's output stands for at x_t = `x_BLP`, t = `t_BL` (per token):
    the output itself, or for data prediction v = (x_t - x0) / max(t, min_t). The loss stays on
    v either way, so the two are scored (and validated) alike."""
    if prediction == "velocity":
        return out_BLP
    if prediction == "data":
        t = jnp.maximum(t_BL, min_t)[..., None].astype(out_BLP.dtype)
        return (x_BLP - out_BLP) / t
    raise ValueError(f"flow.prediction {prediction!r} is not one of {PREDICTIONS}")


def loss_target(x0, noise, x_BLP, t_BL, prediction: str) -> jax.Array:
    """What `velocity_from_output(network output)` is scored against: noise - x0, or for data
    prediction the velocity x0 itself stands for under the same divisor. The two are equal from
    DATA_PREDICTION_MIN_T up; below it this keeps the network's target x0 (JiT), where noise - x0
    would ask it for an extrapolation past the data that the sampler does not expect."""
    if prediction == "data":
        return velocity_from_output(x0, x_BLP, t_BL, prediction)
    return velocity(x0, noise)


def per_segment(values_BS: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
    """Gathers a per-segment value [B, S, ...] to tokens [B, L, ...] (padding gets segment 1's)."""
    idx = jnp.maximum(segment_ids_BL - 1, 0)
    return jnp.take_along_axis(
        values_BS, idx.reshape(idx.shape + (1,) * (values_BS.ndim - 2)), axis=1
    )


def packed_loss_sums(
    pred_BLP: jax.Array,
    target_BLP: jax.Array,
    segment_ids_BL: jax.Array,
    cond_mask_BL: jax.Array,
    max_segments: int,
    weighting: str = "segment",
) -> dict[str, jax.Array]:
    """The loss as a sum and a count, so micro-batches add up to exactly the whole batch's.

    weighting="segment": total = sum over live segments of each one's mean token error, count =
    live segments. weighting="token": total = sum of token errors, count = live tokens. The
    loss is total / count over everything summed; `segments` counts live segments either way.
    """
    if weighting not in ("segment", "token"):
        raise ValueError(f"loss weighting {weighting!r} is not 'segment' or 'token'")
    err_BL = jnp.mean(jnp.square(pred_BLP.astype(jnp.float32) - target_BLP), axis=-1)
    live_BL = (segment_ids_BL > 0) & ~cond_mask_BL
    err_BL = jnp.where(live_BL, err_BL, 0.0)
    onehot_BLS = (
        jax.nn.one_hot(segment_ids_BL - 1, max_segments, dtype=jnp.float32) * live_BL[..., None]
    )
    count_BS = onehot_BLS.sum(axis=1)
    has_BS = count_BS > 0
    segments = has_BS.sum().astype(jnp.float32)
    if weighting == "token":
        return {
            "total": jnp.sum(err_BL),
            "count": live_BL.sum().astype(jnp.float32),
            "segments": segments,
        }
    sum_BS = jnp.einsum("bl,bls->bs", err_BL, onehot_BLS)
    seg_loss_BS = jnp.where(has_BS, sum_BS / jnp.maximum(count_BS, 1.0), 0.0)
    return {"total": jnp.sum(seg_loss_BS), "count": segments, "segments": segments}


def loss_from_sums(sums: dict[str, jax.Array]) -> jax.Array:
    """total / count, 0 for a batch with nothing to score."""
    return sums["total"] / jnp.maximum(sums["count"], 1.0)


def packed_loss(
    pred_BLP: jax.Array,
    target_BLP: jax.Array,
    segment_ids_BL: jax.Array,
    cond_mask_BL: jax.Array,
    max_segments: int,
    weighting: str = "segment",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared velocity error over real, non-conditioning tokens.

    weighting="segment" (default): averaged per segment, then over segments, so a 16-token image
    counts as much as a 1,000-token clip. weighting="token": every token counts the same.
    """
    sums = packed_loss_sums(
        pred_BLP, target_BLP, segment_ids_BL, cond_mask_BL, max_segments, weighting
    )
    loss = loss_from_sums(sums)
    return loss, {"loss": loss, "segments": sums["segments"]}


SOLVERS = ("euler", "heun")  # velocity evaluations per step: 1 and 2


class SamplingInterrupted(RuntimeError):
    """`should_stop` asked the sampling loop to stop (preemption): the batch is abandoned."""


def unshift_time(t: jax.Array, shift: jax.Array) -> jax.Array:
    """Inverse of `shift_time`: the unshifted time u with shift_time(u, shift) == t."""
    return t / (shift - (shift - 1.0) * t)


def time_grid(num_steps: int, shift_BS: jax.Array, start_BS: jax.Array | None = None) -> jax.Array:
    """Per-segment sampling times [num_steps + 1, B, S], from `start_BS` (default 1, noise)
    down to 0 (data).

    A start below 1 (SDEdit) keeps the resolution shift's shape: the unshifted start
    u0 = unshift_time(start, shift) is found first, num_steps even steps go from u0 to 0, and
    each is shifted, so the first time is exactly `start` and the steps crowd towards noise as a
    full schedule of that segment's size would. All num_steps steps are spent on [0, start]
    (rather than skipping the first (1 - start) share of a full grid): an edit at steps=N costs
    N model evaluations, like any other request in its pack.
    """
    u = jnp.linspace(1.0, 0.0, num_steps + 1)[:, None, None]
    if start_BS is not None:
        u = u * unshift_time(jnp.asarray(start_BS, jnp.float32), shift_BS)[None]
    t = shift_time(u, shift_BS[None])
    if start_BS is not None:  # exactly the requested start, whatever the rounding
        t = t.at[0].set(jnp.broadcast_to(start_BS, t.shape[1:]))
    return t


_time_grid = jax.jit(time_grid, static_argnums=0)


def clamp(x_BLP: jax.Array, clean_BLP: jax.Array | None, cond_mask_BL: jax.Array | None):
    """Conditioning tokens held at their clean values (image-to-video, extension, loops)."""
    if cond_mask_BL is None:
        return x_BLP
    return jnp.where(cond_mask_BL[..., None], clean_BLP, x_BLP)


def euler_update(x_BLP, v_BLP, t_BS, t_next_BS, segment_ids_BL) -> jax.Array:
    """One Euler step from t to t_next (smaller), each token at its segment's times."""
    dt_BL = per_segment(t_BS - t_next_BS, segment_ids_BL)
    return x_BLP - dt_BL[..., None] * v_BLP


def solver_step(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_BLP: jax.Array,
    t_BS: jax.Array,
    t_next_BS: jax.Array,
    segment_ids_BL: jax.Array,
    solver: str = "euler",
    clean_BLP: jax.Array | None = None,
    cond_mask_BL: jax.Array | None = None,
) -> jax.Array:
    """x at t -> x at t_next for one solver, tokens in `cond_mask_BL` held at `clean_BLP`
    before every velocity evaluation and in the result; a token's dt is its segment's.

    euler: x - dt v(x, t). heun (2nd order, 2 evaluations): v1 = v(x, t), x' = x - dt v1,
    v2 = v(x', t_next), x - dt (v1 + v2) / 2. Heun takes its correction on the last step too:
    t_next = 0 is a valid time for rectified flow (the velocity there is E[noise] - x0).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    x = _clamp(x_BLP, clean_BLP, cond_mask_BL)
    v1 = velocity_fn(x, t_BS)
    x_euler = _update(x, v1, t_BS, t_next_BS, segment_ids_BL, clean_BLP, cond_mask_BL)
    if solver == "euler":
        return x_euler
    v2 = velocity_fn(x_euler, t_next_BS)
    return _update(x, v1, t_BS, t_next_BS, segment_ids_BL, clean_BLP, cond_mask_BL, v2)


@jax.jit
def _clamp(x_BLP, clean_BLP, cond_mask_BL):
    return clamp(x_BLP, clean_BLP, cond_mask_BL)


@jax.jit
def _update(x, v1, t_BS, t_next_BS, segment_ids_BL, clean_BLP, cond_mask_BL, v2=None):
    """The clamped Euler step with v1, or with (v1 + v2) / 2 (Heun's), as one compiled call:
    the host loop's arithmetic op by op would compile each op once per shape."""
    v = v1 if v2 is None else 0.5 * (v1 + v2)
    return clamp(euler_update(x, v, t_BS, t_next_BS, segment_ids_BL), clean_BLP, cond_mask_BL)


def sample(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_BLP: jax.Array,
    segment_ids_BL: jax.Array,
    shift_BS: jax.Array,
    num_steps: int,
    *,
    solver: str = "euler",
    start_BS: jax.Array | None = None,
    clean_BLP: jax.Array | None = None,
    cond_mask_BL: jax.Array | None = None,
    should_stop: Callable[[int], bool] | None = None,
    final_correction: bool = True,
) -> jax.Array:
    """Integrates dx/dt = v(x, t) from each segment's start (1 by default) to t=0, each segment
    on its own shifted schedule (`time_grid`). The one sampling loop: sample.py and the tests
    use it.

    `x_BLP` is the state at the start times: noise, or for SDEdit segments the source noised to
    their start. `velocity_fn(x_BLP, t_BS)` is the (guided) model, jitted by the caller; the loop
    runs on the host, step by step, so `should_stop(step)` is polled before every step (a
    preemption notice) and True abandons the batch with SamplingInterrupted.
    `final_correction=False` makes Heun's last step, into t = 0, an Euler step (EDM's and JiT's
    rule): a data-predicting network's velocity at t = 0 is (x - x0) / 0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    ts = _time_grid(num_steps, shift_BS, start_BS)
    x = x_BLP
    for i in range(num_steps):
        if should_stop is not None and should_stop(i):
            raise SamplingInterrupted(f"stopped before {solver} step {i + 1} of {num_steps}")
        last = i == num_steps - 1
        step_solver = "euler" if last and not final_correction else solver
        x = solver_step(
            velocity_fn, x, ts[i], ts[i + 1], segment_ids_BL, step_solver, clean_BLP, cond_mask_BL
        )
    return _clamp(x, clean_BLP, cond_mask_BL)
