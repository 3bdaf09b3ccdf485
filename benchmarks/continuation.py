"""How much better a trained run continues held-out clips when it is given their first frames.

    python -m benchmarks.continuation --workdir runs/default [--data_dir data/tfds]

For held-out (validation) clips of synthetic_clips with at least 4 frames, at 16 x 16 pixels:
frames 2-3 sampled given frames 0-1 (`extend` forward: clean conditioning through cond_mask)
against frames 2-3 sampled with nothing given (text-to-video), same noise, same steps, same
guidance. The error is the mean squared error in the model's [-1, 1] pixels against the real
frames 2-3. Twice: with each clip's caption as the prompt, and with the empty prompt (then the
frames are all the model knows about the clip). Prints one JSON line.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from benchmarks import common

FRAMES, SIDE, GIVEN = 4, 16, 2


def continuation_errors(
    model,
    config,
    data_dir: str,
    clips: int = 8,
    captions: bool = True,
    steps: int = 8,
    source: str = "synthetic_clips/small",
) -> tuple[float, float]:
    """(error given the first frames, error with none given) over `clips` held-out clips."""
    import tensorflow_datasets as tfds

    import data_pipelines.build  # noqa: F401 - registers the builders
    from jaxsora import conditioning, sample
    from jaxsora.data.media import decode_example

    records = tfds.data_source(source, split="validation", data_dir=data_dir)
    known = np.arange(FRAMES) < GIVEN
    requests, truths, canvases = [], [], []
    for i in range(len(records)):
        if len(requests) == clips:
            break
        frames = decode_example(records[i], max_frames=FRAMES)
        if frames.shape[0] < FRAMES:
            continue
        truth = conditioning.resize_cover(frames, SIDE, SIDE)
        caption = records[i]["caption"]
        prompt = caption.decode() if isinstance(caption, bytes) else str(caption)
        requests.append(sample.Request(prompt if captions else "", FRAMES, SIDE, SIDE, seed=i))
        truths.append(truth.astype(np.float32) / 127.5 - 1.0)
        canvases.append(conditioning.Canvas(conditioning.fill_unknown(truth, known), known))
    kw = dict(steps=steps, guidance=config.sample.guidance)
    given = sample.generate_latents(model, config, requests, canvases=canvases, **kw)
    alone = sample.generate_latents(model, config, requests, canvases=[None] * len(requests), **kw)
    for z, truth in zip(given, truths, strict=True):  # the given frames come back exactly
        np.testing.assert_allclose(z[:GIVEN], truth[:GIVEN], atol=1e-5)
    errors = [
        np.mean([np.mean(np.square(z[GIVEN:] - t[GIVEN:])) for z, t in zip(o, truths, strict=True)])
        for o in (given, alone)
    ]
    return float(errors[0]), float(errors[1])


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS

    def measure(model, config, record: dict) -> None:
        record.update(source=f.source, clips=f.clips, steps=f.steps)
        record.update(frames=FRAMES, frames_given=GIVEN, side=SIDE)
        for captions in (True, False):
            given, alone = continuation_errors(
                model, config, f.data_dir, f.clips, captions, f.steps, f.source
            )
            record["with_captions" if captions else "empty_prompt"] = {
                "mse_given_first_frames": given,
                "mse_nothing_given": alone,
                "ratio": given / alone,
            }

    common.measure_trained_run("continuation", f.workdir, measure)


if __name__ == "__main__":
    common.define_held_out_flags(clips=16, steps=16)
    app.run(main)
