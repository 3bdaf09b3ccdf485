"""The VAE's training objective: L1 + (1 - SSIM) + KL, and an optional adversarial term.

Why SSIM and not a perceptual (LPIPS) term: LPIPS needs pretrained VGG/AlexNet weights, which this
project cannot download; SSIM needs no weights, is differentiable, rewards local structure (edges,
texture) that L1 alone blurs, and is one of the two numbers the evaluation reports. The optional
adversarial term (a small 3D PatchGAN with hinge loss, `loss.adversarial_weight > 0`) is the
usual remedy for remaining blur once reconstructions are close.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsora import quality


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(q(z|x) || N(0, I)) per latent element, averaged: independent of the clip's size."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reconstruction_terms(recon: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Mean L1 and mean SSIM (per frame, see jaxsora/quality.py) of a [B, T, H, W, 3] batch."""
    return {
        "l1": jnp.mean(jnp.abs(recon - target)),
        "ssim": jnp.mean(quality.ssim(recon, target)),
    }


class PatchDiscriminator(nnx.Module):
    """A few strided 3D convs to a map of real/fake logits (PatchGAN, as in VQGAN/MAGVIT)."""

    def __init__(self, width: int = 32, depth: int = 3, *, rngs: nnx.Rngs):
        layers, cin = [], 3
        for i in range(depth):
            cout = width * 2**i
            layers.append(
                nnx.Conv(cin, cout, (3, 4, 4), strides=(1, 2, 2), padding="SAME", rngs=rngs)
            )
            cin = cout
        self.layers = nnx.List(layers)
        self.head = nnx.Conv(cin, 1, (3, 3, 3), padding="SAME", rngs=rngs)

    def __call__(self, video_BTHWC: jax.Array) -> jax.Array:
        x = video_BTHWC
        for layer in self.layers:
            x = jax.nn.leaky_relu(layer(x), 0.2)
        return self.head(x)


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    return 0.5 * (real + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)


def adversarial_ramp(step: jax.Array, start: int) -> jax.Array:
    """0 before `start` (let reconstructions form first), then 1."""
    return (step >= start).astype(jnp.float32)
