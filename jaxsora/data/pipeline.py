"""The input pipeline: TFDS data sources -> Grain -> decoded, resized, patchified examples ->
online packs -> global batches on the mesh.

    tfds.data_source (array_record, random access)
      -> grain.MapDataset: this process's shard, shuffled per epoch, repeated, sources mixed
      -> example_at(i): decode, temporal window, resize to a token budget, compress, patchify,
         tokenize the caption (all seeded by (seed, i), so any example can be rebuilt)
      -> OnlinePacker (first-fit decreasing over a buffer)
      -> PackedBatches: B_local packs per step, state = a few integers

Bad media (corrupt, empty, no frames) is logged with its path and skipped; the pipeline raises
only when skipped examples exceed the configured error budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxsora.compression import PixelSpace
from jaxsora.data import packing, video
from jaxsora.data.media import BadMediaError, decode_example
from jaxsora.models.tokenizer import tokenize
from jaxsora.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """How one record becomes one example of patches."""

    patch: tuple[int, int, int]  # (p_t, p_h, p_w) in latent units
    min_tokens: int
    max_tokens: int
    max_frames: int
    frame_stride: int
    text_len: int
    text_vocab: int
    token_drop_rate: float = 0.0  # NaViT token dropping, per example, training only


def patch_pixels(spec: ExampleSpec, stage: PixelSpace) -> tuple[int, int, int]:
    pt, ph, pw = spec.patch
    return pt * stage.temporal_factor, ph * stage.spatial_factor, pw * stage.spatial_factor


def make_example(
    frames: np.ndarray, caption: bytes | str, spec: ExampleSpec, stage: PixelSpace,
    rng: np.random.Generator,
) -> packing.Example:
    """Decoded frames [T, H, W, 3] uint8 + caption -> one example for the packer."""
    window = video.sample_window(frames.shape[0], spec.max_frames, spec.frame_stride, rng)
    budget = int(rng.integers(spec.min_tokens, spec.max_tokens + 1))
    frames = video.frames_to_grid(frames[window], patch_pixels(spec, stage), budget)
    latents = stage.to_latents(frames)
    patches, positions = video.patchify(latents, spec.patch)
    grid = np.asarray(
        [latents.shape[0] // spec.patch[0], latents.shape[1] // spec.patch[1],
         latents.shape[2] // spec.patch[2]], np.int32)
    if spec.token_drop_rate > 0 and patches.shape[0] > 1:
        keep = max(1, round(patches.shape[0] * (1 - rng.uniform(0, spec.token_drop_rate))))
        kept = np.sort(rng.choice(patches.shape[0], keep, replace=False))
        patches, positions = patches[kept], positions[kept]
    text_ids, text_mask = tokenize(caption, spec.text_len, spec.text_vocab)
    return {"patches": patches, "positions": positions, "grid": grid,
            "text_ids": text_ids, "text_mask": text_mask}


def open_sources(data_dir: str, sources: list[dict], split: str, seed: int) -> grain.MapDataset:
    """Each source's shard for this process, shuffled per epoch and repeated, then mixed.

    Every process gets the same number of records from each source (the remainder is dropped), so
    hosts step in lockstep and never wait on a collective that one of them will not reach.
    """
    datasets, weights = [], []
    for i, src in enumerate(sources):
        name = src["name"]
        try:
            records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises several kinds when a dataset was never built
            raise FileNotFoundError(
                f"dataset {name!r} (split {split!r}) not found under data_dir={data_dir!r}: {e}. "
                f"Build it with `python -m data_pipelines.build --dataset {name} "
                f"--data_dir {data_dir}` (or `make data`)"
            ) from e
        ds = grain.MapDataset.source(records)
        per_process = len(ds) // jax.process_count()
        if per_process == 0:
            raise ValueError(f"dataset {name!r} has {len(ds)} records, fewer than the "
                             f"{jax.process_count()} processes reading it")
        start = jax.process_index() * per_process
        ds = ds[start : start + per_process].seed(seed + 7919 * i).shuffle().repeat()
        datasets.append(ds)
        weights.append(float(src.get("weight", 1.0)))
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


class PackedBatches(Iterator[dict[str, np.ndarray]]):
    """Endless batches of this process's packs, with a JSON-able state for checkpoints."""

    def __init__(self, records: grain.MapDataset, spec: ExampleSpec, shape: packing.PackShape,
                 batch_size: int, buffer_size: int, seed: int, stage: PixelSpace,
                 max_bad_fraction: float = 0.05, min_bad_allowed: int = 8):
        self._records, self._spec, self._stage, self._seed = records, spec, stage, seed
        self._batch_size = batch_size
        self._max_bad_fraction, self._min_bad_allowed = max_bad_fraction, min_bad_allowed
        self.packer = packing.OnlinePacker(self.example_at, shape, buffer_size)

    def example_at(self, index: int) -> packing.Example | None:
        record = self._records[index]
        try:
            frames = decode_example(record, max_frames=None)
        except BadMediaError as e:
            logging.warning("skipping example %d: %s", index, e)
            return None
        rng = np.random.default_rng([self._seed, index])
        return make_example(frames, record["caption"], self._spec, self._stage, rng)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = packing.stack_packs([next(self.packer) for _ in range(self._batch_size)])
        self._check_error_budget()
        return batch

    def _check_error_budget(self) -> None:
        seen = self.packer.examples_read
        bad = self.packer.skipped
        if bad > max(self._min_bad_allowed, self._max_bad_fraction * seen):
            raise RuntimeError(
                f"{bad} of {seen} media files could not be decoded, over the error budget "
                f"(config data.max_bad_fraction={self._max_bad_fraction}); see the warnings above "
                "for their paths, then fix or remove them, or raise the budget"
            )

    def get_state(self) -> dict:
        return self.packer.get_state()

    def set_state(self, state: dict) -> None:
        self.packer.set_state(state)


def example_spec(config) -> ExampleSpec:
    d, m = config.data, config.model
    return ExampleSpec(
        patch=tuple(m.patch), min_tokens=d.min_tokens, max_tokens=d.max_tokens,
        max_frames=d.max_frames, frame_stride=d.frame_stride, text_len=m.text_len,
        text_vocab=m.text_vocab, token_drop_rate=d.get("token_drop_rate", 0.0))


def pack_shape(config, stage: PixelSpace) -> packing.PackShape:
    pt, ph, pw = config.model.patch
    return packing.PackShape(seq_len=config.data.seq_len, max_segments=config.data.max_segments,
                             patch_dim=pt * ph * pw * stage.channels, text_len=config.model.text_len)


def make_batches(config, stage: PixelSpace, split: str = "train") -> PackedBatches:
    """This process's share of the global batch (config.batch_size packs over all processes)."""
    d = config.data
    if config.batch_size % jax.process_count():
        raise ValueError(f"config batch_size={config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    records = open_sources(d.data_dir, list(d.sources), split, config.seed)
    return PackedBatches(
        records, example_spec(config), pack_shape(config, stage),
        batch_size=config.batch_size // jax.process_count(), buffer_size=d.buffer_size,
        seed=config.seed, stage=stage, max_bad_fraction=d.max_bad_fraction)


def abstract_batch(config, stage: PixelSpace, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and shardings (from the pack format itself), enough to
    compile the train step before any data is read."""
    empty = packing.stack_packs([packing.build_pack([], pack_shape(config, stage))])
    return {
        k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype,
                                sharding=batch_sharding(mesh, rules, v.ndim))
        for k, v in empty.items()
    }


def to_global(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """Process-local packs -> global arrays sharded over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
            for k, v in batch.items()}
