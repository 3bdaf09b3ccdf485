"""3D rotary position embedding over (t, h, w) patch coordinates.

Each example's positions start at (0, 0, 0), so a clip means the same thing wherever it sits in
a pack, and any grid size the model was not trained on still gets well-defined positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs for (t, h, w): a quarter for time, the rest split between the two sides."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    pairs = head_dim // 2
    n_t = max(1, pairs // 4)
    n_h = (pairs - n_t) // 2
    return n_t, n_h, pairs - n_t - n_h


def rope_angles(positions_BL3: jax.Array, head_dim: int, theta: float = 10_000.0) -> jax.Array:
    """Rotation angles [B, L, head_dim // 2]."""
    parts = []
    for axis, n in enumerate(axis_pairs(head_dim)):
        freqs = theta ** (-jnp.arange(n, dtype=jnp.float32) / max(n, 1))
        parts.append(positions_BL3[..., axis : axis + 1].astype(jnp.float32) * freqs)
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x_BLHK: jax.Array, angles_BLK2: jax.Array) -> jax.Array:
    """Rotates consecutive halves (x1, x2) of each head by the angles, in float32."""
    x = x_BLHK.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos = jnp.cos(angles_BLK2)[:, :, None, :]
    sin = jnp.sin(angles_BLK2)[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BLHK.dtype)
