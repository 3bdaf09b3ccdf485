"""Absolute 2D sin-cos position embeddings over (h, w) patch coordinates: the DiT paper's (from
MAE), for the original-DiT configuration (`DiTConfig.positions = "sincos"`).

The first half of the width encodes the column (w), the second the row (h), each as
[sin(p * omega), cos(p * omega)] with omega_i = 10000^(-i / (d / 2)): exactly the layout of DiT's
`get_2d_sincos_pos_embed` and diffusers' (whose meshgrid puts w first). Positions are each
example's own integer patch coordinates, so a packed image gets the same embedding as alone, at
any size (diffusers instead rescales positions when the input is not its `sample_size`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sincos_1d(pos: jax.Array, dim: int) -> jax.Array:
    """[...] positions -> [..., dim] features, sines then cosines."""
    omega = 1.0 / 10_000.0 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    angles = pos.astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sincos_2d(positions_BL3: jax.Array, dim: int) -> jax.Array:
    """[B, L, 3] (t, h, w) positions -> [B, L, dim]; the frame index is not encoded (DiT is an
    image model: the config allows one frame per example with these positions)."""
    if dim % 4:
        raise ValueError(f"model.width={dim} must be divisible by 4 for 2D sin-cos positions")
    h, w = positions_BL3[..., 1], positions_BL3[..., 2]
    return jnp.concatenate([sincos_1d(w, dim // 2), sincos_1d(h, dim // 2)], axis=-1)
