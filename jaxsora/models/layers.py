"""Building blocks shared by the DiT and its caption encoder, with logical axis names on weights.

Logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `patch`) say what an axis is; the config's
rules alone say which mesh axis, if any, it is sharded over (see jaxsora/sharding.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsora.models.attention import attention
from jaxsora.models.rope import apply_rope
from jaxsora.sharding import constrain


def dense(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    *,
    zero: bool = False,
    use_bias: bool = True,
) -> nnx.Linear:
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm in float32 (adaLN supplies the scale and shift).

    Its backward is written out (the textbook LayerNorm gradient from the normalised output and
    1/std): autodiff's version is a chain of small ops that XLA:CPU fuses into, and recomputes
    inside, every consumer of the residual stream's gradient; the explicit one made the default
    CPU train step about 15% faster (benchmarks/train_step.py)."""
    return _layer_norm_forward(x, eps)[0]


def _layer_norm_forward(x, eps):
    x32 = x.astype(jnp.float32)
    centered = x32 - x32.mean(-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
    y = centered * inv_std
    return y.astype(x.dtype), (y, inv_std)


def _layer_norm_backward(eps, residuals, dy):
    del eps
    y, inv_std = residuals
    dy32 = dy.astype(jnp.float32)
    mean_dy = dy32.mean(-1, keepdims=True)
    mean_dy_y = (dy32 * y).mean(-1, keepdims=True)
    return ((inv_std * (dy32 - mean_dy - y * mean_dy_y)).astype(dy.dtype),)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, names: tuple[str | None]):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=names)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis in float32, times a learned gain (QK-norm).

    Its backward is written out for the reason `layer_norm`'s is: autodiff's chain of small ops
    over every head of every token cost more than the attention scores' own elementwise work
    on a CPU (benchmarks/train_step.py)."""
    return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_forward(x, scale, eps):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    normed = x32 * inv_rms
    return (normed * scale).astype(x.dtype), (normed, inv_rms, scale)


def _rms_norm_backward(eps, residuals, dy):
    del eps
    normed, inv_rms, scale = residuals
    dy32 = dy.astype(jnp.float32)
    dscale = jnp.sum(dy32 * normed, axis=tuple(range(dy.ndim - 1)))
    g = dy32 * scale
    dx = inv_rms * (g - normed * jnp.mean(g * normed, -1, keepdims=True))
    return dx.astype(dy.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


class Attention(nnx.Module):
    """Multi-head attention with QK-norm (unless `qk_norm=False`, as in the original DiT); RoPE
    when angles are given (self-attention).

    `cross=True`: the keys are another sequence (captions) that every query needs whole, so
    their token axis is never split over `context`. Splitting it is also what made XLA (GSPMD
    and Shardy alike, jax 0.10) leave caption_proj's gradient un-reduced over `data` on data x
    context meshes; tests/test_sharding.py compares every gradient leaf on such a mesh.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        rngs: nnx.Rngs,
        dtype,
        backend: str,
        kv_width: int | None = None,
        cross: bool = False,
        qk_norm: bool = True,
    ):
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, width // num_heads, backend
        self.kv_names = ("batch", None if cross else "length", "heads", "kv")
        kv_width = kv_width or width
        self.q = dense(width, width, ("embed", "heads"), rngs, dtype)
        self.k = dense(kv_width, width, ("embed", "heads"), rngs, dtype)
        self.v = dense(kv_width, width, ("embed", "heads"), rngs, dtype)
        self.out = dense(width, width, ("heads", "embed"), rngs, dtype)
        self.q_norm = RMSNorm(self.head_dim, ("kv",)) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, ("kv",)) if qk_norm else None

    def __call__(
        self, x_BLD, kv_BMD, seg_q_BL, seg_kv_BM, angles_BLK2=None, window=None, block=None
    ):
        """`window`, `block`: for the `windowed` backend (jaxsora/models/windowed.py)."""
        B, L, _ = x_BLD.shape
        M = kv_BMD.shape[1]
        heads = ("batch", "length", "heads", "kv")
        q = self.q(x_BLD).reshape(B, L, self.num_heads, self.head_dim)
        k = self.k(kv_BMD).reshape(B, M, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = constrain(q, heads), constrain(k, self.kv_names)
        v = constrain(self.v(kv_BMD).reshape(B, M, self.num_heads, self.head_dim), self.kv_names)
        if angles_BLK2 is not None:
            q, k = apply_rope(q, angles_BLK2), apply_rope(k, angles_BLK2)
        o = attention(
            q, k, v, seg_q_BL, seg_kv_BM, backend=self.backend, window=window, block=block
        )
        return self.out(o.reshape(B, L, -1))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs, dtype):
        self.fc1 = dense(width, hidden, ("embed", "mlp"), rngs, dtype)
        self.fc2 = dense(hidden, width, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x):
        hidden = constrain(jax.nn.gelu(self.fc1(x), approximate=True), ("batch", "length", "mlp"))
        return self.fc2(hidden)
