"""A small trainable caption encoder: token embeddings, a few bidirectional transformer layers.

Each segment's caption is encoded on its own ([B, S, Lt] -> [B*S, Lt]); the output feeds
cross-attention (every token), and its masked mean conditions adaLN (one vector per segment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsora.models.layers import Attention, Mlp, layer_norm


class CaptionLayer(nnx.Module):
    def __init__(self, width: int, num_heads: int, rngs: nnx.Rngs, dtype, backend: str):
        self.attn = Attention(width, num_heads, rngs, dtype, "xla")  # Lt tokens: dense is right
        self.mlp = Mlp(width, 4 * width, rngs, dtype)

    def __call__(self, x_NLD, valid_NL):
        seg = valid_NL.astype(jnp.int32)
        h = layer_norm(x_NLD)
        x_NLD = x_NLD + self.attn(h, h, seg, seg)
        return x_NLD + self.mlp(layer_norm(x_NLD))


class CaptionEncoder(nnx.Module):
    def __init__(
        self,
        vocab: int,
        text_len: int,
        width: int,
        depth: int,
        num_heads: int,
        rngs: nnx.Rngs,
        dtype,
        backend: str,
    ):
        self.embed = nnx.Embed(
            vocab,
            width,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.pos = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (text_len, width)), out_sharding=(None, "embed")
        )
        self.layers = nnx.List(
            [CaptionLayer(width, num_heads, rngs, dtype, backend) for _ in range(depth)]
        )

    def __call__(self, ids_BSL, mask_BSL):
        """-> tokens [B, S, Lt, D] and pooled [B, S, D] (masked mean)."""
        B, S, Lt = ids_BSL.shape
        ids, mask = ids_BSL.reshape(B * S, Lt), mask_BSL.reshape(B * S, Lt)
        x = self.embed(ids) + self.pos[:Lt].astype(self.embed.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        x = layer_norm(x)
        w = mask[..., None].astype(jnp.float32)
        pooled = (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return x.reshape(B, S, Lt, -1), pooled.reshape(B, S, -1).astype(x.dtype)
