"""Sample quality of a run: a fixed prompt set, sampled from fixed seeds, scored by what the
clips show (jaxsora/prompt_accuracy.py: background colour, object colour, shape, direction).

    python -m jaxsora.evaluate --workdir runs/default [--prompts 40] [--steps 32]

writes `<workdir>/eval/quality_step<N>.json` (the accuracies, the score, the coherence and
confusion diagnostics, and every clip's reading), `quality_step<N>.npz` (the generated clips,
uint8, for `jaxsora.scaling samples`) and `quality_step<N>.png` (a contact sheet: a row per
clip, its frames left to right, to look at) and prints the accuracies as one JSON line. The
prompts are the synthetic world's grammar drawn from `--seed` (every shape equally often, every
eighth prompt an image), sized to the run's own token budget (`data.max_tokens`,
`data.max_frames`, its patch and compression stage), so any two runs on the synthetic clips are
scored on the same questions. Training runs the same evaluation every `eval.quality_every`
steps (and at the last step) and logs `quality_*` beside `val_loss`.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image

from jaxsora import prompt_accuracy, training
from jaxsora.compression import Stage, make_stage
from jaxsora.sample import Request, generate, load_run, request_grid

ASPECTS = ((5, 3), (3, 5), (1, 1), (4, 3), (3, 4), (2, 1))  # (width, height) of the videos
IMAGE_EVERY = 8  # every eighth prompt is a still, as ~10% of the synthetic clips are
DEFAULT_PROMPTS = 40


def sized_request(
    prompt: str, frames: int, aspect: tuple[int, int], config, stage, name: str, seed: int
):
    """The request at `aspect` with the most pixels whose tokens fit data.max_tokens."""
    unit = config.model.patch[1] * stage.spatial_factor
    aw, ah = aspect
    best = None
    for k in range(1, 64):
        h = unit * k
        w = max(unit, round(h * aw / ah / unit) * unit)
        req = Request(prompt, frames, h, w, name=name, seed=seed)
        if np.prod(request_grid(req, config, stage)) > config.data.max_tokens:
            break
        best = req
    if best is None:
        raise ValueError(
            f"bad config: data.max_tokens={config.data.max_tokens} holds no {frames}-frame clip "
            "of one patch per side; raise data.max_tokens"
        )
    return best


def video_frames(config, stage: Stage) -> int:
    """The most frames <= data.max_frames a request of this run may have (the causal VAE takes
    1 + 4k; the patch takes whole temporal patches)."""
    for frames in range(max(2, int(config.data.max_frames)), 1, -1):
        try:
            request_grid(Request("", frames, 1024, 1024), config, stage)
            return frames
        except ValueError:
            continue
    raise ValueError(f"no video length <= data.max_frames={config.data.max_frames} fits the patch")


def prompt_set(
    config, n: int = DEFAULT_PROMPTS, seed: int = 0, stage: Stage | None = None
) -> list[Request]:
    """`n` fixed requests: a pure function of (n, seed) and the run's sizes (`stage`: the
    run's compression stage, made from the config when not given)."""
    stage = stage or make_stage(config.model)
    from data_pipelines.synthetic_clips.synthetic_clips import COLORS, DIRECTIONS, SHAPES, _a

    rng = np.random.default_rng([seed, 0xE7A1])
    names = list(COLORS)
    frames = video_frames(config, stage)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        color, background = (names[j] for j in rng.choice(len(names), size=2, replace=False))
        still = i % IMAGE_EVERY == IMAGE_EVERY - 1
        direction = DIRECTIONS[(i // len(SHAPES)) % len(DIRECTIONS)]
        motion = "" if still else f" moving {direction}"
        prompt = f"{_a(color)} {color} {shape}{motion} on {_a(background)} {background} background"
        aspect = (1, 1) if still else ASPECTS[i % len(ASPECTS)]
        frames_i = 1 if still else frames
        out.append(sized_request(prompt, frames_i, aspect, config, stage, f"q{i:03d}", seed + i))
    return out


def check_synthetic(config) -> None:
    """The analyzer knows the synthetic world only: a run must have trained on it, by caption."""
    names = [s["name"] for s in config.data.sources]
    if config.text.get("encoder") == "class" or not any("synthetic_clips" in n for n in names):
        raise ValueError(
            f"the quality evaluation reads clips of the bundled synthetic world, prompted by "
            f"caption; this run trains on {names} with text.encoder="
            f"{config.text.get('encoder')!r}. Evaluate a run whose data.sources include "
            "synthetic_clips (or its latents) and whose captions are text"
        )


def quality(model, config, n: int, steps: int | None = None, seed: int = 0, stage=None):
    """(scores, requests, clips uint8) of `model` on the fixed prompt set."""
    stage = stage or make_stage(config.model)  # made once: a VAE stage loads its weights
    requests = prompt_set(config, n, seed, stage)
    sc = config.sample
    clips = generate(
        model,
        config,
        requests,
        steps=steps or sc.steps,
        guidance=sc.guidance,
        image_guidance=sc.get("image_guidance", 1.0),
        solver=sc.get("solver", "euler"),
        prompt_extension="identity",  # the prompts are already the training grammar
        stage=stage,
    )
    clips = as_uint8(clips)
    scores = prompt_accuracy.score(clips, [r.prompt for r in requests])
    return scores, requests, clips


def as_uint8(clips: list[np.ndarray]) -> list[np.ndarray]:
    """Sampled clips in [0, 1] as the uint8 pixels the analyzer reads (and files hold)."""
    return [np.round(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8) for c in clips]


def summary(scores: dict) -> dict[str, float]:
    """The metrics-row form: quality_score, quality_all_correct, quality_<attribute>, and
    quality_coherence (prompt_accuracy.object_share, not part of the score)."""
    out = {
        "quality_score": scores["score"],
        "quality_all_correct": scores["all_correct"],
        "quality_coherence": scores["coherence"],
    }
    for a in prompt_accuracy.ATTRIBUTES:
        if f"{a}_accuracy" in scores:
            out[f"quality_{a}"] = scores[f"{a}_accuracy"]
    return out


SHEET_SCALE = 4  # at most this many sheet pixels per clip pixel (small clips, to be seen)...
SHEET_SIDE = 128  # ...and no more than brings the largest frame side to this (large ones stay 1x)
SHEET_GAP = 2  # grey pixels between frames and between rows, before scaling


def contact_sheet(clips: list[np.ndarray], columns: int = 2) -> np.ndarray:
    """uint8 [H, W, 3]: the clips (uint8 [T, h, w, 3]) as rows of frames, left to right, in
    `columns` columns of rows (clip i in column i // ceil(n / columns)), on grey, each pixel a
    square of up to SHEET_SCALE pixels (so that the largest frame side reaches SHEET_SIDE)."""
    if not clips:
        raise ValueError("no clips for a contact sheet")
    g = SHEET_GAP
    rows = []
    for clip in clips:
        t, h, w, _ = clip.shape
        row = np.full((h + g, t * (w + g), 3), 128, np.uint8)
        for i, frame in enumerate(clip):
            row[:h, i * (w + g) : i * (w + g) + w] = frame
        rows.append(row)
    per_column = -(-len(rows) // columns)
    blocks = [rows[k : k + per_column] for k in range(0, len(rows), per_column)]
    height = max(sum(r.shape[0] for r in b) for b in blocks)
    widths = [max(r.shape[1] for r in b) for b in blocks]
    sheet = np.full((height + g, sum(widths) + g, 3), 128, np.uint8)  # rows end in their gap
    x = g
    for block, width in zip(blocks, widths, strict=True):
        y = g
        for r in block:
            sheet[y : y + r.shape[0], x : x + r.shape[1]] = r
            y += r.shape[0]
        x += width
    side = max(max(c.shape[1:3]) for c in clips)
    scale = max(1, min(SHEET_SCALE, SHEET_SIDE // side))
    return sheet.repeat(scale, axis=0).repeat(scale, axis=1)


def write(workdir: str, step: int, scores: dict, requests, clips) -> str:
    """`eval/quality_step<N>.{json,npz,png}` in `workdir`; returns the JSON's path."""
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"quality_step{step}")
    rows = [
        {"name": r.name, "prompt": r.prompt, "frames": r.frames, "height": r.height,
         "width": r.width, "seed": r.seed}
        for r in requests
    ]  # fmt: skip
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"step": step, **scores, "requests": rows}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    np.savez_compressed(stem + ".npz", **{r.name: c for r, c in zip(requests, clips, strict=True)})
    Image.fromarray(contact_sheet(clips)).save(stem + ".png.tmp", format="PNG")
    os.replace(stem + ".png.tmp", stem + ".png")
    return stem + ".json"


class QualityEvaluator:
    """The trainer's hook: scores the EMA weights every `eval.quality_every` steps."""

    def __init__(self, config, workdir: str, stage: Stage):
        ev = config.eval  # checked by the trainer's validate (check_synthetic, prompt_set)
        self.every = int(ev.get("quality_every", 0) or 0)
        self.n, self.steps = int(ev.quality_prompts), int(ev.quality_steps or 0) or None
        self.workdir, self.config, self.stage = workdir, config, stage

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.config.total_steps

    def __call__(self, model, step: int) -> dict[str, float]:
        scores, requests, clips = quality(model, self.config, self.n, self.steps, stage=self.stage)
        if jax.process_index() == 0:
            write(self.workdir, step, scores, requests, clips)
        return summary(scores)


def quality_every(config) -> int:
    return int((config.get("eval") or {}).get("quality_every", 0) or 0)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    training.quiet_orbax_info_logs()
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    model, config, step = load_run(FLAGS.workdir, FLAGS.ema, with_step=True)
    try:
        check_synthetic(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    scores, requests, clips = quality(model, config, FLAGS.prompts, FLAGS.steps, FLAGS.seed)
    path = write(FLAGS.workdir, step, scores, requests, clips)
    logging.info("wrote %s", path)
    print(json.dumps({"workdir": FLAGS.workdir, "step": step, **summary(scores)}))


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    flags.DEFINE_integer("prompts", DEFAULT_PROMPTS, "Prompts in the fixed set.")
    flags.DEFINE_integer("steps", None, "Solver steps (default: the run's config.sample.steps).")
    flags.DEFINE_integer("seed", 0, "Seed of the prompt set and its noise.")
    flags.DEFINE_bool("ema", True, "Use the EMA weights.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
