"""Builds a jaxsora dataset as TFDS array_record files, offline, with no TensorFlow.

    python -m data_pipelines.build --dataset synthetic_clips:small --data_dir data/tfds
    python -m data_pipelines.build --dataset sample_media --data_dir data/tfds
    python -m data_pipelines.build --dataset video_folder --folder my_clips --data_dir data/mine
    python -m data_pipelines.build --dataset latents:synthetic_clips --vae_dir runs/vae/vae \
        --data_dir data/tfds   # the VAE latents of a dataset already built in data_dir
    python -m data_pipelines.build --dataset caption_embeddings:synthetic_clips \
        --text_encoder minilm --data_dir data/tfds   # + caption embeddings of a built dataset
    python -m data_pipelines.build --dataset video_folder --folder my_clips --data_dir data/mine \
        --beam_options="--runner=DirectRunner --direct_num_workers=2 \
        --direct_running_mode=multi_processing"      # on Apache Beam (README, "Data")

video_folder, latents and caption_embeddings run on Apache Beam when given --beam_options
(data_pipelines/engine.py: the same records as without); --num_shards sets the array_record
files per split, --recaptioner rewrites captions as they are built (data_pipelines/recaption.py).

Read back with `builder.as_data_source(split)` or `tfds.data_source(name, data_dir=...)` after
importing `data_pipelines.build` (the import registers the builders).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines.caption_embeddings import CaptionEmbeddings
from data_pipelines.latents import Latents
from data_pipelines.sample_media import SampleMedia
from data_pipelines.synthetic_clips import SyntheticClips
from data_pipelines.video_folder import VideoFolder

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "synthetic_clips": SyntheticClips,
    "sample_media": SampleMedia,
    "video_folder": VideoFolder,
    "latents": Latents,
    "caption_embeddings": CaptionEmbeddings,
}


def make_builder(name: str, data_dir: str, **builder_kwargs: Any) -> tfds.core.DatasetBuilder:
    """`name` is "dataset" or "dataset:config" (or "dataset/config")."""
    dataset, _, config = name.replace("/", ":").partition(":")
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(BUILDERS)}")
    if config:
        builder_kwargs["config"] = config
    return BUILDERS[dataset](data_dir=os.path.abspath(data_dir), **builder_kwargs)


def beam_pipeline_options(beam_options: str | Sequence[str]):
    """Beam's PipelineOptions from flags as one string ("--runner=DirectRunner
    --direct_num_workers=2") or a list."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    return PipelineOptions(args)


def build(
    name: str,
    data_dir: str,
    *,
    overwrite: bool = False,
    beam_options: str | Sequence[str] | None = None,
    num_shards: int | None = None,
    **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
    """Prepares `name` under `data_dir` (reusing a finished build unless `overwrite`).

    `builder_kwargs` go to the builder, e.g. `folder=` for video_folder, `vae_dir=` for latents,
    `text_encoder=`, `text_checkpoint=`, `text_max_tokens=` for caption_embeddings,
    `recaptioner=` for the builders that make captions. `beam_options` (Beam's pipeline flags,
    e.g. "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing")
    runs the build on Apache Beam (builders of `data_pipelines.engine`; the same records as
    without); `num_shards` fixes the number of array_record files per split (TFDS sizes them
    otherwise: one per 64 MiB-1 GiB).
    """
    builder = make_builder(name, data_dir, **builder_kwargs)
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # rebuilds the dataset itself
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    # The builders already write array_record (their constructor's default); asking again would
    # make TFDS refuse to rebuild (--overwrite) a dataset whose info it has read.
    has_format = getattr(builder.info.file_format, "value", None) == "array_record"
    builder.download_and_prepare(
        # try_download_gcs=False: never look for a prebuilt copy online.
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            download_mode=mode,
            beam_options=beam_pipeline_options(beam_options) if beam_options else None,
            num_shards=num_shards,
        ),
        file_format=None if has_format else "array_record",
    )
    return builder


def summary(builder: tfds.core.DatasetBuilder, seconds: float) -> str:
    splits = " ".join(f"{k}={v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    size = sum(
        os.path.getsize(os.path.join(builder.data_dir, f)) for f in os.listdir(builder.data_dir)
    )
    counts = (builder.info.metadata or {}).get("counts")
    counted = f", counts {json.dumps(counts, sort_keys=True)}" if counts else ""
    return (
        f"{builder.info.full_name}: {splits} examples, {seconds:.1f} s, "
        f"{size / 2**20:.1f} MiB in {builder.data_dir}{counted}"
    )


def main(argv: list[str]) -> None:
    del argv
    from absl import app, flags

    f = flags.FLAGS
    kwargs = {"folder": f.folder} if f.folder else {}
    if f.vae_dir:
        kwargs["vae_dir"] = f.vae_dir
    if f.text_encoder:
        kwargs.update(
            text_encoder=f.text_encoder,
            text_checkpoint=f.text_checkpoint,
            text_max_tokens=f.text_max_tokens,
        )
    elif f.text_checkpoint:
        raise app.UsageError("--text_checkpoint needs --text_encoder (minilm, t5 or umt5)")
    if f.recaptioner:
        kwargs["recaptioner"] = f.recaptioner
    if f.drop_bad_media:
        kwargs["drop_bad_media"] = True
    start = time.perf_counter()
    builder = build(
        f.dataset,
        f.data_dir,
        overwrite=f.overwrite,
        beam_options=f.beam_options,
        num_shards=f.num_shards,
        **kwargs,
    )
    print(summary(builder, time.perf_counter() - start))


def _define_flags() -> None:
    # Defined only when run as a script, so importing `build` never clashes with other flags.
    from absl import flags

    flags.DEFINE_string("dataset", None, f"One of {sorted(BUILDERS)}, optionally ':config'.")
    flags.DEFINE_string("data_dir", "data/tfds", "Where TFDS writes the dataset.")
    flags.DEFINE_string("folder", None, "Media folder, for --dataset video_folder.")
    flags.DEFINE_string("vae_dir", None, "VAE directory to encode with, for --dataset latents.")
    flags.DEFINE_enum(
        "text_encoder",
        None,
        ["minilm", "t5", "umt5"],
        "Frozen text encoder to embed captions with, for --dataset caption_embeddings.",
    )
    flags.DEFINE_string(
        "text_checkpoint", None, "Text encoder folder (optional for minilm: the packaged weights)."
    )
    flags.DEFINE_integer("text_max_tokens", 16, "Caption tokens kept, for caption_embeddings.")
    flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset already exists.")
    flags.DEFINE_string(
        "beam_options",
        None,
        "Build on Apache Beam with these pipeline flags, e.g. '--runner=DirectRunner "
        "--direct_num_workers=2 --direct_running_mode=multi_processing' (README, Data).",
    )
    flags.DEFINE_integer("num_shards", None, "array_record files per split (default: by size).")
    flags.DEFINE_string(
        "recaptioner",
        None,
        "identity, template or package.module:function (data_pipelines/recaption.py), for the "
        "builders that make captions.",
    )
    flags.DEFINE_bool(
        "drop_bad_media",
        False,
        "video_folder: leave undecodable files out (default: counted, kept).",
    )
    flags.mark_flag_as_required("dataset")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
