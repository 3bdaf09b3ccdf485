"""Generates videos and images of any size from a trained run, several requests per forward pass.

    python -m jaxsora.sample --workdir runs/default --prompt "a red circle moving left on a blue
        background" --frames 8 --height 32 --width 56 --out runs/default/samples/clip
    python -m jaxsora.sample --workdir runs/default --requests experiments/samples_tiny.jsonl

A requests file holds one JSON object per line: prompt, frames, height, width (whole numbers),
and optionally name and seed (see experiments/samples_tiny.jsonl). Outputs go to
`--out_dir/<name>.{mp4,gif,png}`; a name may hold subfolders (`cats/01`) but not leave --out_dir
(no absolute path, no `..`), two requests may not share a name, and an unnamed request is named
after its line (`line007`). Any mistake is an error naming the file and the line, raised before
the model is loaded.

Conditioning (jaxsora/conditioning.py has the rules), in a requests line or as flags of the
single --prompt request; one mode per request, mixed freely in one file:

  "image": PATH                 --image PATH            animate a still (frame 0)
  "extend": PATH, "direction": "forward"|"backward", "context_frames": K
                                --extend V --direction forward|backward [--context_frames K]
                                forward: the first K frames are V's last K; backward: the
                                last K are V's first K (K default: half the frames)
  "connect": [A, B]             --connect A,B (one flag, the two paths comma-separated, as
                                absl list flags take them; a path with a comma needs the file)
                                from A's last K frames to B's first K (K default: frames / 4)
  "loop": true                  --loop                  the first frame is the last one too;
                                from "image", the start of "extend", or else generated first
  "edit": PATH, "strength": s   --edit V --strength s   SDEdit: V noised to t = s in (0, 1]
                                (default 0.7), then denoised with the prompt

Media paths in a requests file are relative to the file's folder; a missing file is an error
naming the field, and an undecodable one (BadMediaError) fails before the model loads.

Each request becomes one segment of noise patches arranged in its own T x H x W grid; requests of
different sizes are packed together, and every segment follows its own resolution-shifted time
schedule (`flow.sample`, `--solver euler|heun`; Heun costs two model passes a step). Conditioning
tokens are held clean (the model sees them at time 0). Guidance runs all its passes as one
batch: classifier-free guidance on the text (`--guidance`), and with `--image_guidance g != 1`
also on the conditioning frames (InstructPix2Pix's three passes). Every prompt first goes through
the prompt extender (`--prompt_extension`, config.sample.prompt_extension; jaxsora/prompts.py).

Requests are in pixels whatever the compression stage. In pixel space a request's sides are
multiples of the patch; with a causal VAE (`model.compression="vae"`) T pixel frames are
T' = 1 + (T-1)/4 latent frames (T = 1, 5, 9, ... and T' a multiple of p_t), sides are multiples
of 8 * patch, and the generated latents are decoded by the VAE in `model.vae_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from jaxsora import conditioning, training
from jaxsora import train as trainer
from jaxsora.checkpointing import Checkpointer
from jaxsora.compression import Stage, make_stage
from jaxsora.data import captions, packing, video
from jaxsora.data.media import BadMediaError, output_stem, write_video_outputs
from jaxsora.diffusion import flow
from jaxsora.distributed import PreemptionWatch
from jaxsora.models.dit import DiT
from jaxsora.models.tokenizer import caption_words
from jaxsora.prompts import get_prompt_extender


@dataclasses.dataclass(frozen=True)
class Request:
    """One video or image to generate, and optionally what to condition it on (one mode at
    most; `loop` may take its first frame from `image` or `extend`). Paths are files."""

    prompt: str
    frames: int
    height: int
    width: int
    name: str = "sample"
    seed: int = 0
    image: str | None = None  # animate a still: frame 0
    extend: str | None = None  # continue a video (forward) or lead into it (backward)
    direction: str | None = None  # "forward" (default with extend) or "backward"
    context_frames: int | None = None  # default: half the frames (a quarter per side: connect)
    connect: tuple[str, str] | None = None  # [A, B]: from A's end to B's start
    loop: bool = False  # the first frame is the last one too
    edit: str | None = None  # SDEdit this video
    strength: float | None = None  # SDEdit start time in (0, 1]; default 0.7


def request_grid(req: Request, config, stage: Stage | None = None) -> tuple[int, int, int]:
    """Patch grid of a request; sizes must be whole patches, or the error says which to use."""
    stage = stage or make_stage(config.model)
    pt, ph, pw = config.model.patch
    tf, sf = stage.temporal_factor, stage.spatial_factor
    unit = (pt * tf, ph * sf, pw * sf)
    fields = (
        ("frames", req.frames, unit[0]),
        ("height", req.height, unit[1]),
        ("width", req.width, unit[2]),
    )
    if stage.causal:  # T = 1 + tf (T' - 1) pixel frames, T' whole temporal patches
        fields = fields[1:]
        latent_frames = 1 + (req.frames - 1) // tf if req.frames >= 1 else 0
        if req.frames < 1 or (req.frames - 1) % tf or latent_frames % pt:
            ok = 1 + tf * (max(pt, latent_frames // pt * pt) - 1)
            raise ValueError(
                f"request {req.name!r}: frames={req.frames} must be 1 + {tf}k (the causal VAE "
                f"keeps frame 0 alone) with 1 + k a multiple of {pt} (the patch); try {ok}"
            )
    for field, value, u in fields:
        if value < u or value % u:
            raise ValueError(
                f"request {req.name!r}: {field}={value} must be a positive multiple "
                f"of {u} (the patch size of this model); try {max(u, value // u * u)}"
            )
    if stage.causal:
        return (1 + (req.frames - 1) // tf) // pt, req.height // unit[1], req.width // unit[2]
    return req.frames // unit[0], req.height // unit[1], req.width // unit[2]


def request_text(req: Request, config) -> dict[str, np.ndarray]:
    """The caption of a request as the model reads it: {text_ids | text_emb, text_mask}, by the
    run's text encoder (hashed ids, or a frozen encoder's embeddings: jaxsora/data/captions.py).
    The unconditional caption is the all-False mask (`trainer.null_text_mask`)."""
    return captions.text_fields(req.prompt, captions.text_spec(config))


def request_example(
    req: Request, config, patch_dim: int, stage: Stage | None = None
) -> packing.Example:
    """A request's segment: its noise as `patches`, grid positions and caption."""
    grid = request_grid(req, config, stage)
    positions = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
    positions = positions.reshape(-1, 3).astype(np.int32)
    noise = np.random.default_rng([req.seed, 0x5EED]).standard_normal((len(positions), patch_dim))
    return {
        "patches": noise.astype(np.float32),
        "positions": positions,
        "grid": np.asarray(grid, np.int32),
        **request_text(req, config),
    }


