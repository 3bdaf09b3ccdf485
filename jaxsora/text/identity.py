"""Whether a dataset's precomputed caption embeddings come from the configured text encoder.

`data_pipelines/caption_embeddings` stores `enc.identity` (kind, checkpoint folder, sha256 of the
weight files and of tokenizer.json, max_tokens, dim) under "text_encoder" in the dataset's
metadata. A model trained on embeddings of one encoder and sampled with prompts embedded by
another conditions on numbers it never saw, silently: `check_text_encoder` refuses that before
anything compiles. Every field but the folder is compared, so weights that moved (same sha256)
are the same encoder. A dataset with no "text_encoder" metadata holds captions only; they are
encoded at run time and any encoder is fine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

METADATA_KEY = "text_encoder"
# Fields that name the encoder's output, and how a message calls them. Any other field found in
# either identity (but the folder) is compared too, so an identity that grows stays checked.
_FIELD_NAMES = {
    "kind": "kind",
    "weights_sha256": "sha256 of the weights",
    "tokenizer_sha256": "sha256 of the tokenizer",
    "max_tokens": "max_tokens",
    "dim": "dim",
}
_IGNORED = ("checkpoint",)  # the folder: a copy of the same files elsewhere is the same encoder


class TextEncoderMismatchError(ValueError):
    """Caption embeddings made by one text encoder read with a config naming another."""


def _short(value: Any) -> str:
    if isinstance(value, Mapping):  # {file: sha256}
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    return repr(value)


def identity_differences(stored: Mapping, expected: Mapping) -> list[str]:
    """The fields (but the folder) where two encoder identities differ, as readable phrases,
    e.g. "max_tokens: 16 in the dataset vs 32 configured"; [] when they name the same encoder."""
    problems = []
    extra = sorted((set(stored) | set(expected)) - set(_FIELD_NAMES) - set(_IGNORED))
    for key in [*_FIELD_NAMES, *extra]:
        a, b = stored.get(key), expected.get(key)
        if a != b:
            name = _FIELD_NAMES.get(key, key)
            problems.append(f"{name}: {_short(a)} in the dataset vs {_short(b)} configured")
    return problems


def stored_identity(records_or_metadata: Any) -> Mapping | None:
    """The "text_encoder" identity of a dataset, or None. Takes the metadata mapping itself, a
    data source (`.dataset_info.metadata`), a DatasetInfo (`.metadata`) or a builder (`.info`)."""
    obj = records_or_metadata
    if not isinstance(obj, Mapping):
        info = getattr(obj, "dataset_info", None) or getattr(obj, "info", None) or obj
        obj = getattr(info, "metadata", None)
    if obj is None or not hasattr(obj, "get"):
        return None
    return obj.get(METADATA_KEY)


def _build_flags(identity: Mapping) -> str:
    flags = f"--text_encoder {identity.get('kind')}"
    checkpoint = identity.get("checkpoint")
    if checkpoint and not _is_packaged_minilm(identity):
        flags += f" --text_checkpoint {checkpoint}"
    return flags + f" --text_max_tokens {identity.get('max_tokens')}"


def _is_packaged_minilm(identity: Mapping) -> bool:
    if identity.get("kind") != "minilm":
        return False
    try:  # lazy: the encoders pull in JAX and the model code
        import os

        from jaxsora.text.encoders import minilm_folder

        return os.path.realpath(minilm_folder()) == os.path.realpath(identity["checkpoint"])
    except Exception:  # noqa: BLE001 - the package is missing: name the folder instead
        return False


def check_text_encoder(
    records_or_metadata: Any, expected_identity: Mapping, source_name: str
) -> Mapping | None:
    """Raises TextEncoderMismatchError unless the dataset `source_name` (as in data.sources)
    holds embeddings of `expected_identity`'s encoder; returns the stored identity (None: the
    dataset holds captions only, encoded at run time)."""
    stored = stored_identity(records_or_metadata)
    if stored is None:
        return None
    problems = identity_differences(stored, expected_identity)
    if problems:
        raise TextEncoderMismatchError(
            f"dataset {source_name!r} holds caption embeddings of another text encoder than the "
            f"config's: {'; '.join(problems)} (dataset: kind={stored.get('kind')!r} from "
            f"{stored.get('checkpoint')!r}; config: kind={expected_identity.get('kind')!r} from "
            f"{expected_identity.get('checkpoint')!r}). Rebuild it with the config's encoder: "
            f"`python -m data_pipelines.build --dataset {source_name.replace('/', ':', 1)} "
            f"{_build_flags(expected_identity)} --data_dir DATA_DIR --overwrite`, or set "
            f"config text.encoder={stored.get('kind')!r}, text.checkpoint="
            f"{stored.get('checkpoint')!r} and model.text_len={stored.get('max_tokens')} to "
            f"match the dataset"
        )
    return stored
