"""From decoded frames to one example's patches: temporal sampling, resizing to a token budget,
patchifying.

The rule for sizes (NaViT-style, no crops, no buckets): each example draws a token count in
`[min_tokens, max_tokens]`, and its frames are resized, keeping the aspect ratio, to the largest
patch grid `T' x H' x W'` within that count. A clip with more frames than `max_frames` is cut to
a window of `max_frames`; if even a 1x1-patch frame per time step is over budget, frames are
subsampled evenly until it fits. Nothing is dropped for being too big.
"""

from __future__ import annotations

import math

import einops
import numpy as np
from PIL import Image


def sample_window(
    num_frames: int, max_frames: int, stride: int, rng: np.random.Generator
) -> np.ndarray:
    """Frame indices of a random window of at most `max_frames` frames taken every `stride`."""
    span = (max_frames - 1) * stride + 1
    if num_frames <= span:
        return np.arange(0, num_frames, stride)
    start = int(rng.integers(0, num_frames - span + 1))
    return np.arange(start, start + span, stride)


def fit_grid(
    num_frames: int,
    height: int,
    width: int,
    patch: tuple[int, int, int],
    token_budget: int,
) -> tuple[int, int, int]:
    """The patch grid (T', H', W') for a clip: aspect ratio kept, T'*H'*W' <= token_budget."""
    pt, _, _ = patch
    t = max(1, num_frames // pt)
    if t > token_budget:  # not even one patch per time step fits: subsample time
        t = token_budget
    per_frame = token_budget / t
    aspect = width / height
    h = max(1, math.floor(math.sqrt(per_frame / aspect)))
    w = max(1, math.floor(h * aspect))
    while h * w > per_frame and (h > 1 or w > 1):  # rounding can overshoot by a patch
        # A side never shrinks below one patch: a frame far wider than tall (say 1 x 1000 px)
        # shrinks its width once its height is down to one patch.
        if (w >= h * aspect or h == 1) and w > 1:
            w -= 1
        else:
            h -= 1
    # Grow the side that is furthest below its ideal share while it still fits.
    while True:
        grow_w = (h * aspect) - w >= (w / aspect) - h
        h2, w2 = (h, w + 1) if grow_w else (h + 1, w)
        if h2 * w2 > per_frame:
            break
        h, w = h2, w2
    return t, h, w


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased resize of uint8 frames [T, H, W, 3] to [T, height, width, 3]."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(
            Image.fromarray(frame).resize(
                (width, height), Image.Resampling.BICUBIC, reducing_gap=None
            )
        )
    return out


def select_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over the clip (the first one always kept)."""
    if frames.shape[0] == count:
        return frames
    idx = np.round(np.linspace(0, frames.shape[0] - 1, count)).astype(int)
    return frames[idx]


def patchify(video: np.ndarray, patch: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """[T, H, W, C] -> patches [N, pt*ph*pw*C] and their (t, h, w) grid positions [N, 3]."""
    pt, ph, pw = patch
    T, H, W, _ = video.shape
    patches = einops.rearrange(
        video, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
    )
    grid = np.stack(
        np.meshgrid(np.arange(T // pt), np.arange(H // ph), np.arange(W // pw), indexing="ij"), -1
    )
    return patches.astype(np.float32), grid.reshape(-1, 3).astype(np.int32)


def unpatchify(
    patches: np.ndarray, grid: tuple[int, int, int], patch: tuple[int, int, int]
) -> np.ndarray:
    """Inverse of `patchify` for one example: [N, pt*ph*pw*C] -> [T, H, W, C]."""
    pt, ph, pw = patch
    t, h, w = grid
    return einops.rearrange(
        patches,
        "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
        t=t,
        h=h,
        w=w,
        pt=pt,
        ph=ph,
        pw=pw,
    )


def frames_to_grid(
    frames: np.ndarray,
    patch_pixels: tuple[int, int, int],
    token_budget: int,
) -> np.ndarray:
    """Cuts/subsamples and resizes frames so they patchify into a grid within the budget.

    `patch_pixels` is one patch's extent in pixels (latent patch x compression factors), so the
    result's sides are multiples of it.
    """
    pt, ph, pw = patch_pixels
    t, h, w = fit_grid(
        frames.shape[0], frames.shape[1], frames.shape[2], patch_pixels, token_budget
    )
    frames = select_frames(frames, min(frames.shape[0], t * pt))
    if frames.shape[0] < t * pt:  # fewer frames than one temporal patch: repeat the last one
        frames = np.concatenate([frames, np.repeat(frames[-1:], t * pt - frames.shape[0], 0)])
    return resize_frames(frames, h * ph, w * pw)
