"""Splash attention (Pallas TPU) on packs, skipping the tiles that cross segments.

Splash decides which (q-block, kv-block) tiles to compute from its `MaskInfo`, and
`make_splash_mha` builds that from a static numpy mask at trace time. Our packs change every
batch, so this module builds the `MaskInfo` inside jit from the segment ids themselves and hands
it to `SplashAttentionKernel`, a pytree whose mask infos are ordinary (here traced) leaves. The
kernel still applies `SegmentIds` to every element of a computed tile, so the block mask only has
to be a superset of the tiles that hold a same-segment pair: every non-empty tile is marked
"full" (2) and no partial mask blocks are needed.

Which tiles: for each block, the [min, max] range of its non-zero segment ids and whether it holds
padding (id 0). A tile is computed when the two ranges overlap or both blocks hold padding. That
is always a superset of the true tiles (a shared id lies in both ranges), so results are right for
any ids; it is exact when the non-zero ids never decrease along the sequence, which is how the
packer lays them out (1,1,2,2,2,3,...,0,0), wherever the padding sits. Padding is its own segment
here, as in `xla_attention`: padding tokens attend to padding, so every query row has a key and no
row ends up with an empty softmax (its outputs are ignored anyway).

A query row with no valid key gets 0 from `xla_attention` but not from splash (the mean of the
masked values of the computed tiles, or NaN when no tile in its row is computed). Self-attention
never has such rows (a token always sees itself), which is the only place the model uses this
backend; cross-attention stays on the dense path.

Batch: each example has its own mask info, so the kernel is vmapped over the batch; Pallas batches
a kernel with per-example scalar-prefetch operands as a loop of per-example kernels. On a mesh
the kernel runs inside shard_map over batch and heads (XLA cannot partition a Pallas kernel); a
pack's tokens cannot be split, which is what the `context` backend is for.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi
from jax.sharding import Mesh, PartitionSpec

from jaxsora.sharding import active_mesh, logical_to_mesh

# Splash tiles hold whole vregs: the kv block is the lane axis, q the sublane one (x 128 for the
# segment-id layout the kernel uses).
_LANES = 128


def splash_block_mask(
    seg_q_BL: jax.Array, seg_kv_BM: jax.Array, block_q: int = 128, block_kv: int = 128
) -> jax.Array:
    """bool [B, L // block_q, M // block_kv]: the tiles splash will compute for these packs."""
    B, L = seg_q_BL.shape
    M = seg_kv_BM.shape[1]
    _check_lengths(L, M, block_q, block_kv)
    lo_q, hi_q, pad_q = _block_ranges(seg_q_BL, block_q)
    lo_k, hi_k, pad_k = _block_ranges(seg_kv_BM, block_kv)
    overlap = (lo_q[:, :, None] <= hi_k[:, None, :]) & (lo_k[:, None, :] <= hi_q[:, :, None])
    return overlap | (pad_q[:, :, None] & pad_k[:, None, :])


def computed_tiles(
    seg_q_BL: jax.Array, seg_kv_BM: jax.Array, block_q: int = 128, block_kv: int = 128
) -> int:
    """How many (q-block, kv-block) tiles the kernel computes per head, summed over the batch."""
    return int(jnp.sum(splash_block_mask(seg_q_BL, seg_kv_BM, block_q, block_kv)))


def splash_attention(
    q_BLHK: jax.Array,
    k_BMHK: jax.Array,
    v_BMHK: jax.Array,
    seg_q_BL: jax.Array,
    seg_kv_BM: jax.Array,
    *,
    block_q: int = 128,
    block_kv: int = 128,
) -> jax.Array:
    """Segment-masked attention [B, L, H, K], numerically `xla_attention` on self-attention.

    Runs natively on TPU and in the Pallas interpreter elsewhere (tests on CPU). Under
    `jaxsora.sharding.activation_sharding` it runs inside `shard_map` over the batch and head
    axes, since XLA cannot partition a Pallas kernel by itself.
    """
    _check_lengths(q_BLHK.shape[1], k_BMHK.shape[1], block_q, block_kv)
    plan = _shard_plan(q_BLHK.shape[0], q_BLHK.shape[2])
    return _splash_jit(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM, block_q, block_kv, plan)


# The mesh plan is a static argument: the active mesh is Python state read at trace time, and a
# jit cache keyed on shapes alone would reuse an unsharded trace under a mesh (or the reverse).
@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _splash_jit(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM, block_q, block_kv, plan):
    def local(q, k, v, seg_q, seg_kv):
        tiles = splash_block_mask(seg_q, seg_kv, block_q, block_kv)
        return _splash_on_tiles(q, k, v, seg_q, seg_kv, tiles, block_q, block_kv)

    if plan is None:
        return local(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM)
    mesh, qkv_spec, seg_spec = plan
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,  # pallas_call has no replication rule
    )(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM)


def _shard_plan(B: int, H: int) -> tuple[Mesh, PartitionSpec, PartitionSpec] | None:
    """shard_map specs from the active mesh and rules; None off-mesh or on a single device.

    Batch and heads split as the rules say when the mesh divides them (else they stay whole, as
    `jaxsora.sharding.constrain` leaves them); the token axis cannot be split: every query needs
    every key of its pack on the same device.
    """
    active = active_mesh()
    if active is None or active[0].size == 1:
        return None
    mesh, rules = active
    batch, length, heads, _ = logical_to_mesh(("batch", "length", "heads", "kv"), rules)
    if _size(mesh, length) > 1:
        raise ValueError(
            f"model.attention='splash' cannot split a pack's tokens over {length!r} "
            f"(mesh size {_size(mesh, length)}): use model.attention='context' for packs split "
            "over the context axis"
        )
    batch = batch if B % _size(mesh, batch) == 0 else None
    heads = heads if H % _size(mesh, heads) == 0 else None
    return mesh, PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)


