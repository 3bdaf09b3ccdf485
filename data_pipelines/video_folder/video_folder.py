"""video_folder: a folder of your own videos and images, with captions, as a TFDS dataset.

Why raw bytes: the input pipeline decodes only the frames an example uses, at the size it
draws, so decoding at build time would fix one size and cost the disk of raw frames. The
builder stores every media file as it is, after a probe (its first frame decoded) that counts
the files that fail ("undecodable" in the metadata's "counts", logged with their paths):
kept by default, where `jaxsora.data.media.decode_example` raises `BadMediaError` naming the
file in the input pipeline, which skips and counts it; left out with `drop_bad_media=True`
(`--drop_bad_media`). A file that cannot be read is always left out and counted
("unreadable"). No bad file stops the build.

The build runs in units of `FILES_PER_UNIT` files (`data_pipelines.engine`), in this process or
on Apache Beam (`--beam_options`), with the same records either way; the captions go through
the build's recaptioner (`--recaptioner`, data_pipelines/recaption.py).

Captions, first match wins: a line {"file": "sub/name.mp4", "caption": "..."} in
`<folder>/captions.jsonl` (paths relative to the folder), a sidecar `name.txt` next to the file,
else the file stem with underscores as spaces. Subfolders are searched; hidden files skipped.

Videos are any container PyAV (FFmpeg) decodes (`VIDEO_EXTS`: .mp4, .mov, .webm, .mkv, .avi,
.gif, ...), images what Pillow reads (`IMAGE_EXTS`). Other files are not stored; the build logs
how many there were, with examples, so a folder of, say, .heic photos is not silently empty.

    python -m data_pipelines.build --dataset video_folder --folder my_clips \
        --data_dir data/tfds_my_clips

The folder is only needed to build; on a cluster runner it must be at the same path on every
worker (a shared mount). Read it back with
`tfds.data_source("video_folder", split="train", data_dir=...)`. One data_dir holds one folder:
rebuilding from another folder into the same data_dir needs `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import engine, recaption

# By extension, as FFmpeg's demuxers and Pillow know them; a .gif is decoded as a video (an
# animated one has many frames, a still one gives a one-frame clip).
VIDEO_EXTS = (
    ".mp4", ".m4v", ".mov", ".qt", ".webm", ".mkv", ".avi", ".gif", ".mpg", ".mpeg",
    ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp", ".ogv",
)  # fmt: skip
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTIONS_FILE = "captions.jsonl"
CAPTION_EXT = ".txt"  # sidecar captions: read, not stored, and not reported as unknown


def media_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def scan_folder(folder: str) -> tuple[list[str], list[str]]:
    """(media files, files of unknown kind) under `folder`, relative posix paths, sorted so
    keys are stable. Hidden files, `captions.jsonl` and .txt sidecars are neither."""
    media, unknown = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or name == CAPTIONS_FILE or name.lower().endswith(CAPTION_EXT):
                continue
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            (media if media_kind(name) else unknown).append(rel)
    return sorted(media), sorted(unknown)


def report_unknown(folder: str, unknown: list[str]) -> None:
    if unknown:
        logging.warning(
            "video_folder: %d files in %s are not media this builder reads and are left out, "
            "e.g. %s; it reads %s (convert the others, e.g. with ffmpeg, to include them)",
            len(unknown),
            folder,
            ", ".join(unknown[:5]),
            " ".join(VIDEO_EXTS + IMAGE_EXTS),
        )


def read_captions_jsonl(folder: str) -> dict[str, str]:
    path = os.path.join(folder, CAPTIONS_FILE)
    if not os.path.exists(path):
        return {}
    captions = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[os.path.normpath(entry["file"]).replace(os.sep, "/")] = str(
                    entry["caption"]
                )
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with 'file' and 'caption' "
                    f'(like {{"file": "a.mp4", "caption": "a dog runs"}}), got {line.strip()!r}'
                ) from e
    return captions


def caption_for(folder: str, rel: str, captions: dict[str, str]) -> str:
    if rel in captions:
        return captions[rel]
    sidecar = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
    if os.path.exists(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            if text := f.read().strip():
                return text
    return os.path.splitext(os.path.basename(rel))[0].replace("_", " ").strip()


def probe(data: bytes, kind: str, path: str) -> None:
    """Raises BadMediaError unless the file's first frame decodes (a cheap check: one frame)."""
    from jaxsora.data.media import check_frames, decode_image_bytes, decode_video_bytes

    if kind == "video":
        check_frames(decode_video_bytes(data, path, max_frames=1), path)
    else:
        check_frames(decode_image_bytes(data, path), path)


