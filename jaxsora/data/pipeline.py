"""The input pipeline: TFDS data sources -> Grain -> decoded, resized, patchified examples ->
online packs -> global batches on the mesh.

    tfds.data_source (array_record, random access)
      -> grain.MapDataset: this process's shard, shuffled per epoch, repeated, sources mixed
      -> example_at(i): decode, temporal window, resize to a token budget, compress, patchify,
         tokenize the caption, draw the task's conditioning frames (data/tasks.py) (all
         seeded by (seed, i), so any example can be rebuilt)
      -> OnlinePacker (first-fit decreasing over a buffer)
      -> PackedBatches: B_local packs per step, state = a few integers

Records that carry `latents` (the cached-latents datasets of `data_pipelines/latents`) skip
decoding and the VAE entirely: the pipeline cuts their latent window, crops them to the token
budget if needed, normalises them and patchifies them (`cached_example`). Training in latent
space therefore never runs the encoder.

Video files are decoded only around the temporal window an example uses (`decode_example_window`
seeks to the keyframe before it and stops after its last frame), so host memory follows the
window, not the length of the file.

Bad media (corrupt, empty, no frames, zero height or width) is logged with its path and
skipped. The error budget counts distinct bad files (a file re-read every epoch counts once) and
is enforced while the packer fills its buffer, so a source whose media are all bad stops the run
with the paths of the last bad files instead of spinning forever.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import os
from collections.abc import Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxsora.compression import Stage, VaeMismatchError, check_same_vae
from jaxsora.data import captions, latent_records, packing, tasks, video
from jaxsora.data.media import BadMediaError, decode_example_window
from jaxsora.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """How one record becomes one example of patches."""

    patch: tuple[int, int, int]  # (p_t, p_h, p_w) in latent units
    min_tokens: int
    max_tokens: int
    max_frames: int
    frame_stride: int
    text_len: int
    text_vocab: int
    token_drop_rate: float = 0.0  # NaViT token dropping, per example, training only
    # The task mix (jaxsora/data/tasks.py): (task, probability) pairs; () trains text-to-video.
    tasks: tuple[tuple[str, float], ...] = ()
    text_encoder: str = captions.HASHED  # config text.encoder (jaxsora/data/captions.py)
    text_checkpoint: str = ""
    class_names: tuple[str, ...] = ()  # text.encoder = "class"

    @property
    def text(self) -> captions.TextSpec:
        return captions.TextSpec(
            self.text_encoder,
            self.text_checkpoint,
            self.text_len,
            self.text_vocab,
            self.class_names,
        )


def patch_pixels(spec: ExampleSpec, stage: Stage) -> tuple[int, int, int]:
    pt, ph, pw = spec.patch
    return pt * stage.temporal_factor, ph * stage.spatial_factor, pw * stage.spatial_factor


def frames_to_latent_grid(
    frames: np.ndarray, patch: tuple[int, int, int], stage: Stage, token_budget: int
) -> np.ndarray:
    """Cuts and resizes uint8 frames so a causal stage's latents patchify within the budget.

    A causal VAE turns T = 1 + tf*(T'-1) pixel frames into T' latent frames (frame 0 is its own
    latent frame), not tf*T' -> T'. So the grid is fitted in latent frames, `1 + (T-1)//tf` of
    them available, and the clip is cut to the *first* `1 + tf*(t*p_t - 1)` frames: a contiguous
    cut keeps the frame rate (spreading the frames out, as the pixel stage does when over
    budget, would hand the VAE uneven motion). Sides are resized, aspect ratio kept, to
    multiples of `spatial_factor * p_h` and `spatial_factor * p_w`. Deterministic.
    """
    tf, sf = stage.temporal_factor, stage.spatial_factor
    pt, ph, pw = patch
    available = 1 + (frames.shape[0] - 1) // tf
    t, h, w = video.fit_grid(available, frames.shape[1], frames.shape[2], patch, token_budget)
    n = 1 + tf * (t * pt - 1)
    frames = frames[:n]
    if frames.shape[0] < n:  # fewer latent frames than one temporal patch: repeat the last
        frames = np.concatenate([frames, np.repeat(frames[-1:], n - frames.shape[0], 0)])
    return video.resize_frames(frames, h * ph * sf, w * pw * sf)


def make_example(
    frames: np.ndarray,
    caption: bytes | str | captions.Precomputed,
    spec: ExampleSpec,
    stage: Stage,
    rng: np.random.Generator,
) -> packing.Example:
    """Decoded frames [T, H, W, 3] uint8 + caption -> one example for the packer.

    With a VAE stage this encodes the clip on the spot (compiling the encoder for every new
    pixel shape): fine for a few clips, slow for training. Train on a latent cache instead.
    """
    window = video.sample_window(frames.shape[0], spec.max_frames, spec.frame_stride, rng)
    return window_example(frames[window], caption, spec, stage, rng)


def window_example(
    frames: np.ndarray,
    caption: bytes | str | captions.Precomputed,
    spec: ExampleSpec,
    stage: Stage,
    rng: np.random.Generator,
) -> packing.Example:
    """`make_example` after the temporal window was cut (its frames only), with `rng` as
    `sample_window` left it, so decoding just the window gives the same example."""
    budget = int(rng.integers(spec.min_tokens, spec.max_tokens + 1))
    if stage.causal:
        frames = frames_to_latent_grid(frames, spec.patch, stage, budget)
    else:
        frames = video.frames_to_grid(frames, patch_pixels(spec, stage), budget)
    return _to_example(stage.to_latents(frames), caption, spec, rng)


def cached_example(
    raw_latents: np.ndarray,
    caption: bytes | str | captions.Precomputed,
    spec: ExampleSpec,
    stage: Stage,
    rng: np.random.Generator,
    path: str = "<cached latents>",
) -> packing.Example:
    """A cached raw posterior mean [T', H', W', C] + caption -> one example, no VAE run.

    The rules, all deterministic (only token dropping draws from `rng`):
      * time: the first `1 + (max_frames - 1) // tf` latent frames (`data.max_frames` counts
        pixel frames, as for every source), cut to whole temporal patches. The window always
        starts at latent frame 0: that frame encodes pixel frame 0 alone, while a later latent
        frame summarises frames that depend on the ones before it, so a window starting there
        would begin mid-context and look like no clip the VAE ever encoded from its start.
        `data.frame_stride` does not apply (latent frames cannot be subsampled).
      * space: sides cropped (centred) to whole patches; if the clip is over `max_tokens`,
        latent frames are dropped from the end first, then the frame is centre-cropped to the
        largest patch grid of its aspect ratio within the budget. A cache built for this
        budget is never cropped. `min_tokens` only chooses among a multi-resolution record's
        sizes (`latent_records.choose`, before this): the cache fixed each size.
      * values: normalised by the stage's per-channel statistics.
    """
    pt, ph, pw = spec.patch
    z = np.asarray(raw_latents, np.float32)
    if z.ndim != 4 or z.shape[-1] != stage.channels:
        raise BadMediaError(
            path, f"latents have shape {z.shape}, expected [T', H', W', {stage.channels}]"
        )
    if z.shape[1] < ph or z.shape[2] < pw:
        raise BadMediaError(path, f"latents {z.shape} are smaller than one {spec.patch} patch")
    z = z[: max(1, 1 + (spec.max_frames - 1) // stage.temporal_factor)]
    if z.shape[0] < pt:
        z = np.concatenate([z, np.repeat(z[-1:], pt - z.shape[0], 0)])
    t, h, w = z.shape[0] // pt, z.shape[1] // ph, z.shape[2] // pw
    if t * h * w > spec.max_tokens:
        t = max(1, spec.max_tokens // (h * w))
        if h * w > spec.max_tokens:
            _, h2, w2 = video.fit_grid(1, h, w, (1, 1, 1), spec.max_tokens)
            h, w = min(h, h2), min(w, w2)
    y0, x0 = (z.shape[1] - h * ph) // 2, (z.shape[2] - w * pw) // 2
    z = z[: t * pt, y0 : y0 + h * ph, x0 : x0 + w * pw]
    return _to_example(stage.normalize(z), caption, spec, rng)


def _to_example(
    latents: np.ndarray,
    caption: bytes | str | captions.Precomputed,
    spec: ExampleSpec,
    rng: np.random.Generator,
) -> packing.Example:
    patches, positions = video.patchify(latents, spec.patch)
    grid = np.asarray(
        [
            latents.shape[0] // spec.patch[0],
            latents.shape[1] // spec.patch[1],
            latents.shape[2] // spec.patch[2],
        ],
        np.int32,
    )
    if spec.token_drop_rate > 0 and patches.shape[0] > 1:
        keep = max(1, round(patches.shape[0] * (1 - rng.uniform(0, spec.token_drop_rate))))
        kept = np.sort(rng.choice(patches.shape[0], keep, replace=False))
        patches, positions = patches[kept], positions[kept]
    example = {
        "patches": patches,
        "positions": positions,
        "grid": grid,
        **captions.text_fields(caption, spec.text),
    }
    # Drawn last, so the rest of the example is the same with or without a task mix.
    cond = tasks.conditioning_mask(spec.tasks, positions, int(grid[0]), rng)
    if cond is not None:
        example["cond"] = cond
    return example


def check_source_stage(name: str, records, stage: Stage) -> None:
    """A latent cache must come from the stage's VAE; pixel records go through any stage.

    Raises before anything compiles: a cache read by a pixel-space DiT, or one encoded by
    another VAE than `model.vae_dir` (whose decoder the sampler will use), trains a model that
    can never be decoded correctly.
    """
    info = getattr(records, "dataset_info", None)
    metadata = getattr(info, "metadata", None) or {}
    cached = metadata.get("vae") if hasattr(metadata, "get") else None
    if cached is None:
        if stage.causal:
            logging.warning(
                "dataset %r holds pixels: every example is VAE-encoded as it is "
                "read (slow); build a latent cache with data_pipelines/latents",
                name,
            )
        return
    identity = getattr(stage, "identity", None)
    if identity is None:
        raise VaeMismatchError(
            f"config data.sources: dataset {name!r} holds latents of the VAE in "
            f"{cached.get('vae_dir')!r}, but model.compression is not 'vae'; set "
            f"model.compression='vae' and model.vae_dir={cached.get('vae_dir')!r}"
        )
    check_same_vae(cached, identity, name)


class RecaptionerMismatchError(ValueError):
    pass


def check_source_recaptioner(name: str, records, expected: str) -> None:
    """The captions of `name` must come from the config's `data.recaptioner`
    (data_pipelines/recaption.py): a model trained on one caption style is prompted in that
    style (`sample.prompt_extension`), so a source in another style is a config error. Datasets
    built before recaptioning existed read as "identity"."""
    info = getattr(records, "dataset_info", None)
    metadata = getattr(info, "metadata", None) or {}
    stored = metadata.get("recaptioner") if hasattr(metadata, "get") else None
    stored_name = (stored or {}).get("name", "identity")
    if stored_name != expected:
        version = (stored or {}).get("version") or ""
        raise RecaptionerMismatchError(
            f"config data.sources: dataset {name!r} has captions from recaptioner "
            f"{stored_name!r}{f' (version {version!r})' if version else ''}, but config "
            f"data.recaptioner={expected!r}; set data.recaptioner={stored_name!r}, or rebuild "
            f"the dataset with `--recaptioner {expected}` (data_pipelines.build)"
        )


# What `python -m data_pipelines.build` needs beyond --dataset and --data_dir, per builder.
_BUILD_ARGS = {"video_folder": " --folder YOUR_MEDIA_FOLDER", "latents": " --vae_dir YOUR_VAE_DIR"}
EPOCH_KEY = "_epoch"  # added to every record by `open_sources`: its pass over its source


def _is_built(data_dir: str, name: str) -> bool:
    """Whether some version of `name` ("dataset" or "dataset/config") is prepared there."""
    pattern = os.path.join(data_dir, *name.replace(":", "/").split("/"), "*", "dataset_info.json")
    return bool(glob.glob(pattern))


def _stale_version_message(data_dir: str, name: str) -> str | None:
    """When `name` is built only at versions other than its builder's (a record format that
    changed, e.g. the multi-resolution latent cache, 2.0.0): what to rebuild, else None."""
    from data_pipelines.build import BUILDERS  # late: it imports every builder

    parts = name.replace(":", "/").split("/")
    builder = BUILDERS.get(parts[0])
    if builder is None:
        return None
    pattern = os.path.join(data_dir, *parts, "*", "dataset_info.json")
    built = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(pattern))
    wanted = str(builder.VERSION)
    if not built or wanted in built:
        return None
    return (
        f"dataset {name!r} under data.data_dir={data_dir!r} is built at version "
        f"{', '.join(built)}, but this code reads version {wanted} "
        f"({builder.RELEASE_NOTES.get(wanted, 'a newer format')}); rebuild it: `python -m "
        f"data_pipelines.build --dataset {name.replace('/', ':', 1)} --data_dir {data_dir} "
        "--overwrite` (with the flags it was built with)"
    )


def missing_dataset_message(data_dir: str, name: str, split: str) -> str:
    """One short paragraph instead of TFDS's list of every dataset in its catalog: the build
    command, for the datasets this project can build, else the ones it can."""
    from data_pipelines.build import BUILDERS  # late: it imports every builder

    where = (
        f"dataset {name!r} (split {split!r}) is not built under config data.data_dir={data_dir!r}"
    )
    base = name.replace(":", "/").split("/")[0]
    if base in BUILDERS:
        return (
            f"{where}; build it with `python -m data_pipelines.build --dataset {name} "
            f"--data_dir {data_dir}{_BUILD_ARGS.get(base, '')}`, or point data.data_dir at the "
            "folder that holds it"
        )
    builds = ", ".join(f"{b}:<source>" if b == "latents" else b for b in sorted(BUILDERS))
    return (
        f"{where}, and it is not a dataset this project builds ({builds}); fix config "
        "data.sources, or prepare it yourself as TFDS array_record files under data.data_dir"
    )


def open_records(data_dir: str, name: str, split: str):
    """A built TFDS dataset's records with random access, or a message saying how to build it.
    `split` may be a TFDS slice ("train[100:200]"): only the shard files it covers are opened."""
    with _read_errors(data_dir, name, split):
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def open_process_share(
    data_dir: str,
    name: str,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """This process's contiguous share of a split (its size // process_count records, the
    remainder dropped so hosts step in lockstep), opened as a TFDS split slice: a host opens
    only the array_record shards that hold its share, never every shard of the split (a pod
    of hundreds of hosts over thousands of shards). The split's size comes from the dataset's
    info, so no shard is opened to learn it. Returns (records, the index in the split of the
    share's first record)."""
    with _read_errors(data_dir, name, split):
        builder = tfds.builder(name, data_dir=data_dir)
        total = builder.info.splits[split].num_examples
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    size = total // count
    if size == 0:
        raise ValueError(
            f"dataset {name!r} has {total} records, fewer than the {count} processes reading "
            "it; build more data or drop the source"
        )
    start = index * size
    with _read_errors(data_dir, name, split):
        return builder.as_data_source(split=f"{split}[{start}:{start + size}]"), start


@contextlib.contextmanager
def _read_errors(data_dir: str, name: str, split: str):
    try:
        yield
    except Exception as e:  # TFDS raises several kinds when a dataset was never built
        if _is_built(data_dir, name):  # built: the version, the split or the format is wrong
            if stale := _stale_version_message(data_dir, name):
                raise ValueError(stale) from e
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"dataset {name!r} under data.data_dir={data_dir!r} cannot be read as split "
                f"{split!r}: {first_line}"
            ) from e
        # `from None`: TFDS's own error lists every dataset in its catalog (500 lines).
        raise FileNotFoundError(missing_dataset_message(data_dir, name, split)) from None