SamplingInterrupted = flow.SamplingInterrupted


def generate(model: DiT, config, requests: list[Request], **kwargs) -> list[np.ndarray]:
    """Pixels in [0, 1], [T, H, W, 3] per request, in request order (`generate_latents`'
    latents through the stage's `to_pixels`: the VAE decoder in latent space)."""
    stage = kwargs.get("stage") or make_stage(config.model)
    latents = generate_latents(model, config, requests, **{**kwargs, "stage": stage})
    return [stage.to_pixels(z) for z in latents]


def generate_latents(
    model: DiT,
    config,
    requests: list[Request],
    *,
    steps: int,
    guidance: float,
    image_guidance: float = 1.0,
    solver: str | None = None,
    seq_len: int | None = None,
    should_stop: Callable[[int], bool] | None = None,
    stage: Stage | None = None,
    prompt_extension: str | Callable[[str], str] | None = None,
    canvases: list[conditioning.Canvas | None] | None = None,
) -> list[np.ndarray]:
    """The generated latents [T', H', W', C] per request, in request order.

    `should_stop(step)` is polled before every solver step (preemption); when it says so, the
    unfinished batch is abandoned with SamplingInterrupted. `stage` defaults to the config's
    (`config.model.compression`, `config.model.vae_dir`). `solver` and `prompt_extension`
    default to `config.sample.solver` / `config.sample.prompt_extension` ("euler", "identity").
    `canvases` are the requests' `conditioning.build_canvas` (built here when not given).
    A loop request without a source first has its first frame generated as an image request
    (same prompt, size and seed), then loops from it: that takes a second sampling pass.
    """
    stage = stage or make_stage(config.model)
    patch_dim = model.cfg.patch_dim
    if patch_dim != int(np.prod(config.model.patch)) * stage.channels:
        raise ValueError(
            f"the model's patch_dim={patch_dim} does not fit model.patch="
            f"{tuple(config.model.patch)} x {stage.channels} channels of the "
            f"{config.model.compression!r} stage; sample with the compression stage (and VAE) "
            "the model was trained with"
        )
    solver = solver or config.sample.get("solver", "euler")
    if solver not in flow.SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {flow.SOLVERS}")
    extender = prompt_extension
    if extender is None or isinstance(extender, str):
        extender = get_prompt_extender(
            extender or config.sample.get("prompt_extension", "identity")
        )
    requests = [extended(r, extender) for r in requests]
    canvases = list(canvases) if canvases is not None else load_canvases(requests)
    run = functools.partial(
        _sample_latents,
        model,
        config,
        stage=stage,
        steps=steps,
        guidance=guidance,
        image_guidance=image_guidance,
        solver=solver,
        seq_len=seq_len,
        should_stop=should_stop,
    )
    unsourced = [i for i, r in enumerate(requests) if r.loop and canvases[i] is None]
    if unsourced:  # a loop with no source loops from a frame generated first
        images = [dataclasses.replace(requests[i], frames=1, loop=False) for i in unsourced]
        for i, z in zip(unsourced, run(images, [None] * len(images)), strict=True):
            first = np.round(stage.to_pixels(z)[0] * 255.0).astype(np.uint8)
            canvases[i] = conditioning.build_canvas(requests[i], first_frame=first)
    return run(requests, canvases)


