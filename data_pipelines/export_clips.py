"""Writes records of a built dataset out as media files: to look at them, or to prompt with them.

    python -m data_pipelines.export_clips --dataset synthetic_clips --split validation \
        --indices 5,10,13 --out runs/default/prompt_media

For each index: `clip<i>.mp4` (the whole clip; H.264 at crf 18), `clip<i>_first.png` (its
first frame, lossless) and a line of `captions.jsonl` ({"index", "caption", "video", "image",
"frames", "height", "width"}). The sampler's image and video prompts read these files
(experiments/samples_modes_tiny.jsonl prompts with validation clips the default run never trained
on).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from PIL import Image

FLAGS = flags.FLAGS


def export(data_dir: str, dataset: str, split: str, indices: list[int], out: str) -> list[dict]:
    import tensorflow_datasets as tfds

    import data_pipelines.build  # noqa: F401 - registers the builders
    from jaxsora.data.media import decode_example, write_video_outputs

    records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i in indices:
        record = records[i]
        frames = decode_example(record)
        caption = record["caption"]
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        stem = os.path.join(out, f"clip{i}")
        paths = write_video_outputs(frames, stem, min_side=1)  # min_side=1: as stored
        for extra in ("gif", "png"):  # keep the mp4; the frame below is the lossless still
            os.remove(paths[extra])
        Image.fromarray(np.asarray(frames[0], np.uint8)).save(f"{stem}_first.png")
        rows.append(
            {
                "index": i,
                "caption": caption,
                "video": f"{stem}.mp4",
                "image": f"{stem}_first.png",
                "frames": int(frames.shape[0]),
                "height": int(frames.shape[1]),
                "width": int(frames.shape[2]),
            }
        )
    with open(os.path.join(out, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def main(argv: list[str]) -> None:
    del argv
    indices = [int(i) for i in FLAGS.indices]
    for row in export(FLAGS.data_dir, FLAGS.dataset, FLAGS.split, indices, FLAGS.out):
        print(json.dumps(row))


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", "data/tfds", "Where the dataset is built.")
    flags.DEFINE_string("dataset", "synthetic_clips", "TFDS name[/config].")
    flags.DEFINE_string("split", "validation", "Split to read.")
    flags.DEFINE_list("indices", ["5", "10", "13"], "Record indices to write.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.mark_flag_as_required("out")
    app.run(main)
