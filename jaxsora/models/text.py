"""The DiT's caption encoder: each segment's caption -> tokens for cross-attention and one pooled
vector for adaLN.

Two inputs, one module:
- `hashed` captions (ids of jaxsora/models/tokenizer.py): token embeddings, learned positions
  and a few bidirectional layers, all trained with the DiT.
- embeddings of a frozen pretrained encoder (MiniLM, T5: jaxsora/text/), [B, S, Lt, Dt]: a
  trained projection to the caption width and the same trained layers on top (PixArt's and
  Open-Sora's caption embedder), so the frozen features are adapted, never changed.

A caption whose mask is all False is the null caption (classifier-free guidance, and empty
segments): hashed ids read it as the start token alone, embeddings as one learned null token
(PixArt's `y_embedding`). Either way cross-attention always has a key.

Each segment's caption is encoded on its own ([B, S, Lt] -> [B*S, Lt]); the output feeds
cross-attention (every token), and its masked mean conditions adaLN (one vector per segment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsora.models.layers import Attention, Mlp, dense, layer_norm
from jaxsora.models.tokenizer import START_ID


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
        embed_dim: int = 0,
    ):
        """`embed_dim` > 0: the input is a frozen encoder's embeddings of that width."""
        self.embed_dim = embed_dim
        if embed_dim:
            self.project = dense(embed_dim, width, (None, "embed"), rngs, dtype)
            self.null = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (embed_dim,)), out_sharding=(None,)
            )
        else:
            self.embed = nnx.Embed(
                vocab,
                width,
                embedding_init=nnx.with_partitioning(
                    nnx.initializers.normal(0.02), ("vocab", "embed")
                ),
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
            self.pos = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (text_len, width)),
                out_sharding=(None, "embed"),
            )
        self.layers = nnx.List(
            [CaptionLayer(width, num_heads, rngs, dtype, backend) for _ in range(depth)]
        )

    def __call__(self, text_BSL, mask_BSL):
        """Ids [B, S, Lt] or embeddings [B, S, Lt, Dt] -> tokens [B, S, Lt, D], pooled [B, S, D]
        (masked mean), and the mask the tokens were read with (the null caption's one token)."""
        B, S, Lt = mask_BSL.shape
        mask = mask_BSL.reshape(B * S, Lt)
        null = (~mask.any(-1, keepdims=True)) & (jnp.arange(Lt) == 0)  # [B*S, Lt]
        mask = mask | null
        if self.embed_dim:
            emb = text_BSL.reshape(B * S, Lt, self.embed_dim).astype(jnp.float32)
            emb = jnp.where(null[..., None], self.null[...], emb)
            x = self.project(emb.astype(self.project.dtype))
        else:
            ids = jnp.where(null, START_ID, text_BSL.reshape(B * S, Lt))
            x = self.embed(ids) + self.pos[:Lt].astype(self.embed.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        x = layer_norm(x)
        w = mask[..., None].astype(jnp.float32)
        pooled = (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return (
            x.reshape(B, S, Lt, -1),
            pooled.reshape(B, S, -1).astype(x.dtype),
            mask.reshape(B, S, Lt),
        )
