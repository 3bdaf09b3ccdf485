"""Sample quality that runs anywhere: does a generated clip show what its prompt asks for?

FID and FVD need Inception / I3D weights that cannot be downloaded here. The bundled synthetic
world (`data_pipelines/synthetic_clips`) is exactly known instead: every caption names a
background colour, an object colour, a shape and (for videos) a motion direction. `analyze`
reads those four attributes back from pixels, and `score` compares them with the prompts:

  background   the median of the frames' border pixels (a shape never touches the border), as
               the nearest palette colour;
  object       the pixels farther than half the palette's smallest gap from that background,
               the largest connected blob of them per frame; their median colour is the nearest
               palette colour other than the background;
  shape        each frame's blob against the five shapes drawn at the size and place its
               bounding box implies (the generator's own masks); the best intersection-over-union
               wins, and the frames vote;
  direction    the blob's centroid from the first to the last frame: the larger axis of the
               move and its sign, or "none" under a tenth of the frame's side (videos only).

Accuracy is per attribute (direction over the prompts that move) plus `score`, their mean, and
`all_correct`, the fraction of clips right on every attribute they have. Two diagnostics say
why a low accuracy is low, and are not part of `score`:

  coherence    `object_share`: of the pixels off the background, the share in the largest
               blob, per frame, averaged (1.0 for one object; a model that scatters the
               object's colour in pieces scores low, whatever the pieces' shape);
  confusion    for shape and direction, how often each asked value was seen as each value: a
               model that ignores the word has flat rows, one that confuses two shapes does not.

On the ground-truth clips the analyzer is near 100% at the sizes the models train on, and at
chance against shuffled captions (tests/test_prompt_accuracy.py), so a sample's numbers mean
what they say.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from scipy import ndimage

from data_pipelines.synthetic_clips.synthetic_clips import COLORS, DIRECTIONS, SHAPES, _shape_mask

ATTRIBUTES = ("background", "object", "shape", "direction")
# Asked -> seen counts in `score`, rows and columns in the grammar's order ("none" last).
CONFUSION_VALUES = {"shape": (*SHAPES, "none"), "direction": (*DIRECTIONS, "none")}
PALETTE = np.array(list(COLORS.values()), np.float32) / 255.0
COLOR_NAMES = tuple(COLORS)
# Half the smallest distance between two palette colours: a pixel farther than this from the
# background is the object's (red and orange are the closest pair).
_GAPS = np.linalg.norm(PALETTE[:, None] - PALETTE[None], axis=-1)
OBJECT_THRESHOLD = 0.5 * float(_GAPS[_GAPS > 0].min())
SUPERSAMPLE = 4
RADIUS_SCALES = (0.92, 1.0, 1.08)
SHAPE_FRAMES = 4  # frames that vote on the shape, evenly spaced (the cost is per frame)
MIN_MOVE = 0.1  # of the frame's side along the move: smaller is "none"
# Each shape's extent from its centre in units of its radius: (left, right, top, bottom).
_EXTENTS = {
    "circle": (1.0, 1.0, 1.0, 1.0),
    "square": (0.85, 0.85, 0.85, 0.85),
    "diamond": (1.0, 1.0, 1.0, 1.0),
    "triangle": (1.0, 1.0, 1.0, 0.7),
    "cross": (1.0, 1.0, 1.0, 1.0),
}
CHANCE = {  # of a uniform guess, for reading the numbers
    "background": 1 / len(COLORS),
    "object": 1 / (len(COLORS) - 1),
    "shape": 1 / len(SHAPES),
    "direction": 1 / len(DIRECTIONS),
}

_COLOR = "|".join(COLORS)
_GRAMMAR = re.compile(
    rf"^an? (?P<object>{_COLOR}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: moving (?P<direction>{'|'.join(DIRECTIONS)}))? on an? (?P<background>{_COLOR}) "
    r"background$"
)


@dataclasses.dataclass(frozen=True)
class Attributes:
    background: str
    object: str
    shape: str
    direction: str  # "none" for a still


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a synthetic-world caption asks for; any other text is an error."""
    m = _GRAMMAR.match(prompt.strip().lower())
    if m is None:
        raise ValueError(
            f"prompt {prompt!r} is not in the synthetic clips' grammar "
            "'a[n] <colour> <shape> [moving <direction>] on a[n] <colour> background' "
            f"(colours {COLOR_NAMES}, shapes {SHAPES}, directions {DIRECTIONS}); the analyzer "
            "only reads clips of the bundled synthetic world"
        )
    return Attributes(m["background"], m["object"], m["shape"], m["direction"] or "none")


