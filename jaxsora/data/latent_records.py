"""The latent cache's record format (`data_pipelines/latents`), read side: a record holds one
clip's raw VAE latents at one or more sizes, and the pipeline draws one size per example.

    latents        float32, every size's [T', H', W', C] flattened and concatenated
    latent_shapes  int32 [K, 4], the sizes, in the order stored (largest budget first)

A record of a cache built before multi-resolution (version 1.x) has a 4-D `latents` and no
`latent_shapes`: one size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def sizes(record: Mapping[str, Any]) -> list[np.ndarray]:
    """The record's latents, one array [T', H', W', C] per stored size."""
    flat = np.asarray(record["latents"])
    if "latent_shapes" not in record:
        return [flat]
    shapes = np.asarray(record["latent_shapes"]).reshape(-1, 4)
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    if not len(shapes) or ends[-1] != flat.size:
        raise ValueError(
            f"latent record: latent_shapes {shapes.tolist()} hold {ends[-1] if len(ends) else 0} "
            f"values but latents has {flat.size}; rebuild the cache (data_pipelines/latents)"
        )
    starts = np.concatenate([[0], ends[:-1]])
    return [flat[a:b].reshape(tuple(s)) for a, b, s in zip(starts, ends, shapes, strict=True)]


def tokens(z: np.ndarray, patch: tuple[int, int, int]) -> int:
    """Patches of `z` [T', H', W', C] at `patch` (partial patches cropped, at least one frame)."""
    pt, ph, pw = patch
    return max(1, z.shape[0] // pt) * (z.shape[1] // ph) * (z.shape[2] // pw)


def choose(
    options: list[np.ndarray],
    patch: tuple[int, int, int],
    min_tokens: int,
    max_tokens: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One size for this example, uniformly among those within [min_tokens, max_tokens]; else
    among those within max_tokens; else the smallest (the pipeline crops it to the budget).
    One stored size draws nothing from `rng`, so a single-size cache gives the examples it
    always gave."""
    if len(options) == 1:
        return options[0]
    counts = [tokens(z, patch) for z in options]
    fits = [i for i, n in enumerate(counts) if min_tokens <= n <= max_tokens]
    fits = fits or [i for i, n in enumerate(counts) if n <= max_tokens]
    if not fits:
        return options[int(np.argmin(counts))]
    if len(fits) == 1:
        return options[fits[0]]
    return options[fits[int(rng.integers(len(fits)))]]
