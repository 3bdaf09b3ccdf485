"""At what noise level does a trained run lose the prompt's shape? SDEdit held-out clips.

    python -m benchmarks.shape_by_noise --workdir runs/default [--data_dir data/tfds]

Held-out (validation) clips of synthetic_clips, each at the size the quality evaluation samples
its aspect ratio at (jaxsora/evaluate.py), are noised to start time s and sampled back with
their own captions (SDEdit: `Request.strength`); s = 1 is plain text-to-video from the same
prompts. The analyzer (jaxsora/prompt_accuracy.py) scores each result. Where the accuracy
falls from the ground truth's to chance tells which part of the trajectory the model gets
wrong: the layout (high noise) or the details (low noise).

Then the same edits with another shape named in each caption (circle -> triangle, square ->
diamond, ...): `shape_of_caption` is how often the result shows the caption's shape,
`shape_of_clip` how often the clip's. A model that reads the shape word moves the first up from
0 as s grows; one that ignores it keeps the second where its own captions put it.

Last, `word_loss_gain`: the held-out flow loss at fixed times t (8 validation packs, the same
noise) with one word of every caption swapped, the shape word or the object's colour word, as
a fraction of the loss with the captions as they are. It needs no sampling and no coherent
object, so it shows a model starting to read a word long before the analyzer can. Prints one
JSON line.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from benchmarks import common

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
SWAP_STRENGTHS = (0.6, 0.8, 1.0)
GAIN_TIMES = (0.5, 0.7, 0.8, 0.9)
GAIN_PACKS = 8


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
        req = evaluate.sized_request(prompt, n, (w // g, h // g), config, stage, f"h{i:03d}", i)
        requests.append(req)
        truths.append(conditioning.resize_cover(frames[:n], req.height, req.width))
    return requests, truths


def edited_clips(model, config, requests, truths, strength: float, steps: int, stage):
    """uint8 clips: the run's SDEdit of `truths` from `strength` (1: from pure noise)."""
    import dataclasses

    from jaxsora import conditioning, evaluate, sample

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
    return evaluate.as_uint8(clips)


def accuracies(model, config, requests, truths, strength: float, steps: int, stage) -> dict:
    """The analyzer's accuracies of the SDEdit from `strength` against the requests' prompts."""
    from jaxsora import evaluate, prompt_accuracy

    clips = edited_clips(model, config, requests, truths, strength, steps, stage)
    return evaluate.summary(prompt_accuracy.score(clips, [r.prompt for r in requests]))


def swap_shape(prompt: str) -> str:
    """The prompt with its shape word replaced by the shape two places on in SHAPES."""
    from data_pipelines.synthetic_clips.synthetic_clips import SHAPES

    words = prompt.split()
    i = next(k for k, w in enumerate(words) if w in SHAPES)
    words[i] = SHAPES[(SHAPES.index(words[i]) + 2) % len(SHAPES)]
    return " ".join(words)


def swapped_shape_accuracies(model, config, requests, truths, strength, steps, stage) -> dict:
    """Shape accuracy of the SDEdit with another shape in every caption, against that caption
    (`shape_of_caption`) and against the clip's own (`shape_of_clip`)."""
    import dataclasses

    from jaxsora import prompt_accuracy

    swapped = [dataclasses.replace(r, prompt=swap_shape(r.prompt)) for r in requests]
    clips = edited_clips(model, config, swapped, truths, strength, steps, stage)
    return {
        f"shape_of_{name}": prompt_accuracy.score(clips, [r.prompt for r in rs])["shape_accuracy"]
        for name, rs in (("caption", swapped), ("clip", requests))
    }


def swap_first_word(ids_BSL: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Caption ids with, in each caption, the first id found in `mapping` replaced by its image
    (the object's colour comes before the background's in the synthetic grammar)."""
    out = ids_BSL.copy()
    for b, s in np.ndindex(ids_BSL.shape[:2]):
        hits = [k for k, i in enumerate(ids_BSL[b, s]) if int(i) in mapping]
        if hits:
            out[b, s, hits[0]] = mapping[int(ids_BSL[b, s, hits[0]])]
    return out


def word_loss_gain(model, config, data_dir: str, source: str, stage) -> dict:
    """{"shape" | "object_color": {t: (loss with that word swapped - loss) / loss}} on the
    validation split's first GAIN_PACKS text-to-video packs; hashed captions only (a frozen
    encoder's embeddings have no word to swap)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from data_pipelines.synthetic_clips.synthetic_clips import COLORS, SHAPES
    from jaxsora import train as trainer
    from jaxsora import validation
    from jaxsora.diffusion import flow
    from jaxsora.models.tokenizer import tokenize

    if config.text.get("encoder", "hashed") != "hashed":
        return {"skipped": f"text.encoder={config.text.encoder!r}: no caption ids to swap"}
    data = ml_collections.ConfigDict(config.to_dict())
    data.data.data_dir, data.data.sources = data_dir, [dict(name=source, weight=1.0)]
    batch = validation.held_out_batch(data, stage, "validation", GAIN_PACKS, 0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["noise"] = jax.random.normal(jax.random.key(0), batch["tokens"].shape, jnp.float32)
    prediction = trainer.prediction(config)

    @jax.jit
    def loss(text_ids, t):
        sums = validation.validation_sums(model, {**batch, "text_ids": text_ids}, t, prediction)
        return flow.loss_from_sums(sums)

    def word(w: str) -> int:
        return int(tokenize(w, 2, config.model.text_vocab)[0][1])

    def cycle(words, by: int) -> dict[int, int]:
        return {word(w): word(words[(i + by) % len(words)]) for i, w in enumerate(words)}

    ids = np.asarray(batch["text_ids"])
    swapped = {
        "shape": swap_first_word(ids, cycle(SHAPES, 2)),
        "object_color": swap_first_word(ids, cycle(list(COLORS), 1)),
    }
    out = {name: {} for name in swapped}
    for t in GAIN_TIMES:
        own = float(loss(batch["text_ids"], t))
        for name, other in swapped.items():
            out[name][str(t)] = (float(loss(jnp.asarray(other), t)) - own) / own
    return out


def main(argv: list[str]) -> None:
    del argv
    from jaxsora import evaluate, prompt_accuracy
    from jaxsora.compression import make_stage

    f = flags.FLAGS

    def measure(model, config, record: dict) -> None:
        stage = make_stage(config.model)
        requests, truths = held_out_requests(config, f.data_dir, f.clips, f.source, stage)
        prompts = [r.prompt for r in requests]
        record.update(source=f.source, clips=len(requests), steps=f.steps)
        record["ground_truth"] = evaluate.summary(prompt_accuracy.score(truths, prompts))
        record["by_start_time"] = {
            str(s): accuracies(model, config, requests, truths, s, f.steps, stage)
            for s in STRENGTHS
        }
        record["shape_word_swapped"] = {
            str(s): swapped_shape_accuracies(model, config, requests, truths, s, f.steps, stage)
            for s in SWAP_STRENGTHS
        }
        record["word_loss_gain"] = word_loss_gain(model, config, f.data_dir, f.source, stage)

    common.measure_trained_run("shape_by_noise", f.workdir, measure)


if __name__ == "__main__":
    common.define_held_out_flags(
        40, 32, "Sampling steps, all spent between s and 0 (flow.time_grid)."
    )
    app.run(main)
