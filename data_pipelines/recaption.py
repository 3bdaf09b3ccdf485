"""Recaptioning at build time: a pluggable function that replaces or augments each clip's caption.

Why: Sora trains on captions written by a captioning model, not on the alt-text that came with
the videos, because detailed, uniform captions are what make a model follow prompts. A
builder that makes captions (video_folder, synthetic_clips) takes `recaptioner=` (the build
flag `--recaptioner`), applies it to every record as it is built (in the Beam workers too), and
stores its identity in the dataset's metadata; training refuses a source whose recaptioner is
not the config's `data.recaptioner` (`jaxsora.data.pipeline`), and rebuilding a dataset with
another one into the same data_dir needs `--overwrite`.

Recaptioners, by name:

  identity                 the caption as it is (what every build did before; the default)
  template                 the synthetic clips' grammar rewritten as a fuller sentence:
                           "a red circle moving left on a blue background" ->
                           "a video of a red circle that moves left across a plain blue
                           background" (a photo: "a photo of ..."); other captions unchanged
  package.module:function  your own: `function(caption: str, media: Media) -> str`

A real captioner (a vision-language model) goes in a module on the Python path of the build
and of every Beam worker (ship it in the workers' requirements), e.g.

    # my_captioner.py
    import functools
    VERSION = "llava-1.6-7b, prompt v2"   # stored in the metadata: bump it when outputs change

    @functools.cache
    def _model():                        # loaded once per worker process, on first use
        from transformers import pipeline
        return pipeline("image-to-text", model="/models/llava")

    def recaption(caption: str, media) -> str:
        frames = media.frames(max_frames=8)   # decoded on demand: uint8 [T, H, W, 3]
        text = _model()(frames[len(frames) // 2])[0]["generated_text"]
        return f"{text.strip()} ({caption})"  # augment: keep the original words too

built with `--recaptioner my_captioner:recaption`. The function runs once per record; keep its
output within what the text encoder reads (`model.text_len` tokens). Its identity is the name
plus the module's (or function's) `VERSION` attribute, if any. To sample a model trained on
recaptioned data, extend prompts into the same style (`sample.prompt_extension`,
`jaxsora/prompts.py`); for `template` that is `data_pipelines.recaption:template_prompt`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

BUILTIN = ("identity", "template")
METADATA_KEY = "recaptioner"


@dataclasses.dataclass
class Media:
    """What a recaptioner may look at: the record's path and kind, and its pixels on demand
    (raw bytes of a user file, or frames a builder made), decoded only if asked for."""

    path: str
    kind: str  # "video" or "image"
    data: bytes | None = None
    array: np.ndarray | None = None  # uint8 [T, H, W, 3], when the builder has decoded frames

    def frames(self, max_frames: int | None = None) -> np.ndarray:
        if self.array is not None:
            return self.array[:max_frames]
        from jaxsora.data.media import decode_example

        record = {"media": self.data, "media_kind": self.kind, "path": self.path}
        return decode_example(record, max_frames=max_frames)


def identity(caption: str, media: Media) -> str:
    del media
    return caption


_SYNTHETIC = re.compile(
    r"^(?P<article>an?) (?P<object>\w+) (?P<shape>\w+)(?: moving (?P<direction>\w+))? "
    r"on an? (?P<background>\w+) background$"
)


def template(caption: str, media: Media) -> str:
    """The synthetic clips' grammar as a fuller sentence (see the module doc); any other caption
    is kept as it is, so the template is safe on mixed data."""
    m = _SYNTHETIC.match(caption.strip())
    if m is None:
        return caption
    kind = "photo" if media.kind == "image" else "video"
    motion = f" that moves {m['direction']} across" if m["direction"] else " on"
    subject = f"{m['article']} {m['object']} {m['shape']}"
    return f"a {kind} of {subject}{motion} a plain {m['background']} background"


def template_prompt(prompt: str) -> str:
    """`template` for sampling (`sample.prompt_extension`): a prompt in the synthetic grammar
    (after `jaxsora.prompts.template`), written as a recaptioned video's caption would be; a
    prompt without motion reads as a photo, as still clips were captioned."""
    from jaxsora.prompts import template as grammar

    caption = grammar(prompt)
    kind = "video" if " moving " in caption else "image"
    return template(caption, Media(path="<prompt>", kind=kind))


def get_recaptioner(name: str) -> Callable[[str, Media], str]:
    if name in BUILTIN:
        return globals()[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"recaptioner {name!r}: expected one of {BUILTIN} or 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"recaptioner {name!r}: cannot import {attr} from {module_name} ({e}); the module "
            "must be on the Python path of the build (and of every Beam worker)"
        ) from e
    if not callable(fn):
        raise ValueError(f"recaptioner {name!r}: {module_name}.{attr} is not callable")
    return fn


def identity_of(name: str) -> dict[str, Any]:
    """What the metadata stores: the name and the function's (or its module's) VERSION."""
    fn = get_recaptioner(name)
    version = getattr(fn, "VERSION", None) or getattr(sys.modules.get(fn.__module__), "VERSION", "")
    return {"name": name, "version": str(version or "")}


def stored_identity(metadata: Any) -> dict[str, Any]:
    """A dataset's recaptioner; datasets built before recaptioning existed are identity."""
    stored = metadata.get(METADATA_KEY) if hasattr(metadata, "get") else None
    return dict(stored) if stored else {"name": "identity", "version": ""}


class RecaptionedBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder with `recaptioner=`: the identity goes in its metadata (`store_recaptioner`,
    from `_split_generators`), and a rebuild with another one needs --overwrite."""

    def __init__(self, *, recaptioner: str = "identity", **kwargs: Any):
        self._recaptioner = recaptioner or "identity"
        super().__init__(**kwargs)
        self._original_state["recaptioner"] = recaptioner  # survives pickling

    @property
    def recaptioner(self) -> str:
        return self._recaptioner

    def store_recaptioner(self) -> None:
        self.info.metadata[METADATA_KEY] = identity_of(self._recaptioner)

    def download_and_prepare(self, *, download_config=None, **kwargs: Any) -> None:
        mode = (download_config or tfds.download.DownloadConfig()).download_mode
        if self.data_path.exists() and not mode.overwrite_dataset:
            stored = stored_identity(self.info.metadata)
            wanted = identity_of(self._recaptioner)
            if stored != wanted:
                raise ValueError(
                    f"{self.info.full_name} in {self._data_dir_root} was built with recaptioner "
                    f"{stored}, not the {wanted} asked for; pass --overwrite "
                    "(download_mode=REUSE_CACHE_IF_EXISTS) to rebuild it, or build into "
                    "another --data_dir"
                )
        super().download_and_prepare(download_config=download_config, **kwargs)
