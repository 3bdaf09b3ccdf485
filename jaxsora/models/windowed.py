"""Segment-windowed attention: attention whose work follows the segments, in plain XLA ops (CPU,
GPU, and anywhere splash is not available).

Packs lay each segment's tokens end to end (jaxsora/data/packing.py). A block of `block`
consecutive queries therefore needs only the keys from the first key of its first query's segment
to the last key of its last query's segment. Each block reads one window of `window` consecutive
keys that starts there, so a pack costs `L * window` score pairs instead of `L * M`: linear in `L`
for segments of bounded size. Shapes are static (the window's start is data, its length is not),
so clip sizes changing between batches never recompile.

The same function serves cross-attention: the keys are the `S * Lt` caption tokens laid out
segment after segment, and a query block whose tokens belong to a few segments reads only those
segments' captions (a window of a few `Lt`), not every caption of the pack.

Exact for any segment ids: when some block's keys do not fit its window (a longer segment than
the window was sized for, ids out of order), the whole call takes the dense path instead
(`lax.cond`, both paths compiled once; same numbers, `L * M` work). `window_plan` says which path
a batch takes, so FLOP counts and benchmarks report the work actually done.

Semantics, shared by both paths: a query attends the keys of its own segment id; padding queries
(id 0) and queries with no key get 0 (`xla_attention` lets padding attend padding: those outputs
are never used, and the model never mixes padding into real tokens, so losses and gradients are
the same). The backward pass recomputes the scores from q, k and the saved log-sum-exp, as flash
attention does, so no `L x window` probabilities are kept between the passes (and no residuals of
the branch the `cond` did not take, which autodiff of a `cond` would zero-fill at full size).

Where a window would be more than half the keys (short packs, long clips) windows save nothing,
so the dense path is chosen statically; it keeps its probabilities for the backward instead of
recomputing them, and both backwards take the softmax's row sums from dO . O (flash attention's
trick) rather than reducing the `L x M` gradient as autodiff does, which is faster on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 64  # queries per block: smaller wastes less window, larger gathers less


def self_window(max_segment: int, block: int, length: int) -> int:
    """Keys a query block needs at most when every segment has <= max_segment tokens: a block
    inside one segment needs that segment; a block across a boundary needs the segment before,
    the block's own tokens and the segment after. 0 (unknown) or more than `length`: `length`."""
    if max_segment <= 0:
        return length
    return min(length, 2 * max_segment + block)