def _tag_epoch(size: int, index: int, record) -> dict:
    """`record` marked with its pass over its source, so the error budget can count a bad file
    the first time it is read and not again every epoch."""
    return {**record, EPOCH_KEY: index // size}


def open_sources(
    data_dir: str,
    sources: list[dict],
    split: str,
    seed: int,
    stage: Stage | None = None,
    text: captions.TextSpec | None = None,
    recaptioner: str | None = None,
) -> tuple[grain.MapDataset, int]:
    """Each source's shard for this process, shuffled per epoch and repeated, then mixed; and
    how many distinct records the shards hold together.

    Every process gets the same number of records from each source (the remainder is dropped), so
    hosts step in lockstep and never wait on a collective that one of them will not reach.
    Each record carries `EPOCH_KEY`. With `stage`, each source is checked against it
    (`check_source_stage`); with `text`, its precomputed caption embeddings, if any, against
    the text encoder (`captions.check_source_encoder`); with `recaptioner`, the captions'
    recaptioner against it (`check_source_recaptioner`).
    """
    datasets, weights, total = [], [], 0
    for i, src in enumerate(sources):
        name = src["name"]
        records, _ = open_process_share(data_dir, name, split)
        if stage is not None:
            check_source_stage(name, records, stage)
        if text is not None:
            captions.check_source_encoder(name, records, text)
        if recaptioner is not None:
            check_source_recaptioner(name, records, recaptioner)
        per_process = len(records)
        ds = grain.MapDataset.source(records).seed(seed + 7919 * i).shuffle().repeat()
        datasets.append(ds.map_with_index(functools.partial(_tag_epoch, per_process)))
        weights.append(float(src.get("weight", 1.0)))
        total += per_process
    mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    return mixed, total


class PackedBatches(Iterator[dict[str, np.ndarray]]):
    """Endless batches of this process's packs, with a JSON-able state for checkpoints.

    The error budget: the run stops once the distinct bad files (`skipped`, in the state) are
    more than max(`min_bad_allowed`, `max_bad_fraction` x records read), or are all
    `num_records` of them. It is checked at each rejection, inside the packer's fill loop.
    """

    def __init__(
        self,
        records: grain.MapDataset,
        spec: ExampleSpec,
        shape: packing.PackShape,
        batch_size: int,
        buffer_size: int,
        seed: int,
        stage: Stage,
        max_bad_fraction: float = 0.05,
        min_bad_allowed: int = 8,
        num_records: int | None = None,
    ):
        self._records, self._spec, self._stage, self._seed = records, spec, stage, seed
        self._batch_size = batch_size
        self._max_bad_fraction, self._min_bad_allowed = max_bad_fraction, min_bad_allowed
        self._num_records = num_records  # distinct records in `records` (None: unknown)
        self._recent_bad: collections.deque[str] = collections.deque(maxlen=3)
        self._first_reads_rejected: set[int] = set()  # bad indices read in their first epoch
        self.packer = packing.OnlinePacker(
            self.example_at, shape, buffer_size, on_reject=self._on_reject
        )

    def example_at(self, index: int) -> packing.Example | None:
        record = self._records[index]
        rng = np.random.default_rng([self._seed, index])
        try:
            if "latents" in record:  # a latent cache: no decoding, no VAE
                spec = self._spec
                z = latent_records.choose(
                    latent_records.sizes(record),
                    spec.patch,
                    spec.min_tokens,
                    spec.max_tokens,
                    rng,
                )
                return cached_example(
                    z,
                    captions.caption_of(record),
                    self._spec,
                    self._stage,
                    rng,
                    path=_path(record),
                )
            # Only the window's frames are decoded; `rng` draws it as from the whole clip.
            frames = decode_example_window(record, self._window_sampler(rng))
        except BadMediaError as e:
            if record.get(EPOCH_KEY, 0) == 0:  # once per file, not again every epoch
                logging.warning("skipping example %d: %s", index, e)
                self._first_reads_rejected.add(index)  # for `_on_reject`, without a re-read
            self._recent_bad.append(f"{e.path} ({e.reason})")
            return None
        return window_example(frames, captions.caption_of(record), self._spec, self._stage, rng)

    def _window_sampler(self, rng: np.random.Generator):
        spec = self._spec
        return lambda num_frames: video.sample_window(
            num_frames, spec.max_frames, spec.frame_stride, rng
        )

    def __next__(self) -> dict[str, np.ndarray]:
        return packing.stack_packs([next(self.packer) for _ in range(self._batch_size)])

    def _on_reject(self, index: int) -> None:
        """The packer's rejection hook: a bad file counts the first time it is read (a re-read
        in a later epoch is the same file), then the budget is checked there and then."""
        if index in self._first_reads_rejected:
            self._first_reads_rejected.discard(index)
            self.packer.count_rejection(index)
        self._check_error_budget(read=index + 1)

    def _check_error_budget(self, read: int) -> None:
        bad = self.packer.skipped
        last = "; ".join(self._recent_bad)
        if self._num_records is not None and bad >= self._num_records:
            raise RuntimeError(
                f"none of the {self._num_records} records of config data.sources can be used "
                f"(the last bad files: {last}); no data.max_bad_fraction allows that: fix or "
                "replace the media and rebuild the dataset, or fix data.sources"
            )
        allowed = max(self._min_bad_allowed, self._max_bad_fraction * read)
        if bad > allowed:
            raise RuntimeError(
                f"{bad} distinct media files could not be used in the first {read} records "
                f"read, over the error budget of {allowed:g} (config "
                f"data.max_bad_fraction={self._max_bad_fraction}, at least "
                f"{self._min_bad_allowed} allowed); the last ones: {last}. Fix or remove them "
                "and rebuild the dataset, or raise data.max_bad_fraction"
            )

    def get_state(self) -> dict:
        return self.packer.get_state()

    def set_state(self, state: dict) -> None:
        self.packer.set_state(state)

    @property
    def skipped(self) -> int:
        """Distinct bad media files so far (the training log's count; the prefetcher reads it
        too): a file re-read every epoch counts once."""
        return self.packer.skipped


def _path(record) -> str:
    path = record.get("path", b"?") if hasattr(record, "get") else b"?"
    return path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)


