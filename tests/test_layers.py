"""The hand-written backward passes of the shared layers equal autodiff of their plain formulas.

`layer_norm` and `rms_norm` carry custom VJPs for speed (jaxsora/models/layers.py); a wrong term
in one would train every model slightly wrong without failing any shape check, so each is held
to the gradient of the textbook formula on random inputs and random output weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsora.models.layers import layer_norm, rms_norm


def plain_layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def plain_rms_norm(x, scale, eps=1e-6):
    return x / jnp.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 * rng.standard_normal((2, 5, 3, 16)) + 0.5, jnp.float32)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # a loss with every term
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
    return x, weights, scale


def test_layer_norm_gradient_is_autodiffs(inputs):
    x, w, _ = inputs
    np.testing.assert_allclose(layer_norm(x), plain_layer_norm(x), atol=1e-5)
    got = jax.grad(lambda x: jnp.sum(layer_norm(x) * w))(x)
    want = jax.grad(lambda x: jnp.sum(plain_layer_norm(x) * w))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rms_norm_gradients_are_autodiffs(inputs):
    x, w, scale = inputs
    np.testing.assert_allclose(rms_norm(x, scale), plain_rms_norm(x, scale), atol=1e-5)
    got = jax.grad(lambda x, s: jnp.sum(rms_norm(x, s) * w), argnums=(0, 1))(x, scale)
    want = jax.grad(lambda x, s: jnp.sum(plain_rms_norm(x, s) * w), argnums=(0, 1))(x, scale)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
