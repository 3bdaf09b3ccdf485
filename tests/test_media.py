"""Media decoding and the mp4/gif/png sample writer."""

import io
import math
import os

import av
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from jaxsora.data.media import (
    BadMediaError,
    decode_example,
    decode_example_window,
    decode_image_bytes,
    decode_video_bytes,
    decode_video_window,
    write_video_outputs,
)


def _sheet_size(t, h, w, cols=8, sep=2):
    c = min(t, cols)
    r = math.ceil(t / c)
    return r * h + (r - 1) * sep, c * w + (c - 1) * sep


@pytest.mark.parametrize(
    "t,h,w,as_float,k",
    [
        (1, 17, 23, True, 8),  # ceil(128/17)=8, already even
        (11, 33, 21, False, 8),  # ceil(128/21)=7 gives odd 231 -> 8
    ],
)
def test_write_video_outputs(tmp_path, t, h, w, as_float, k):
    rng = np.random.default_rng(t)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    given = frames.astype(np.float32) / 255 if as_float else frames
    paths = write_video_outputs(given, str(tmp_path / "out" / "sample.mp4"), fps=8)
    stem = str(tmp_path / "out" / "sample")
    assert paths == {"mp4": stem + ".mp4", "gif": stem + ".gif", "png": stem + ".png"}
    big = frames.repeat(k, axis=1).repeat(k, axis=2)

    with open(paths["mp4"], "rb") as f:
        video = decode_video_bytes(f.read(), paths["mp4"])
    assert video.shape == (t, h * k, w * k, 3)
    assert video.shape[1] % 2 == 0 and video.shape[2] % 2 == 0 and min(video.shape[1:3]) >= 128
    # Blocky noise survives crf 18 roughly: far closer than unrelated noise (~85).
    assert np.abs(video.astype(int) - big).mean() < 30

    gif = iio.imread(paths["gif"], index=None)
    assert gif.shape[:3] == (t, h * k, w * k)

    sheet = np.asarray(Image.open(paths["png"]).convert("RGB"))
    assert sheet.shape[:2] == _sheet_size(t, h * k, w * k)
    np.testing.assert_array_equal(sheet[: h * k, : w * k], big[0])  # png is lossless
    if t > 1:  # second cell starts after a 2 px separator
        np.testing.assert_array_equal(sheet[: h * k, w * k + 2 : 2 * w * k + 2], big[1])


def test_output_stem_with_and_without_extension(tmp_path):
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    bare = write_video_outputs(frames, str(tmp_path / "a"))
    assert bare["gif"] == str(tmp_path / "a.gif")
    dotted = write_video_outputs(frames, str(tmp_path / "step_1.5"))
    assert dotted["png"] == str(tmp_path / "step_1.5.png")  # ".5" is not an extension
    assert all(os.path.getsize(p) > 0 for p in [*bare.values(), *dotted.values()])
    img = np.asarray(Image.open(bare["png"]))
    assert img.shape[:2] == (128, 258)  # upscaled x2, two cells


def test_decoders_and_errors():
    grey = Image.fromarray(np.arange(12 * 16, dtype=np.uint8).reshape(12, 16))
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    rgb = decode_image_bytes(buf.getvalue(), "grey.png")
    assert rgb.shape == (1, 12, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, ..., 0], rgb[0, ..., 2])

    for call in (
        lambda: decode_video_bytes(b"", "v/empty.mp4"),
        lambda: decode_video_bytes(b"\x00" * 500, "v/empty.mp4"),
        lambda: decode_image_bytes(b"not a png", "v/empty.mp4"),
        lambda: decode_example({"media": b"", "media_kind": b"image", "path": b"v/empty.mp4"}),
        lambda: decode_example({"media": b"x", "media_kind": b"gif", "path": b"v/empty.mp4"}),
        lambda: decode_example({"frames": np.zeros((2, 4, 4)), "path": b"v/empty.mp4"}),
        lambda: decode_example({"frames": np.zeros((0, 4, 4, 3), np.uint8), "path": "v/empty.mp4"}),
    ):
        with pytest.raises(BadMediaError, match=r"^v/empty\.mp4: .*re-encode or remove the file"):
            call()

    frames = np.ones((5, 4, 6, 3), np.uint8)
    assert decode_example({"frames": frames, "path": b"p"}, max_frames=3).shape == (3, 4, 6, 3)


