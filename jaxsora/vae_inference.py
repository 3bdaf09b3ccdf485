"""Memory-bounded VAE encode/decode: temporal chunks with the causal context carried, spatial tiles
with blended overlaps.

Peak memory is that of one (tile x chunk) call, whatever the clip's length or size; only the
output (on the host) grows. Chunking in time is exact: the causal context makes chunk-by-chunk
equal to the whole clip up to float rounding (tests/test_vae.py). Tiling in space is not exact:
each tile sees zeros beyond its border, so tiles overlap and are cross-faded there (linear ramps,
normalised weights); the test states the tolerance measured.

    codec = VaeCodec(model, chunk_latent_frames=2, tile_latent=(32, 32), tile_overlap=8)
    z = codec.encode(video_BTHWC)   # raw posterior mean
    x = codec.decode(z)             # pixels in [-1, 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsora.models.vae import BadShapeError, CausalContext, VideoVAE, check_pixel_shape


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Chunk and tile sizes in latent units. `tile_latent=None` means no spatial tiling."""

    chunk_latent_frames: int = 1
    tile_latent: tuple[int, int] | None = None
    tile_overlap: int = 4

    def __post_init__(self):
        if self.chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames={self.chunk_latent_frames} must be >= 1")
        if self.tile_latent is not None and min(self.tile_latent) <= self.tile_overlap:
            raise ValueError(
                f"tile_latent={self.tile_latent} must be larger than tile_overlap="
                f"{self.tile_overlap} in both dimensions"
            )


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles covering [0, size); the last one is moved back to end at the
    edge (so every tile has one shape and compiles once)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def blend_weights(size: int, start: int, tile: int, total: int, overlap: int) -> np.ndarray:
    """1D weights of one tile: a linear ramp over the overlap on sides that have a neighbour."""
    w = np.ones(tile, np.float32)
    ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
    if start > 0:
        w[:overlap] = np.minimum(w[:overlap], ramp)
    if start + tile < total:
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w[:size]


class VaeCodec:
    """A VAE for inference: one jitted function per chunk kind, reused for every chunk and tile."""

    def __init__(self, model: VideoVAE, tiling: Tiling = Tiling()):
        self.cfg, self.tiling = model.cfg, tiling
        graphdef, self.state = nnx.split(model)

        def encode_chunk(state, x, previous, first):
            ctx = CausalContext(previous, first)
            mean, _ = nnx.merge(graphdef, state).encode(x, ctx)
            return mean, ctx.carried

        def decode_chunk(state, z, previous, first):
            ctx = CausalContext(previous, first)
            x = nnx.merge(graphdef, state).decode(z, ctx)
            return jnp.clip(x, -1.0, 1.0), ctx.carried

        self._encode_chunk = jax.jit(encode_chunk, static_argnums=3)
        self._decode_chunk = jax.jit(decode_chunk, static_argnums=3)

    # -- time -------------------------------------------------------------------------------

    def _pixel_chunks(self, frames: int) -> Iterator[slice]:
        """Frame 0 alone, then `chunk_latent_frames` latent frames' worth of pixels at a time."""
        yield slice(0, 1)
        step = self.tiling.chunk_latent_frames * self.cfg.temporal_factor
        for start in range(1, frames, step):
            yield slice(start, min(start + step, frames))

    def _latent_chunks(self, latent_frames: int) -> Iterator[slice]:
        yield slice(0, 1)
        step = self.tiling.chunk_latent_frames
        for start in range(1, latent_frames, step):
            yield slice(start, min(start + step, latent_frames))

    def _run_chunks(self, fn: Callable, x: np.ndarray, chunks: Iterator[slice]) -> np.ndarray:
        outputs, previous = [], None
        for i, chunk in enumerate(chunks):
            out, previous = fn(self.state, jnp.asarray(x[:, chunk]), previous, i == 0)
            outputs.append(np.asarray(out))
        return np.concatenate(outputs, axis=1)

    # -- space ------------------------------------------------------------------------------

    def _tiled(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        x: np.ndarray,
        scale_in: int,
        scale_out: int,
        out_shape: tuple[int, ...],
    ) -> np.ndarray:
        """Applies `fn` on overlapping spatial tiles of x and cross-fades the results.

        Tiles are laid out in latent units; `scale_in`/`scale_out` convert to x's and the
        output's pixels (8/1 for encoding, 1/8 for decoding).
        """
        tile = self.tiling.tile_latent
        H, W = x.shape[2] // scale_in, x.shape[3] // scale_in
        if tile is None or (tile[0] >= H and tile[1] >= W):
            return fn(x)
        th, tw = min(tile[0], H), min(tile[1], W)
        ov = self.tiling.tile_overlap
        out = np.zeros(out_shape, np.float32)
        total = np.zeros(out_shape[2:4], np.float32)
        for y in tile_starts(H, th, ov):
            for x0 in tile_starts(W, tw, ov):
                piece = fn(
                    x[
                        :,
                        :,
                        y * scale_in : (y + th) * scale_in,
                        x0 * scale_in : (x0 + tw) * scale_in,
                    ]
                )
                wy = np.repeat(blend_weights(th, y, th, H, ov), scale_out)
                wx = np.repeat(blend_weights(tw, x0, tw, W, ov), scale_out)
                w = wy[:, None] * wx[None, :]
                ys = slice(y * scale_out, (y + th) * scale_out)
                xs = slice(x0 * scale_out, (x0 + tw) * scale_out)
                out[:, :, ys, xs] += piece * w[None, None, :, :, None]
                total[ys, xs] += w
        return out / total[None, None, :, :, None]

    # -- public -----------------------------------------------------------------------------

    def encode(self, video: np.ndarray) -> np.ndarray:
        """Posterior mean [B, T', H', W', z] (or [T', H', W', z] for an unbatched clip)."""
        video, unbatched = _as_batch(
            video, self.cfg.in_channels, "encode takes [B, T, H, W, {c}] pixels in [-1, 1]"
        )
        check_pixel_shape(self.cfg, *video.shape[1:4])
        B, T, H, W, _ = video.shape
        sf = self.cfg.spatial_factor
        out_shape = (B, *self.cfg.latent_shape(T, H, W)[:3], self.cfg.z_dim)
        z = self._tiled(
            lambda v: self._run_chunks(self._encode_chunk, v, self._pixel_chunks(T)),
            video,
            sf,
            1,
            out_shape,
        )
        return z[0] if unbatched else z

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Pixels in [-1, 1], [B, T, H, W, 3] (or unbatched, matching the input)."""
        z, unbatched = _as_batch(
            latents, self.cfg.z_dim, "decode takes [B, T', H', W', {c}] latents"
        )
        B, Tl, Hl, Wl, _ = z.shape
        sf = self.cfg.spatial_factor
        out_shape = (B, *self.cfg.pixel_shape(Tl, Hl, Wl), self.cfg.out_channels)
        x = self._tiled(
            lambda t: self._run_chunks(self._decode_chunk, t, self._latent_chunks(Tl)),
            z,
            1,
            sf,
            out_shape,
        )
        return x[0] if unbatched else x


def _as_batch(x, channels: int, expected: str) -> tuple[np.ndarray, bool]:
    """float32 [B, T, H, W, C] (a batch of one for an unbatched clip) and whether it was one."""
    x = np.asarray(x, np.float32)
    unbatched = x.ndim == 4
    if unbatched:
        x = x[None]
    if x.ndim != 5 or x.shape[-1] != channels:
        raise BadShapeError(f"VAE {expected.format(c=channels)}; got shape {x.shape}")
    return x, unbatched
