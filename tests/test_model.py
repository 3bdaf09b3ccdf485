"""The packed DiT: an example's output does not depend on what else is in its pack, and does
depend on its own caption, time and positions. The packing properties hold for scanned and
unrolled blocks, for a bfloat16 model and for the original-DiT configuration; every remat
policy gives the same gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsora.data import packing
from jaxsora.models.dit import REMAT_POLICIES, DiTConfig, make_model, original_dit_fields
from jaxsora.models.tokenizer import tokenize
from tests.conftest import randomize_params, run_fast_compiled

CFG = DiTConfig(
    patch_dim=12,
    width=32,
    depth=2,
    num_heads=2,
    text_vocab=64,
    text_len=6,
    text_width=16,
    text_depth=1,
    text_heads=2,
)
SHAPE = packing.PackShape(seq_len=96, max_segments=4, patch_dim=12, text_len=6)
# float32 on CPU: the same math in a different order (other tokens in the softmax sum as exact
# zeros, different matmul shapes) moves results by a few ulps. bfloat16 keeps 8 bits of mantissa,
# and a different matmul shape may round an intermediate the other way: a few bf16 ulps of ~1.
VARIANTS = {
    "scanned": (dict(scan_layers=True), 2e-5),
    "unrolled": (dict(scan_layers=False), 2e-5),  # what experiments/tiny.py trains
    "bfloat16": (dict(dtype="bfloat16"), 3e-2),
    # The DiT paper's model (class labels: the caption's first id, absolute sin-cos positions,
    # no QK-norm, learned sigma): packing holds for it too.
    "original_dit": (original_dit_fields(num_classes=5), 2e-5),
    # NaViT's fractional positions: read off each segment's own positions, so packing holds.
    "frame_positions": (dict(frame_positions=True), 2e-5),
}
TOL = 2e-5


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    overrides, tol = VARIANTS[request.param]
    return randomize_params(make_model(dataclasses.replace(CFG, **overrides), seed=0)), tol


@pytest.fixture(scope="module")
def model():
    return randomize_params(make_model(CFG, seed=0))


def example(grid, caption, seed, cond_frames=()):
    """`cond_frames`: temporal patch indices given clean, as an image-to-video prompt gives
    frame 0."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(grid))
    positions = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)
    positions = positions.reshape(-1, 3).astype(np.int32)
    ids, mask = tokenize(caption, CFG.text_len, CFG.text_vocab)
    return {
        "patches": rng.standard_normal((n, CFG.patch_dim)).astype(np.float32),
        "positions": positions,
        "grid": np.array(grid, np.int32),
        "text_ids": ids,
        "text_mask": mask,
        "cond": np.isin(positions[:, 0], cond_frames),
    }


EXAMPLES = [  # the first is conditioned on its first frame: packing must hold with per-token time
    example((3, 2, 5), "a red circle moving left", 0, cond_frames=(0,)),
    example((1, 6, 4), "a photo of a cat", 1),
    example((2, 3, 3), "a blue square", 2),
]
TIMES = [0.3, 0.8, 0.55]


@nnx.jit
def forward(model, *inputs):
    return model(*inputs)


def run(model, examples, times, positions=None):
    pack = packing.stack_packs([packing.build_pack(examples, SHAPE)])
    if positions is not None:
        pack["positions"] = positions
    t = np.zeros((1, SHAPE.max_segments), np.float32)
    t[0, : len(times)] = times
    out = forward(
        model,
        jnp.asarray(pack["tokens"]),
        jnp.asarray(t),
        jnp.asarray(pack["segment_ids"]),
        jnp.asarray(pack["positions"]),
        jnp.asarray(pack["text_ids"]),
        jnp.asarray(pack["text_mask"]),
        jnp.asarray(pack["cond_mask"]),
    )
    return np.asarray(out[0], np.float32), pack["segment_ids"][0]


def test_output_alone_equals_output_packed(variant):
    model, tol = variant
    packed, segs = run(model, EXAMPLES, TIMES)
    for k, (ex, t) in enumerate(zip(EXAMPLES, TIMES, strict=True)):
        alone, alone_segs = run(model, [ex], [t])
        n = ex["patches"].shape[0]
        assert np.abs(alone[:n]).max() > 0.1, (
            "outputs must be non-trivial for the test to mean anything"
        )
        np.testing.assert_allclose(
            packed[segs == k + 1], alone[alone_segs == 1], atol=tol, rtol=tol
        )


def test_order_in_the_pack_does_not_matter(variant):
    model, tol = variant
    packed, segs = run(model, EXAMPLES, TIMES)
    reordered, rsegs = run(model, EXAMPLES[::-1], TIMES[::-1])
    for k in range(3):
        np.testing.assert_allclose(
            packed[segs == k + 1], reordered[rsegs == 3 - k], atol=tol, rtol=tol
        )


