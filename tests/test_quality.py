"""PSNR and SSIM agree with scikit-image, and behave as a loss needs (finite gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxsora import quality


def skimage_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """The reference: skimage in float64, Wang et al.'s settings."""
    return structural_similarity(
        x.astype(np.float64),
        y.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1,
    )


def image_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Random pairs (uncorrelated and noisy copies) and a real photo with noise, in [-1, 1]."""
    rng = np.random.default_rng(0)
    noise_x = rng.uniform(-1, 1, (2, 24, 40, 3))
    noisy = np.clip(noise_x + rng.normal(0, 0.2, noise_x.shape), -1, 1)
    photo = transform.resize(data.astronaut(), (64, 48), anti_aliasing=True) * 2 - 1
    photos = np.stack([photo, photo[::-1]])[:, :24, :40]
    degraded = np.clip(photos + rng.normal(0, 0.1, photos.shape), -1, 1)
    blurred = ndimage.gaussian_filter(photos, (0, 1, 1, 0))
    x = np.concatenate([noise_x, noise_x, photos, photos])
    y = np.concatenate([rng.uniform(-1, 1, noise_x.shape), noisy, degraded, blurred])
    return x.astype(np.float32), y.astype(np.float32)


def test_psnr_matches_skimage():
    x, y = image_pairs()
    ours = np.asarray(quality.psnr(x, y))
    pairs = zip(x.astype(np.float64), y, strict=True)
    ref = [peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in pairs]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_psnr_of_identical_inputs_is_capped_and_finite():
    x, _ = image_pairs()
    value = quality.psnr(x, x)
    np.testing.assert_allclose(np.asarray(value), quality.MAX_PSNR_DB, rtol=1e-6)
    grad = jax.grad(lambda a: quality.psnr(a, x).sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all()


def test_ssim_matches_skimage_on_random_and_real_images():
    x, y = image_pairs()
    ours = np.asarray(quality.ssim(x, y))
    ref = np.array([skimage_ssim(a, b) for a, b in zip(x, y, strict=True)])
    assert ref.min() < 0.1 and ref.max() > 0.8  # the pairs span bad to good reconstructions
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_ssim_matches_skimage_with_another_data_range():
    x, y = image_pairs()
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    ours = np.asarray(quality.ssim(x01, y01, data_range=1.0))
    ref = [skimage_ssim(a, b, data_range=1.0) for a, b in zip(x01, y01, strict=True)]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_ssim_of_identical_inputs_is_one():
    x, _ = image_pairs()
    np.testing.assert_allclose(np.asarray(quality.ssim(x, x)), 1.0, atol=1e-6)


def test_ssim_gradient_is_finite_and_points_towards_the_target():
    x, y = image_pairs()
    loss = lambda a: jnp.sum(1.0 - quality.ssim(a, jnp.asarray(x)))
    for start in (jnp.asarray(y), jnp.asarray(x)):  # far from, and exactly at, the target
        assert np.isfinite(np.asarray(jax.grad(loss)(start))).all()
    step = jnp.asarray(y) - 0.5 * jax.grad(loss)(jnp.asarray(y))
    assert loss(step) < loss(jnp.asarray(y))


def test_video_scores_are_the_mean_of_their_frames():
    x, y = image_pairs()  # 8 frames: 2 videos of 4 frames
    vx, vy = x.reshape(2, 4, *x.shape[1:]), y.reshape(2, 4, *y.shape[1:])
    frames = np.asarray(quality.ssim(x, y)).reshape(2, 4).mean(1)
    np.testing.assert_allclose(np.asarray(quality.ssim(vx, vy)), frames, atol=1e-6)
    mse = ((vx - vy) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(np.asarray(quality.psnr(vx, vy)), 10 * np.log10(4 / mse), atol=1e-4)


def test_small_frames_use_a_smaller_window():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    ref16 = [skimage_ssim(a, b) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(np.asarray(quality.ssim(x, y)), ref16, atol=1e-4, rtol=0)

    sides = (1, 2, 7, 8, 9, 10, 11, 40)
    assert [quality.ssim_window(s, s) for s in sides] == [1, 1, 7, 7, 9, 9, 11, 11]
    small_x, small_y = x[:, :8, :10], y[:, :8, :10]  # 8 px: a 7-tap window, sigma still 1.5
    win = quality.ssim_window(8, 10)
    assert win == 7
    blur = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=(win // 2) / 1.5)[3:-3, 3:-3]
    ref = []
    for a, b in zip(small_x.astype(np.float64), small_y.astype(np.float64), strict=True):
        per_channel = []
        for ch in range(3):
            p, q = a[..., ch], b[..., ch]
            ux, uy = blur(p), blur(q)
            vx, vy, vxy = blur(p * p) - ux**2, blur(q * q) - uy**2, blur(p * q) - ux * uy
            c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
            s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
            per_channel.append(s.mean())
        ref.append(np.mean(per_channel))
    np.testing.assert_allclose(np.asarray(quality.ssim(small_x, small_y)), ref, atol=1e-4)
    tiny = x[:, :2, :5]
    np.testing.assert_allclose(np.asarray(quality.ssim(tiny, tiny)), 1.0, atol=1e-6)
    assert np.isfinite(np.asarray(quality.ssim(tiny, y[:, :2, :5]))).all()


def test_mismatched_or_flat_inputs_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        quality.ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 17, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        quality.psnr(np.zeros((16, 16)), np.zeros((16, 16)))
