"""The windowed attention backend gives dense xla attention's numbers (forward and gradients) on
real tokens, on packs where its windows are used and on packs that force its dense fallback, for
self-attention and for cross-attention to per-segment captions; the whole DiT on it gives the
same outputs and weight gradients as on xla; and changing clip sizes never recompiles it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsora.models import windowed
from jaxsora.models.attention import xla_attention
from jaxsora.models.dit import attention_windows, make_model
from tests.conftest import randomize_params
from tests.test_model import CFG as MODEL_CFG

B, L, H, K = 2, 384, 2, 16
S, LT = 16, 8
BLOCK = 32
MIN_SEG, MAX_SEG = 8, 48
SELF_WINDOW = windowed.self_window(MAX_SEG, BLOCK, L)  # 128 of 384 keys
CROSS_WINDOW = windowed.cross_window(MIN_SEG, BLOCK, S, LT)  # 5 captions of 16
TOL = 2e-5


def random_pack(rng, lo=MIN_SEG, hi=MAX_SEG, max_segments=S):
    """Segment ids 1, 1, ..., 2, ... of random sizes in [lo, hi], then padding (id 0)."""
    seg = np.zeros(L, np.int32)
    start, k = 0, 1
    while k <= max_segments:
        n = int(rng.integers(lo, hi + 1))
        if start + n > L - int(rng.integers(0, 24)):
            break
        seg[start : start + n] = k
        start, k = start + n, k + 1
    return seg


def caption_ids(rng, seg_BL, drop_segment=None):
    """Cross-attention key ids [B, S*Lt]: segment k's caption tokens carry k, masked ones 0."""
    mask = rng.random((B, S, LT)) < 0.7
    mask[:, :, 0] = True
    if drop_segment is not None:  # a caption masked whole: its tokens attend nothing
        mask[:, drop_segment - 1] = False
    return np.where(mask, np.arange(1, S + 1)[None, :, None], 0).reshape(B, S * LT)


def qkv(rng, M):
    q = jnp.asarray(rng.standard_normal((B, L, H, K)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, M, H, K)), jnp.float32) for _ in range(2))
    return q, k, v


def compare(seg_q, seg_kv, window, q, k, v):
    """max |windowed - xla| over real-token outputs and over the q, k, v gradients of a random
    readout of the real tokens; also checks padding queries output exactly 0."""
    real = jnp.asarray(seg_q > 0)[..., None, None]
    readout = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32) * real

    def win(q, k, v):
        return windowed.windowed_attention(q, k, v, seg_q, seg_kv, window=window, block=BLOCK)

    def dense(q, k, v):
        return xla_attention(q, k, v, seg_q, seg_kv)

    got, want = jax.jit(win)(q, k, v), jax.jit(dense)(q, k, v)
    assert float(jnp.abs(jnp.where(real, 0.0, got)).max()) == 0.0
    errors = [float(jnp.abs(jnp.where(real, got - want, 0.0)).max())]
    grads = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * readout), argnums=(0, 1, 2)))(q, k, v)
        for f in (win, dense)
    ]
    errors += [float(jnp.abs(a - b).max()) for a, b in zip(*grads, strict=True)]
    assert max(float(jnp.abs(g).max()) for g in grads[1]) > 0.1  # a real gradient
    return errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_attention_in_windows_equals_dense(seed):
    rng = np.random.default_rng(seed)
    seg = np.stack([random_pack(rng) for _ in range(B)])
    assert bool(windowed.window_plan(seg, seg, BLOCK, SELF_WINDOW)[1])  # the windows are used
    assert max(compare(seg, seg, SELF_WINDOW, *qkv(rng, L))) < TOL


def test_a_segment_longer_than_the_window_takes_the_dense_path_with_the_same_numbers():
    rng = np.random.default_rng(3)
    seg = np.stack([random_pack(rng), random_pack(rng, lo=150, hi=200)])
    assert not bool(windowed.window_plan(seg, seg, BLOCK, SELF_WINDOW)[1])
    assert max(compare(seg, seg, SELF_WINDOW, *qkv(rng, L))) < TOL


def test_ids_out_of_order_and_missing_ids_are_still_exact():
    """Not what the packer makes (ids rise along the pack), but any ids give xla's numbers:
    interleaved segments, ids that skip (1, 2, 5), a segment far from its other half."""
    rng = np.random.default_rng(4)
    seg = np.stack([random_pack(rng) for _ in range(B)])
    seg[0, 10:20] = 5
    seg[1] = rng.integers(0, 4, L)
    assert max(compare(seg, seg, SELF_WINDOW, *qkv(rng, L))) < TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_attention_reads_only_its_segments_captions(seed):
    rng = np.random.default_rng(10 + seed)
    seg = np.stack([random_pack(rng) for _ in range(B)])
    captions = caption_ids(rng, seg, drop_segment=2)
    assert bool(windowed.window_plan(seg, captions, BLOCK, CROSS_WINDOW)[1])
    assert CROSS_WINDOW < S * LT // 2
    assert max(compare(seg, captions, CROSS_WINDOW, *qkv(rng, S * LT))) < TOL