@dataclasses.dataclass
class FolderFiles(engine.Processor):
    """One unit: a run of (key, relative path); each file read, probed and captioned."""

    folder: str
    captions: dict[str, str]
    drop_bad_media: bool
    recaptioner: str = "identity"

    def setup(self) -> None:
        self._recaption = recaption.get_recaptioner(self.recaptioner)

    def __call__(self, unit):
        from jaxsora.data.media import BadMediaError

        for key, rel in unit:
            path = os.path.join(self.folder, rel)
            kind = media_kind(rel)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield engine.Skip("unreadable", f"{path}: {e}")
                continue
            try:
                probe(data, kind, path)
            except BadMediaError as e:
                if self.drop_bad_media:
                    yield engine.Skip("undecodable", str(e))
                    continue
                # Kept: the input pipeline skips and counts it as it reads (see the module doc).
                yield engine.Tally("undecodable")
            caption = caption_for(self.folder, rel, self.captions)
            media = recaption.Media(path=path, kind=kind, data=data)
            yield (
                key,
                {
                    "media": data,
                    "media_kind": kind,
                    "caption": self._recaption(caption, media),
                    "path": path,
                },
            )


class VideoFolder(recaption.RecaptionedBuilder, engine.EngineBuilder):
    """User media from a folder, stored undecoded with a caption per file."""

    # The records are the same as in 1.0.0 (the probe, the counts and the recaptioner only add
    # metadata), so builds from before stay readable.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    FILES_PER_UNIT = 64

    def __init__(
        self,
        *,
        folder: str | None = None,
        drop_bad_media: bool = False,
        file_format: str | None = "array_record",
        **kwargs,
    ):
        # array_record: random access through `as_data_source`, with no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)
        self._folder = os.path.abspath(os.path.expanduser(folder)) if folder else None
        self._drop_bad_media = bool(drop_bad_media)
        # Survive pickling, like the other args.
        self._original_state.update(folder=folder, drop_bad_media=drop_bad_media)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # np.object_ scalar: variable-length bytes, stored as-is, read back as bytes.
                    "media": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "media_kind": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                    "path": tfds.features.Text(),
                }
            ),
            # Filled at build time: the counts per split and the recaptioner's identity.
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # record i is the i-th file in sorted order
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the media is local
        if not self._folder:
            raise ValueError(
                "video_folder needs the media folder to build: pass VideoFolder(folder=...), "
                "tfds.builder('video_folder', folder=...) or --folder to data_pipelines.build"
            )
        if not os.path.isdir(self._folder):
            raise FileNotFoundError(f"video_folder: {self._folder} is not a directory")
        files, unknown = scan_folder(self._folder)
        report_unknown(self._folder, unknown)
        if not files:
            raise ValueError(
                f"video_folder: no media in {self._folder} ({len(unknown)} files of other "
                f"kinds); expected files ending in {', '.join(VIDEO_EXTS + IMAGE_EXTS)}"
            )
        captions = read_captions_jsonl(self._folder)
        if missing := sorted(set(captions) - set(files)):
            logging.warning(
                "%s names %d files not in the folder, e.g. %s",
                CAPTIONS_FILE,
                len(missing),
                missing[:3],
            )
        self.store_recaptioner()
        processor = FolderFiles(self._folder, captions, self._drop_bad_media, self.recaptioner)
        units = engine.chunks(list(enumerate(files)), self.FILES_PER_UNIT)
        return {"train": self._generate_examples("train", units, processor)}
