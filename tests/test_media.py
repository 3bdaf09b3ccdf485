"""Media decoding and the mp4/gif/png sample writer."""

import io
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from jaxsora.data.media import (
    BadMediaError,
    decode_example,
    decode_image_bytes,
    decode_video_bytes,
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