def test_gradient_never_crosses_segments(variant):
    model, _ = variant
    """d(output of segment 1) / d(tokens of segments 2, 3) is exactly zero; to itself it is not."""
    pack = packing.stack_packs([packing.build_pack(EXAMPLES, SHAPE)])
    segs = jnp.asarray(pack["segment_ids"])
    t = jnp.asarray([TIMES + [0.0]], jnp.float32)

    def seg1_output(tokens):
        out = model(
            tokens,
            t,
            segs,
            jnp.asarray(pack["positions"]),
            jnp.asarray(pack["text_ids"]),
            jnp.asarray(pack["text_mask"]),
            jnp.asarray(pack["cond_mask"]),
        )
        return jnp.sum(jnp.where((segs == 1)[..., None], out, 0.0) ** 2)

    g = np.asarray(jax.jit(jax.grad(seg1_output))(jnp.asarray(pack["tokens"])), np.float32)[0]
    s = pack["segment_ids"][0]
    assert np.abs(g[s == 1]).max() > 1e-3
    assert (g[(s != 1)] == 0).all()


def test_a_segments_output_follows_its_own_caption_and_no_other(model):
    base, segs = run(model, EXAMPLES, TIMES)
    other = [EXAMPLES[0], {**EXAMPLES[1]}, EXAMPLES[2]]
    other[1]["text_ids"], other[1]["text_mask"] = tokenize(
        "a green triangle far away", CFG.text_len, CFG.text_vocab
    )
    changed, _ = run(model, other, TIMES)
    np.testing.assert_array_equal(base[segs == 1], changed[segs == 1])
    np.testing.assert_array_equal(base[segs == 3], changed[segs == 3])
    assert np.abs(base[segs == 2] - changed[segs == 2]).max() > 1e-3


def test_a_segments_output_follows_its_own_time_and_no_other(model):
    base, segs = run(model, EXAMPLES, TIMES)
    changed, _ = run(model, EXAMPLES, [TIMES[0], 0.05, TIMES[2]])
    np.testing.assert_array_equal(base[segs == 1], changed[segs == 1])
    np.testing.assert_array_equal(base[segs == 3], changed[segs == 3])
    assert np.abs(base[segs == 2] - changed[segs == 2]).max() > 1e-3


def test_a_clean_conditioning_frame_steers_its_own_segment_and_no_other(model):
    """Changing only segment 1's conditioning frame changes the prediction for the rest of
    segment 1 (the frame is read as context) and leaves segments 2 and 3 bitwise the same."""
    base, segs = run(model, EXAMPLES, TIMES)
    other = [{**EXAMPLES[0]}, *EXAMPLES[1:]]
    cond = EXAMPLES[0]["cond"]
    other[0]["patches"] = np.where(cond[:, None], -EXAMPLES[0]["patches"], EXAMPLES[0]["patches"])
    changed, _ = run(model, other, TIMES)
    rest = np.flatnonzero(segs == 1)[~cond]
    assert np.abs(base[rest] - changed[rest]).max() > 1e-3
    np.testing.assert_array_equal(base[segs == 2], changed[segs == 2])
    np.testing.assert_array_equal(base[segs == 3], changed[segs == 3])


def test_conditioning_tokens_are_seen_at_time_zero(model):
    """Per-token time: a token marked clean is modulated exactly as at t = 0. A segment whose
    tokens are all conditioning equals the same segment at t = 0 with none marked; marking or
    not marking a frame changes the other tokens' prediction (the model can tell them apart)."""
    plain = {**EXAMPLES[2], "cond": np.zeros_like(EXAMPLES[2]["cond"])}
    all_clean = {**plain, "cond": np.ones_like(plain["cond"])}
    at_zero, segs = run(model, [EXAMPLES[0], EXAMPLES[1], plain], [TIMES[0], TIMES[1], 0.0])
    marked, _ = run(model, [EXAMPLES[0], EXAMPLES[1], all_clean], TIMES)
    np.testing.assert_allclose(marked[segs == 3], at_zero[segs == 3], atol=TOL, rtol=TOL)
    unmarked = [{**EXAMPLES[0], "cond": np.zeros_like(EXAMPLES[0]["cond"])}, *EXAMPLES[1:]]
    base, _ = run(model, EXAMPLES, TIMES)
    changed, _ = run(model, unmarked, TIMES)
    rest = np.flatnonzero(segs == 1)[~EXAMPLES[0]["cond"]]
    assert np.abs(base[rest] - changed[rest]).max() > 1e-3
    np.testing.assert_array_equal(base[segs == 2], changed[segs == 2])