def extended(req: Request, extender: Callable[[str], str]) -> Request:
    """The request with its prompt extended (logged when the extender changed it)."""
    prompt = extender(req.prompt)
    if prompt != req.prompt:
        logging.info("request %r: prompt %r extended to %r", req.name, req.prompt, prompt)
    return dataclasses.replace(req, prompt=prompt)


def load_canvases(requests: list[Request]) -> list[conditioning.Canvas | None]:
    """Every request's conditioning canvas, its media decoded: a bad file fails here, naming
    the request and the file, before anything is sampled."""
    canvases = []
    for r in requests:
        try:
            canvases.append(conditioning.build_canvas(r))
        except (BadMediaError, OSError) as e:
            raise ValueError(f"request {r.name!r}: {e}") from e
    return canvases


def _sample_latents(
    model: DiT,
    config,
    requests: list[Request],
    canvases: list[conditioning.Canvas | None],
    *,
    stage: Stage,
    steps: int,
    guidance: float,
    image_guidance: float,
    solver: str,
    seq_len: int | None,
    should_stop: Callable[[int], bool] | None,
) -> list[np.ndarray]:
    """Packs the requests (noise and clean conditioning laid out alike) and runs `flow.sample`."""
    patch_dim, patch = model.cfg.patch_dim, tuple(config.model.patch)
    examples, clean = [], []
    for r, canvas in zip(requests, canvases, strict=True):
        ex = request_example(r, config, patch_dim, stage)
        z = np.zeros_like(ex["patches"])
        if canvas is not None:
            canvas = conditioning.for_stage(canvas, stage.temporal_factor, stage.causal)
            z, _ = video.patchify(stage.to_latents(canvas.frames), patch)
            ex["cond"] = conditioning.token_cond(
                canvas, ex["positions"], patch[0], stage.temporal_factor, stage.causal
            )
        examples.append(ex)
        clean.append(z)
    sizes = [ex["patches"].shape[0] for ex in examples]
    seq_len = max([seq_len or config.sample.seq_len, *sizes])
    shape = packing.PackShape(
        seq_len,
        config.data.max_segments,
        patch_dim,
        config.model.text_len,
        text_dim=captions.embedding_dim(captions.text_spec(config)),
    )
    bins = packing.first_fit_decreasing(sizes, shape.seq_len, shape.max_segments)
    batch = packing.stack_packs([packing.build_pack([examples[i] for i in b], shape) for b in bins])
    batch["clean"] = packing.stack_packs(
        [packing.build_pack([{**examples[i], "patches": clean[i]} for i in b], shape) for b in bins]
    )["tokens"]
    edits = np.ones((len(bins), shape.max_segments), np.float32)
    for p, b in enumerate(bins):
        for k, i in enumerate(b):
            if canvases[i] is not None and canvases[i].edit:
                edits[p, k] = requests[i].strength or conditioning.DEFAULT_STRENGTH
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["noise"] = batch.pop("tokens")
    seg = batch["segment_ids"]
    start_BS = jnp.asarray(edits) if (edits < 1).any() else None
    x = batch["noise"]
    if start_BS is not None:  # SDEdit: the source noised to its start with the request's noise
        x = flow.add_noise(batch["clean"], x, flow.per_segment(start_BS, seg))
    three_pass = image_guidance != 1.0 and bool(batch["cond_mask"].any())
    prediction = trainer.prediction(config)

    def velocity_fn(x_BLP, t_BS):
        return guided_velocity(
            model, batch, x_BLP, t_BS, guidance, image_guidance, three_pass, prediction
        )

    x = flow.sample(
        velocity_fn,
        x,
        seg,
        flow.resolution_shift(batch["grid"], config.flow.base_tokens),
        steps,
        solver=solver,
        start_BS=start_BS,
        clean_BLP=batch["clean"],
        cond_mask_BL=batch["cond_mask"],
        should_stop=should_stop,
        final_correction=prediction == "velocity",
    )
    x, seg = np.asarray(x), np.asarray(seg)
    out: list[np.ndarray] = [None] * len(requests)  # type: ignore[list-item]
    for p, b in enumerate(bins):
        for k, i in enumerate(b):
            out[i] = video.unpatchify(x[p][seg[p] == k + 1], tuple(examples[i]["grid"]), patch)
    return out


