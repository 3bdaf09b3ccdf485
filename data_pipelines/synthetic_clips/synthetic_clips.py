"""synthetic_clips: captioned clips of a coloured shape moving over a plain background.

Why: a dataset whose captions are exactly true, that builds in seconds on a laptop, and that
spans the sizes, aspect ratios and lengths the packer must handle (9:16 to 21:9, 1 to 16
frames, ~10% still images). A model that learns it has learnt to follow colour, shape and
motion words, which is easy to check by eye.

    python -m data_pipelines.build --dataset synthetic_clips:small --data_dir data/tfds
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import recaption

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
}
# (width, height): portrait 9:16 to ultra-wide 21:9.
ASPECTS = ((9, 16), (3, 4), (1, 1), (4, 3), (16, 9), (21, 9))
DIRECTIONS = ("left", "right", "up", "down")
MIN_HEIGHT, MAX_HEIGHT = 32, 96
MAX_FRAMES = 16
IMAGE_FRACTION = 0.1


@dataclasses.dataclass(eq=False)
class SyntheticClipsConfig(tfds.core.BuilderConfig):
    """How many examples per split, and the seed that makes every build byte-identical."""

    num_train: int = 2000
    num_validation: int = 100
    seed: int = 0


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside `shape` of radius `r`, given offsets from its centre (any broadcast)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r  # about the circle's area
    if shape == "diamond":
        return ax + ay <= r
    if shape == "triangle":  # pointing up, apex at -r, base at +0.7r, base half-width r
        return (dy >= -r) & (dy <= 0.7 * r) & (ax <= (dy + r) / 1.7)
    if shape == "cross":  # a plus sign, arms a third of the radius thick
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _path(rng: np.random.Generator, length: int, r: float, t: int, moving: bool) -> np.ndarray:
    """Centre positions along one axis: a sweep over 60-100% of the free range, or fixed."""
    lo, hi = r, length - r
    free = max(hi - lo, 0.0)
    if not moving:
        return np.full(t, lo + rng.uniform(0, 1) * free)
    travel = rng.uniform(0.6, 1.0) * free
    start = lo + rng.uniform(0, 1) * (free - travel)
    return start + travel * np.linspace(0.0, 1.0, t)


def make_example(split: str, index: int, seed: int = 0) -> dict[str, Any]:
    """One example, a pure function of (seed, split, index): builds are byte-identical."""
    # crc32, not hash(): str hashes change between processes.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    aspect_w, aspect_h = ASPECTS[rng.integers(len(ASPECTS))]
    height = 2 * int(rng.integers(MIN_HEIGHT // 2, MAX_HEIGHT // 2 + 1))
    width = max(2, 2 * round(height * aspect_w / aspect_h / 2))
    t = 1 if rng.random() < IMAGE_FRACTION else int(rng.integers(2, MAX_FRAMES + 1))
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLORS)
    color_i, background_i = rng.choice(len(names), size=2, replace=False)
    color, background = names[color_i], names[background_i]
    direction = "none" if t == 1 else DIRECTIONS[rng.integers(len(DIRECTIONS))]

    r = rng.uniform(0.35, 0.5) * min(height, width) / 2
    horizontal = direction in ("left", "right")
    xs = _path(rng, width, r, t, moving=horizontal)
    ys = _path(rng, height, r, t, moving=direction in ("up", "down"))
    if direction == "left":
        xs = xs[::-1]
    if direction == "up":
        ys = ys[::-1]

    # Pixel centres against per-frame shape centres: [T, H, W] in one broadcast.
    dx = (np.arange(width) + 0.5)[None, None, :] - xs[:, None, None]
    dy = (np.arange(height) + 0.5)[None, :, None] - ys[:, None, None]
    mask = _shape_mask(shape, dx, dy, r)
    frames = np.where(
        mask[..., None],
        np.array(COLORS[color], np.uint8),
        np.array(COLORS[background], np.uint8),
    ).astype(np.uint8)

    motion = "" if direction == "none" else f" moving {direction}"
    caption = f"{_a(color)} {color} {shape}{motion} on {_a(background)} {background} background"
    return {
        "frames": frames,
        "caption": caption,
        "path": f"synthetic/{split}/{index:06d}",
        "shape": shape,
        "color": color,
        "background": background,
        "direction": direction,
    }


class SyntheticClips(recaption.RecaptionedBuilder):
    """Procedural captioned clips: a coloured shape moving over a plain background."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SyntheticClipsConfig(name="default", num_train=2000, num_validation=100),
        SyntheticClipsConfig(name="small", num_train=64, num_validation=16),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, file_format: str | None = "array_record", **kwargs: Any):
        # array_record: random access through `as_data_source`, with no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # zlib: flat colours compress ~50x, and TFDS needs an encoding for a
                    # Tensor with several unknown dimensions.
                    "frames": tfds.features.Tensor(
                        shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"
                    ),
                    "caption": tfds.features.Text(),
                    "path": tfds.features.Text(),
                    "shape": tfds.features.Text(),
                    "color": tfds.features.Text(),
                    "background": tfds.features.Text(),
                    "direction": tfds.features.Text(),
                }
            ),
            # The recaptioner's identity (data_pipelines/recaption.py), filled at build time.
            metadata=tfds.core.MetadataDict(),
            # Record i of a split is example i, so an index names the same clip in every build.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config: SyntheticClipsConfig = self.builder_config
        self.store_recaptioner()
        return {
            "train": self._generate_examples("train", config.num_train, config.seed),
            "validation": self._generate_examples("validation", config.num_validation, config.seed),
        }

    def _generate_examples(self, split: str, num: int, seed: int):
        recaptioner = recaption.get_recaptioner(self.recaptioner)
        for index in range(num):
            example = make_example(split, index, seed)
            kind = "image" if example["frames"].shape[0] == 1 else "video"
            media = recaption.Media(path=example["path"], kind=kind, array=example["frames"])
            yield index, {**example, "caption": recaptioner(example["caption"], media)}
