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


def time_grid(num_steps: int, shift_BS: jax.Array) -> jax.Array:
    """Per-segment sampling times [num_steps + 1, B, S], from 1 (noise) down to 0 (data)."""
    t = jnp.linspace(1.0, 0.0, num_steps + 1)
    return shift_time(t[:, None, None], shift_BS[None])


def euler_update(x_BLP, v_BLP, t_BS, t_next_BS, segment_ids_BL) -> jax.Array:
    """One Euler step from t to t_next (smaller), each token at its segment's times."""
    dt_BL = per_segment(t_BS - t_next_BS, segment_ids_BL)
    return x_BLP - dt_BL[..., None] * v_BLP


def euler_sample(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise_BLP: jax.Array,
    segment_ids_BL: jax.Array,
    shift_BS: jax.Array,
    num_steps: int,
    cond_BLP: jax.Array | None = None,
    cond_mask_BL: jax.Array | None = None,
) -> jax.Array:
    """Integrates dx/dt = v(x, t) from t=1 to t=0 with each segment on its own shifted schedule.

    `velocity_fn(x_BLP, t_BS)` returns the velocity; tokens in `cond_mask_BL` are held at their
    clean values `cond_BLP` (image-to-video, extension).
    """
    ts = time_grid(num_steps, shift_BS)

    def clamp(x):
        if cond_mask_BL is None:
            return x
        return jnp.where(cond_mask_BL[..., None], cond_BLP, x)

    def step(x, i):
        return euler_update(x, velocity_fn(clamp(x), ts[i]), ts[i], ts[i + 1], segment_ids_BL), None

    x, _ = jax.lax.scan(step, noise_BLP, jnp.arange(num_steps))
    return clamp(x)
