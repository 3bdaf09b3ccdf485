"""crc32 checksums of the array slices a checkpoint holds, so a flipped or rewritten weight file
is caught on restore instead of training on (jaxsora/checkpointing.py writes and checks them).

Each process sums the slices it saves (its shards with replica_id 0), keyed by the array's
dotted path and the slice's global index; on restore each process checks every saved slice that
lies wholly inside one of its restored shards. On the mesh that saved it that is all of its own;
restored on one device, everything; a slice split over several restored shards is not checked.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np


def shard_checksums(state: Any) -> dict:
    """crc32 of every array slice this process saves (its shards with replica_id 0), by dotted
    path and the slice's global index: {path: {shape, dtype, slices: {"0:32,0:64": crc}}}."""
    shards = []
    for name, x in named_leaves(state):
        if isinstance(x, jax.Array):
            for s in x.addressable_shards:
                if s.replica_id == 0:
                    s.data.copy_to_host_async()  # every transfer in flight before the first wait
                    shards.append((name, x, s.index, s.data))
        elif jax.process_index() == 0:  # host values: saved once, by the primary process
            shards.append((name, np.asarray(x), (), x))
    out: dict = {}
    for name, x, index, data in shards:
        entry = out.setdefault(name, {"shape": list(x.shape), "dtype": str(x.dtype), "slices": {}})
        entry["slices"][_region_key(_region(index, x.shape))] = _crc(np.asarray(data))
    return out


def verify_checksums(state: Any, saved: dict) -> tuple[int, list[str]]:
    """(slices checked, names of those that differ) against `shard_checksums` output."""
    done, bad = set(), []
    for name, x in named_leaves(state):
        entry = saved.get(name)
        if entry is None or entry["dtype"] != str(x.dtype) or tuple(entry["shape"]) != x.shape:
            continue
        slices = [(_parse_region(k), k, crc) for k, crc in entry["slices"].items()]
        for region, data in _local_pieces(x):
            host = None
            for want, key, crc in slices:
                if (name, key) in done or not _contains(region, want):
                    continue
                host = np.asarray(data) if host is None else host
                local = tuple(
                    slice(a - r0, b - r0) for (a, b), (r0, _) in zip(want, region, strict=True)
                )
                done.add((name, key))
                if _crc(host[local]) != crc:
                    bad.append(f"{name}[{key}]")
    return len(done), bad


def _local_pieces(x) -> list[tuple[tuple, Any]]:
    """(global region, data) of each distinct piece of `x` this process holds."""
    if not isinstance(x, jax.Array):
        return [(_region((), np.shape(x)), x)]
    pieces = {}
    for s in x.addressable_shards:
        pieces.setdefault(_region(s.index, x.shape), s.data)
    return list(pieces.items())


def _region(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _region_key(region) -> str:
    return ",".join(f"{a}:{b}" for a, b in region)


def _parse_region(key: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in part.split(":")) for part in key.split(",") if part)


def _contains(outer, inner) -> bool:
    return all(a <= c and d <= b for (a, b), (c, d) in zip(outer, inner, strict=True))


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def named_leaves(tree: Any, is_leaf=None) -> list[tuple[str, Any]]:
    """Dotted paths (`ema.blocks.0.ada.bias`): lists and dicts name alike, as Orbax saves."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return [(jax.tree_util.keystr(p, simple=True, separator="."), x) for p, x in leaves]
