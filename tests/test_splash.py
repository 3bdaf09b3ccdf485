"""Splash attention on packs: same numbers as the dense masked path, work that follows segments.

On CPU the kernel runs interpreted: the kernel checks use the Pallas TPU interpreter (it simulates
TPU memory and fails on an out-of-bounds block read, e.g. a bad `data_next`), the model checks the
default generic interpreter. Shapes stay at the smallest that still have several blocks: L=512,
blocks of 128.
The sharded check needs simulated devices configured before JAX's backend starts, so it runs this
file as a module in a subprocess that prints its measurements as one JSON line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from jaxsora.data import packing
from jaxsora.models import splash
from jaxsora.models.attention import xla_attention
from jaxsora.models.dit import DiTConfig, make_model
from jaxsora.models.tokenizer import tokenize
from tests.conftest import run_module_result

L, H, K, BLOCK = 512, 2, 64, 128
TOL = 1e-5


def runs(*lengths_and_ids) -> np.ndarray:
    """A segment-id row from (length, id) runs."""
    row = np.concatenate([np.full(n, s, np.int32) for n, s in lengths_and_ids])
    assert row.shape == (L,)
    return row


# Example 0 is what the packer makes: unaligned segments, padding at the end. Example 1 is not:
# ids out of order, padding in the middle, id 1 in two separate runs; the block mask may then be
# a superset of the needed tiles, and the numbers must still be right.
SEGS = np.stack(
    [
        runs((100, 1), (200, 2), (100, 3), (20, 4), (92, 0)),
        runs((150, 3), (60, 1), (50, 0), (140, 2), (112, 1)),
    ]
)


def brute_force_tiles(seg_q: np.ndarray, seg_kv: np.ndarray) -> np.ndarray:
    """[B, nq, nkv]: tiles holding at least one (query, key) pair of the same segment."""
    same = seg_q[:, :, None] == seg_kv[:, None, :]
    B, Lq, Lk = same.shape
    return same.reshape(B, Lq // BLOCK, BLOCK, Lk // BLOCK, BLOCK).any(axis=(2, 4))


def qkv(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, L, H, K)), jnp.float32) for _ in range(3)]


def test_splash_equals_xla_forward_and_gradients():
    q, k, v = qkv()
    seg = jnp.asarray(SEGS)
    # Make sure the first example really skips tiles, or the test would not exercise skipping.
    assert 0 < splash.computed_tiles(seg[:1], seg[:1]) < 16

    w = jax.random.normal(jax.random.key(2), q.shape)

    def loss(attn):
        # A non-linear readout so the output cotangent differs per element.
        return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v, seg, seg)) * w)

    with pltpu.force_tpu_interpret_mode():
        out, grads = jax.jit(
            lambda q, k, v: (
                splash.splash_attention(q, k, v, seg, seg),
                jax.grad(loss(splash.splash_attention), argnums=(0, 1, 2))(q, k, v),
            )
        )(q, k, v)
    ref = xla_attention(q, k, v, seg, seg)
    ref_grads = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    assert float(jnp.abs(out - ref).max()) < TOL
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert float(jnp.abs(r).max()) > 1e-2, f"d/d{name} must be non-trivial"
        err = float(jnp.abs(g - r).max())
        assert err < TOL, (name, err)


def test_computed_tiles_follow_segments():
    nb = L // BLOCK
    aligned = np.repeat(np.arange(1, nb + 1, dtype=np.int32), BLOCK)[None]
    assert splash.computed_tiles(aligned, aligned) == nb  # the diagonal
    np.testing.assert_array_equal(splash.splash_block_mask(aligned, aligned)[0], np.eye(nb))
    one = np.ones((1, L), np.int32)
    assert splash.computed_tiles(one, one) == nb * nb

    # Packer-like rows (non-decreasing ids, unaligned lengths, padding at the end): exact.
    rng = np.random.default_rng(0)
    rows = [SEGS[0]]
    for _ in range(20):
        cuts = np.sort(rng.choice(np.arange(1, L), size=rng.integers(1, 8), replace=False))
        row = np.searchsorted(cuts, np.arange(L), side="right").astype(np.int32) + 1
        row[row == row.max()] = 0 if rng.random() < 0.7 else row.max()  # last run: padding
        rows.append(row)
    packs = np.stack(rows)
    np.testing.assert_array_equal(
        splash.splash_block_mask(packs, packs, BLOCK, BLOCK), brute_force_tiles(packs, packs)
    )
    assert splash.computed_tiles(packs, packs) == brute_force_tiles(packs, packs).sum()

    # Arbitrary ids: never fewer tiles than needed (the kernel masks inside the tiles it runs).
    wild = rng.integers(0, 5, size=(8, L)).astype(np.int32)
    wild[:, :200] = rng.permutation(np.repeat(np.arange(1, 5), 50))  # some out-of-order runs
    needed = brute_force_tiles(wild, wild)
    got = np.asarray(splash.splash_block_mask(wild, wild))
    assert (got | ~needed).all()
    got = np.asarray(splash.splash_block_mask(SEGS, SEGS))
    assert (got | ~brute_force_tiles(SEGS, SEGS)).all()


def test_kernel_skips_the_tiles_the_mask_leaves_out():
    """Given only the diagonal tiles, the kernel must miss exactly the cross-block pairs: so the
    block mask, not the segment ids, is what decides the work."""
    q, k, v = qkv(1)
    seg = jnp.asarray(SEGS[:1])
    diag = jnp.eye(L // BLOCK, dtype=bool)[None]
    with pltpu.force_tpu_interpret_mode():
        out = splash._splash_on_tiles(q[:1], k[:1], v[:1], seg, seg, diag, BLOCK, BLOCK)
    ref = xla_attention(q[:1], k[:1], v[:1], seg, seg)
    err = np.abs(np.asarray(out - ref)).max(axis=(2, 3))[0]
    # Segment 1 (tokens 0-99) and segment 4 (400-419) sit inside one block: unaffected.
    assert err[:100].max() < TOL and err[400:420].max() < TOL
    # Segments 2 and 3 span blocks: their keys in other blocks were skipped.
    assert err[100:400].min() > 1e-3


def test_lengths_must_be_multiples_of_the_block():
    q = jnp.zeros((1, 200, 1, K))
    seg = jnp.ones((1, 200), jnp.int32)
    with pytest.raises(ValueError, match=r"data\.seq_len.*128"):
        splash.splash_attention(q, q, q, seg, seg)


def test_dit_with_splash_equals_dit_with_xla():
    common = dict(
        patch_dim=12, width=64, depth=2, num_heads=2, text_vocab=64, text_len=6, text_width=16,
        text_depth=1, text_heads=2,
    )  # fmt: skip
    dense = make_model(DiTConfig(**common, attention="xla"), seed=0)
    # adaLN-Zero zero-inits the outputs (see conftest.randomize_params); numpy noise here because
    # eager jax.random compiles once per weight shape, which costs this CPU ~15 s.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32),
        jax.device_get(nnx.state(dense, nnx.Param)),
    )
    nnx.update(dense, params)
    sparse = make_model(DiTConfig(**common, attention="splash"), seed=0)
    nnx.update(sparse, params)

    shape = packing.PackShape(seq_len=256, max_segments=4, patch_dim=12, text_len=6)
    examples = []
    # 128 + 90 + 16 tokens and padding: the first clip fills block 0, so 2 of 4 tiles are skipped.
    for grid, caption in [((2, 8, 8), "a cat"), ((3, 6, 5), "a red circle"), ((1, 4, 4), "sea")]:
        ids, mask = tokenize(caption, 6, 64)
        pos = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)
        examples.append(
            {
                "patches": rng.standard_normal((int(np.prod(grid)), 12)).astype(np.float32),
                "positions": pos.reshape(-1, 3).astype(np.int32),
                "grid": np.array(grid, np.int32),
                "text_ids": ids,
                "text_mask": mask,
            }
        )
    pack = packing.stack_packs([packing.build_pack(examples, shape)])
    segs = pack["segment_ids"][0]
    assert (segs == 0).any()
    assert splash.computed_tiles(pack["segment_ids"], pack["segment_ids"]) == 2
    t = jnp.asarray([[0.3, 0.8, 0.55, 0.0]], jnp.float32)
    keys = ("tokens", "segment_ids", "positions", "text_ids", "text_mask")
    tokens, seg, positions, text_ids, text_mask = (jnp.asarray(pack[k]) for k in keys)
    outs = [
        np.asarray(m(tokens, t, seg, positions, text_ids, text_mask))[0] for m in (dense, sparse)
    ]
    assert np.abs(outs[0][segs > 0]).max() > 0.1
    np.testing.assert_allclose(outs[1][segs > 0], outs[0][segs > 0], atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_sharded_splash_equals_one_device():
    """Under activation_sharding the kernel runs per (batch, heads) shard inside shard_map."""
    r = run_module_result("tests.test_splash", timeout=300)
    assert r["shard_map"], "no shard_map around the kernel under a 4-device mesh"
    assert r["out_spec"] == r["in_spec"], r
    for name in ("forward", "dq", "dk", "dv"):
        assert r[name] < TOL, (name, r[name])
    assert "model.attention='context'" in r["context_error"], r["context_error"]


def _sharded_measurements() -> dict:
    """Run in the subprocess: 4 simulated devices, batch over `data`, heads over `tensor`."""
    from jaxsora import sharding

    mesh = sharding.make_mesh({"data": 2, "tensor": 2})
    q, k, v = qkv()
    seg = jnp.asarray(SEGS)
    w = jax.random.normal(jax.random.key(2), q.shape)

    def out_and_grads(attn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v, seg, seg)) * w)
        return lambda q, k, v: (attn(q, k, v, seg, seg), jax.grad(loss, (0, 1, 2))(q, k, v))

    def step(q, k, v):
        with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
            return out_and_grads(splash.splash_attention)(q, k, v)

    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]
    out, grads = jax.jit(step)(*sharded)
    ref, ref_grads = out_and_grads(xla_attention)(q, k, v)
    r = {
        "shard_map": "shard_map" in str(jax.make_jaxpr(step)(*sharded)),
        "in_spec": str(spec),
        "out_spec": str(out.sharding.spec),
        "forward": float(jnp.abs(out - ref).max()),
    }
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        r[name] = float(jnp.abs(g - rg).max())
    context_mesh = sharding.make_mesh({"data": 2, "context": 2})
    try:
        with sharding.activation_sharding(context_mesh, sharding.DEFAULT_RULES):
            splash.splash_attention(q, k, v, seg, seg)
        r["context_error"] = ""
    except ValueError as e:
        r["context_error"] = str(e)
    return r


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 4)
    print("RESULT " + json.dumps(_sharded_measurements()))
