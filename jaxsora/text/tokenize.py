"""Caption tokenization with the `tokenizers` package, from a checkpoint's `tokenizer.json`.

Named tokenize.py so as not to shadow the `tokenizers` package. Truncation and padding to a fixed
`max_tokens` match transformers' `tokenizer(captions, truncation=True, padding="max_length",
max_length=max_tokens)`: the special tokens of the file's post-processor are kept when a caption
is cut (BERT: [CLS] ... [SEP]; T5: ... </s>).
"""

from __future__ import annotations

import os

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
_PAD_TOKENS = ("[PAD]", "<pad>")


def _missing_message(path: str) -> str:
    return (
        f"{path}: no such file; the checkpoint folder needs the fast tokenizer's tokenizer.json. "
        "Write it once on a machine with network: `from transformers import AutoTokenizer; "
        "AutoTokenizer.from_pretrained('<hub id, e.g. google/t5-v1_1-xxl>')"
        f".save_pretrained('{os.path.dirname(path)}')`"
    )


class CaptionTokenizer:
    """Fixed-length token ids and masks for a batch of captions."""

    def __init__(self, folder: str, max_tokens: int):
        from tokenizers import Tokenizer

        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(_missing_message(path))
        if max_tokens < 2:
            raise ValueError(f"max_tokens={max_tokens}: need room for the special tokens")
        tok = Tokenizer.from_file(path)
        pad = tok.padding or {}
        pad_token = pad.get("pad_token")
        if pad_token is None or tok.token_to_id(pad_token) is None:
            pad_token = next((t for t in _PAD_TOKENS if tok.token_to_id(t) is not None), None)
        if pad_token is None:
            raise ValueError(f"{path}: no padding token (looked for {', '.join(_PAD_TOKENS)})")
        tok.enable_truncation(max_length=max_tokens)
        pad_id = tok.token_to_id(pad_token)
        tok.enable_padding(length=max_tokens, pad_id=pad_id, pad_token=pad_token)
        self.path, self.max_tokens, self._tok = path, max_tokens, tok

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, max_tokens] int32, mask [N, max_tokens] bool: True on real tokens)."""
        if isinstance(captions, str):
            raise TypeError("captions: a list of strings, not one string")
        encs = self._tok.encode_batch(list(captions))
        ids = np.asarray([e.ids for e in encs], np.int32).reshape(len(encs), self.max_tokens)
        mask = np.asarray([e.attention_mask for e in encs], bool).reshape(ids.shape)
        return ids, mask


def tokenize(folder: str, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """One-off form of `CaptionTokenizer(folder, max_tokens)(captions)`."""
    return CaptionTokenizer(folder, max_tokens)(captions)
