"""What a resumed run may change: one table, used by both trainers (jaxsora/checkpointing.py).

A checkpoint holds weights of one shape and meaning, and an optimizer part-way through one
schedule. Resuming compares the checkpoint's saved config with the current one, field by field
(dotted names, `model.width`), and each field falls in one class, the first matching row below:

  weights    defines the saved tensors or what they mean: a change is refused, always.
  schedule   defines what the remaining steps optimise (learning-rate schedule, loss, batch):
             refused unless `allow_schedule_change=True`, and then logged.
  free       how the run executes (attention kernel, compute dtype, remat, mesh, cadence, data):
             allowed, and logged.

Fields not in the table: `model.*` and `vae.*` count as weights (a new architecture field may
change the tensors), anything else as free.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from typing import Any

from absl import logging

WEIGHTS, SCHEDULE, FREE = "weights", "schedule", "free"

# (dotted-name pattern, class, why); the first match wins.
RULES: tuple[tuple[str, str, str], ...] = (
    # DiT (config key "model"): execution only. Parameters stay float32 whatever `dtype` says.
    ("model.attention", FREE, "the attention kernel computes the same function"),
    ("model.attention_block", FREE, "the windowed kernel's query block: the same function"),
    ("model.dtype", FREE, "the compute dtype; parameters are float32"),
    ("model.remat", FREE, "activation checkpointing recomputes, it stores no weights"),
    (
        "model.scan_layers",
        WEIGHTS,
        "scanned blocks are saved stacked, unrolled ones one by one: another parameter tree "
        "(no conversion is implemented)",
    ),
    ("model.vae_dir", WEIGHTS, "the DiT was trained on that VAE's latents"),
    ("model.*", WEIGHTS, "an architecture field"),
    ("text.*", WEIGHTS, "the frozen caption encoder whose embeddings the DiT learnt to read"),
    # VAE (config key "vae").
    ("vae.dtype", FREE, "the compute dtype; parameters are float32"),
    ("vae.*", WEIGHTS, "an architecture field"),
    ("loss.disc_width", WEIGHTS, "the discriminator's width"),
    (
        "loss.adversarial_weight",
        WEIGHTS,
        "the discriminator and its optimizer are saved only when it is > 0",
    ),
    # What the remaining steps optimise.
    ("optim.accum_steps", FREE, "micro-batches: the same step, less activation memory"),
    ("optim.*", SCHEDULE, "the optimizer and its learning-rate schedule"),
    ("total_steps", SCHEDULE, "the learning-rate schedule's length"),
    ("batch_size", SCHEDULE, "examples per optimizer step"),
    ("flow.*", SCHEDULE, "the training objective"),
    ("loss.*", SCHEDULE, "the training objective"),
    # Everything else: seed, stop_after, cadence, mesh, sharding rules, data, sampling, eval.
    ("*", FREE, "execution"),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint and the config disagree on a field the table refuses: a user error, never
    treated as a damaged checkpoint."""


def classify(name: str) -> tuple[str, str]:
    """(class, why) of a dotted config field."""
    for pattern, kind, why in RULES:
        if fnmatch.fnmatchcase(name, pattern):
            return kind, why
    raise AssertionError("the table ends with '*'")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted names -> JSON values; lists stay whole (a patch size is one field)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_MISSING = "<absent>"


# Fields added to the configs after checkpoints were already written without them: a saved config
# that lacks one was trained with this value (what the field's absence meant then).
ADDED_FIELDS: dict[str, Any] = {"model.frame_positions": False, "flow.prediction": "velocity"}


def changes(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every field that differs, in name order."""
    a, b = flatten(saved), flatten(json.loads(json.dumps(current)))  # tuples -> lists, as saved
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k.partition(".")[0] in saved}, **a}
    names = sorted(set(a) | set(b))
    return [(n, a.get(n, _MISSING), b.get(n, _MISSING)) for n in names if a.get(n) != b.get(n)]


def check_resume(
    saved: Mapping, current: Mapping, where: str, allow_schedule_change: bool = False
) -> None:
    """Raises CheckpointMismatchError on a refused change; logs the allowed ones."""
    by_kind: dict[str, list[tuple[str, Any, Any]]] = {WEIGHTS: [], SCHEDULE: [], FREE: []}
    for name, old, new in changes(saved, current):
        by_kind[classify(name)[0]].append((name, old, new))
    if by_kind[WEIGHTS]:
        name, old, new = by_kind[WEIGHTS][0]
        raise CheckpointMismatchError(
            f"checkpoint {where} was written with {name}={old!r} but the config says "
            f"{name}={new!r} ({classify(name)[1]}); use the matching config or a new --workdir"
        )
    if by_kind[SCHEDULE] and not allow_schedule_change:
        listed = ", ".join(f"{n}={o!r} -> {v!r}" for n, o, v in by_kind[SCHEDULE])
        raise CheckpointMismatchError(
            f"checkpoint {where} was trained on another schedule ({listed}); resuming would "
            "change what the remaining steps optimise. Use the saved values, or pass "
            "--config.allow_schedule_change=True to resume with the new ones"
        )
    for kind in (SCHEDULE, FREE):
        for name, old, new in by_kind[kind]:
            logging.info("resuming with %s changed: %r -> %r (%s)", name, old, new, kind)
