"""The compression stage between pixels and the transformer's patches.

The DiT never sees pixels directly: it sees whatever `to_latents` returns, patchified. Today the
stage is the identity on pixels scaled to [-1, 1]; a video VAE (or latents cached on disk) drops
in behind the same three members, so the input pipeline and the sampler do not change.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """Pixels in [-1, 1]: no compression, one latent frame per frame, one latent per pixel."""

    channels: int = 3
    temporal_factor: int = 1
    spatial_factor: int = 1

    def to_latents(self, frames_uint8: np.ndarray) -> np.ndarray:
        return frames_uint8.astype(np.float32) / 127.5 - 1.0

    def to_pixels(self, latents: np.ndarray) -> np.ndarray:
        """Back to [0, 1] floats for writing images and videos."""
        return np.clip((np.asarray(latents, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def make_stage(name: str) -> PixelSpace:
    if name == "pixels":
        return PixelSpace()
    raise ValueError(
        f"config model.compression={name!r} is not a known compression stage; use 'pixels'"
    )
