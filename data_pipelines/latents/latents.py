"""latents: another dataset's clips encoded ONCE by a trained video VAE, for latent-space DiTs.

Why: encoding is most of the cost of a latent-space input pipeline, and the same clip at the same
size always encodes to the same latents. The cache sizes every clip deterministically, encodes
it once, and the DiT's pipeline (`jaxsora.data.pipeline.cached_example`) reads latents without
ever running the encoder.

    python -m data_pipelines.build --dataset latents:synthetic_clips --vae_dir runs/vae/vae \
        --data_dir data/tfds

The source dataset (`config.source`: synthetic_clips, sample_media, video_folder, ...) is read
from the same data_dir (or `source_data_dir=`) and must be built first. Every split of the
source becomes a split here.

Sizing, per clip, deterministic: the first `max_frames` pixel frames; then the largest grid that
keeps the aspect ratio and whose latent token count in DiT patches (`patch`, in latent units) is
at most `max_tokens`, with T = 1 + 4k pixel frames (the causal VAE's frame 0 is its own latent
frame); see `jaxsora.data.pipeline.frames_to_latent_grid`. Clips of the same pixel shape are
encoded together, `encode_batch` at a time (a partial batch is padded, so the encoder compiles
once per pixel shape: 25 shapes for synthetic_clips), the batch sharded over all local devices
(and padded to a multiple of their count).

Stored per clip: `latents` float32 [T', H', W', C], the RAW posterior mean (the DiT normalises
with the VAE's `latents_mean`/`latents_std` as it reads, so new statistics never need a
re-encode), `caption`, `path` (the source clip's), `pixel_shape` (T, H, W the clip was encoded
at) and `source_index`. The dataset metadata (`metadata.json`, `builder.info.metadata`) holds the
VAE's identity under "vae" (its directory, a sha256 of its config and weights, its latent
statistics): the DiT refuses a cache made by another VAE than the one in `model.vae_dir`, the
one it samples with. Undecodable source clips are logged, skipped and counted ("skipped" in the
metadata), never fatal. Rebuilding with another VAE into the same data_dir needs `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging


@dataclasses.dataclass(eq=False)
class LatentsConfig(tfds.core.BuilderConfig):
    """Which dataset to encode and how to size its clips (see the module docstring)."""

    source: str = "synthetic_clips"  # a TFDS name[/config] in the same data_dir
    patch: tuple[int, int, int] = (1, 2, 2)  # the DiT's patch, in latent units
    max_tokens: int = 128  # latent patches per clip at most
    max_frames: int = 17  # pixel frames read from the start of each clip (1 + 4k is exact)
    encode_batch: int = 8  # clips per encoder call (padded to it), sharded over local devices
    splits: tuple[str, ...] = ()  # source splits to encode; () = all of them
    max_examples: int = 0  # per split, from the start; 0 = all (smoke tests)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Latents(tfds.core.GeneratorBasedBuilder):
    """Cached VAE latents (raw posterior means) of another dataset's clips."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        LatentsConfig(name="synthetic_clips", source="synthetic_clips"),
        LatentsConfig(name="synthetic_clips_small", source="synthetic_clips/small"),
        LatentsConfig(name="sample_media", source="sample_media"),
        LatentsConfig(name="video_folder", source="video_folder"),
    ]
    DEFAULT_CONFIG_NAME = "synthetic_clips"

    def __init__(
        self,
        *,
        vae_dir: str | None = None,
        source_data_dir: str | None = None,
        file_format: str | None = "array_record",
        **kwargs: Any,
    ):
        # array_record: random access through `as_data_source`, with no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)
        self._vae_dir = vae_dir
        self._source_data_dir = source_data_dir
        # Survive pickling, like the other constructor args (TFDS copies builders that way).
        self._original_state["vae_dir"] = vae_dir
        self._original_state["source_data_dir"] = source_data_dir

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # Raw float32 bytes: latents barely compress. C is the VAE's z_dim.
                    "latents": tfds.features.Tensor(
                        shape=(None, None, None, None), dtype=np.float32, encoding="bytes"
                    ),
                    "caption": tfds.features.Text(),
                    "path": tfds.features.Text(),
                    "pixel_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                    "source_index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            # Filled at build time: the VAE's identity, the sizing, the skipped counts.
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # records in the order encoded (deterministic)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        # Late imports: the jaxsora side pulls in JAX, and `build` registers the source builders
        # (importing it at module level would be circular).
        import data_pipelines.build  # noqa: F401
        from jaxsora.compression import load_latent_space

        config: LatentsConfig = self.builder_config
        if not self._vae_dir:
            raise ValueError(
                "latents needs the VAE to encode with: pass --vae_dir DIR to "
                "data_pipelines.build (or Latents(vae_dir=...)); the VAE trainer writes it to "
                "<its workdir>/vae"
            )
        stage = load_latent_space(self._vae_dir)
        source_dir = self._source_data_dir or self._data_dir_root
        try:
            source = tfds.builder(config.source, data_dir=source_dir)
            splits = config.splits or tuple(sorted(source.info.splits.keys()))
            records = {
                s: tfds.data_source(config.source, split=s, data_dir=source_dir, download=False)
                for s in splits
            }
        except Exception as e:  # TFDS raises several kinds when a dataset was never built
            raise FileNotFoundError(
                f"latents: source dataset {config.source!r} not found under {source_dir} ({e}); "
                f"build it first with `python -m data_pipelines.build --dataset "
                f"{config.source} --data_dir {source_dir}`"
            ) from e
        metadata = self.info.metadata
        metadata["vae"] = stage.identity
        metadata["source"] = {"name": config.source, "data_dir": os.path.abspath(source_dir)}
        metadata["sizing"] = {
            "patch": list(config.patch),
            "max_tokens": config.max_tokens,
            "max_frames": config.max_frames,
        }
        metadata["skipped"] = {}
        return {s: self._generate_examples(s, records[s], stage) for s in splits}

    def _generate_examples(
        self, split: str, records, stage
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        from jaxsora.data.media import BadMediaError, decode_example
        from jaxsora.data.pipeline import frames_to_latent_grid

        config: LatentsConfig = self.builder_config
        n = len(records) if not config.max_examples else min(len(records), config.max_examples)
        pending: dict[tuple[int, ...], list] = {}
        skipped, encoded, start = 0, 0, time.perf_counter()
        for index in range(n):
            record = records[index]
            try:
                frames = decode_example(record, max_frames=config.max_frames)
            except BadMediaError as e:
                logging.warning("latents/%s: skipping source record %d: %s", split, index, e)
                skipped += 1
                continue
            clip = frames_to_latent_grid(frames, config.patch, stage, config.max_tokens)
            group = pending.setdefault(clip.shape, [])
            group.append((index, clip, _text(record["caption"]), _text(record.get("path", ""))))
            if len(group) == config.encode_batch:
                encoded += len(group)
                yield from self._encode(pending.pop(clip.shape), stage)
        for shape in sorted(pending):  # the partial batches, in a fixed order
            encoded += len(pending[shape])
            yield from self._encode(pending[shape], stage)
        self.info.metadata["skipped"][split] = skipped
        logging.info(
            "latents/%s: %d clips encoded, %d skipped (undecodable), %.1f s",
            split,
            encoded,
            skipped,
            time.perf_counter() - start,
        )

    def _encode(self, group: list, stage) -> Iterator[tuple[int, dict[str, Any]]]:
        clips = np.stack([clip for _, clip, _, _ in group])
        latents = stage.encode_batch(clips, pad_to=self.builder_config.encode_batch)
        for (index, clip, caption, path), z in zip(group, latents, strict=True):
            yield (
                index,
                {
                    "latents": z.astype(np.float32),
                    "caption": caption,
                    "path": path,
                    "pixel_shape": np.asarray(clip.shape[:3], np.int32),
                    "source_index": index,
                },
            )
