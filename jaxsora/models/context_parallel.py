"""Context parallelism: self-attention over packs whose tokens are split over the `context` axis.

A pack too long for one device has its length axis sharded over the mesh axis `context` (logical
rule `length -> context`). Everything in a DiT block except attention is token-wise, so only
attention needs to talk across that axis. Two ways, both inside `jax.shard_map` and both
differentiable (the transpose of all_to_all is all_to_all, of ppermute the reverse ppermute):

  all-to-all (DeepSpeed-Ulysses, `context_parallel_attention`, the `context` backend): trade the
    length split for a head split, attend over the whole pack for H/c heads with the ordinary
    dense masked attention, trade back. Two collectives per call whose volume does not grow with
    the context size; needs (heads per tensor shard) % context == 0.
  ring (`ring_attention`): keys and values travel around the context ring in c steps while each
    device keeps its queries and an online softmax. No constraint on heads and never holds more
    than L/c keys, at the price of c sequential steps.

Segment ids make packing safe across shards: a query only sees keys with its own segment id,
whichever device they started on, so a clip split over two devices is still one example.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxsora.models.attention import xla_attention
from jaxsora.sharding import active_mesh, logical_to_mesh

CONTEXT = "context"
QKV_NAMES = ("batch", "length", "heads", "kv")
SEG_NAMES = ("batch", "length")


def context_parallel_attention(
    q_BLHK: jax.Array,
    k_BMHK: jax.Array,
    v_BMHK: jax.Array,
    segment_ids_q_BL: jax.Array,
    segment_ids_kv_BM: jax.Array,
) -> jax.Array:
    """All-to-all (Ulysses) attention over `context`; plain `xla_attention` when unsplit.

    Same contract as `xla_attention`: [B, L, H, K] out, attention only within a segment id,
    zeros for a query whose segment has no key.
    """
    plan = _plan(q_BLHK, k_BMHK)
    if plan is None:
        return xla_attention(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)
    mesh, qkv_spec, seg_spec, context, heads_local = plan
    if heads_local % context:
        heads = q_BLHK.shape[2]
        raise ValueError(
            f"model.num_heads={heads} ({heads_local} per tensor shard) is not divisible by "
            f"mesh.context={context}: all-to-all context parallelism gives every context device "
            f"whole heads. Use a model.num_heads that is a multiple of "
            f"{context * heads // heads_local} (mesh.context x mesh.tensor), or a smaller "
            "mesh.context"
        )

    def local(q, k, v, seg_q, seg_kv):
        # [b, L/c, h, K] -> [b, L, h/c, K]: every device now holds whole packs for some heads.
        q, k, v = (
            jax.lax.all_to_all(x, CONTEXT, split_axis=2, concat_axis=1, tiled=True)
            for x in (q, k, v)
        )
        seg_q, seg_kv = (
            jax.lax.all_gather(s, CONTEXT, axis=1, tiled=True) for s in (seg_q, seg_kv)
        )
        o = xla_attention(q, k, v, seg_q, seg_kv)
        return jax.lax.all_to_all(o, CONTEXT, split_axis=1, concat_axis=2, tiled=True)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
        out_specs=qkv_spec,
    )(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)


def ring_attention(
    q_BLHK: jax.Array,
    k_BMHK: jax.Array,
    v_BMHK: jax.Array,
    segment_ids_q_BL: jax.Array,
    segment_ids_kv_BM: jax.Array,
) -> jax.Array:
    """Ring attention over `context`: k/v blocks go round the ring under an online softmax.

    Works for any head count; plain `xla_attention` when there is no split to undo.
    """
    plan = _plan(q_BLHK, k_BMHK)
    if plan is None:
        return xla_attention(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)
    mesh, qkv_spec, seg_spec, context, _ = plan
    return jax.shard_map(
        functools.partial(_ring_local, context=context),
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
        out_specs=qkv_spec,
    )(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)


def _ring_local(q, k, v, seg_q, seg_kv, *, context: int):
    """One device's queries against every key block in turn (flash-attention style update)."""
    scale = q.shape[-1] ** -0.5
    neg = jnp.finfo(jnp.float32).min
    b, lq, h, kd = q.shape
    # Running max, softmax denominator and unnormalised output, all float32.
    m_BHL = jnp.full((b, h, lq), neg, jnp.float32)
    l_BHL = jnp.zeros((b, h, lq), jnp.float32)
    acc_BLHK = jnp.zeros((b, lq, h, kd), jnp.float32)
    # Device i sends to i + 1, so at step s it holds the block that started on i - s.
    perm = [(i, (i + 1) % context) for i in range(context)]
    for step in range(context):
        s_BHLM = jnp.einsum("blhk,bmhk->bhlm", q, k, preferred_element_type=jnp.float32) * scale
        mask_B1LM = (seg_q[:, :, None] == seg_kv[:, None, :])[:, None]
        s_BHLM = jnp.where(mask_B1LM, s_BHLM, neg)
        m_new = jnp.maximum(m_BHL, s_BHLM.max(-1))
        # Masked scores are zeroed explicitly: a fully masked block must add nothing even
        # while the running max is still the `neg` sentinel (exp(neg - neg) would be 1).
        p_BHLM = jnp.where(mask_B1LM, jnp.exp(s_BHLM - m_new[..., None]), 0.0)
        corr_BHL = jnp.exp(m_BHL - m_new)
        l_BHL = corr_BHL * l_BHL + p_BHLM.sum(-1)
        pv_BLHK = jnp.einsum(
            "bhlm,bmhk->blhk", p_BHLM.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        acc_BLHK = corr_BHL.transpose(0, 2, 1)[..., None] * acc_BLHK + pv_BLHK
        m_BHL = m_new
        if step + 1 < context:
            k, v, seg_kv = (jax.lax.ppermute(x, CONTEXT, perm) for x in (k, v, seg_kv))
    l_BLH1 = l_BHL.transpose(0, 2, 1)[..., None]
    # A query with no key in its segment anywhere has l == 0: output 0, as xla_attention does.
    out = jnp.where(l_BLH1 > 0, acc_BLHK / jnp.where(l_BLH1 > 0, l_BLH1, 1.0), 0.0)
    return out.astype(q.dtype)


def _plan(
    q_BLHK: jax.Array, k_BMHK: jax.Array
) -> tuple[Mesh, PartitionSpec, PartitionSpec, int, int] | None:
    """Specs for the shard_map from the active mesh and rules; None when nothing is split.

    Nothing to do outside `activation_sharding`, on a mesh whose `context` axis has size 1, or
    under rules that do not put `length` on `context`. Batch and head axes whose mesh size does
    not divide the array stay unsharded, as `jaxsora.sharding.constrain` leaves them.
    """
    active = active_mesh()
    if active is None:
        return None
    mesh, rules = active
    context = int(mesh.shape.get(CONTEXT, 1))
    qkv_spec = logical_to_mesh(QKV_NAMES, rules)
    if context == 1 or CONTEXT not in _names(qkv_spec[1]):
        return None
    if _names(qkv_spec[1]) != (CONTEXT,):
        raise ValueError(
            f"config sharding_rules map 'length' to {qkv_spec[1]!r}; the context attention "
            f"backends split tokens over {CONTEXT!r} alone, so map 'length' to {CONTEXT!r}"
        )
    B, L, H, _ = q_BLHK.shape
    M = k_BMHK.shape[1]
    for what, n in (("query", L), ("key", M)):
        if n % _size(mesh, qkv_spec[1]):
            raise ValueError(
                f"{what} length {n} (config data.seq_len) is not divisible by "
                f"mesh.context={context}; make data.seq_len a multiple of it"
            )
    batch = qkv_spec[0] if B % _size(mesh, qkv_spec[0]) == 0 else None
    heads = qkv_spec[2] if H % _size(mesh, qkv_spec[2]) == 0 else None
    qkv_spec = PartitionSpec(batch, qkv_spec[1], heads, None)
    seg_spec = PartitionSpec(batch, qkv_spec[1])
    return mesh, qkv_spec, seg_spec, context, H // _size(mesh, heads)


def _names(axes) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else ((axes,) if axes else ())


def _size(mesh: Mesh, axes) -> int:
    return math.prod(int(mesh.shape[a]) for a in _names(axes))