def _size(mesh: Mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
    return math.prod(mesh.shape[a] for a in names)


def _splash_on_tiles(q_BLHK, k_BMHK, v_BMHK, seg_q_BL, seg_kv_BM, tiles_BQK, block_q, block_kv):
    """The kernel on the given tiles only (tests pass wrong tiles to see that skipping is real)."""
    K = q_BLHK.shape[-1]
    # The kernel does not scale the logits; scale q like MaxText does (in q's dtype).
    q_BHLK = (q_BLHK * K**-0.5).astype(q_BLHK.dtype).transpose(0, 2, 1, 3)
    k_BHMK = k_BMHK.transpose(0, 2, 1, 3)
    v_BHMK = v_BMHK.transpose(0, 2, 1, 3)
    run = functools.partial(
        _splash_one, block_q=block_q, block_kv=block_kv, interpret=_interpret_mode()
    )
    o_BHLK = jax.vmap(run)(q_BHLK, k_BHMK, v_BHMK, seg_q_BL, seg_kv_BM, tiles_BQK)
    return o_BHLK.transpose(0, 2, 1, 3)


def _splash_one(q_HLK, k_HMK, v_HMK, seg_q_L, seg_kv_M, tiles_QK, *, block_q, block_kv, interpret):
    """One example: its own MaskInfo (traced), the stock kernel around it."""
    fwd = _mask_info(tiles_QK, dkv=False)
    sizes = sk.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = sk.SplashAttentionKernel(
        fwd,
        fwd,  # the dq kernel walks tiles in the forward order with the same blocks
        _mask_info(tiles_QK, dkv=True),
        block_sizes=sizes,
        is_mqa=False,
        save_residuals=False,
        mask_value=sk.DEFAULT_MASK_VALUE,
        attn_logits_soft_cap=None,
        residual_checkpoint_name=None,
        mask_function=None,
        interpret=interpret,
    )
    segment_ids = sk.SegmentIds(q=seg_q_L.astype(jnp.int32), kv=seg_kv_M.astype(jnp.int32))
    return kernel(q_HLK, k_HMK, v_HMK, segment_ids=segment_ids)


def _mask_info(tiles_QK: jax.Array, *, dkv: bool) -> mi.MaskInfo:
    """MaskInfo for one head-independent block mask, in the unshrunk [1, n_q, n_kv] layout.

    The forward and dq kernels walk tiles q-block-major and fetch the kv block `data_next` names;
    the dkv kernel walks kv-block-major and fetches the q block. A skipped tile names the next
    computed one in walking order (wrapping around), as the static builder does, so the kernel
    prefetches it early and the skipped steps issue no copies.
    """
    nq, nkv = tiles_QK.shape
    walk = tiles_QK.T if dkv else tiles_QK
    flat = walk.reshape(-1)
    n = flat.size
    idx = jnp.arange(n, dtype=jnp.int32)
    nxt = jax.lax.cummin(jnp.where(flat, idx, n), reverse=True)
    nxt = jnp.where(nxt == n, nxt[0], nxt)  # past the last computed tile: wrap to the first
    nxt = jnp.where(nxt == n, 0, nxt)  # nothing computed at all: any valid block
    data_next = (nxt % nq).reshape(nkv, nq).T if dkv else (nxt % nkv).reshape(nq, nkv)
    block_mask = jnp.where(tiles_QK, 2, 0).astype(jnp.int8)
    return mi.MaskInfo(
        data_next=data_next.astype(_smem_dtype(max(nq, nkv)))[None],
        mask_next=None,
        block_mask=block_mask[None],
        partial_mask_blocks=None,
        q_sequence=None,
    )


def _smem_dtype(n: int):
    """Smallest integer type for block indices: they live in scarce TPU scalar memory."""
    return np.int8 if n <= np.iinfo(np.int8).max else np.int16 if n <= 32767 else np.int32


def _block_ranges(seg_BL: jax.Array, block: int):
    """Per block: min and max of the non-zero ids (empty range if none), and whether 0 occurs."""
    B, L = seg_BL.shape
    s = seg_BL.reshape(B, L // block, block).astype(jnp.int32)
    real = s != 0
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    lo = jnp.min(jnp.where(real, s, big), axis=-1)
    hi = jnp.max(jnp.where(real, s, small), axis=-1)
    return lo, hi, jnp.any(~real, axis=-1)


def _check_lengths(L: int, M: int, block_q: int, block_kv: int) -> None:
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block % _LANES:
            raise ValueError(f"splash attention: {name}={block} must be a multiple of {_LANES}")
    for what, n, name, block in (
        ("query", L, "block_q", block_q),
        ("key", M, "block_kv", block_kv),
    ):
        if n % block:
            raise ValueError(
                f"splash attention needs the {what} length ({n} tokens) to be a multiple of "
                f"{name}={block}: set config data.seq_len to a multiple of {block} "
                f"(e.g. {-(-n // block) * block}) or use model.attention='xla'"
            )


def _interpret_mode() -> bool:
    """Native on TPU; elsewhere (tests on CPU) Pallas's generic HLO interpreter.

    Not the TPU interpreter by default, although it simulates TPU memory more faithfully: its io
    callbacks are effects that `jax.checkpoint` (model.remat) rejects, and inside shard_map over
    several simulated CPU devices it hangs (jax 0.10.2). Tests opt into it for the kernel checks
    with `pltpu.force_tpu_interpret_mode()`, which overrides this choice.
    """
    return jax.default_backend() != "tpu"
