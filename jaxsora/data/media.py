"""Decode stored media into uint8 frames, and write generated clips for people to look at.

Every dataset record ends up as uint8 [T, H, W, 3] here, whichever builder wrote it, so the
input pipeline has one place that decides what a bad file is. Bad files raise `BadMediaError`
(a `ValueError`) naming the file, so the pipeline can skip them and the log says which to fix.
The training pipeline asks for one temporal window of a clip (`decode_example_window`), and only
that window is decoded: a minute of 1080p is ~11 GB as RGB frames, a 16-frame window ~100 MB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import av
import imageio.v3 as iio
import numpy as np
from PIL import Image

# Extensions `write_video_outputs` strips from `out_path`; anything else is part of the stem,
# so "samples/step_1.5" keeps its ".5".
_OUTPUT_EXTS = (".mp4", ".gif", ".png", ".webm", ".mov", ".mkv", ".avi", ".jpg", ".jpeg")
_SEPARATOR = 2  # px between frames on the contact sheet
_SHEET_COLS = 8


class BadMediaError(ValueError):
    """A media file that cannot become frames; the message names the file and the fix."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}; re-encode or remove the file")


@contextlib.contextmanager
def _video_errors(path: str) -> Iterator[None]:
    """PyAV's errors on bad bytes become one BadMediaError naming the file."""
    try:
        yield
    except BadMediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        # Random bytes raise InvalidDataError at open; a truncated file fails mid-stream.
        raise BadMediaError(path, f"cannot decode video ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _open_video(data: bytes, path: str) -> Iterator[tuple[Any, Any]]:
    """(container, first video stream) of in-memory video bytes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise BadMediaError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: ~2x faster on 2 cores
        yield container, stream


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    if not frames:
        raise BadMediaError(path, "video has no decodable frames")
    if len({f.shape for f in frames}) > 1:
        raise BadMediaError(path, "frame size changes mid-stream")
    return np.stack(frames)


def decode_video_bytes(data: bytes, path: str, max_frames: int | None = None) -> np.ndarray:
    """Decodes a whole video (or its first `max_frames`) to uint8 [T, H, W, 3] RGB."""
    if not data:
        raise BadMediaError(path, "empty file (0 bytes)")
    frames: list[np.ndarray] = []
    with _video_errors(path), _open_video(data, path) as (container, stream):
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return _stack(frames, path)


@dataclasses.dataclass(frozen=True)
class _Packet:
    """One frame as the container lists it, in decode order."""

    pts: int | None
    dts: int | None
    keyframe: bool


def _list_packets(data: bytes, path: str) -> list[_Packet]:
    """The video stream's frames from its packets alone: demuxing reads no pixels, so counting
    the frames of a long HD clip costs a fraction of decoding one."""
    with _open_video(data, path) as (container, stream):
        return [
            _Packet(p.pts, p.dts, bool(p.is_keyframe))
            for p in container.demux(stream)
            # Empty packets flush the demuxer; discarded ones (edit lists) yield no frame.
            if p.size > 0 and not p.is_discard
        ]


def _presentation_pts(packets: list[_Packet]) -> list[int] | None:
    """The pts of frame i for every i: a decoder outputs frames by increasing pts, so the i-th
    smallest is the i-th frame, B-frames and variable frame rates included. None when the
    timestamps cannot place every frame (one missing, or two frames sharing one)."""
    pts = [p.pts for p in packets]
    if any(t is None for t in pts) or len(set(pts)) != len(pts):
        return None
    return sorted(pts)


def _seek_target(packets: list[_Packet], wanted: set[int]) -> int | None:
    """A timestamp to seek to from which every wanted frame decodes exactly, or None for "the
    start". That is the last keyframe that comes before all wanted frames in decode order and
    is not shown after the first of them (its leading frames may lean on the GOP before it).
    The smaller of its pts and dts is returned: seeking lands on it, or, for a demuxer that
    seeks by the other timestamp, on an earlier keyframe, which is slower but still exact."""
    first_pts = min(wanted)
    first_pos = min(i for i, p in enumerate(packets) if p.pts in wanted)
    for pos in range(first_pos, 0, -1):  # position 0 is the start: no seek needed
        p = packets[pos]
        if p.keyframe and p.pts <= first_pts:
            return p.pts if p.dts is None else min(p.pts, p.dts)
    return None


def _decode_by_pts(
    data: bytes, path: str, packets: list[_Packet], pts_of: list[int], indices: np.ndarray
) -> list[np.ndarray] | None:
    """The frames at `indices`, seeking to the keyframe before them and stopping after the
    last one. None if the decoder does not hand out frame after frame in the order of
    `pts_of` (AVI, for one, stamps B-frames with their decode order): then the caller counts
    frames from the start instead."""
    slot = {pts_of[i]: k for k, i in enumerate(indices)}  # pts -> position in the window
    target = _seek_target(packets, set(slot))
    position = {t: i for i, t in enumerate(pts_of)}
    last = max(slot)
    frames: list[np.ndarray | None] = [None] * len(indices)
    expected = None  # the frame index the next decoded frame must have
    with _open_video(data, path) as (container, stream):
        if target is not None:
            try:
                container.seek(target, stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                return None  # a format that cannot seek
        for frame in container.decode(stream):
            index = position.get(frame.pts)
            if index is None or (expected is not None and index != expected):
                return None
            if expected is None and index > int(indices.min()):
                return None  # the seek went past the window
            if frame.pts in slot:
                frames[slot[frame.pts]] = frame.to_ndarray(format="rgb24")
            if frame.pts >= last:
                break
            expected = index + 1
    return frames if all(f is not None for f in frames) else None


def _decode_by_order(data: bytes, path: str, indices: np.ndarray, listed: int) -> list[np.ndarray]:
    """The frames at `indices` counting decoded frames from the start (what whole decoding
    does), keeping only those and stopping after the last one."""
    slot = {int(i): k for k, i in enumerate(indices)}
    frames: list[np.ndarray | None] = [None] * len(indices)
    decoded = 0
    with _open_video(data, path) as (container, stream):
        for frame in container.decode(stream):
            if decoded in slot:
                frames[slot[decoded]] = frame.to_ndarray(format="rgb24")
            decoded += 1
            if decoded > max(slot):
                break
    if decoded <= max(slot):
        raise BadMediaError(path, f"the container lists {listed} frames but only {decoded} decode")
    return frames


def decode_video_window(data: bytes, path: str, window: Callable[[int], np.ndarray]) -> np.ndarray:
    """The frames `window(num_frames)` picks, as uint8 [len(window), H, W, 3] RGB.

    Memory follows the window, not the file: the frames are counted from the container's
    packets without decoding, then decoding starts at the keyframe before the window and stops
    after its last frame. `window` is called once with the frame count (so a random window is
    drawn exactly as from a whole decode), and the frames are those whole decoding would give
    at the same indices.
    """
    if not data:
        raise BadMediaError(path, "empty file (0 bytes)")
    with _video_errors(path):
        packets = _list_packets(data, path)
        if not packets:
            raise BadMediaError(path, "video has no frames")
        # A window may repeat a frame (a short clip held on its last one): decode each once.
        indices, repeat = np.unique(
            np.asarray(window(len(packets)), dtype=np.int64), return_inverse=True
        )
        pts_of = _presentation_pts(packets)
        frames = None
        if pts_of is not None:
            frames = _decode_by_pts(data, path, packets, pts_of, indices)
        if frames is None:
            frames = _decode_by_order(data, path, indices, len(packets))
    return _stack(frames, path)[repeat.reshape(-1)]


def decode_image_bytes(data: bytes, path: str) -> np.ndarray:
    """Decodes an image to uint8 [1, H, W, 3] RGB: a photo is a one-frame video."""
    if not data:
        raise BadMediaError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and truncated-file errors are both OSErrors.
        raise BadMediaError(path, f"cannot decode image ({type(e).__name__}: {e})") from e
    return rgb[None]


def _text(value: Any) -> str:
    """TFDS `Text` features come back as bytes; tests and user code may pass str."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def check_frames(frames: np.ndarray, path: str) -> np.ndarray:
    """`frames` if the rest of the pipeline can resize and patchify them, else BadMediaError.

    The shape is checked here, explicitly, because a record with zero height or width would
    otherwise fail deep inside `make_example` (a division by zero), crashing the run instead of
    being skipped and counted like any other bad file.
    """
    if frames.dtype != np.uint8:
        raise BadMediaError(path, f"frames have dtype {frames.dtype}, expected uint8")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise BadMediaError(path, f"frames have shape {frames.shape}, expected [T>=1,H,W,3]")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise BadMediaError(path, f"frames have shape {frames.shape}: zero height or width")
    return frames


def _record_path(example: Mapping[str, Any]) -> str:
    return _text(example.get("path", b"<record without path>"))


def _media(example: Mapping[str, Any], path: str) -> tuple[str, bytes]:
    """(media_kind, raw bytes) of a record that stores its file undecoded."""
    if "media" not in example:
        raise BadMediaError(
            path, f"record has neither 'frames' nor 'media' (keys: {sorted(example)})"
        )
    data = example["media"]
    data = data.item() if isinstance(data, np.ndarray) else data
    kind = _text(example.get("media_kind", b""))
    if kind not in ("video", "image"):
        raise BadMediaError(path, f"unknown media_kind {kind!r}, expected 'video' or 'image'")
    return kind, bytes(data)


def decode_example(example: Mapping[str, Any], max_frames: int | None = None) -> np.ndarray:
    """Frames of one dataset record, from any builder in `data_pipelines`, as uint8 [T,H,W,3].

    Records either carry decoded `frames` (synthetic_clips, sample_media) or raw `media` bytes
    with a `media_kind` (video_folder), which are decoded here so that corrupt user files fail
    in the input pipeline, where they can be skipped, rather than while building the dataset.
    """
    path = _record_path(example)
    if "frames" in example:
        frames = check_frames(np.asarray(example["frames"]), path)
        return frames[:max_frames] if max_frames is not None else frames
    kind, data = _media(example, path)
    if kind == "video":
        return check_frames(decode_video_bytes(data, path, max_frames=max_frames), path)
    return check_frames(decode_image_bytes(data, path), path)


def decode_example_window(
    example: Mapping[str, Any], window: Callable[[int], np.ndarray]
) -> np.ndarray:
    """The frames of one record that `window(num_frames)` picks, as uint8 [len, H, W, 3].

    What `decode_example(example)[window(T)]` gives, without holding the whole clip: a video
    file is decoded only around the window (`decode_video_window`). `window` is called once.
    """
    path = _record_path(example)
    if "frames" in example:
        frames = check_frames(np.asarray(example["frames"]), path)
        return frames[window(frames.shape[0])]
    kind, data = _media(example, path)
    if kind == "video":
        return check_frames(decode_video_window(data, path, window), path)
    return check_frames(decode_image_bytes(data, path), path)[window(1)]


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be [T>=1, H, W, 3], got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        return np.round(np.clip(np.nan_to_num(frames), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")


def _upscale(frames: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour by an integer factor: a 32 px sample stays sharp, and H.264/yuv420p
    needs even sizes (an even factor makes any size even)."""
    _, h, w, _ = frames.shape
    k = max(1, math.ceil(min_side / min(h, w)))
    if (h * k) % 2 or (w * k) % 2:
        k += 1
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def _contact_sheet(frames: np.ndarray) -> np.ndarray:
    t, h, w, _ = frames.shape
    cols = min(t, _SHEET_COLS)
    rows = math.ceil(t / cols)
    sheet = np.full(
        (rows * h + (rows - 1) * _SEPARATOR, cols * w + (cols - 1) * _SEPARATOR, 3),
        255,
        dtype=np.uint8,
    )
    for i, frame in enumerate(frames):
        y, x = (i // cols) * (h + _SEPARATOR), (i % cols) * (w + _SEPARATOR)
        sheet[y : y + h, x : x + w] = frame
    return sheet


def _write_mp4(frames: np.ndarray, path: str, fps: int) -> None:
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}  # small clips: spend bits on quality
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed frames


def output_stem(out_path: str) -> str:
    """What `write_video_outputs` appends .mp4/.gif/.png to: the path less a media extension."""
    stem, ext = os.path.splitext(out_path)
    return stem if ext.lower() in _OUTPUT_EXTS else out_path


def write_video_outputs(
    frames: np.ndarray, out_path: str, fps: int = 8, min_side: int = 128
) -> dict[str, str]:
    """Writes `<stem>.mp4`, `<stem>.gif` and a `<stem>.png` contact sheet of `frames`.

    `frames` is uint8 or float in [0, 1], [T, H, W, 3]. Three formats because each fails a
    different reader: the mp4 for players and TensorBoard-free sharing, the gif for inline
    previews, the png to see every frame at once (and for single-frame samples).
    Returns {"mp4": path, "gif": path, "png": path}.
    """
    stem = output_stem(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    big = _upscale(_to_uint8(frames), min_side)
    paths = {"mp4": f"{stem}.mp4", "gif": f"{stem}.gif", "png": f"{stem}.png"}
    _write_mp4(big, paths["mp4"], fps)
    # Pillow's GIF writer merges identical consecutive frames (adding their durations).
    iio.imwrite(paths["gif"], big, extension=".gif", duration=1000 / fps, loop=0)
    Image.fromarray(_contact_sheet(big)).save(paths["png"])
    return paths
