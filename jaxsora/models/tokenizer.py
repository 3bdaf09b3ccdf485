"""A vocabulary-free caption tokenizer: words hashed into a fixed id range.

Stable across machines and processes (crc32, not Python's salted hash), needs no vocabulary file,
and gives a small trainable caption encoder distinct ids for the words it will see. Id 0 is
padding, id 1 is the start token that every caption keeps, even when dropped for
classifier-free guidance, so cross-attention always has one key to attend to.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

PAD_ID = 0
START_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str | bytes, text_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption -> (ids [text_len] int32, mask [text_len] bool); long captions are truncated."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    words = _WORD.findall(caption.lower())[: text_len - 1]
    ids = np.full((text_len,), PAD_ID, np.int32)
    ids[0] = START_ID
    span = vocab_size - _FIRST_WORD_ID
    for i, word in enumerate(words, start=1):
        ids[i] = _FIRST_WORD_ID + zlib.crc32(word.encode()) % span
    return ids, ids != PAD_ID
