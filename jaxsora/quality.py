"""Reconstruction quality: PSNR and SSIM in JAX, per example, for images and videos.

Both take `[B, T, H, W, C]` videos or `[B, H, W, C]` images (floats, channels last) and return
one number per example, so the VAE trainer can log them and use `1 - ssim` as a loss term, and
the evaluation can report them per clip. Pixels in this project are in [-1, 1], hence
`data_range=2.0` by default.

SSIM follows Wang et al. 2004 exactly as scikit-image computes it with
`structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=..., channel_axis=-1)`: an 11-tap Gaussian window (sigma 1.5), population
covariances, and the mean taken only where the whole window lies inside the frame (skimage
filters with reflected borders, then crops `(win - 1) // 2` pixels from every side, which is
exactly a 'VALID' convolution). A video's SSIM is the mean of its frames' SSIM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_PSNR_DB = 100.0  # PSNR of identical inputs: a large finite number instead of +inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape:
        raise ValueError(f"inputs must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim not in (4, 5):
        raise ValueError(
            f"inputs must be images [B, H, W, C] or videos [B, T, H, W, C], got shape {x.shape}"
        )


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Per-example PSNR in dB over all axes but the first: float32 [B].

    A perfect reconstruction (MSE 0) would be +inf and poison a mean over examples, so the MSE
    is floored at `data_range**2 * 1e-10`, which caps the result at `MAX_PSNR_DB` (100 dB) and
    keeps its gradient finite.
    """
    _check_pair(x, y)
    diff = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
    floor = data_range**2 * 10.0 ** (-MAX_PSNR_DB / 10.0)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, floor))


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side for a frame: 11, or for frames smaller than that, the smaller side
    rounded down to odd (skimage would refuse such frames; a tiny VAE test clip should still get
    a number). The Gaussian keeps sigma 1.5 and is truncated to the smaller window."""
    return min(SSIM_WINDOW, min(height, width) - (1 - min(height, width) % 2))


def gaussian_kernel(size: int, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1D Gaussian of odd `size` taps: the weights of scipy.ndimage's
    `gaussian_filter1d` (which skimage uses) for radius `(size - 1) // 2`."""
    r = np.arange(size, dtype=np.float64) - (size - 1) // 2
    k = np.exp(-0.5 * (r / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur_valid(maps: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Separable Gaussian blur of [N, H, W, C] maps, each channel on its own, 'VALID' borders.

    HIGHEST precision: on TPU the default convolution precision is bfloat16, which would cost
    SSIM about two decimal digits.
    """
    channels, k = maps.shape[-1], kernel.shape[0]
    dims = ("NHWC", "HWIO", "NHWC")
    for shape in ((k, 1, 1, channels), (1, k, 1, channels)):
        weights = jnp.broadcast_to(jnp.asarray(kernel).reshape(shape[:2] + (1, 1)), shape)
        maps = jax.lax.conv_general_dilated(
            maps,
            weights,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=dims,
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )
    return maps


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Per-example mean SSIM: float32 [B], differentiable (a loss term is `1 - ssim`).

    Each frame is scored on its own (2D Gaussian window, channels averaged), and a video's score
    is the mean over its frames, so a clip and the same frames as images agree.
    """
    _check_pair(x, y)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    batch = x.shape[0]
    h, w, c = x.shape[-3:]
    x = x.reshape(-1, h, w, c)  # frames of all examples: [B*T, H, W, C]
    y = y.reshape(-1, h, w, c)
    kernel = gaussian_kernel(ssim_window(h, w))

    # One depthwise blur over the five maps the statistics need.
    moments = _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), kernel)
    ux, uy, uxx, uyy, uxy = jnp.split(moments, 5, axis=-1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_frame = jnp.mean(s, axis=(1, 2, 3))
    return jnp.mean(per_frame.reshape(batch, -1), axis=1)
