"""Segment-masked attention behind one function; the backend is a config choice.

A query attends to a key only when both carry the same segment id, so examples packed together
never see each other. Queries whose segment has no key at all (possible in cross-attention from
padding) get a zero output rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "windowed", "splash", "context", "ring")


def attention(
    q_BLHK: jax.Array,
    k_BMHK: jax.Array,
    v_BMHK: jax.Array,
    segment_ids_q_BL: jax.Array,
    segment_ids_kv_BM: jax.Array,
    *,
    backend: str = "xla",
    window: int | None = None,
    block: int | None = None,
) -> jax.Array:
    """`window`, `block`: the `windowed` backend's keys and queries per block (None: dense)."""
    if backend == "xla":
        return xla_attention(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)
    if backend == "windowed":
        from jaxsora.models import windowed

        return windowed.windowed_attention(
            q_BLHK,
            k_BMHK,
            v_BMHK,
            segment_ids_q_BL,
            segment_ids_kv_BM,
            window=window or k_BMHK.shape[1],
            block=block or windowed.DEFAULT_BLOCK,
        )
    if backend == "splash":
        from jaxsora.models.splash import splash_attention

        return splash_attention(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)
    if backend == "context":
        from jaxsora.models.context_parallel import context_parallel_attention

        return context_parallel_attention(
            q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM
        )
    if backend == "ring":
        from jaxsora.models.context_parallel import ring_attention

        return ring_attention(q_BLHK, k_BMHK, v_BMHK, segment_ids_q_BL, segment_ids_kv_BM)
    raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")


def xla_attention(q, k, v, seg_q, seg_kv):
    """Dense scores, then the segment mask; softmax in float32."""
    scale = q.shape[-1] ** -0.5
    scores_BHLM = jnp.einsum("blhk,bmhk->bhlm", q, k, preferred_element_type=jnp.float32) * scale
    mask_B1LM = (seg_q[:, :, None] == seg_kv[:, None, :])[:, None]
    scores_BHLM = jnp.where(mask_B1LM, scores_BHLM, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BHLM, axis=-1)
    # Only cross-attention can leave a query row with no key; self-attention (the same segment-id
    # array on both sides) always has the token itself, so it skips this pass over the scores.
    if seg_q is not seg_kv:
        probs = jnp.where(mask_B1LM.any(axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bhlm,bmhk->blhk", probs.astype(v.dtype), v)
