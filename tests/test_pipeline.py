"""The input pipeline: deterministic packs, exact iterator restore, efficiency, bad media."""

import dataclasses
import logging

import av
import numpy as np
import pytest
from PIL import Image

from data_pipelines.build import build
from jaxsora.compression import PixelSpace
from jaxsora.data import pipeline, video
from tests.conftest import runlocal_config


def batches_for(config):
    return pipeline.make_batches(config, PixelSpace())


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_packs_other_seed_other_packs(data_dir):
    config = runlocal_config(data_dir)
    a = [next(it) for it in [batches_for(config)] for _ in range(5)]
    b = [next(it) for it in [batches_for(config)] for _ in range(5)]
    assert_same_batches(a, b)
    config.seed = 1
    c = [next(it) for it in [batches_for(config)] for _ in range(5)]
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_restoring_the_iterator_state_continues_exactly(data_dir):
    config = runlocal_config(data_dir)
    it = batches_for(config)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    fresh = batches_for(config)
    fresh.set_state(state)
    assert_same_batches(expected, [next(fresh) for _ in range(6)])


def test_packs_follow_the_contract(data_dir):
    config = runlocal_config(data_dir)
    batch = next(batches_for(config))
    B, L, S = config.batch_size, config.data.seq_len, config.data.max_segments
    pt, ph, pw = config.model.patch
    assert batch["tokens"].shape == (B, L, pt * ph * pw * 3)
    assert batch["segment_ids"].shape == (B, L) and batch["positions"].shape == (B, L, 3)
    assert batch["grid"].shape == (B, S, 3) and batch["cond_mask"].shape == (B, L)
    assert batch["text_ids"].shape == (B, S, config.model.text_len)
    for b in range(B):
        segs = batch["segment_ids"][b]
        for s in range(1, segs.max() + 1):
            n = (segs == s).sum()
            grid = batch["grid"][b, s - 1]
            assert n == np.prod(grid), "a segment holds exactly its grid's tokens"
            assert config.data.min_tokens // 4 <= n <= config.data.max_tokens
            pos = batch["positions"][b][segs == s]
            assert (pos.max(0) < grid).all() and (pos.min(0) == 0).all()
    assert np.abs(batch["tokens"]).max() <= 1.0


def test_packing_efficiency_on_the_bundled_data_is_at_least_95_percent(data_dir):
    config = runlocal_config(data_dir, "")  # the default training config's packing settings
    config.data.sources = [dict(name="synthetic_clips", weight=1.0)]
    it = batches_for(config)
    segs = np.concatenate([next(it)["segment_ids"] for _ in range(12)])
    efficiency = float((segs > 0).mean())
    assert efficiency >= 0.95, efficiency


def test_token_budget_keeps_aspect_ratio_and_cuts_long_clips():
    for T, H, W, budget in [
        (16, 90, 160, 128),
        (1, 160, 90, 64),
        (8, 32, 224, 200),
        (500, 64, 64, 100),
    ]:
        t, h, w = video.fit_grid(T, H, W, (1, 4, 4), budget)
        assert t * h * w <= budget
        assert t <= T
        if t * h * w > 4:  # tiny grids cannot keep a ratio
            assert abs(np.log((w / h) / (W / H))) < 0.7
    frames = np.zeros((500, 64, 64, 3), np.uint8)
    out = video.frames_to_grid(frames, (1, 4, 4), 100)
    assert out.shape[0] * (out.shape[1] // 4) * (out.shape[2] // 4) <= 100


def write_mp4(path, frames=6, size=(32, 48)):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(frames):
            img = np.full((size[0], size[1], 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """A user folder with two good files, a corrupt MP4 and an empty file."""
    folder = tmp_path_factory.mktemp("media")
    write_mp4(folder / "good_clip.mp4")
    Image.fromarray(np.full((40, 24, 3), 200, np.uint8)).save(folder / "good_photo.png")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "empty.mp4").write_bytes(b"")
    data_dir = str(tmp_path_factory.mktemp("tfds_folder"))
    build("video_folder", data_dir, folder=str(folder))
    return data_dir


def test_bad_media_is_skipped_counted_and_logged_with_its_path(folder_dataset, caplog):
    config = runlocal_config(folder_dataset)
    config.data.sources = [dict(name="video_folder", weight=1.0)]
    config.data.max_bad_fraction = 0.6  # half of this folder is bad: allow it
    it = batches_for(config)
    with caplog.at_level(logging.WARNING):
        batch = next(it)
    seen = it.packer.examples_read
    assert it.packer.skipped > 0
    assert it.packer.skipped == pytest.approx(seen / 2, abs=2)  # 2 of every 4 files are bad
    assert "corrupt.mp4" in caplog.text and "empty.mp4" in caplog.text
    assert (batch["segment_ids"] > 0).any()


def test_bad_media_past_the_error_budget_stops_the_run(folder_dataset):
    config = runlocal_config(folder_dataset)
    config.data.sources = [dict(name="video_folder", weight=1.0)]
    config.data.max_bad_fraction = 0.05
    it = batches_for(config)
    with pytest.raises(RuntimeError, match="error budget"):
        for _ in range(20):
            next(it)


def test_a_missing_dataset_says_how_to_build_it(tmp_path):
    config = runlocal_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_pipelines.build"):
        batches_for(config)


def test_token_dropping_keeps_a_subset_of_each_examples_patches_with_their_positions():
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 48, 3)).astype(np.uint8)
    spec = pipeline.ExampleSpec(
        patch=(1, 4, 4),
        min_tokens=96,
        max_tokens=96,
        max_frames=4,
        frame_stride=1,
        text_len=8,
        text_vocab=64,
    )
    full = pipeline.make_example(frames, "a clip", spec, PixelSpace(), np.random.default_rng(1))
    dropping = dataclasses.replace(spec, token_drop_rate=0.5)
    kept = pipeline.make_example(frames, "a clip", dropping, PixelSpace(), np.random.default_rng(1))
    n_full, n_kept = full["patches"].shape[0], kept["patches"].shape[0]
    assert n_full == int(np.prod(full["grid"])) and 0.5 * n_full <= n_kept < n_full
    np.testing.assert_array_equal(kept["grid"], full["grid"])  # the example keeps its size
    by_position = {tuple(p): x for p, x in zip(full["positions"], full["patches"], strict=True)}
    for p, x in zip(kept["positions"], kept["patches"], strict=True):
        np.testing.assert_array_equal(x, by_position[tuple(p)])