def cross_window(min_segment: int, block: int, num_segments: int, caption_len: int) -> int:
    """Caption tokens a query block needs at most when every segment has >= min_segment tokens:
    the block touches at most (block - 2) // min_segment + 2 segments, each with one caption."""
    if min_segment <= 0:
        return num_segments * caption_len
    touched = min(num_segments, (block - 2) // min_segment + 2)
    return touched * caption_len


def window_plan(seg_q_BL, seg_kv_BM, block: int, window: int):
    """Where each query block's window starts (int32 [B, nb], nb = ceil(L / block)) and whether
    every block's keys fit in its window (bool scalar: False = the dense path runs).

    NumPy ids give NumPy results, computed on the host: the trainer's FLOP count calls this
    for every batch, and JAX ops there would queue behind the running train step."""
    xp = np if isinstance(seg_q_BL, np.ndarray) and isinstance(seg_kv_BM, np.ndarray) else jnp
    B, L = seg_q_BL.shape
    M = seg_kv_BM.shape[1]
    window = min(window, M)
    ids = max(L, M) + 1  # segment ids are 0..S with S <= L (pack format); others: dense path
    in_range = xp.all((seg_q_BL >= 0) & (seg_q_BL < ids)) & xp.all(
        (seg_kv_BM >= 0) & (seg_kv_BM < ids)
    )
    first, last = _key_ranges(xp.clip(seg_kv_BM, 0, ids - 1), ids, xp)  # [B, ids] each
    seg_q = xp.clip(seg_q_BL, 0, ids - 1)
    pad = -L % block
    seg_q = xp.pad(seg_q, [(0, 0), (0, pad)]) if pad else seg_q  # padding: id 0
    q_first = xp.take_along_axis(first, seg_q, axis=1)
    q_last = xp.take_along_axis(last, seg_q, axis=1)
    # Padding queries attend nothing; a segment without keys has first > last.
    needs = (seg_q > 0) & (q_first <= q_last)
    big = np.iinfo(np.int32).max
    lo = xp.where(needs, q_first, big).reshape(B, -1, block).min(-1)
    hi = xp.where(needs, q_last + 1, 0).reshape(B, -1, block).max(-1)
    starts = xp.clip(xp.minimum(lo, M - window), 0, M - window).astype(xp.int32)
    fits = xp.all(hi <= starts + window) & in_range
    return starts, fits


def _key_ranges(seg_kv_BM, ids: int, xp):
    """First and last position of each id among the keys, [B, ids]; an absent id has first =
    the int32 max and last = the int32 min (segment_min's and segment_max's identities)."""
    M = seg_kv_BM.shape[1]
    pos = xp.arange(M, dtype=xp.int32)
    if xp is jnp:
        first = jax.vmap(lambda s: jax.ops.segment_min(pos, s, ids))(seg_kv_BM)
        last = jax.vmap(lambda s: jax.ops.segment_max(pos, s, ids))(seg_kv_BM)
        return first, last
    info = np.iinfo(np.int32)
    first = np.full((seg_kv_BM.shape[0], ids), info.max, np.int32)
    last = np.full((seg_kv_BM.shape[0], ids), info.min, np.int32)
    rows = np.broadcast_to(np.arange(seg_kv_BM.shape[0])[:, None], seg_kv_BM.shape)
    np.minimum.at(first, (rows, seg_kv_BM), np.broadcast_to(pos, seg_kv_BM.shape))
    np.maximum.at(last, (rows, seg_kv_BM), np.broadcast_to(pos, seg_kv_BM.shape))
    return first, last


def windowed_attention(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM, *, window: int, block: int):
    """Attention of each query to the keys of its segment, reading one `window` of keys per
    `block` queries (module docstring); [B, L, H, K] like `attention.attention`. A window of
    more than half the keys saves nothing over the dense path (the gathered windows and the
    backward's scatter cost about as much as the scores they skip), so there the dense path is
    chosen statically."""
    M = k_BMHK.shape[1]
    # Heads-major inside: XLA:CPU's dot kernels take [batch..., rows, contracted] operands
    # without copies only when every batch dim leads.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BLHK, k_BMHK, v_BMHK))
    if 2 * window > M:
        o_BHLK = _dense_attention(q, k, v, seg_q_BL, seg_kv_BM)
    else:
        o_BHLK = _attention(q, k, v, seg_q_BL, seg_kv_BM, window, block)
    return jnp.swapaxes(o_BHLK, 1, 2)


@jax.custom_vjp
def _dense_attention(q, k, v, seg_q, seg_kv):
    """All [L, M] scores, the probabilities kept for the backward (no recomputation): the
    path for windows of more than half the keys; flash attention's backward on them."""
    return _dense_forward(q, k, v, seg_q, seg_kv)[0]


def _dense_forward(q, k, v, seg_q, seg_kv):
    one = lambda x: x[:, :, None]  # every query one block, every key one window
    p, _ = _softmax(_masked_scores(one(q), one(k), seg_q[:, None], seg_kv[:, None]))
    o = jnp.einsum("bhnqw,bhnwk->bhnqk", p.astype(v.dtype), one(v))[:, :, 0]
    return o, (q, k, v, p, o)


def _dense_backward(res, do):
    q, k, v, p, o = res
    one = lambda x: x[:, :, None]
    dq, dk, dv = (g[:, :, 0] for g in _grads_from_probs(p, *map(one, (q, k, v, o, do))))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_dense_attention.defvjp(_dense_forward, _dense_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, seg_q, seg_kv, window, block):
    return _forward(q, k, v, seg_q, seg_kv, window, block)[0]


def _forward(q, k, v, seg_q, seg_kv, window, block):
    """q [B, H, L, K], k and v [B, H, M, K] -> (o [B, H, L, K], residuals)."""
    L = q.shape[2]
    starts, fits = window_plan(seg_q, seg_kv, block, window)
    q_pad, seg_pad = _pad_to_blocks(q, block, axis=2), _pad_to_blocks(seg_q, block, axis=1)

    def windowed(_):
        kw, vw = _gather_heads(k, starts, window), _gather_heads(v, starts, window)
        sw = _gather(seg_kv, starts, window)
        ob, lse = _core_forward(_blocks(q_pad, block, 2), kw, vw, _blocks(seg_pad, block, 1), sw)
        return _unblock(ob), _unblock(lse)

    def dense(_):  # every query one block: the plain [L, M] scores of the dense path
        ob, lse = _core_forward(
            q_pad[:, :, None], k[:, :, None], v[:, :, None], seg_pad[:, None], seg_kv[:, None]
        )
        return _unblock(ob), _unblock(lse)

    o, lse = jax.lax.cond(fits, windowed, dense, None)
    o = o[:, :, :L].astype(v.dtype)
    return o, (q, k, v, seg_q, seg_kv, o, lse, starts, fits)


def _backward(window, block, res, do):
    q, k, v, seg_q, seg_kv, o, lse, starts, fits = res
    L, M = q.shape[2], k.shape[2]
    q_pad, o_pad, do_pad = (_pad_to_blocks(x, block, axis=2) for x in (q, o, do))
    seg_pad = _pad_to_blocks(seg_q, block, axis=1)

    def windowed(_):
        kw, vw = _gather_heads(k, starts, window), _gather_heads(v, starts, window)
        sw = _gather(seg_kv, starts, window)
        qb, ob, dob = (_blocks(x, block, 2) for x in (q_pad, o_pad, do_pad))
        lse_b = _blocks(lse, block, 2)
        dqb, dkw, dvw = _core_backward(qb, kw, vw, _blocks(seg_pad, block, 1), sw, ob, dob, lse_b)
        return _unblock(dqb), _scatter_add_heads(dkw, starts, M), _scatter_add_heads(dvw, starts, M)

    def dense(_):
        one = lambda x: x[:, :, None]
        dqb, dk, dv = _core_backward(
            one(q_pad),
            one(k),
            one(v),
            seg_pad[:, None],
            seg_kv[:, None],
            one(o_pad),
            one(do_pad),
            one(lse),
        )
        return _unblock(dqb), dk[:, :, 0], dv[:, :, 0]

    dq, dk, dv = jax.lax.cond(fits, windowed, dense, None)
    dq = dq[:, :, :L]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_forward, _backward)