def example_spec(config) -> ExampleSpec:
    d, m = config.data, config.model
    text = captions.text_spec(config)
    return ExampleSpec(
        patch=tuple(m.patch),
        min_tokens=d.min_tokens,
        max_tokens=d.max_tokens,
        max_frames=d.max_frames,
        frame_stride=d.frame_stride,
        text_len=m.text_len,
        text_vocab=m.text_vocab,
        token_drop_rate=d.get("token_drop_rate", 0.0),
        tasks=tasks.normalized(d.get("tasks")),
        text_encoder=text.encoder,
        text_checkpoint=text.checkpoint,
        class_names=text.class_names,
    )


def pack_shape(config, stage: Stage) -> packing.PackShape:
    pt, ph, pw = config.model.patch
    return packing.PackShape(
        seq_len=config.data.seq_len,
        max_segments=config.data.max_segments,
        patch_dim=pt * ph * pw * stage.channels,
        text_len=config.model.text_len,
        text_dim=captions.embedding_dim(captions.text_spec(config)),
    )


def make_batches(config, stage: Stage, split: str = "train") -> PackedBatches:
    """This process's share of the global batch (config.batch_size packs over all processes)."""
    d = config.data
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"config batch_size={config.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    records, num_records = open_sources(
        d.data_dir,
        list(d.sources),
        split,
        config.seed,
        stage,
        captions.text_spec(config),
        recaptioner=d.get("recaptioner", "identity"),
    )
    return PackedBatches(
        records,
        example_spec(config),
        pack_shape(config, stage),
        batch_size=config.batch_size // jax.process_count(),
        buffer_size=d.buffer_size,
        seed=config.seed,
        stage=stage,
        max_bad_fraction=d.max_bad_fraction,
        num_records=num_records,
    )


def abstract_batch(config, stage: Stage, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and shardings (from the pack format itself), enough to
    compile the train step before any data is read."""
    empty = packing.stack_packs([packing.build_pack([], pack_shape(config, stage))])
    return {
        k: jax.ShapeDtypeStruct(
            (config.batch_size, *v.shape[1:]), v.dtype, sharding=batch_sharding(mesh, rules, v.ndim)
        )
        for k, v in empty.items()
    }


def to_global(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """Process-local packs -> global arrays sharded over the batch axes of the mesh."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
        for k, v in batch.items()
    }
