"""Config checks shared by the trainers: each field, the values it accepts and the words that
say so, checked before anything is read or compiled (`check_fields`)."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class FieldCheck:
    """One config field, the values it accepts, and the words that tell the user so."""

    field: str  # dotted path from the config root, e.g. "data.max_frames"
    ok: Callable[[Any], bool]
    allowed: str  # completes "must be ...", e.g. "an integer >= 1"
    why: str = ""  # what the bad value would do, when that is not obvious
    optional: bool = False  # checked only when present (configs older than the field)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(field: str, low: int | None = None, **kw) -> FieldCheck:
    """An integer >= low (any integer when low is None)."""
    allowed = "an integer" if low is None else f"an integer >= {low}"
    return FieldCheck(field, lambda v: _is_int(v) and (low is None or v >= low), allowed, **kw)


def integers(field: str, low: int, length: int | None = None, **kw) -> FieldCheck:
    """A non-empty list or tuple of integers >= low, of `length` entries when given."""

    def ok(v) -> bool:
        if not isinstance(v, list | tuple) or not v or (length and len(v) != length):
            return False
        return all(_is_int(x) and x >= low for x in v)

    count = f"{length} integers" if length else "a list of integers"
    return FieldCheck(field, ok, f"{count}, each >= {low}", **kw)


def number(
    field: str, low: float, high: float | None = None, *, open_low=False, open_high=True, **kw
) -> FieldCheck:
    """A number in [low, high) by default; `open_low` excludes low, `open_high=False` keeps high.
    NaN is in no range, so it is refused too."""

    def ok(v) -> bool:
        if not _is_number(v) or not (v > low if open_low else v >= low):
            return False
        return high is None or (v < high if open_high else v <= high)

    if high is None:
        allowed = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        allowed = (
            f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        )
    return FieldCheck(field, ok, allowed, **kw)


def one_of(field: str, choices: Iterable, **kw) -> FieldCheck:
    choices = tuple(choices)
    return FieldCheck(field, lambda v: v in choices, f"one of {choices}", **kw)


def boolean(field: str, **kw) -> FieldCheck:
    return FieldCheck(field, lambda v: isinstance(v, bool), "True or False", **kw)


_MISSING = object()


def _lookup(config, field: str):
    node = config
    for key in field.split("."):
        if not hasattr(node, "keys") or key not in node:
            return _MISSING
        node = node[key]
    return node


def check_fields(config, checks: Sequence[FieldCheck]) -> None:
    """Raises the first failed check as one line: `bad config: group.field=value must be ...`."""
    for c in checks:
        value = _lookup(config, c.field)
        if value is _MISSING:
            if c.optional:
                continue
            raise ValueError(f"bad config: {c.field} is missing; set it to {c.allowed}")
        if not c.ok(value):
            why = f" ({c.why})" if c.why else ""
            raise ValueError(f"bad config: {c.field}={value!r} must be {c.allowed}{why}")


def check_sources(sources, field: str = "data.sources") -> None:
    """The datasets mixed into training: at least one, each named, with a weight > 0."""
    example = "[dict(name='synthetic_clips', weight=1.0)]"
    if not isinstance(sources, list | tuple) or not sources:
        raise ValueError(
            f"bad config: {field}={sources!r} must list at least one dataset, e.g. {example}"
        )
    for i, src in enumerate(sources):
        if not hasattr(src, "keys") or not isinstance(src.get("name"), str) or not src["name"]:
            raise ValueError(
                f"bad config: {field}[{i}]={src!r} must be a dict with a dataset name, "
                f"e.g. {example}"
            )
        weight = src.get("weight", 1.0)
        if not (_is_number(weight) and weight > 0):
            raise ValueError(
                f"bad config: {field}[{i}].weight={weight!r} must be a number > 0 (the "
                "source's share of the mix; remove the source to leave it out)"
            )


# The run bookkeeping and the optimizer, as both trainers read them.
# Read by the prefetcher itself too (jaxsora/data/prefetch.py), so one rule serves all three.
PREFETCH_CHECK = integer("data.prefetch", 0, why="batches made ahead; 0 = off", optional=True)
RUN_CHECKS = (
    integer("seed"),
    integer("total_steps", 1),
    integer("stop_after", 0, why="0 = never stop early"),
    integer("log_every", 1),
    integer("checkpoint_every", 1),
    integer("keep_checkpoints", 1, why="0 would delete every checkpoint"),
    boolean("strict_sharding", optional=True),
    boolean("stop_on_damaged_checkpoint", optional=True),
    boolean("allow_schedule_change", optional=True),
)
OPTIM_CHECKS = (
    number("optim.lr", 0.0, open_low=True),
    integer("optim.warmup_steps", 0),
    number("optim.weight_decay", 0.0),
    number("optim.b1", 0.0, 1.0),
    number("optim.b2", 0.0, 1.0),
    number("optim.grad_clip", 0.0, open_low=True, why="the global-norm clip"),
    number("optim.ema_decay", 0.0, 1.0, why="1 would keep the EMA at its initial weights"),
)
