"""At what noise level does a trained run lose the prompt's shape? SDEdit held-out clips.

    python -m benchmarks.shape_by_noise --workdir runs/default [--data_dir data/tfds]

Held-out (validation) clips of synthetic_clips, each at the size the quality evaluation samples
its aspect ratio at (jaxsora/evaluate.py), are noised to start time s and sampled back with
their own captions (SDEdit: `Request.strength`); s = 1 is plain text-to-video from the same
prompts. The analyzer (jaxsora/prompt_accuracy.py) scores each result. Where the accuracy
falls from the ground truth's to chance tells which part of the trajectory the model gets
wrong: the layout (high noise) or the details (low noise). Prints one JSON line.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from benchmarks import common

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def held_out_requests(config, data_dir: str, clips: int, source: str, stage):
    """(requests, truths uint8 [T, H, W, 3]) of the first `clips` validation clips: videos at
    the evaluation's length, stills as stills, each at its aspect ratio's evaluation size."""
    import tensorflow_datasets as tfds

    import data_pipelines.build  # noqa: F401 - registers the builders
    from jaxsora import conditioning, evaluate
    from jaxsora.data.media import decode_example

    records = tfds.data_source(source, split="validation", data_dir=data_dir)
    video_frames = evaluate.video_frames(config, stage)
    requests, truths = [], []
    for i in range(min(clips, len(records))):
        frames = decode_example(records[i], max_frames=video_frames)
        n = video_frames if frames.shape[0] >= video_frames else 1
        h, w = frames.shape[1:3]
        g = np.gcd(h, w)
        caption = records[i]["caption"]
        prompt = caption.decode() if isinstance(caption, bytes) else str(caption)
        req = evaluate._sized(prompt, n, (w // g, h // g), config, stage, f"h{i:03d}", i)
        requests.append(req)
        truths.append(conditioning.resize_cover(frames[:n], req.height, req.width))
    return requests, truths


def accuracies(model, config, requests, truths, strength: float, steps: int, stage) -> dict:
    """The analyzer's accuracies of the run's SDEdit from `strength` (1: from pure noise)."""
    import dataclasses

    from jaxsora import conditioning, evaluate, prompt_accuracy, sample

    if strength < 1.0:
        requests = [dataclasses.replace(r, strength=strength) for r in requests]
        canvases = [conditioning.Canvas(t, np.ones(len(t), bool), edit=True) for t in truths]
    else:
        canvases = [None] * len(requests)
    clips = sample.generate(
        model,
        config,
        requests,
        canvases=canvases,
        steps=steps,
        guidance=config.sample.guidance,
        prompt_extension="identity",
        stage=stage,
    )
    clips = [np.round(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8) for c in clips]
    return evaluate.summary(prompt_accuracy.score(clips, [r.prompt for r in requests]))


def main(argv: list[str]) -> None:
    del argv
    from jaxsora import evaluate, prompt_accuracy
    from jaxsora.compression import make_stage
    from jaxsora.sample import load_run

    f = flags.FLAGS
    with common.json_stdout() as emit:
        record = {"benchmark": "shape_by_noise", "machine": common.machine_info()}
        try:
            model, config = load_run(f.workdir)
        except FileNotFoundError as e:  # nothing trained yet: say so, as the others do
            record["skipped"] = str(e)
            emit(record)
            return
        stage = make_stage(config.model)
        requests, truths = held_out_requests(config, f.data_dir, f.clips, f.source, stage)
        prompts = [r.prompt for r in requests]
        record.update(workdir=f.workdir, source=f.source, clips=len(requests), steps=f.steps)
        record["ground_truth"] = evaluate.summary(prompt_accuracy.score(truths, prompts))
        record["by_start_time"] = {
            str(s): accuracies(model, config, requests, truths, s, f.steps, stage)
            for s in STRENGTHS
        }
        emit(common.round_floats(record))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/default", "A trained run (make train).")
    flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir with synthetic_clips built.")
    flags.DEFINE_string("source", "synthetic_clips", "Dataset whose validation clips are used.")
    flags.DEFINE_integer("clips", 40, "Held-out clips.")
    flags.DEFINE_integer("steps", 32, "Sampling steps, all spent between s and 0 (flow.time_grid).")
    app.run(main)
