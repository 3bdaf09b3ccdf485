"""Images and videos -> the conditioning frames of a sampling request.

Every mode (animate an image, extend a video forward or backward, connect two videos, loop,
SDEdit) is one pixel canvas at the request's size, `[T, H, W, 3]` uint8, and a mask `[T]` of
the frames that are known. Unknown frames hold the nearest known frame (so a causal VAE encodes
a plausible clip around the known ones). The sampler encodes the canvas with the compression
stage and holds every token whose frames are all known at its clean value (`token_cond`):

  image      frame 0 is the image
  extend     forward: the first K frames are the video's last K; backward: the last K are its
             first K (K = context_frames, default half the request's frames, at least 1)
  connect    the first K frames are A's last K, the last K are B's first K
  loop       the first frame (the image, or the first frame of `extend`'s video, or one the
             sampler generates first) is known at frame 0 and at the last frame
  edit       SDEdit: every frame is the video's (its first T frames, the last one held if it is
             shorter); nothing is held, the sampler starts from the canvas noised to `strength`

Sources are cropped to the request's aspect ratio: resized to cover height x width (aspect kept),
then centre-cropped. A file is read as an image when its extension is an image's, else as a
video; only the frames a mode uses are decoded (`decode_video_window`). A file that cannot be
decoded raises BadMediaError naming it.

With a causal VAE a latent frame is one pixel frame (frame 0) or four, and it is held only when
all of its pixel frames are known: K context frames hold 1 + (K-1)//4 latent frames at the start.
A loop's end is widened to the whole last latent frame (its last 4 pixel frames show the first
frame), since one pixel frame alone cannot be held there.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxsora.data import media, video

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_STRENGTH = 0.7


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A request's pixel canvas: `frames` [T, H, W, 3] uint8 and which of them are `known`.

    `edit` canvases are SDEdit sources (all frames known, none held); `loop` canvases hold
    their first frame at the end too.
    """

    frames: np.ndarray
    known: np.ndarray
    edit: bool = False
    loop: bool = False


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS


def read_frames(path: str, pick: str, count: int) -> np.ndarray:
    """uint8 [n, H, W, 3] of a file: its first `count` frames (`pick="first"`), its last
    (`"last"`), or exactly `count` from the start with the last frame held (`"hold"`). An image
    is a one-frame video."""
    with open(path, "rb") as f:
        data = f.read()
    if is_image_path(path):
        frames = media.check_frames(media.decode_image_bytes(data, path), path)
        return frames if pick != "hold" else np.repeat(frames, count, axis=0)

    def window(n: int) -> np.ndarray:
        if pick == "first":
            return np.arange(min(count, n))
        if pick == "last":
            return np.arange(max(0, n - count), n)
        return np.minimum(np.arange(count), n - 1)

    return media.check_frames(media.decode_video_window(data, path, window), path)


def resize_cover(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resized (aspect kept) to cover height x width, then centre-cropped to it."""
    _, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    frames = video.resize_frames(frames, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def fill_unknown(frames: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Unknown frames take the nearest known frame (ties: the earlier one)."""
    idx = np.flatnonzero(known)
    if idx.size == 0:
        return frames
    t = np.arange(len(known))
    nearest = idx[np.argmin(np.abs(t[:, None] - idx[None, :]), axis=1)]
    return frames[nearest]


def default_context_frames(frames: int, connect: bool = False) -> int:
    """Half the request's frames (a quarter on each side for connect), at least 1."""
    return max(1, frames // (4 if connect else 2))


def build_canvas(req, first_frame: np.ndarray | None = None) -> Canvas | None:
    """The canvas of a request (a `jaxsora.sample.Request`), or None for plain text-to-video.

    `first_frame` [H, W, 3] uint8 is the loop frame of a loop without a source (the image the
    sampler generated for it first).
    """
    T, H, W = req.frames, req.height, req.width
    canvas = np.zeros((T, H, W, 3), np.uint8)
    known = np.zeros((T,), bool)

    def place(start: int, frames: np.ndarray) -> None:
        frames = resize_cover(frames, H, W)
        canvas[start : start + len(frames)] = frames
        known[start : start + len(frames)] = True

    if req.edit:
        return Canvas(resize_cover(read_frames(req.edit, "hold", T), H, W), np.ones(T, bool), True)
    if req.loop:
        if req.image:
            first = read_frames(req.image, "first", 1)[:1]
        elif req.extend:
            first = read_frames(req.extend, "first", 1)[:1]
        elif first_frame is not None:
            first = np.asarray(first_frame, np.uint8)[None]
        else:
            return None  # the sampler generates the first frame, then calls again
        place(0, first)
        place(T - 1, first)
        return Canvas(fill_unknown(canvas, known), known, loop=True)
    if req.image:
        place(0, read_frames(req.image, "first", 1)[:1])
    elif req.extend:
        k = min(T, req.context_frames or default_context_frames(T))
        if req.direction == "backward":
            frames = read_frames(req.extend, "first", k)
            place(T - len(frames), frames)
        else:
            place(0, read_frames(req.extend, "last", k))
    elif req.connect:
        k = min(T // 2, req.context_frames or default_context_frames(T, connect=True))
        place(0, read_frames(req.connect[0], "last", k))
        frames = read_frames(req.connect[1], "first", k)
        place(T - len(frames), frames)
    else:
        return None
    return Canvas(fill_unknown(canvas, known), known)


def for_stage(canvas: Canvas, temporal_factor: int, causal: bool) -> Canvas:
    """A loop's end widened to the whole last latent frame of a causal VAE (see the module)."""
    if not (canvas.loop and causal and temporal_factor > 1):
        return canvas
    frames, known = canvas.frames.copy(), canvas.known.copy()
    tail = min(temporal_factor, len(known) - 1)
    frames[-tail:] = frames[0]
    known[-tail:] = True
    return dataclasses.replace(canvas, frames=frames, known=known)


def latent_known(known: np.ndarray, temporal_factor: int, causal: bool) -> np.ndarray:
    """Pixel frames known [T] -> latent frames known [T']: a latent frame is known when all of
    its pixel frames are (causal: latent 0 = pixel 0, latent j >= 1 = pixels 4j-3..4j)."""
    tf = temporal_factor
    if causal:
        rest = known[1:].reshape(-1, tf).all(axis=1) if len(known) > 1 else np.zeros(0, bool)
        return np.concatenate([known[:1], rest])
    return known.reshape(-1, tf).all(axis=1)


def token_cond(
    canvas: Canvas | None,
    positions: np.ndarray,
    patch_t: int,
    temporal_factor: int,
    causal: bool,
) -> np.ndarray:
    """[N] bool: the patches held as conditioning, from each one's temporal position."""
    if canvas is None or canvas.edit:
        return np.zeros((len(positions),), bool)
    lat = latent_known(canvas.known, temporal_factor, causal)
    patch_known = lat.reshape(-1, patch_t).all(axis=1)
    return patch_known[positions[:, 0]]