def guided_velocity(
    model: DiT,
    batch: dict,
    x,
    t_BS,
    guidance,
    image_guidance=1.0,
    three_pass: bool = False,
    prediction: str = "velocity",
) -> jax.Array:
    """The guided velocity at x, t, every pass of the guidance in one batch.

    Two passes (classifier-free guidance on text): v = v0 + guidance (vT - v0), where the
    unconditional pass has the null caption and keeps the conditioning frames. `three_pass`
    (image guidance, InstructPix2Pix): passes (no text, no frames), (no text, frames), (text,
    frames) and v = v00 + image_guidance (v0F - v00) + guidance (vTF - v0F). "No frames" clears
    `cond_mask` and makes the conditioning tokens ordinary noisy tokens at t, (1 - t) clean +
    t noise with the request's own noise. `prediction`: what the network outputs (the run's
    flow.prediction), turned into each pass's velocity before the passes are combined.
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # strong types: one compile whatever the caller
    return _guided_velocity(
        model,
        batch,
        f32(x),
        f32(t_BS),
        f32(guidance),
        f32(image_guidance),
        bool(three_pass),
        prediction,
    )


@nnx.jit(static_argnums=(6, 7))
def _guided_velocity(
    model: DiT, batch: dict, x, t_BS, guidance, image_guidance, three_pass, prediction
):
    """guided_velocity, compiled once per batch shape and pass count (the scales are traced)."""
    seg, pos, cond = batch["segment_ids"], batch["positions"], batch["cond_mask"]
    # The null caption is the all-False mask; the ids or embeddings under it are not read.
    ids, mask = trainer.caption_input(batch), batch["text_mask"]
    null_ids, null_mask = ids, trainer.null_text_mask(mask)
    n = 3 if three_pass else 2
    rep = lambda a: jnp.concatenate([a] * n, axis=0)
    if three_pass:
        t_BL = flow.per_segment(t_BS, seg)
        free = flow.add_noise(batch["clean"], batch["noise"], t_BL)
        xs = jnp.concatenate([jnp.where(cond[..., None], free, x), x, x], axis=0)
        texts = (
            jnp.concatenate([null_ids, null_ids, ids], axis=0),
            jnp.concatenate([null_mask, null_mask, mask], axis=0),
        )
        conds = jnp.concatenate([jnp.zeros_like(cond), cond, cond], axis=0)
    else:
        xs = rep(x)
        texts = (jnp.concatenate([ids, null_ids], 0), jnp.concatenate([mask, null_mask], 0))
        conds = rep(cond)
    out = model(xs, rep(t_BS), rep(seg), rep(pos), *texts, conds)
    t_BL = rep(flow.per_segment(t_BS, seg))
    v = flow.velocity_from_output(out, xs, t_BL, prediction, flow.SAMPLING_MIN_T)
    if not three_pass:
        v_text, v_null = jnp.split(v, 2, axis=0)
        return v_null + guidance * (v_text - v_null)
    v00, v0f, vtf = jnp.split(v, 3, axis=0)
    return v00 + image_guidance * (v0f - v00) + guidance * (vtf - v0f)


def load_run(workdir: str, use_ema: bool = True, with_step: bool = False):
    """The model of the latest checkpoint in `workdir` that loads (EMA weights by default) and
    its config (and its step, `with_step`). A damaged step gives way to the previous one with a
    warning; the sampler never moves or writes anything in the run's directory (it may be
    training)."""
    ckpt = Checkpointer(workdir, read_only=True)
    built = {}

    def target(saved: dict):
        """The abstract state the step's own config builds, on one device."""
        config = ml_collections.ConfigDict(saved)
        cfg = trainer.dit_config(config)
        tx = training.make_optimizer(config.optim, config.total_steps)
        abstract = nnx.eval_shape(
            lambda: trainer.TrainState(trainer.make_model(cfg, config.seed), tx, config.seed)
        )
        graphdef, abstract_state = nnx.split(abstract)
        built.update(config=config, graphdef=graphdef, state=abstract_state)  # the last is used
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            abstract_state.to_pure_dict(),
        )

    resumed = ckpt.restore_latest(target)
    ckpt.close()
    if resumed is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt.directory}; train first with "
            f"`python -m jaxsora.train --config ... --workdir {workdir}`"
        )
    step, restored = resumed
    nnx.replace_by_pure_dict(built["state"], restored)
    state = nnx.merge(built["graphdef"], built["state"])
    logging.info("loaded %s weights from step %d of %s", "EMA" if use_ema else "raw", step, workdir)
    model = state.ema if use_ema else state.model
    return (model, built["config"], step) if with_step else (model, built["config"])


