"""The input pipeline: deterministic packs, exact iterator restore, efficiency, bad media."""

import contextlib
import dataclasses
import json
import logging
import re
import signal

import av
import grain
import numpy as np
import pytest
from PIL import Image

from data_pipelines.build import build
from jaxsora.compression import PixelSpace
from jaxsora.data import pipeline, video
from jaxsora.data.media import decode_example
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


def test_frames_far_wider_or_taller_than_the_budget_allows_still_make_an_example():
    spec = pipeline.ExampleSpec(
        patch=(1, 4, 4), min_tokens=16, max_tokens=64, max_frames=4, frame_stride=1,
        text_len=8, text_vocab=64,
    )  # fmt: skip
    for shape in [(3, 1, 1000, 3), (1, 2, 20000, 3), (2, 1000, 1, 3)]:
        frames = np.zeros(shape, np.uint8)
        ex = pipeline.make_example(frames, "a", spec, PixelSpace(), np.random.default_rng(0))
        assert (ex["grid"] >= 1).all() and np.prod(ex["grid"]) <= spec.max_tokens, shape


def write_mp4(path, frames=6, size=(32, 48), options=None):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.options = options or {}
        for i in range(frames):
            img = np.full((size[0], size[1], 3), 20 * i % 256, np.uint8)
            img[:, (3 * i) % size[1]] = 255  # a moving line: every frame differs in space too
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


@pytest.fixture(scope="module")
def clips_dataset(tmp_path_factory):
    """A user folder of 40-frame clips with keyframes every 5 frames and B-frames (MP4, and an
    AVI whose timestamps cannot place its B-frames), and a photo."""
    folder = tmp_path_factory.mktemp("clips")
    gop = {"g": "5", "bf": "3"}
    write_mp4(folder / "a.mp4", frames=40, options=gop)
    write_mp4(folder / "b.mp4", frames=33, size=(48, 32), options=gop)
    write_mp4(folder / "c.avi", frames=40, options=gop)
    Image.fromarray(np.full((40, 24, 3), 90, np.uint8)).save(folder / "photo.png")
    data_dir = str(tmp_path_factory.mktemp("tfds_clips"))
    build("video_folder", data_dir, folder=str(folder))
    return data_dir


def test_decoding_only_the_window_gives_the_examples_of_decoding_whole_clips(clips_dataset):
    config = folder_config(clips_dataset, max_frames=4, frame_stride=2)  # 7 of 40 frames
    stage = PixelSpace()
    records, _ = pipeline.open_sources(clips_dataset, config.data.sources, "train", 0)
    spec = pipeline.example_spec(config)
    it = pipeline.PackedBatches(
        records, spec, pipeline.pack_shape(config, stage), 1, 4, config.seed, stage
    )
    for i in range(16):
        record = records[i]
        whole = pipeline.make_example(
            decode_example(record),  # the whole clip, cut to a window afterwards
            record["caption"],
            spec,
            stage,
            np.random.default_rng([config.seed, i]),
        )
        windowed = it.example_at(i)
        assert whole.keys() == windowed.keys()
        for k in whole:
            np.testing.assert_array_equal(whole[k], windowed[k], err_msg=f"record {i}: {k}")


def folder_config(data_dir, **data):
    config = runlocal_config(data_dir)
    config.data.sources = [dict(name="video_folder", weight=1.0)]
    config.data.update(data)
    return config


def test_bad_media_is_skipped_counted_and_logged_with_its_path(folder_dataset, caplog):
    it = batches_for(folder_config(folder_dataset))
    with caplog.at_level(logging.WARNING):
        batch = next(it)
    assert it.skipped == 2  # corrupt.mp4 and empty.mp4, each once
    assert "corrupt.mp4" in caplog.text and "empty.mp4" in caplog.text
    assert (batch["segment_ids"] > 0).any()


def test_the_error_budget_counts_distinct_bad_files_across_epochs_and_restores(folder_dataset):
    """2 bad files of 4, re-read every epoch, are 2 bad files: under the default 5% budget
    (8 files at least) the run goes on, and the count survives a restore exactly."""
    config = folder_config(folder_dataset, max_bad_fraction=0.05)
    it = batches_for(config)
    for _ in range(3):  # a round fills 16 examples from ~32 records: 8 passes over 4 files
        next(it)
    state = it.get_state()
    assert state["skipped"] == it.skipped == 2
    assert state["next_index"] > 12, "the test must cover several epochs"
    expected = [next(it) for _ in range(3)]
    fresh = batches_for(config)
    fresh.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert_same_batches(expected, [next(fresh) for _ in range(3)])
    assert fresh.skipped == it.skipped == 2
    old = {k: v for k, v in state.items() if k != "skipped"}  # a state from before the count
    batches_for(config).set_state(old)


def build_folder(root, good, bad):
    """A video_folder dataset of `good` clips and `bad` corrupt files; returns its data_dir."""
    folder = root / "media"
    folder.mkdir()
    for i in range(good):
        write_mp4(folder / f"good_{i}.mp4")
    rng = np.random.default_rng(0)
    for i in range(bad):
        (folder / f"bad_{i}.mp4").write_bytes(rng.bytes(500) if i % 2 else b"")
    build("video_folder", str(root / "tfds"), folder=str(folder))
    return str(root / "tfds")


