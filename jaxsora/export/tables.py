"""Strict loading of pretrained weights: safetensors only, every key and shape checked at once.

Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: unpickling runs arbitrary code
and needs PyTorch. A checkpoint is one `model.safetensors` or shards named by
`model.safetensors.index.json` (or diffusers' `diffusion_pytorch_model.*`). Shapes are read
from the headers first (`read_shapes`), so a wrong checkpoint is reported before gigabytes are
read.

`check_table` checks a found {key: shape} table against an expected one (the text encoders use
it); `report` formats any list of (key, expected, found) problems as one message with its fix
(the VAE import, jaxsora/export/vae.py, builds its rows from its conversion rules and
transforms, and the VAE directory loader, jaxsora/vae_dir.py, from the saved shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The weight files a folder may hold: transformers' `model`, diffusers'
# `diffusion_pytorch_model`, each one file or shards with an index.
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_ROWS = 100  # a wholly wrong file would otherwise print thousands of lines
_CHUNK = 1 << 22  # 4 MiB reads when hashing

Shape = tuple[int, ...]


class WeightTableError(ValueError):
    """A checkpoint whose keys or shapes are not the model's; the message lists every problem."""


def _pickle_refusal(path: str) -> ValueError:
    return ValueError(
        f"{path}: pickle files are refused (.bin/.pt/.pth/.ckpt run arbitrary code when loaded "
        "and need PyTorch); convert to safetensors once on a machine with PyTorch: "
        "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`, or "
        "`safetensors.torch.save_file(torch.load(F), 'model.safetensors')`"
    )


def weight_files(paths_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The safetensors files of a checkpoint: a folder, one file, an index file, or a list."""
    if isinstance(paths_or_dir, str | os.PathLike):
        path = os.fspath(paths_or_dir)
        if os.path.isdir(path):
            for stem in WEIGHT_STEMS:
                single = os.path.join(path, f"{stem}.safetensors")
                index = os.path.join(path, f"{stem}.safetensors.index.json")
                if os.path.isfile(single):
                    return [single]
                if os.path.isfile(index):
                    return weight_files(index)
            pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise _pickle_refusal(os.path.join(path, pickles[0]))
            raise FileNotFoundError(
                f"{path}: no {SINGLE_FILE} and no {INDEX_FILE} (found: "
                f"{', '.join(sorted(os.listdir(path))) or 'nothing'}); a checkpoint folder holds "
                "the weights as safetensors, as written by `save_pretrained`"
            )
        if path.endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(path)
        if path.endswith(".json"):
            with open(path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{path}: no `weight_map` of key -> shard file in the index")
            folder = os.path.dirname(path)
            shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
            missing = [s for s in shards if not os.path.isfile(s)]
            if missing:
                raise FileNotFoundError(
                    f"{path}: names {len(missing)} shard(s) that are not there: "
                    + ", ".join(missing)
                )
            return shards
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: not a .safetensors file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        return [path]
    files: list[str] = []
    for p in paths_or_dir:
        files.extend(weight_files(p))
    return files


def _source(paths_or_dir) -> str:
    if isinstance(paths_or_dir, str | os.PathLike):
        return os.fspath(paths_or_dir)
    return ", ".join(os.fspath(p) for p in paths_or_dir)


def read_shapes(paths_or_dir) -> dict[str, Shape]:
    """{key: shape} of every tensor, from the safetensors headers only (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, Shape] = {}
    for path in weight_files(paths_or_dir):
        try:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if key in shapes:
                        raise ValueError(f"{path}: key {key} is also in another shard")
                    shapes[key] = tuple(int(d) for d in f.get_slice(key).get_shape())
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    return shapes


def load_safetensors(paths_or_dir, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """{key: numpy array} of a checkpoint (all keys, or only `keys`); numpy only, no PyTorch."""
    from safetensors import SafetensorError, safe_open

    wanted = None if keys is None else set(keys)
    out: dict[str, np.ndarray] = {}
    for path in weight_files(paths_or_dir):
        try:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118
                    if wanted is None or key in wanted:
                        out[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    if wanted is not None and wanted - set(out):
        raise WeightTableError(
            f"{_source(paths_or_dir)}: keys not found: {', '.join(sorted(wanted - set(out)))}"
        )
    return out


def _shape(s: Sequence[int]) -> str:
    return str(tuple(int(x) for x in s))


def check_table(
    found: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    source: str,
    *,
    optional: Mapping[str, Sequence[int] | None] | None = None,
    fix: str | None = None,
) -> None:
    """Raises one WeightTableError naming `source` and listing every missing, unexpected
    (extra) and misshapen key, or returns None when `found` is exactly `expected`.

    `optional`: keys a checkpoint may hold that the model does not use (a shape of None: any);
    shown in the message so that a reader sees what was allowed and why nothing was missed.
    """
    optional = dict(optional or {})
    rows: list[tuple[str, str, str]] = []
    for key in sorted(set(expected) | set(found)):
        if key in expected:
            want = _shape(expected[key])
            if key not in found:
                rows.append((key, want, "missing"))
            elif tuple(found[key]) != tuple(expected[key]):
                rows.append((key, want, _shape(found[key])))
        elif key in optional:
            want = optional[key]
            if want is not None and tuple(found[key]) != tuple(want):
                rows.append((key, _shape(want) + " (unused)", _shape(found[key])))
        else:
            rows.append((key, "-", f"{_shape(found[key])} unexpected"))
    if not rows:
        return
    counts = {
        "missing": sum(r[2] == "missing" for r in rows),
        "unexpected": sum(r[2].endswith("unexpected") for r in rows),
    }
    counts["misshapen"] = len(rows) - counts["missing"] - counts["unexpected"]
    shown = rows[:_MAX_ROWS]
    header = ("key", "expected shape", "found")
    width = [max(len(r[i]) for r in [header, *shown]) for i in range(3)]
    lines = [
        f"{source}: {len(rows)} problem(s) with the weight table ("
        + ", ".join(f"{n} {what}" for what, n in counts.items())
        + "):"
    ]
    for r in [header, *shown]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more")
    if optional:
        lines.append("Allowed but unused: " + ", ".join(sorted(optional)))
    lines.append(
        "Fix: "
        + (fix or "the checkpoint does not match its config.json: check the folder and config")
    )
    raise WeightTableError("\n".join(lines))


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str) -> str:
    """sha256 of a file's whole content, streamed in 4 MiB chunks (a 10 GB T5 takes ~10 s once);
    cached in-process by (real path, size, mtime), so reloading does not hash again."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# A wholly wrong file would otherwise print thousands of lines.
MAX_ROWS = 100


def shape_str(s) -> str:
    return str(tuple(int(x) for x in s))


def report(source: str, what: str, rows: list[tuple[str, str, str]], fix: str) -> str:
    """One message: the file, a table of every problem, and what to do about it."""
    shown = rows[:MAX_ROWS]
    header = ("key", "expected shape", "found")
    width = [max(len(r[i]) for r in [header, *shown]) for i in range(3)]
    lines = [f"{source}: {len(rows)} problem(s) {what}:"]
    for r in [header, *shown]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more")
    lines.append(f"Fix: {fix}")
    return "\n".join(lines)