def _nearest(color: np.ndarray, exclude: int | None = None) -> int:
    d = np.linalg.norm(PALETTE - color, axis=-1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


def _as_float(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:  # one image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (or [H, W, 3]), got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def _blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a frame's mask (noise specks dropped)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def _coverage(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """The fraction of each pixel the shape covers (4 x 4 samples a pixel): the generator's
    mask, anti-aliased as a resized clip's edges are."""
    s = SUPERSAMPLE
    px = (np.arange(w * s) + 0.5)[None, :] / s
    py = (np.arange(h * s) + 0.5)[:, None] / s
    drawn = _shape_mask(shape, px - cx, py - cy, r).astype(np.float32)
    return drawn.reshape(h, s, w, s).mean(axis=(1, 3))


def _shape_of(alpha: np.ndarray, blob: np.ndarray) -> tuple[str, float]:
    """The shape whose drawing, fitted to the blob's bounding box (radius within +-8%), best
    overlaps the frame's object coverage `alpha` (soft IoU), and that overlap."""
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    h, w = blob.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        left, right, top, bottom = _EXTENTS[shape]
        r0 = 0.5 * ((x1 - x0) / (left + right) + (y1 - y0) / (top + bottom))
        cx = 0.5 * (x0 + x1) + 0.5 * (left - right) * r0
        cy = 0.5 * (y0 + y1) + 0.5 * (top - bottom) * r0
        for scale in RADIUS_SCALES:
            c = _coverage(shape, h, w, cx, cy, r0 * scale)
            iou = float(np.minimum(c, alpha).sum() / max(np.maximum(c, alpha).sum(), 1e-6))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best, best_iou


def _off_background(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the background colour: the median of the border pixels, the [T, H, W] mask of pixels
    farther than OBJECT_THRESHOLD from it) of float frames [T, H, W, 3]."""
    border = np.concatenate(
        [x[:, 0].reshape(-1, 3), x[:, -1].reshape(-1, 3), x[:, :, 0].reshape(-1, 3)]
        + [x[:, :, -1].reshape(-1, 3)]
    )
    bg_color = np.median(border, axis=0)
    return bg_color, np.linalg.norm(x - bg_color, axis=-1) > OBJECT_THRESHOLD


def object_share(frames: np.ndarray) -> float:
    """How much of a clip's off-background area is one object: per frame with any (2 pixels or
    more), the largest 4-connected blob's pixels over all off-background pixels, averaged over
    those frames; 0.0 when no frame has an object."""
    _, far = _off_background(_as_float(frames))
    return _share(far, [_blob(f) for f in far])


def _share(far: np.ndarray, blobs: list[np.ndarray]) -> float:
    """`object_share` from a clip's off-background masks and their largest blobs."""
    shares = [b.sum() / f.sum() for f, b in zip(far, blobs, strict=True) if f.sum() >= 2]
    return float(np.mean(shares)) if shares else 0.0


def analyze(frames: np.ndarray) -> Attributes:
    """The attributes a clip shows: frames [T, H, W, 3] uint8, or floats in [0, 1]."""
    return _read(frames)[0]


def _read(frames: np.ndarray) -> tuple[Attributes, float]:
    """(`analyze`, `object_share`) of a clip, from one pass over its pixels and blobs."""
    x = _as_float(frames)
    t, h, w, _ = x.shape
    bg_color, far = _off_background(x)
    bg = _nearest(bg_color)
    blobs = [_blob(f) for f in far]
    share = _share(far, blobs)
    present = [i for i, b in enumerate(blobs) if b.sum() >= 2]
    if not present:
        return Attributes(COLOR_NAMES[bg], "none", "none", "none"), share
    pixels = np.concatenate([x[i][blobs[i]] for i in present])
    obj = _nearest(np.median(pixels, axis=0), exclude=bg)
    # How much of each pixel is object: its colour's position between background and object.
    span = np.median(pixels, axis=0) - bg_color
    alpha = np.clip((x - bg_color) @ span / max(float(span @ span), 1e-6), 0.0, 1.0)
    votes: dict[str, float] = {}
    for i in present[:: max(1, len(present) // SHAPE_FRAMES)]:
        region = ndimage.binary_dilation(blobs[i], iterations=2)  # the blob and its edge
        shape, iou = _shape_of(alpha[i] * region, blobs[i])
        votes[shape] = votes.get(shape, 0.0) + iou
    shape = max(votes, key=votes.get)
    direction = "none"
    if t > 1 and present[0] == 0 and present[-1] == t - 1:
        (y_a, x_a), (y_b, x_b) = (ndimage.center_of_mass(blobs[i]) for i in (0, t - 1))
        dx, dy = (x_b - x_a) / w, (y_b - y_a) / h
        if max(abs(dx), abs(dy)) >= MIN_MOVE:
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
    return Attributes(COLOR_NAMES[bg], COLOR_NAMES[obj], shape, direction), share


def score(clips: list[np.ndarray], prompts: list[str]) -> dict:
    """Per-attribute accuracy of `clips` against `prompts`, `score` (their mean) and
    `all_correct`; `per_clip` holds each clip's asked and seen attributes."""
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips for {len(prompts)} prompts")
    if not clips:
        raise ValueError("no clips to score")
    right = {a: [] for a in ATTRIBUTES}
    all_right, per_clip, shares = [], [], []
    confusion = {a: {} for a in CONFUSION_VALUES}
    for clip, prompt in zip(clips, prompts, strict=True):
        want, (seen, share) = parse_prompt(prompt), _read(clip)
        ok = {}
        for a in ATTRIBUTES:
            if a == "direction" and want.direction == "none":
                continue  # a still has no motion to get right
            ok[a] = getattr(want, a) == getattr(seen, a)
            right[a].append(ok[a])
            if a in confusion:
                row = confusion[a].setdefault(getattr(want, a), {})
                row[getattr(seen, a)] = row.get(getattr(seen, a), 0) + 1
        all_right.append(all(ok.values()))
        shares.append(share)
        per_clip.append(
            {
                "prompt": prompt,
                "seen": dataclasses.asdict(seen),
                "correct": ok,
                "object_share": share,
            }
        )
    acc = {a: float(np.mean(v)) for a, v in right.items() if v}
    for a, order in CONFUSION_VALUES.items():
        rows = confusion[a]
        confusion[a] = {
            w: {g: rows[w][g] for g in order if g in rows[w]} for w in order if w in rows
        }
    return {
        **{f"{a}_accuracy": v for a, v in acc.items()},
        "score": float(np.mean(list(acc.values()))),
        "all_correct": float(np.mean(all_right)),
        "coherence": float(np.mean(shares)),
        "confusion": confusion,
        "clips": len(clips),
        "per_clip": per_clip,
    }
