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

Each request becomes one segment of noise patches arranged in its own T x H x W grid; requests of
different sizes are packed together, and every segment follows its own resolution-shifted time
schedule. Classifier-free guidance runs the conditional and unconditional passes as one batch.

Requests are in pixels whatever the compression stage. In pixel space a request's sides are
multiples of the patch; with a causal VAE (`model.compression="vae"`) T pixel frames are
T' = 1 + (T-1)/4 latent frames (T = 1, 5, 9, ... and T' a multiple of p_t), sides are multiples
of 8 * patch, and the generated latents are decoded by the VAE in `model.vae_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from jaxsora import train as trainer
from jaxsora import training
from jaxsora.checkpointing import Checkpointer
from jaxsora.compression import Stage, make_stage
from jaxsora.data import packing, video
from jaxsora.data.media import output_stem, write_video_outputs
from jaxsora.diffusion import flow
from jaxsora.distributed import PreemptionWatch
from jaxsora.models.dit import DiT
from jaxsora.models.tokenizer import caption_words, tokenize


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    frames: int
    height: int
    width: int
    name: str = "sample"
    seed: int = 0


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


def request_example(
    req: Request, config, patch_dim: int, stage: Stage | None = None
) -> packing.Example:
    grid = request_grid(req, config, stage)
    positions = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1)
    positions = positions.reshape(-1, 3).astype(np.int32)
    noise = np.random.default_rng([req.seed, 0x5EED]).standard_normal((len(positions), patch_dim))
    ids, mask = tokenize(req.prompt, config.model.text_len, config.model.text_vocab)
    return {
        "patches": noise.astype(np.float32),
        "positions": positions,
        "grid": np.asarray(grid, np.int32),
        "text_ids": ids,
        "text_mask": mask,
    }


def generate(
    model: DiT,
    config,
    requests: list[Request],
    *,
    steps: int,
    guidance: float,
    seq_len: int | None = None,
    should_stop: Callable[[int], bool] | None = None,
    stage: Stage | None = None,
) -> list[np.ndarray]:
    """Pixels in [0, 1], [T, H, W, 3] per request, in request order.

    `should_stop(step)` is polled before every Euler step (preemption); when it says so, the
    unfinished batch is abandoned with SamplingInterrupted. `stage` defaults to the config's
    (`config.model.compression`, `config.model.vae_dir`); latents go out through its
    `to_pixels` (the VAE decoder in latent space).
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
    examples = [request_example(r, config, patch_dim, stage) for r in requests]
    sizes = [ex["patches"].shape[0] for ex in examples]
    seq_len = max([seq_len or config.sample.seq_len, *sizes])
    shape = packing.PackShape(seq_len, config.data.max_segments, patch_dim, config.model.text_len)
    bins = packing.first_fit_decreasing(sizes, shape.seq_len, shape.max_segments)
    batch = packing.stack_packs([packing.build_pack([examples[i] for i in b], shape) for b in bins])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ts = flow.time_grid(steps, flow.resolution_shift(batch["grid"], config.flow.base_tokens))
    x = batch["tokens"]
    for i in range(steps):  # a host loop, so preemption is noticed between steps
        if should_stop is not None and should_stop(i):
            raise SamplingInterrupted(f"stopped before Euler step {i + 1} of {steps}")
        x = euler_step(model, batch, x, ts[i], ts[i + 1], guidance)
    x = np.asarray(x)
    out: list[np.ndarray] = [None] * len(requests)  # type: ignore[list-item]
    for p, b in enumerate(bins):
        for k, i in enumerate(b):
            tokens = x[p][batch["segment_ids"][p] == k + 1]
            latents = video.unpatchify(
                tokens, tuple(examples[i]["grid"]), tuple(config.model.patch)
            )
            out[i] = stage.to_pixels(latents)
    return out


class SamplingInterrupted(RuntimeError):
    pass


@nnx.jit(static_argnums=(5,))
def euler_step(model: DiT, batch: dict, x, t_BS, t_next_BS, guidance: float) -> jax.Array:
    """x at t -> x at t_next, with classifier-free guidance (both halves in one batch)."""
    seg, text_ids, text_mask = batch["segment_ids"], batch["text_ids"], batch["text_mask"]
    both = lambda a, b: jnp.concatenate([a, b], axis=0)
    v = model(
        both(x, x),
        both(t_BS, t_BS),
        both(seg, seg),
        both(batch["positions"], batch["positions"]),
        both(text_ids, trainer.null_text_ids(text_ids)),
        both(text_mask, trainer.null_text_mask(text_mask)),
    )
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return flow.euler_update(x, v_uncond + guidance * (v_cond - v_uncond), t_BS, t_next_BS, seg)


def load_run(workdir: str, use_ema: bool = True) -> tuple[DiT, ml_collections.ConfigDict]:
    """The model of the latest checkpoint in `workdir` that loads (EMA weights by default) and
    its config. A damaged step gives way to the previous one with a warning; the sampler never
    moves or writes anything in the run's directory (it may be training)."""
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
    return (state.ema if use_ema else state.model), built["config"]


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
            requests.append(parse_request(row, where, default_name=f"line{lineno:03d}"))
            lines.append(lineno)
    if not requests:
        raise ValueError(f"{path} holds no requests; write one per line, e.g. {REQUEST_EXAMPLE}")
    check_unique_outputs(requests, lines, path)
    return requests


def parse_request(row, where: str, default_name: str) -> Request:
    """A decoded JSON line -> Request, refusing unknown keys and values of the wrong type."""
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
    request = Request(**{**row, "name": name})
    warn_if_wordless(request, where)
    return request


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
        requests = [Request(FLAGS.prompt, FLAGS.frames, FLAGS.height, FLAGS.width, seed=FLAGS.seed)]
        warn_if_wordless(requests[0], "--prompt")
        outs = [FLAGS.out or os.path.join(FLAGS.workdir, "samples", "sample")]
    else:
        raise app.UsageError("give --prompt (one request) or --requests FILE.jsonl")
    model, config = load_run(FLAGS.workdir, FLAGS.ema)
    for r in requests:
        request_grid(r, config)  # bad sizes fail before anything is compiled
    watch = PreemptionWatch(distributed=False)
    try:
        videos = generate(
            model,
            config,
            requests,
            steps=FLAGS.steps or config.sample.steps,
            guidance=config.sample.guidance if FLAGS.guidance is None else FLAGS.guidance,
            should_stop=watch.reached,
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
    flags.DEFINE_integer("steps", None, "Euler steps (default: the run's config.sample.steps).")
    flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default from config).")
    flags.DEFINE_integer("seed", 0, "Noise seed of the single request.")
    flags.DEFINE_bool("ema", True, "Use the EMA weights.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
