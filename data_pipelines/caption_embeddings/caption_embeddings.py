"""caption_embeddings: another dataset, record for record, plus its captions embedded ONCE by a
frozen pretrained text encoder (`jaxsora.text.encoders`: MiniLM, T5, UMT5).

Why: a frozen encoder maps the same caption to the same embedding every epoch, and running a
T5 beside the DiT costs memory and step time; the cache runs it once, offline, and the training
pipeline reads `caption_emb` instead of encoding captions.

    python -m data_pipelines.build --dataset caption_embeddings:synthetic_clips \
        --text_encoder minilm --data_dir data/tfds
    python -m data_pipelines.build --dataset caption_embeddings:latents_synthetic_clips \
        --text_encoder t5 --text_checkpoint my_t5_folder --text_max_tokens 64 --data_dir data/tfds

The source (`config.source`: synthetic_clips, sample_media, video_folder, latents/..., a TFDS
name[/config]) is read from the same data_dir (or `source_data_dir=`) and must be built first;
every split of the source becomes a split here. Every source record passes through UNCHANGED,
in the same order (record i here is record i there: all its fields, same keys, same values),
so a pipeline reading this dataset sees exactly the source's media/latents/captions, plus:

- `caption_emb` float16 [max_tokens, dim]: the encoder's token embeddings of `caption`, zeros
  at padding. float16, not float32: half the bytes (12 KiB a record for MiniLM at 16 tokens),
  and the DiT computes in bfloat16 (8 significant bits) on TPU anyway.
  float16 keeps 11 significant bits: every value is within 2**-11 (4.9e-4) of its float32
  value, relatively (2**-25 absolute for the tiny, subnormal ones). Measured on the 80 captions
  of synthetic_clips/small with MiniLM (|x| <= 5.6): max relative error 4.87e-4, relative RMS
  2.1e-4, max abs error 1.9e-3, mean abs error 5.6e-5 over caption tokens; each build records
  its own max/mean in the metadata. A build that would overflow float16 (|x| > 65504) fails
  loudly rather than storing inf.
- `caption_mask` bool [max_tokens]: True at the caption's tokens.

Captions are encoded `encode_batch` at a time, the last batch padded (with its last caption) so
the encoder compiles once. The dataset metadata (`metadata.json`, `builder.info.metadata`):
- "text_encoder": the encoder's identity (kind, checkpoint folder, sha256 of every weight file
  and of tokenizer.json, max_tokens, dim); the training side refuses embeddings of another
  encoder than its config's with `jaxsora.text.identity.check_text_encoder`;
- "source": {name, data_dir};
- "caption_emb": {dtype, shape, float16_max_abs_error and float16_mean_abs_error (over all
  stored values) per split}.
Rebuilding with another encoder into the same data_dir needs `--overwrite` (a build without it
refuses, naming what differs, instead of silently reusing the old embeddings).

The features are the source's FeaturesDict (its builder's `info.features`, which TFDS has from
the source's code whether or not it is built) plus the two above; a built caption_embeddings
dataset reads its own features.json, so reading it back needs no source.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import engine, recaption
from data_pipelines.engine import FIXED_POINT, WRITTEN

EMB_KEY, MASK_KEY = "caption_emb", "caption_mask"
# What `python -m data_pipelines.build` needs beyond --dataset and --data_dir, per source.
_SOURCE_BUILD_ARGS = {
    "video_folder": " --folder YOUR_MEDIA_FOLDER",
    "latents": " --vae_dir YOUR_VAE_DIR",
}


@dataclasses.dataclass(eq=False)
class CaptionEmbeddingsConfig(tfds.core.BuilderConfig):
    """Which dataset's captions to embed (see the module docstring)."""

    source: str = "synthetic_clips"  # a TFDS name[/config] in the same data_dir
    encode_batch: int = 64  # captions per encoder call (the last call padded to it)
    batches_per_unit: int = 4  # encoder batches per work unit (one Beam element)
    splits: tuple[str, ...] = ()  # source splits to copy; () = all of them
    max_examples: int = 0  # per split, from the start; 0 = all (smoke tests)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _build_command(source: str, data_dir: str) -> str:
    extra = _SOURCE_BUILD_ARGS.get(source.split("/")[0], "")
    name = source.replace("/", ":", 1)
    return f"python -m data_pipelines.build --dataset {name}{extra} --data_dir {data_dir}"