def _encode(container_format, codec, frames=40, options=None, pix_fmt="yuv420p", **codec_attrs):
    """A 64x48 clip whose every frame differs, encoded in memory."""
    yy, xx = np.mgrid[0:48, 0:64]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.options = options or {}
        for key, value in codec_attrs.items():
            setattr(stream.codec_context, key, value)
        for t in range(frames):
            rgb = np.stack([(xx * 4 + 9 * t) % 256, (yy * 5 + 3 * t) % 256, xx * 0 + 17 * t % 256])
            frame = av.VideoFrame.from_ndarray(np.moveaxis(rgb, 0, -1).astype(np.uint8), "rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


# Keyframes every 5 frames and B-frames, so windows start mid-GOP and frames are stored out of
# presentation order. AVI stamps frames in decode order (the pts cannot place B-frames), which
# makes the decoder count frames from the start instead; a GIF has a single keyframe.
CLIPS = {
    "mp4_h264_bframes": lambda: _encode("mp4", "libx264", options={"g": "5", "bf": "3"}),
    "webm_vp9": lambda: _encode("webm", "libvpx-vp9", options={"g": "6"}),
    "avi_h264_bframes": lambda: _encode("avi", "libx264", options={"g": "5", "bf": "2"}),
    "gif": lambda: _encode("gif", "gif", frames=20, pix_fmt="rgb8"),
}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_windowed_decoding_gives_the_frames_of_whole_decoding(name):
    data = CLIPS[name]()
    whole = decode_video_bytes(data, name)
    n = whole.shape[0]
    windows = [
        np.arange(0, 4),  # the start
        np.arange(13, 18),  # mid-GOP
        np.arange(n - 5, n),  # the end
        np.arange(3, 16, 3),  # stride 3
        np.arange(n // 2, n, 2),  # stride 2, over several GOPs
        np.array([n - 1]),  # the last frame alone
        np.minimum(np.arange(n - 3, n + 2), n - 1),  # a short clip held on its last frame (VAE)
    ]
    for window in windows:
        counts = []
        got = decode_video_window(
            data, name, lambda count, w=window, c=counts: c.append(count) or w
        )
        assert counts == [n], "the window is drawn once, from the whole clip's frame count"
        np.testing.assert_array_equal(got, whole[window], err_msg=f"{name} {window}")


def test_windowed_decoding_decodes_only_around_the_window(monkeypatch):
    """A 4-frame window at the end of a 40-frame clip with keyframes every 5 frames decodes the
    GOP before it, not the clip: memory follows the window, not the file."""
    data = CLIPS["mp4_h264_bframes"]()
    decoded = []
    real_open = av.open

    class Counting:
        def __init__(self, container):
            self._container = container

        def __enter__(self):
            self._container.__enter__()
            return self

        def __exit__(self, *exc):
            return self._container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._container, name)

        def decode(self, *args, **kwargs):
            for frame in self._container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    got = decode_video_window(data, "clip.mp4", lambda n: np.arange(n - 4, n))
    assert got.shape == (4, 48, 64, 3)
    assert len(decoded) <= 10, f"decoded {len(decoded)} frames for a 4-frame window"


def test_frames_with_zero_height_or_width_are_bad_media():
    for shape in [(2, 0, 8, 3), (1, 8, 0, 3)]:
        record = {"frames": np.zeros(shape, np.uint8), "path": b"clips/flat.npy"}
        with pytest.raises(BadMediaError, match=r"^clips/flat\.npy: .*zero height or width"):
            decode_example(record)
        with pytest.raises(BadMediaError, match="zero height or width"):
            decode_example_window(record, lambda n: np.arange(n))
