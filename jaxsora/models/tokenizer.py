"""A vocabulary-free caption tokenizer: words hashed into a fixed id range.

Stable across machines and processes (crc32, not Python's salted hash), needs no vocabulary file,
and gives a small trainable caption encoder distinct ids for the words it will see. Id 0 is
padding, id 1 is the start token that every caption keeps, even when dropped for
classifier-free guidance, so cross-attention always has one key to attend to.

Words are runs of letters and digits in any script (NFKC-normalised, lower-cased, hashed as
UTF-8); Chinese and Japanese characters, written without spaces, are a word each. On ASCII text
this is exactly the former `[a-z0-9]+` rule, so ASCII captions keep the ids that trained models
and built datasets rely on (tests/test_sample.py checks it). Non-ASCII captions were read
without their non-ASCII letters before: a model trained on such captions sees new ids for them.
"""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np

PAD_ID = 0
START_ID = 1
_FIRST_WORD_ID = 2
# Han and kana: written without spaces, so each character is a word of its own.
_ONE_CHAR_WORD = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
)


def caption_words(caption: str | bytes) -> list[str]:
    """The words a caption is read as; none means it is read as the empty (unconditional) one.

    A word is a run of letters and digits (Unicode categories L and N) with the combining marks
    that follow them (M: Devanagari vowel signs, decomposed accents). On ASCII these are exactly
    [A-Za-z0-9], so ASCII captions split as they always did.
    """
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    words, word = [], ""
    for ch in unicodedata.normalize("NFKC", caption).lower():
        kind = unicodedata.category(ch)[0]
        if kind == "L" and _ONE_CHAR_WORD.match(ch):
            words += [word, ch] if word else [ch]
            word = ""
        elif kind in "LN" or (kind == "M" and word):
            word += ch
        elif word:
            words.append(word)
            word = ""
    return words + [word] if word else words


def tokenize(caption: str | bytes, text_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption -> (ids [text_len] int32, mask [text_len] bool); long captions are truncated."""
    words = caption_words(caption)[: text_len - 1]
    ids = np.full((text_len,), PAD_ID, np.int32)
    ids[0] = START_ID
    span = vocab_size - _FIRST_WORD_ID
    for i, word in enumerate(words, start=1):
        ids[i] = _FIRST_WORD_ID + zlib.crc32(word.encode()) % span
    return ids, ids != PAD_ID