# Einsum letters: b batch, h head, n query block, q query in block, w key in its window, k head
# dim. The dense path is the same code with one block of every query and one window of every key.
def _masked_scores(qb, kw, seg_qb, sw):
    """float32 [B, H, nb, bq, W] scores, -inf off the query's segment and for padding."""
    scale = qb.shape[-1] ** -0.5
    s = jnp.einsum("bhnqk,bhnwk->bhnqw", qb, kw, preferred_element_type=jnp.float32) * scale
    same = (seg_qb[..., None] == sw[:, :, None, :]) & (seg_qb[..., None] > 0)  # [B, nb, bq, W]
    return jnp.where(same[:, None], s, -jnp.inf)


def _softmax(s):
    """Row softmax of -inf-masked scores and its log-sum-exp; a row with no key gets zero
    probabilities and lse +inf (so that a backward's exp(s - lse) is 0 there too)."""
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no key: every score is -inf
    p = jnp.exp(s - m)
    total = p.sum(-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total[..., 0] > 0, m[..., 0] + jnp.log(total[..., 0]), jnp.inf)
    return p, lse


def _core_forward(qb, kw, vw, seg_qb, sw):
    p, lse = _softmax(_masked_scores(qb, kw, seg_qb, sw))
    ob = jnp.einsum("bhnqw,bhnwk->bhnqk", p.astype(vw.dtype), vw)
    return ob.astype(jnp.float32), lse


def _core_backward(qb, kw, vw, seg_qb, sw, ob, dob, lse):
    """The backward inside windows, on probabilities recomputed from q, k and the saved lse."""
    p = jnp.exp(_masked_scores(qb, kw, seg_qb, sw) - lse[..., None])
    return _grads_from_probs(p, qb, kw, vw, ob, dob)


def _grads_from_probs(p, qb, kw, vw, ob, dob):
    """Flash attention's backward from the probabilities: dq [B, H, nb, bq, K] and dk, dv per
    window [B, H, nb, W, K]. The row sums come from dO . O ([bq] per block and head), not
    from a [bq, W] reduction as autodiff's softmax backward does."""
    scale = qb.shape[-1] ** -0.5
    dob32 = dob.astype(jnp.float32)
    dvw = jnp.einsum("bhnqw,bhnqk->bhnwk", p, dob32)
    dp = jnp.einsum("bhnqk,bhnwk->bhnqw", dob32, vw, preferred_element_type=jnp.float32)
    delta = (dob32 * ob.astype(jnp.float32)).sum(-1)  # elementwise: as an einsum, a dot per row
    ds = p * (dp - delta[..., None]) * scale
    dqb = jnp.einsum("bhnqw,bhnwk->bhnqk", ds, kw, preferred_element_type=jnp.float32)
    dkw = jnp.einsum("bhnqw,bhnqk->bhnwk", ds, qb, preferred_element_type=jnp.float32)
    return dqb, dkw, dvw


def _pad_to_blocks(x, block, axis):
    L = x.shape[axis]
    pad = math.ceil(L / block) * block - L
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)  # padding ids are 0: they attend nothing


def _blocks(x, block, axis):
    return x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1 :])


def _unblock(xb):
    """[B, H, nb, bq, ...] -> [B, H, nb * bq, ...]."""
    return xb.reshape(*xb.shape[:2], -1, *xb.shape[4:])


def _gather(x_BM, starts_BN, window):
    """[B, nb, window]: for each block, `window` entries of x from its start."""
    take = lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, window, axis=0)
    return jax.vmap(jax.vmap(take, in_axes=(None, 0)))(x_BM, starts_BN)


def _gather_heads(x_BHMK, starts_BN, window):
    """[B, H, nb, window, K]: for each block, `window` keys of every head from its start."""
    take = lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, window, axis=1)
    return jax.vmap(jax.vmap(take, in_axes=(None, 0), out_axes=1))(x_BHMK, starts_BN)


def _scatter_add_heads(xw_BHNWK, starts_BN, M):
    """The transpose of `_gather_heads`: window rows summed back into [B, H, M, K]."""
    B, H, nb, W, K = xw_BHNWK.shape
    rows = (starts_BN[:, :, None] + jnp.arange(W, dtype=jnp.int32)).reshape(B, nb * W)
    flat = xw_BHNWK.reshape(B, H, nb * W, K)
    zeros = jnp.zeros((H, M, K), xw_BHNWK.dtype)
    return jax.vmap(lambda r, x: zeros.at[:, r].add(x))(rows, flat)
