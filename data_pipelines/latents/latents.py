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

Sizing, per clip and per token budget, deterministic: the first `max_frames` pixel frames; then
the largest grid that keeps the aspect ratio and whose latent token count in DiT patches
(`patch`, in latent units) is at most the budget, with T = 1 + 4k pixel frames (the causal VAE's
frame 0 is its own latent frame); see `jaxsora.data.pipeline.frames_to_latent_grid`.

Multi-resolution: every clip is encoded at each of `token_budgets` (default: `max_tokens`
alone), or at `budgets_per_clip` of them drawn per clip (seeded by `seed` and the clip's index),
so that training from the cache still gives each example a different size, as NaViT does from
pixels: the pipeline draws one of a record's sizes per example
(`jaxsora.data.latent_records.choose`). Budgets that give a clip the same grid are stored once.
Storage grows with the sum of the budgets: a clip costs about `4 * C * budget * p_t * p_h * p_w`
bytes per budget (float32; 2 KiB per 32 tokens at C=4 and patch 1x2x2); the build records
the measured mean bytes per clip of each budget in the metadata ("storage").

Work runs in units of `records_per_unit` source records (`data_pipelines.engine`: in this process
or on Apache Beam, the same records either way); within a unit, clips of the same pixel shape
are encoded together, `encode_batch` at a time (a partial batch is padded, so the encoder
compiles once per pixel shape), the batch sharded over the process's local devices.

Stored per clip (`jaxsora/data/latent_records.py` reads them): `latents` float32, the RAW
posterior means of all its sizes, flattened and concatenated (the DiT normalises with the VAE's
`latents_mean`/`latents_std` as it reads, so new statistics never need a re-encode),
`latent_shapes` int32 [K, 4] (T', H', W', C of each size), `pixel_shapes` int32 [K, 3] (T, H, W
each was encoded at), `token_budgets` int32 [K], `caption`, `path` (the source clip's) and
`source_index`. The dataset metadata (`metadata.json`, `builder.info.metadata`) holds the
VAE's identity under "vae" (its directory, a sha256 of its config and weights, its latent
statistics): the DiT refuses a cache made by another VAE than the one in `model.vae_dir`, the
one it samples with. Undecodable source clips are logged, skipped and counted ("skipped" in the
metadata), never fatal. Rebuilding with another VAE into the same data_dir needs `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import engine, recaption


@dataclasses.dataclass(eq=False)
class LatentsConfig(tfds.core.BuilderConfig):
    """Which dataset to encode and how to size its clips (see the module docstring)."""

    source: str = "synthetic_clips"  # a TFDS name[/config] in the same data_dir
    patch: tuple[int, int, int] = (1, 2, 2)  # the DiT's patch, in latent units
    max_tokens: int = 128  # latent patches per clip at most (the budget when token_budgets=())
    token_budgets: tuple[int, ...] = ()  # multi-resolution: every clip at each (or a subset)
    budgets_per_clip: int = 0  # 0: every budget; k: k budgets drawn per clip
    seed: int = 0  # the per-clip budget draw
    max_frames: int = 17  # pixel frames read from the start of each clip (1 + 4k is exact)
    encode_batch: int = 8  # clips per encoder call (padded to it), sharded over local devices
    # Source records per work unit (one Beam element). Big: a unit batches its clips by pixel
    # shape, and each shape's last batch is padded, so small units encode much padding.
    records_per_unit: int = 1024
    splits: tuple[str, ...] = ()  # source splits to encode; () = all of them
    max_examples: int = 0  # per split, from the start; 0 = all (smoke tests)

    @property
    def budgets(self) -> tuple[int, ...]:
        budgets = tuple(int(b) for b in (self.token_budgets or (self.max_tokens,)))
        if not budgets or min(budgets) < 1 or len(set(budgets)) != len(budgets):
            raise ValueError(
                f"latents/{self.name}: token_budgets={self.token_budgets} must be distinct "
                "positive token counts, e.g. (32, 64, 128)"
            )
        if not 0 <= self.budgets_per_clip <= len(budgets):
            raise ValueError(
                f"latents/{self.name}: budgets_per_clip={self.budgets_per_clip} must be 0 "
                f"(all) or at most the {len(budgets)} token_budgets"
            )
        return budgets

    def budgets_for(self, index: int) -> list[int]:
        """The budgets clip `index` is encoded at, largest first: all, or a seeded subset."""
        budgets = sorted(self.budgets, reverse=True)
        if self.budgets_per_clip:
            rng = np.random.default_rng([self.seed, index])
            keep = rng.choice(len(budgets), self.budgets_per_clip, replace=False)
            budgets = [budgets[i] for i in sorted(keep)]
        return budgets


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class EncodeRecords(engine.Processor):
    """One unit: a run of source record indices of one split, encoded at their budgets."""

    config: LatentsConfig
    vae_dir: str
    source_dir: str
    split: str

    def setup(self) -> None:
        import data_pipelines.build  # noqa: F401  (registers the source builders)
        from jaxsora.compression import load_latent_space

        self._stage = load_latent_space(self.vae_dir)
        self._records = tfds.data_source(
            self.config.source, split=self.split, data_dir=self.source_dir, download=False
        )

    def __call__(self, unit: list[int]):
        from jaxsora.data.media import BadMediaError, decode_example
        from jaxsora.data.pipeline import frames_to_latent_grid

        config = self.config
        clips: dict[int, list] = {}  # index -> [(budget, pixel clip)], unique grids only
        info: dict[int, tuple[str, str]] = {}
        for index in unit:
            record = self._records[index]
            try:
                frames = decode_example(record, max_frames=config.max_frames)
            except BadMediaError as e:
                yield engine.Skip("undecodable", f"source record {index}: {e}")
                continue
            sizes = clips.setdefault(index, [])
            for budget in config.budgets_for(index):
                clip = frames_to_latent_grid(frames, config.patch, self._stage, budget)
                if all(clip.shape != other.shape for _, other in sizes):
                    sizes.append((budget, clip))
            info[index] = (_text(record["caption"]), _text(record.get("path", "")))
        latents = self._encode(clips)
        for index, sizes in clips.items():
            zs = [latents[index, budget].astype(np.float32) for budget, _ in sizes]
            for (budget, _), z in zip(sizes, zs, strict=True):
                yield engine.Tally(f"bytes_{budget}", z.nbytes)
                yield engine.Tally(f"clips_{budget}")
            caption, path = info[index]
            yield (
                index,
                {
                    "latents": np.concatenate([z.ravel() for z in zs]),
                    "latent_shapes": np.asarray([z.shape for z in zs], np.int32),
                    "pixel_shapes": np.asarray([c.shape[:3] for _, c in sizes], np.int32),
                    "token_budgets": np.asarray([b for b, _ in sizes], np.int32),
                    "caption": caption,
                    "path": path,
                    "source_index": index,
                },
            )

    def _encode(self, clips: dict[int, list]) -> dict[tuple[int, int], np.ndarray]:
        """Every (index, budget) clip's latents: same pixel shapes batched, in a fixed order."""
        groups: dict[tuple[int, ...], list] = {}
        for index, sizes in clips.items():
            for budget, clip in sizes:
                groups.setdefault(clip.shape, []).append(((index, budget), clip))
        out, batch = {}, self.config.encode_batch
        for shape in sorted(groups):
            group = groups[shape]
            for first in range(0, len(group), batch):
                part = group[first : first + batch]
                z = self._stage.encode_batch(np.stack([c for _, c in part]), pad_to=batch)
                out.update((key, latent) for (key, _), latent in zip(part, z, strict=True))
        return out


class Latents(engine.EngineBuilder):
    """Cached VAE latents (raw posterior means) of another dataset's clips, at several sizes."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "2.0.0": "Multi-resolution: all of a clip's sizes in one record; builds on Apache Beam.",
    }
    BUILDER_CONFIGS = [
        LatentsConfig(name="synthetic_clips", source="synthetic_clips"),
        LatentsConfig(name="synthetic_clips_small", source="synthetic_clips/small"),
        LatentsConfig(
            name="synthetic_clips_multires",
            source="synthetic_clips",
            token_budgets=(32, 64, 128),
        ),
        LatentsConfig(name="sample_media", source="sample_media"),
        LatentsConfig(name="video_folder", source="video_folder"),
        LatentsConfig(
            name="video_folder_multires", source="video_folder", token_budgets=(32, 64, 128)
        ),
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
                    # Raw float32 bytes: latents barely compress. Every size, flattened.
                    "latents": tfds.features.Tensor(
                        shape=(None,), dtype=np.float32, encoding="bytes"
                    ),
                    "latent_shapes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
                    "pixel_shapes": tfds.features.Tensor(shape=(None, 3), dtype=np.int32),
                    "token_budgets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "caption": tfds.features.Text(),
                    "path": tfds.features.Text(),
                    "source_index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            # Filled at build time: the VAE's identity, the sizing, the counts, the storage.
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # records in source order (deterministic, both engines)
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
        budgets = config.budgets  # checked before any work
        stage = load_latent_space(self._vae_dir)
        source_dir = os.path.abspath(self._source_data_dir or self._data_dir_root)
        try:
            source = tfds.builder(config.source, data_dir=source_dir)
            splits = config.splits or tuple(sorted(source.info.splits.keys()))
            sizes = {s: source.info.splits[s].num_examples for s in splits}
        except Exception as e:  # TFDS raises several kinds when a dataset was never built
            raise FileNotFoundError(
                f"latents: source dataset {config.source!r} not found under {source_dir} ({e}); "
                f"build it first with `python -m data_pipelines.build --dataset "
                f"{config.source} --data_dir {source_dir}`"
            ) from e
        metadata = self.info.metadata
        metadata["vae"] = stage.identity
        metadata["source"] = {"name": config.source, "data_dir": source_dir}
        # The captions are the source's: so is their recaptioner (checked at training).
        metadata[recaption.METADATA_KEY] = recaption.stored_identity(source.info.metadata)
        metadata["sizing"] = {
            "patch": list(config.patch),
            "max_tokens": max(budgets),
            "token_budgets": sorted(budgets),
            "budgets_per_clip": config.budgets_per_clip,
            "max_frames": config.max_frames,
        }
        metadata["skipped"], metadata["counts"], metadata["storage"] = {}, {}, {}
        generators = {}
        for split in splits:
            n = sizes[split] if not config.max_examples else min(sizes[split], config.max_examples)
            units = engine.chunks(range(n), config.records_per_unit)
            processor = EncodeRecords(config, self._vae_dir, source_dir, split)
            generators[split] = self._generate_examples(split, units, processor)
        return generators

    def record_counts(self, split: str, counts: dict[str, int]) -> None:
        metadata = self.info.metadata
        metadata["skipped"][split] = counts.get("undecodable", 0)
        metadata["counts"][split] = {
            k: v for k, v in counts.items() if not k.startswith(("bytes_", "clips_"))
        }
        storage = {}
        for budget in sorted(self.builder_config.budgets):
            clips = counts.get(f"clips_{budget}", 0)
            if clips:
                storage[str(budget)] = {
                    "clips": clips,
                    "mean_bytes_per_clip": counts[f"bytes_{budget}"] / clips,
                }
        metadata["storage"][split] = storage