def test_rope_positions_matter_and_move_with_their_tokens(model):
    """Shuffling positions within a segment changes its output (RoPE is not a no-op); shuffling
    tokens together with their positions just shuffles the output (no hidden order)."""
    pack = packing.build_pack(EXAMPLES, SHAPE)
    base, segs = run(model, EXAMPLES, TIMES)
    rows = np.flatnonzero(segs == 1)
    perm = np.random.default_rng(0).permutation(len(rows))
    positions = pack["positions"].copy()
    positions[rows] = positions[rows][perm]
    moved, _ = run(model, EXAMPLES, TIMES, positions=positions[None])
    assert np.abs(moved[rows] - base[rows]).max() > 1e-2
    np.testing.assert_array_equal(moved[segs == 2], base[segs == 2])
    shuffled = [{**EXAMPLES[0]}, *EXAMPLES[1:]]
    shuffled[0]["patches"] = EXAMPLES[0]["patches"][perm]
    shuffled[0]["positions"] = EXAMPLES[0]["positions"][perm]
    shuffled[0]["cond"] = EXAMPLES[0]["cond"][perm]
    both, _ = run(model, shuffled, TIMES)
    np.testing.assert_allclose(both[rows], base[rows][perm], atol=TOL, rtol=TOL)


def test_padding_does_not_change_real_tokens(model):
    short = packing.PackShape(seq_len=40, max_segments=4, patch_dim=12, text_len=6)
    ex = EXAMPLES[0]
    outs = []
    for shape in (short, SHAPE):
        pack = packing.stack_packs([packing.build_pack([ex], shape)])
        t = jnp.full((1, 4), 0.3)
        out = model(
            jnp.asarray(pack["tokens"]),
            t,
            jnp.asarray(pack["segment_ids"]),
            jnp.asarray(pack["positions"]),
            jnp.asarray(pack["text_ids"]),
            jnp.asarray(pack["text_mask"]),
        )
        outs.append(np.asarray(out[0, :30]))
    np.testing.assert_allclose(outs[0], outs[1], atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_every_remat_policy_gives_the_gradients_of_none():
    pack = packing.stack_packs([packing.build_pack(EXAMPLES, SHAPE)])
    tokens = jnp.asarray(pack["tokens"])
    t = jnp.asarray([TIMES + [0.0]], jnp.float32)
    rest = [jnp.asarray(pack[k]) for k in ("segment_ids", "positions", "text_ids", "text_mask")]
    flat = {}
    for policy in ("none", *REMAT_POLICIES):
        model = randomize_params(make_model(dataclasses.replace(CFG, remat=policy), seed=0))
        graphdef, params, others = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, others=others):
            out = nnx.merge(graphdef, params, others)(tokens, t, *rest)
            return jnp.sum(jnp.square(out - tokens))

        flat[policy] = jax.tree.leaves(run_fast_compiled(jax.grad(loss), params))
    for policy in REMAT_POLICIES:
        for a, b in zip(flat[policy], flat["none"], strict=True):
            scale = float(jnp.abs(b).max())
            assert scale > 0
            assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, policy


def test_frozen_encoder_embeddings_keep_packing_and_an_empty_mask_is_the_null_caption():
    """With caption embeddings of a frozen encoder as input (text_embed_dim > 0): packed equals
    alone; a segment follows its own embeddings only; an all-False mask reads the learned null
    token whatever the embeddings hold (what classifier-free guidance drops to)."""
    cfg = dataclasses.replace(CFG, text_embed_dim=8)
    shape = dataclasses.replace(SHAPE, text_dim=8)
    m = randomize_params(make_model(cfg, seed=0))
    rng = np.random.default_rng(5)
    examples = []
    for ex in EXAMPLES:
        ex = {k: v for k, v in ex.items() if k != "text_ids"}
        ex["text_emb"] = rng.standard_normal((CFG.text_len, 8)).astype(np.float32)
        examples.append(ex)

    def run_emb(examples, times):
        pack = packing.stack_packs([packing.build_pack(examples, shape)])
        t = np.zeros((1, shape.max_segments), np.float32)
        t[0, : len(times)] = times
        keys = ("tokens", "segment_ids", "positions", "text_emb", "text_mask", "cond_mask")
        tokens, seg, pos, emb, mask, cond = (jnp.asarray(pack[k]) for k in keys)
        out = forward(m, tokens, jnp.asarray(t), seg, pos, emb, mask, cond)
        return np.asarray(out[0]), pack["segment_ids"][0]

    packed, segs = run_emb(examples, TIMES)
    alone, alone_segs = run_emb([examples[1]], [TIMES[1]])
    np.testing.assert_allclose(packed[segs == 2], alone[alone_segs == 1], atol=TOL, rtol=TOL)
    other = [examples[0], {**examples[1], "text_emb": -examples[1]["text_emb"]}, examples[2]]
    changed, _ = run_emb(other, TIMES)
    assert np.abs(changed[segs == 2] - packed[segs == 2]).max() > 1e-3
    np.testing.assert_array_equal(changed[segs == 1], packed[segs == 1])
    null = [{**ex, "text_mask": np.zeros_like(ex["text_mask"])} for ex in examples]
    null_other = [{**ex, "text_emb": 5 + ex["text_emb"]} for ex in null]
    a, _ = run_emb(null, TIMES)
    b, _ = run_emb(null_other, TIMES)
    np.testing.assert_array_equal(a[segs > 0], b[segs > 0])  # padding is never scored
    assert np.abs(a[segs == 2] - packed[segs == 2]).max() > 1e-3