class CaptionEmbeddings(engine.EngineBuilder):
    """Another dataset's records, unchanged, plus frozen-text-encoder caption embeddings."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        CaptionEmbeddingsConfig(name="synthetic_clips", source="synthetic_clips"),
        CaptionEmbeddingsConfig(name="synthetic_clips_small", source="synthetic_clips/small"),
        CaptionEmbeddingsConfig(name="sample_media", source="sample_media"),
        CaptionEmbeddingsConfig(name="video_folder", source="video_folder"),
        CaptionEmbeddingsConfig(name="latents_synthetic_clips", source="latents/synthetic_clips"),
    ]
    DEFAULT_CONFIG_NAME = "synthetic_clips"

    def __init__(
        self,
        *,
        text_encoder: str | None = None,
        text_checkpoint: str | None = None,
        text_max_tokens: int = 16,
        source_data_dir: str | None = None,
        file_format: str | None = "array_record",
        **kwargs: Any,
    ):
        # Set before super().__init__, which calls _info (it needs to know whether we build).
        self._text_kind = text_encoder
        self._text_checkpoint = text_checkpoint
        self._text_max_tokens = int(text_max_tokens)
        self._source_data_dir = source_data_dir
        # array_record: random access through `as_data_source`, with no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)
        # Survive pickling, like the other constructor args (TFDS copies builders that way).
        self._original_state.update(
            text_encoder=text_encoder,
            text_checkpoint=text_checkpoint,
            text_max_tokens=text_max_tokens,
            source_data_dir=source_data_dir,
        )

    @property
    def _source_dir(self) -> str:
        return os.path.abspath(self._source_data_dir or self._data_dir_root)

    def _source_builder(self) -> tfds.core.DatasetBuilder:
        # Late import: `build` registers the source builders (at module level: circular).
        import data_pipelines.build  # noqa: F401

        source = self.builder_config.source
        try:
            return tfds.builder(source, data_dir=self._source_dir)
        except Exception as e:  # an unknown name or config
            raise ValueError(
                f"caption_embeddings/{self.builder_config.name}: source dataset {source!r} is "
                f"not a known TFDS builder ({e}); config.source must name one, e.g. "
                "synthetic_clips/small"
            ) from e

    def _info(self) -> tfds.core.DatasetInfo:
        if self._text_kind is None and (self.data_path / "features.json").exists():
            # Reading a built dataset: the features it was written with, source or not.
            features = tfds.features.FeaturesDict.from_config(os.fspath(self.data_path))
        else:
            source = dict(self._source_builder().info.features)
            if clash := sorted({EMB_KEY, MASK_KEY} & set(source)):
                raise ValueError(
                    f"caption_embeddings: source {self.builder_config.source!r} already has "
                    f"{clash}; embed a dataset without caption embeddings"
                )
            features = tfds.features.FeaturesDict(
                {
                    **source,
                    # Shape [max_tokens, dim] varies with the encoder: unknown here, so "bytes"
                    # (raw float16, which barely compresses); the metadata has both sizes.
                    EMB_KEY: tfds.features.Tensor(
                        shape=(None, None), dtype=np.float16, encoding="bytes"
                    ),
                    MASK_KEY: tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }
            )
        return self.dataset_info_from_configs(
            features=features,
            # Filled at build time: the encoder's identity, the source, the float16 error.
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # record i is the source's record i
        )

    def _load_encoder(self):
        from jaxsora.text.encoders import load_text_encoder

        if not self._text_kind:
            raise ValueError(
                "caption_embeddings needs the text encoder to embed with: pass --text_encoder "
                "minilm|t5|umt5 (and --text_checkpoint FOLDER, optional for minilm; "
                "--text_max_tokens N) to data_pipelines.build, or "
                "CaptionEmbeddings(text_encoder=..., text_checkpoint=..., text_max_tokens=...)"
            )
        return load_text_encoder(self._text_kind, self._text_checkpoint, self._text_max_tokens)

    def download_and_prepare(self, *, download_config=None, **kwargs: Any) -> None:
        """As TFDS's, but refuses to reuse a build made by another encoder than the one asked
        for (TFDS would silently keep the old embeddings): that needs --overwrite."""
        mode = (download_config or tfds.download.DownloadConfig()).download_mode
        if self._text_kind and self.data_path.exists() and not mode.overwrite_dataset:
            from jaxsora.text.identity import identity_differences, stored_identity

            enc = self._load_encoder()
            stored = stored_identity(self.info.metadata) or {}
            if problems := identity_differences(stored, enc.identity):
                raise ValueError(
                    f"{self.info.full_name} in {self._data_dir_root} was built with another "
                    f"text encoder than the one asked for: {'; '.join(problems)}. Pass "
                    "--overwrite (download_mode=REUSE_CACHE_IF_EXISTS) to rebuild it"
                )
        super().download_and_prepare(download_config=download_config, **kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        config: CaptionEmbeddingsConfig = self.builder_config
        enc = self._load_encoder()
        source = self._source_builder()
        try:
            splits = config.splits or tuple(sorted(source.info.splits.keys()))
            if not splits:
                raise FileNotFoundError("no splits: the dataset is not built")
            records = {s: source.as_data_source(s) for s in splits}
        except Exception as e:  # TFDS raises several kinds when a dataset was never built
            raise FileNotFoundError(
                f"caption_embeddings: source dataset {config.source!r} not found under "
                f"{self._source_dir} ({e}); build it first with "
                f"`{_build_command(config.source, self._source_dir)}`"
            ) from e
        if "caption" not in source.info.features:
            raise ValueError(
                f"caption_embeddings: source {config.source!r} has no 'caption' field "
                f"(fields: {sorted(source.info.features)})"
            )
        metadata = self.info.metadata
        metadata["text_encoder"] = enc.identity
        metadata["source"] = {"name": config.source, "data_dir": self._source_dir}
        # The captions are the source's: so is their recaptioner (checked at training).
        metadata[recaption.METADATA_KEY] = recaption.stored_identity(source.info.metadata)
        metadata["caption_emb"] = {
            "dtype": "float16",
            "shape": [enc.max_tokens, enc.dim],
            "float16_max_abs_error": {},
            "float16_mean_abs_error": {},
        }
        generators = {}
        for split in splits:
            n = len(records[split])
            n = min(n, config.max_examples) if config.max_examples else n
            step = config.encode_batch * config.batches_per_unit
            units = [(a, min(a + step, n)) for a in range(0, n, step)]
            processor = EmbedCaptions(
                config.source,
                self._source_dir,
                split,
                self._text_kind,
                self._text_checkpoint,
                self._text_max_tokens,
                config.encode_batch,
            )
            generators[split] = self._generate_examples(split, units, processor)
        return generators

    def record_counts(self, split: str, counts: dict[str, int]) -> None:
        caption_emb = self.info.metadata["caption_emb"]
        caption_emb["float16_max_abs_error"][split] = counts.get("max_error", 0) / FIXED_POINT
        values = max(counts.get("values", 0), 1)
        caption_emb["float16_mean_abs_error"][split] = counts.get("sum_error", 0) / (
            FIXED_POINT * values
        )
        self.info.metadata.setdefault("counts", {})[split] = {WRITTEN: counts[WRITTEN]}


@dataclasses.dataclass
class EmbedCaptions(engine.Processor):
    """One unit: a run of source records (whole encoder batches), copied with their captions'
    embeddings. The encoder loads once per worker (`setup`)."""

    source: str
    source_dir: str
    split: str
    text_kind: str
    text_checkpoint: str | None
    text_max_tokens: int
    encode_batch: int

    def setup(self) -> None:
        import data_pipelines.build  # noqa: F401  (registers the source builders)
        from jaxsora.text.encoders import load_text_encoder

        self._enc = load_text_encoder(self.text_kind, self.text_checkpoint, self.text_max_tokens)
        self._records = tfds.builder(self.source, data_dir=self.source_dir).as_data_source(
            self.split
        )

    def __call__(self, unit: tuple[int, int]):
        start, stop = unit
        enc = self._enc
        for first in range(start, stop, self.encode_batch):
            batch = [self._records[i] for i in range(first, min(first + self.encode_batch, stop))]
            captions = [_text(r["caption"]) for r in batch]
            padded = captions + captions[-1:] * (self.encode_batch - len(captions))
            emb32, mask = enc.embed(padded)
            emb32, mask = emb32[: len(batch)], mask[: len(batch)]
            emb = emb32.astype(np.float16)
            if not np.isfinite(emb).all():
                raise ValueError(
                    f"caption_embeddings/{self.split}: records {first}..{first + len(batch) - 1}"
                    f": embeddings overflow float16 (max |x| = {np.abs(emb32).max():.4g} > "
                    f"65504); this encoder ({enc.kind}, {enc.checkpoint}) cannot be cached in "
                    "float16"
                )
            err = np.abs(emb.astype(np.float32) - emb32)
            yield engine.Peak("max_error", round(float(err.max()) * FIXED_POINT))
            yield engine.Tally("sum_error", round(float(err.sum(dtype=np.float64)) * FIXED_POINT))
            yield engine.Tally("values", int(err.size))
            for offset, record in enumerate(batch):
                # The record as read, re-encoded by the same features: unchanged.
                yield first + offset, {**record, EMB_KEY: emb[offset], MASK_KEY: mask[offset]}