# --------------------------------------------------------------------------------- requests file

REQUEST_EXAMPLE = '{"prompt": "a red circle", "frames": 4, "height": 32, "width": 32, "name": "c"}'
_REQUIRED = ("prompt", "frames", "height", "width")
_FIELDS = tuple(f.name for f in dataclasses.fields(Request))


def read_requests(path: str) -> list[Request]:
    """One request per non-blank line of a JSON-lines file; any error names the file and line.

    A request without a name is named after its line (`line007`), so none overwrites another.
    """
    requests, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
                    f"object per line, e.g. {REQUEST_EXAMPLE}"
                ) from e
            requests.append(
                parse_request(
                    row,
                    where,
                    default_name=f"line{lineno:03d}",
                    base_dir=os.path.dirname(os.path.abspath(path)),
                )
            )
            lines.append(lineno)
    if not requests:
        raise ValueError(f"{path} holds no requests; write one per line, e.g. {REQUEST_EXAMPLE}")
    check_unique_outputs(requests, lines, path)
    return requests


def parse_request(row, where: str, default_name: str, base_dir: str = "") -> Request:
    """A decoded JSON line -> Request, refusing unknown keys and values of the wrong type.

    Media paths (image, extend, connect, edit) are relative to `base_dir` (the requests file's
    folder) unless absolute, and must name existing files.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a request is a JSON object, e.g. {REQUEST_EXAMPLE}")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], _FIELDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; {hint}the keys are {_FIELDS}")
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing}; every request needs {_REQUIRED}")
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: prompt={row['prompt']!r} must be a string")
    for key, low in (("frames", 1), ("height", 1), ("width", 1), ("seed", 0)):
        value = row.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"{where}: {key}={value!r} must be a whole number >= {low}, written without "
                'quotes or a decimal point (e.g. "frames": 4)'
            )
    name = row.get("name", default_name)
    check_name(name, where)
    row = dict(row)
    for key in ("image", "extend", "edit"):
        if row.get(key) is not None:
            row[key] = media_path(row[key], key, where, base_dir)
    if row.get("connect") is not None:
        pair = row["connect"]
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(
                f"{where}: connect={pair!r} must be a list of two video paths, "
                '"connect": ["from.mp4", "to.mp4"]'
            )
        row["connect"] = tuple(media_path(v, "connect", where, base_dir) for v in pair)
    request = Request(**{**row, "name": name})
    check_modes(request, where)
    warn_if_wordless(request, where)
    return request


def media_path(value, key: str, where: str, base_dir: str = "") -> str:
    """An existing file's path (relative paths are taken from `base_dir`)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key}={value!r} must be a file path (a string)")
    path = os.path.join(base_dir, os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ValueError(f"{where}: {key}={value!r}: no such file {os.path.abspath(path)!r}")
    return path


def check_modes(r: Request, where: str) -> None:
    """The conditioning fields of a request make sense together (see Request)."""
    sources = [k for k in ("image", "extend", "connect", "edit") if getattr(r, k) is not None]
    if len(sources) > 1:
        raise ValueError(f"{where}: {' and '.join(sources)} given together; use one of them")
    if r.direction is not None:
        if r.direction not in ("forward", "backward"):
            raise ValueError(f"{where}: direction={r.direction!r} must be 'forward' or 'backward'")
        if r.extend is None:
            raise ValueError(f"{where}: direction={r.direction!r} needs extend (a video path)")
    if not isinstance(r.loop, bool):
        raise ValueError(f"{where}: loop={r.loop!r} must be true or false")
    if r.loop:
        if r.connect is not None or r.edit is not None:
            raise ValueError(
                f"{where}: loop=true takes its first frame from image or extend, not from "
                f"{sources[0]}"
            )
        if r.direction is not None or r.context_frames is not None:
            raise ValueError(
                f"{where}: loop=true uses only the first frame of extend's video; drop "
                "direction and context_frames"
            )
        if r.frames < 2:
            raise ValueError(f"{where}: loop=true needs frames >= 2, got frames={r.frames}")
    k = r.context_frames
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{where}: context_frames={k!r} must be a whole number >= 1")
        if r.extend is None and r.connect is None:
            raise ValueError(f"{where}: context_frames={k} needs extend or connect")
        if r.extend is not None and k > r.frames:
            raise ValueError(f"{where}: context_frames={k} is more than frames={r.frames}")
        if r.connect is not None and 2 * k > r.frames:
            raise ValueError(
                f"{where}: context_frames={k} from each of connect's two videos is more than "
                f"frames={r.frames}"
            )
    s = r.strength
    if s is not None:
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= 1:
            raise ValueError(f"{where}: strength={s!r} must be a number in (0, 1]")
        if r.edit is None:
            raise ValueError(f"{where}: strength={s} needs edit (a video path)")


def check_name(name, where: str) -> None:
    """A name is a path relative to --out_dir: subfolders (`cats/01`) are allowed, leaving the
    folder is not, so one requests file cannot write over files elsewhere."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ValueError(
            f"{where}: name={name!r} must be a relative path inside --out_dir: no leading '/', "
            "no '..', '.' or empty parts (subfolders like 'cats/01' are fine)"
        )


def check_unique_outputs(requests: list[Request], lines: list[int], path: str) -> None:
    """Two requests writing the same files would leave one of them: refuse, naming both lines."""
    first_line: dict[str, int] = {}
    for r, lineno in zip(requests, lines, strict=True):
        stem = output_stem(r.name)
        if stem in first_line:
            raise ValueError(
                f"{path}:{first_line[stem]} and {path}:{lineno} both write {stem!r} (.mp4, .gif, "
                ".png); give each request its own name"
            )
        first_line[stem] = lineno


def check_caption(request: Request, config, extender) -> None:
    """A prompt the run cannot read (a class-conditional run's prompt naming none of its
    classes, or two) fails here, naming the request, before anything is compiled."""
    spec = captions.text_spec(config)
    if spec.encoder != captions.CLASS:
        return  # any text is a caption
    try:
        captions.class_label(extender(request.prompt), spec.class_names)
    except captions.UnknownClassError as e:
        raise app.UsageError(f"request {request.name!r}: {e}") from None


def warn_if_wordless(request: Request, where: str) -> None:
    """A prompt with no letter or digit is read as the empty caption: unconditional samples."""
    if not caption_words(request.prompt):
        logging.warning(
            "%s: request %r: prompt %r has no words the tokenizer reads (letters or digits); it "
            "is sampled as the empty, unconditional prompt",
            where,
            request.name,
            request.prompt,
        )


def flag_request() -> Request:
    """The single request of --prompt and the conditioning flags, checked like a file's."""
    F = flags.FLAGS
    connect = None
    if F.connect is not None:
        if len(F.connect) != 2:
            raise app.UsageError(f"--connect takes two paths, A,B; got {F.connect}")
        connect = tuple(media_path(p, "--connect", "flags") for p in F.connect)
    paths = {
        k: media_path(getattr(F, k), f"--{k}", "flags") if getattr(F, k) else None
        for k in ("image", "extend", "edit")
    }
    request = Request(
        F.prompt,
        F.frames,
        F.height,
        F.width,
        seed=F.seed,
        direction=F.direction,
        context_frames=F.context_frames,
        connect=connect,
        loop=F.loop,
        strength=F.strength,
        **paths,
    )
    check_modes(request, "flags")
    warn_if_wordless(request, "--prompt")
    return request


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    training.quiet_orbax_info_logs()
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if FLAGS.requests:
        requests = read_requests(FLAGS.requests)
        out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, "samples")
        outs = [os.path.join(out_dir, r.name) for r in requests]
    elif FLAGS.prompt:
        requests = [flag_request()]
        outs = [FLAGS.out or os.path.join(FLAGS.workdir, "samples", "sample")]
    else:
        raise app.UsageError("give --prompt (one request) or --requests FILE.jsonl")
    canvases = load_canvases(requests)  # bad media fail before the model loads
    model, config = load_run(FLAGS.workdir, FLAGS.ema)
    extender = get_prompt_extender(
        FLAGS.prompt_extension or config.sample.get("prompt_extension", "identity")
    )
    for r in requests:
        request_grid(r, config)  # bad sizes fail before anything is compiled
        check_caption(r, config, extender)
    watch = PreemptionWatch(distributed=False)
    sc = config.sample
    try:
        videos = generate(
            model,
            config,
            requests,
            steps=FLAGS.steps or sc.steps,
            guidance=sc.guidance if FLAGS.guidance is None else FLAGS.guidance,
            image_guidance=(
                sc.get("image_guidance", 1.0)
                if FLAGS.image_guidance is None
                else FLAGS.image_guidance
            ),
            solver=FLAGS.solver or sc.get("solver", "euler"),
            should_stop=watch.reached,
            prompt_extension=extender,
            canvases=canvases,
        )
    except SamplingInterrupted as e:
        logging.warning("SIGTERM: %s; nothing written, rerun to generate", e)
        return
    for r, v, out in zip(requests, videos, outs, strict=True):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        paths = write_video_outputs(v, out)
        logging.info("%s (%dx%dx%d): %s", r.prompt, r.frames, r.height, r.width, paths)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
    flags.DEFINE_string("prompt", None, "Caption of the single video to generate.")
    flags.DEFINE_integer("frames", 1, "Frames of the single request (1 = an image).")
    flags.DEFINE_integer("height", 32, "Height in pixels of the single request.")
    flags.DEFINE_integer("width", 32, "Width in pixels of the single request.")
    flags.DEFINE_string(
        "out", None, "Output path (stem) of the single request: writes .mp4 .gif .png"
    )
    flags.DEFINE_string("requests", None, "JSON-lines file of requests, all generated in one pass.")
    flags.DEFINE_string(
        "out_dir", None, "Where --requests outputs go: <out_dir>/<name> (default WORKDIR/samples)"
    )
    flags.DEFINE_integer("steps", None, "Solver steps (default: the run's config.sample.steps).")
    flags.DEFINE_enum(
        "solver", None, list(flow.SOLVERS), "ODE solver (default config.sample.solver or euler)."
    )
    flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default from config).")
    flags.DEFINE_float(
        "image_guidance", None, "Guidance on the conditioning frames; 1 = off (the default)."
    )
    flags.DEFINE_integer("seed", 0, "Noise seed of the single request.")
    flags.DEFINE_bool("ema", True, "Use the EMA weights.")
    flags.DEFINE_string("image", None, "Animate this image: it becomes frame 0.")
    flags.DEFINE_string("extend", None, "Extend this video (see --direction, --context_frames).")
    flags.DEFINE_enum(
        "direction", None, ["forward", "backward"], "--extend: continue it or lead into it."
    )
    flags.DEFINE_integer(
        "context_frames", None, "Frames of --extend/--connect held (default: half the frames)."
    )
    flags.DEFINE_list("connect", None, "Two videos A,B (comma-separated): from A's end to B's.")
    flags.DEFINE_bool("loop", False, "A seamless loop: the first frame is the last too.")
    flags.DEFINE_string("edit", None, "SDEdit this video (see --strength).")
    flags.DEFINE_float("strength", None, "--edit: how much to change, in (0, 1] (default 0.7).")
    flags.DEFINE_string(
        "prompt_extension",
        None,
        "identity, template or package.module:function (default config.sample.prompt_extension)",
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