@contextlib.contextmanager
def time_limit(seconds):
    """Fails a test that would hang instead of waiting for it forever."""

    def fail(*_):
        raise TimeoutError(f"no error after {seconds} s: the pipeline spins on bad media")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "good,bad,match",
    [
        (0, 3, "none of the 3 records"),  # all bad, and fewer than the 8 always allowed
        (0, 12, "error budget"),  # all bad: the budget stops it at the 9th
        (1, 10, "error budget"),
    ],
)
def test_bad_media_past_the_error_budget_stops_the_run_naming_the_files(tmp_path, good, bad, match):
    data_dir = build_folder(tmp_path, good, bad)
    it = batches_for(folder_config(data_dir, max_bad_fraction=0.05))
    with time_limit(30), pytest.raises(RuntimeError, match=match) as err:
        for _ in range(20):
            next(it)
    message = str(err.value)
    assert "data.max_bad_fraction" in message
    assert re.search(r"bad_\d+\.mp4 \(", message), "the last bad files are named"


def test_a_record_with_zero_height_is_skipped_and_counted_not_a_crash(data_dir, caplog):
    config = runlocal_config(data_dir)
    good = {"frames": np.zeros((4, 16, 24, 3), np.uint8), "caption": b"a", "path": b"ok.npy"}
    flat = {"frames": np.zeros((4, 0, 24, 3), np.uint8), "caption": b"b", "path": b"flat.npy"}
    records = grain.MapDataset.source([good, flat] * 8)
    it = pipeline.PackedBatches(
        records,
        pipeline.example_spec(config),
        pipeline.pack_shape(config, PixelSpace()),
        batch_size=1,
        buffer_size=4,
        seed=0,
        stage=PixelSpace(),
        max_bad_fraction=0.6,
    )
    with caplog.at_level(logging.WARNING):
        next(it)
    assert it.skipped > 0 and "flat.npy" in caplog.text and "zero height" in caplog.text


@pytest.mark.parametrize(
    "name,expected",
    [
        ("synthetic_clips/small", "--dataset synthetic_clips/small --data_dir {}`"),
        ("video_folder", "--dataset video_folder --data_dir {} --folder YOUR_MEDIA_FOLDER`"),
        ("latents/synthetic_clips", "--data_dir {} --vae_dir YOUR_VAE_DIR`"),
    ],
)
def test_a_missing_dataset_says_how_to_build_it_in_a_few_words(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        pipeline.open_records(str(tmp_path), name, "train")
    message = str(err.value)
    assert "python -m data_pipelines.build" in message and expected.format(tmp_path) in message
    # A few words besides the data_dir (named twice), not TFDS's list of every dataset.
    assert "data.data_dir" in message and len(message) - 2 * len(str(tmp_path)) < 300, message


def test_a_dataset_this_project_does_not_build_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        pipeline.open_records(str(tmp_path), "mnist", "train")
    message = str(err.value)
    assert "not a dataset this project builds" in message and "data.sources" in message
    assert "data_pipelines.build" not in message and "video_folder" in message
    assert len(message) < 400 and err.value.__cause__ is None, message


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


def test_a_built_dataset_without_the_split_names_the_splits_it_has(data_dir):
    with pytest.raises(ValueError, match=r"cannot be read as split 'test'.*'train'"):
        pipeline.open_records(data_dir, "synthetic_clips/small", "test")


def test_each_process_opens_only_the_shards_that_hold_its_share(tmp_path, monkeypatch):
    """A split in 4 array_record shards read by 2 processes: each opens the 2 files of its
    half, gets exactly the records the whole split has there, and its sources hold that half."""
    import jax
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path)
    build("synthetic_clips:small", data_dir, num_shards=4)
    whole = tfds.data_source("synthetic_clips/small", split="train", data_dir=data_dir)
    assert len(whole) == 64 and len(whole.dataset_info.splits["train"].shard_lengths) == 4
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        share, start = pipeline.open_process_share(data_dir, "synthetic_clips/small", "train")
        files = {i.filename for i in share.data_source._read_instructions}
        assert start == 32 * index
        assert sorted(f[-14:] for f in files) == [f"0000{2 * index + k}-of-00004" for k in (0, 1)]
        for i in (0, 17, 31):
            assert share[i]["path"] == whole[start + i]["path"]
        config = runlocal_config(data_dir)
        _, count = pipeline.open_sources(data_dir, list(config.data.sources), "train", 0)
        assert count == 32


def test_a_cache_built_at_an_older_record_format_says_to_rebuild_it(tmp_path):
    old = tmp_path / "latents" / "video_folder" / "1.0.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=r"version 1\.0\.0, but this code reads version 2\.0\.0.*"
        r"Multi-resolution.*--dataset latents:video_folder .*--overwrite",
    ):
        pipeline.open_records(str(tmp_path), "latents/video_folder", "train")
