"""The training task mix: which frames of an example are given clean as conditioning.

One model learns text-to-video and every frame-conditioned task at once, as Open-Sora's masking
strategies do: each example draws a task with the configured weights (`data.tasks`), and the
task marks some of its temporal patches as conditioning. Those tokens reach the model clean
(seen at time 0, jaxsora/models/dit.py) and are left out of the loss (diffusion/flow.py), so the
model learns to generate the other frames around them.

  t2v              nothing given: text alone
  i2v_head         the first frame given: animate an image (image-to-video)
  i2v_tail         the last frame given: lead up to an image
  extend_forward   the first k frames given, k in [1, T-1]: continue a video
  extend_backward  the last k frames given: what came before
  connect          the first k1 and the last k2 frames given: a transition between two clips
  loop             the first and the last frame given (one each): what the sampler's `--loop`
                   asks for, with the same frame at both ends

Frames are temporal patches of the example's grid (positions[:, 0]); with a causal VAE latent
frame 0 is pixel frame 0 alone, so `i2v_head` conditions on exactly the image. An example with
too few frames for its task (an image has one) trains as `t2v`: there is nothing to generate
around. Draws come from the example's own generator, after everything else it draws, so an
example is the same with or without a task mix apart from its conditioning mask, and each
segment of a pack draws its own task.

Open-Sora's weights for reference: 1.2 stages used image-head 0.05-0.22, random 0.05 and none
~0.8; 2.0 used t2v 1, i2v-head 5, loop 1, tail 1 (normalised here).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TASKS = ("t2v", "i2v_head", "i2v_tail", "extend_forward", "extend_backward", "connect", "loop")
# Temporal patches a task needs: one to give and one to generate, two to give around one.
MIN_FRAMES = {
    "t2v": 1,
    "i2v_head": 2,
    "i2v_tail": 2,
    "extend_forward": 2,
    "extend_backward": 2,
    "connect": 3,
    "loop": 3,
}


def check_weights(weights: Mapping[str, float] | None, field: str = "data.tasks") -> None:
    """Unknown task names, negative or non-numeric weights, or all zero: an error naming the
    field and the fix, raised before anything compiles."""
    if weights is None:
        return
    if not hasattr(weights, "items"):
        raise ValueError(
            f"bad config: {field}={weights!r} must be a dict of task name -> weight, e.g. "
            "dict(t2v=0.6, i2v_head=0.2, extend_forward=0.2)"
        )
    for name, w in weights.items():
        if name not in TASKS:
            raise ValueError(f"bad config: {field}: unknown task {name!r}; the tasks are {TASKS}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:
            raise ValueError(f"bad config: {field}.{name}={w!r} must be a number >= 0")
    if not sum(weights.values()) > 0:
        raise ValueError(
            f"bad config: {field}: the weights sum to 0; give at least one task weight > 0"
        )


def normalized(weights: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    """(task, probability) pairs in TASKS order; none or only t2v -> () (no mix: no draws)."""
    if not weights or all(w == 0 for k, w in weights.items() if k != "t2v"):
        return ()
    total = float(sum(weights.values()))
    return tuple((k, float(weights[k]) / total) for k in TASKS if weights.get(k, 0) > 0)


def draw_task(mix: tuple[tuple[str, float], ...], rng: np.random.Generator) -> str:
    if not mix:
        return "t2v"
    names, probs = zip(*mix, strict=True)
    return names[int(rng.choice(len(names), p=np.asarray(probs)))]


def conditioning_frames(task: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Which of `num_frames` temporal patches the task gives clean, [num_frames] bool."""
    given = np.zeros((num_frames,), bool)
    if num_frames < MIN_FRAMES[task] or task == "t2v":
        return given
    if task == "i2v_head":
        given[0] = True
    elif task == "i2v_tail":
        given[-1] = True
    elif task == "extend_forward":
        given[: rng.integers(1, num_frames)] = True
    elif task == "extend_backward":
        given[num_frames - rng.integers(1, num_frames) :] = True
    elif task == "connect":
        head = rng.integers(1, num_frames - 1)
        tail = rng.integers(1, num_frames - head)
        given[:head] = True
        given[num_frames - tail :] = True
    elif task == "loop":
        given[0] = given[-1] = True
    return given


def conditioning_mask(
    mix: tuple[tuple[str, float], ...],
    positions_N3: np.ndarray,
    num_frames: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """The example's `cond` mask [N] (by each token's temporal position), or None with no mix."""
    if not mix:
        return None
    task = draw_task(mix, rng)
    return conditioning_frames(task, num_frames, rng)[positions_N3[:, 0]]