def test_cross_attention_with_small_segments_falls_back_exactly():
    """Segments of 2-4 tokens put more captions in a query block than the window holds."""
    rng = np.random.default_rng(12)
    seg = np.stack([random_pack(rng, lo=2, hi=4, max_segments=S) for _ in range(B)])
    captions = caption_ids(rng, seg)
    assert not bool(windowed.window_plan(seg, captions, BLOCK, CROSS_WINDOW)[1])
    assert max(compare(seg, captions, CROSS_WINDOW, *qkv(rng, S * LT))) < TOL


def test_the_host_plan_the_flop_count_uses_is_the_compiled_plan():
    """jaxsora/flops.py plans on the host in NumPy; the step plans in JAX: same starts, same
    choice of path, on packer-like and on arbitrary ids."""
    rng = np.random.default_rng(8)
    for case in range(40):
        seg = np.stack([random_pack(rng) for _ in range(B)])
        keys = caption_ids(rng, seg) if case % 2 else seg
        if case % 4 == 3:
            seg, keys = (rng.integers(-1, 6, x.shape).astype(np.int32) for x in (seg, keys))
        window = int(rng.integers(8, keys.shape[1]))
        host = windowed.window_plan(seg, keys, BLOCK, window)
        traced = jax.jit(windowed.window_plan, static_argnums=(2, 3))(seg, keys, BLOCK, window)
        np.testing.assert_array_equal(host[0], np.asarray(traced[0]))
        assert bool(host[1]) == bool(traced[1]), case


def test_new_clip_sizes_reuse_the_compiled_attention():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, L)
    f = jax.jit(
        lambda q, k, v, s: windowed.windowed_attention(
            q, k, v, s, s, window=SELF_WINDOW, block=BLOCK
        )
    )
    for lo, hi in [(8, 48), (20, 30), (100, 180)]:  # the last one takes the dense path
        seg = jnp.asarray(np.stack([random_pack(rng, lo, hi) for _ in range(B)]))
        f(q, k, v, seg).block_until_ready()
    assert f._cache_size() == 1


# tests/test_model.py's small DiT, with captions of LT tokens and windows sized for these packs.
CFG = dataclasses.replace(
    MODEL_CFG, text_len=LT, attention_block=BLOCK, segment_tokens=(MIN_SEG, MAX_SEG)
)


def test_the_dit_on_windowed_attention_equals_the_dit_on_xla():
    """Same weights, same packs: outputs at real tokens and every weight's gradient agree, with
    the windows in use in both self- and cross-attention."""
    rng = np.random.default_rng(6)
    seg = np.stack([random_pack(rng) for _ in range(B)])
    captions = caption_ids(rng, seg, drop_segment=3)
    text_mask = (captions > 0).reshape(B, S, LT)
    assert attention_windows(CFG, L, captions) == (SELF_WINDOW, CROSS_WINDOW)
    positions = np.stack([rng.integers(0, 6, (B, L)) for _ in range(3)], -1).astype(np.int32)
    inputs = (
        jnp.asarray(rng.standard_normal((B, L, CFG.patch_dim)), jnp.float32),
        jnp.asarray(rng.uniform(0.05, 0.95, (B, S)), jnp.float32),
        jnp.asarray(seg),
        jnp.asarray(positions),
        jnp.asarray(rng.integers(2, CFG.text_vocab, (B, S, LT)), jnp.int32),
        jnp.asarray(text_mask),
        jnp.asarray(rng.random((B, L)) < 0.2),
    )
    real = jnp.asarray(seg > 0)[..., None]
    readout = jnp.asarray(rng.standard_normal((B, L, CFG.patch_dim)), jnp.float32) * real
    base = randomize_params(make_model(dataclasses.replace(CFG, attention="xla"), seed=0))
    results = []
    for backend in ("xla", "windowed"):
        model = make_model(dataclasses.replace(CFG, attention=backend), seed=0)
        nnx.update(model, nnx.state(base, nnx.Param))

        @nnx.jit
        def out_and_grads(model):
            loss = lambda m: jnp.sum(m(*inputs) * readout)
            return model(*inputs), nnx.grad(loss)(model)

        out, grads = out_and_grads(model)
        results.append((np.where(real, np.asarray(out), 0.0), jax.tree.leaves(grads)))
    (out_x, grads_x), (out_w, grads_w) = results
    assert np.abs(out_x).max() > 0.1
    np.testing.assert_allclose(out_w, out_x, rtol=0, atol=1e-4)
    for gw, gx in zip(grads_w, grads_x, strict=True):
        np.testing.assert_allclose(gw, gx, rtol=0, atol=1e-4 * max(1.0, np.abs(gx).max()))
