"""The compression stage between pixels and the transformer's patches.

The DiT never sees pixels directly: it sees whatever `to_latents` returns, patchified. Two stages
sit behind the same members (`channels`, `temporal_factor`, `spatial_factor`, `causal`,
`to_latents`, `to_pixels`), so the input pipeline and the sampler do not care which one runs:

  * `PixelSpace` (`model.compression="pixels"`, the default): the identity on pixels scaled to
    [-1, 1].
  * `LatentSpace` (`model.compression="vae"`, `model.vae_dir=DIR`): a trained causal video VAE
    (`jaxsora/models/vae.py`) and its per-channel latent statistics. The DiT sees *normalised*
    latents `(z - latents_mean) / latents_std`, where `z` is the posterior mean.

Latent caches (`data_pipelines/latents`) store the RAW posterior mean, and the stage normalises
when it reads them: new statistics (say, re-measured on more data) never need a re-encode, and a
cache says plainly what the encoder produced. A cache also records its VAE's identity (a hash of
the weights plus the statistics), and the DiT pipeline refuses a cache whose VAE is not the one
in `model.vae_dir`, the one it will sample with.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from jaxsora.models.vae import CausalContext, VideoVAE
from jaxsora.vae_inference import Tiling, VaeCodec

# How to make the directory `model.vae_dir` points at; every error about it ends with this.
TRAIN_VAE_HINT = (
    "train one with `make train-latent` (or `python -m jaxsora.train_vae --config "
    "experiments/vae_tiny.py --workdir runs/vae`, which writes runs/vae/vae), or import one "
    "with `python -m jaxsora.export import-vae ... --out DIR` and point model.vae_dir at it"
)


class Stage(Protocol):
    """What the pipeline and the sampler need from a compression stage."""

    channels: int
    temporal_factor: int
    spatial_factor: int
    causal: bool

    def to_latents(self, frames_uint8: np.ndarray) -> np.ndarray: ...

    def to_pixels(self, latents: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """Pixels in [-1, 1]: no compression, one latent frame per frame, one latent per pixel."""

    channels: int = 3
    temporal_factor: int = 1
    spatial_factor: int = 1
    causal: bool = False  # T frames are T latent frames (no special first frame)

    def to_latents(self, frames_uint8: np.ndarray) -> np.ndarray:
        return frames_uint8.astype(np.float32) / 127.5 - 1.0

    def to_pixels(self, latents: np.ndarray) -> np.ndarray:
        """Back to [0, 1] floats for writing images and videos."""
        return np.clip((np.asarray(latents, np.float32) + 1.0) / 2.0, 0.0, 1.0)


class VaeMismatchError(ValueError):
    """Latents cached with one VAE read by a DiT configured with another."""


def params_sha256(model: VideoVAE) -> str:
    """A hash of the VAE's config and every weight (path, dtype, shape, bytes).

    Paths are hashed with the values, so two models that hold the same numbers in different
    places differ; the config is hashed too, so a config change that keeps the weights' shapes
    (e.g. dtype) is seen.
    """
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


class LatentSpace:
    """A trained causal video VAE as the compression stage.

    `to_latents` takes uint8 frames `[T, H, W, 3]` with T = 1 + 4k (the causal VAE's frame 0 is
    its own latent frame; `jaxsora.data.pipeline.frames_to_latent_grid` sizes clips so) and sides
    that are multiples of 8, and returns normalised latents `[1 + (T-1)/4, H/8, W/8, z_dim]`.
    `to_pixels` inverts it to [0, 1] floats. Both run through `VaeCodec` (temporal chunks with
    the causal context carried), so memory is that of one chunk whatever the clip's length.
    """

    causal = True

    def __init__(
        self,
        model: VideoVAE,
        latents_mean: Any,
        latents_std: Any,
        vae_dir: str = "",
        tiling: Tiling | None = None,
    ):
        cfg = model.cfg
        self.model, self.vae_dir = model, os.path.abspath(vae_dir) if vae_dir else ""
        self.codec = VaeCodec(model, tiling or Tiling())
        self.channels = cfg.z_dim
        self.temporal_factor = cfg.temporal_factor
        self.spatial_factor = cfg.spatial_factor
        self.latents_mean = np.asarray(latents_mean, np.float32).reshape(-1)
        self.latents_std = np.asarray(latents_std, np.float32).reshape(-1)
        where = f"VAE {self.vae_dir or '(in memory)'}"
        for name, v in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
            if v.shape != (cfg.z_dim,):
                raise ValueError(
                    f"{where}: {name} has shape {v.shape}, expected ({cfg.z_dim},) (one value "
                    "per latent channel); re-export the VAE with its latent statistics"
                )
            if not np.isfinite(v).all():
                raise ValueError(f"{where}: {name} is not finite: {v}")
        if (self.latents_std <= 0).any():
            raise ValueError(f"{where}: latents_std must be > 0, got {self.latents_std}")
        self._sharded_encode = None

    @functools.cached_property
    def identity(self) -> dict:
        """What a latent cache records about its VAE, and what the DiT checks it against."""
        return {
            "vae_dir": self.vae_dir,
            "params_sha256": params_sha256(self.model),
            "latents_mean": [float(x) for x in self.latents_mean],
            "latents_std": [float(x) for x in self.latents_std],
            "z_dim": self.channels,
            "temporal_factor": self.temporal_factor,
            "spatial_factor": self.spatial_factor,
        }

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw posterior means (what caches store) -> what the DiT sees."""
        return ((np.asarray(raw, np.float32) - self.latents_mean) / self.latents_std).astype(
            np.float32
        )

    def denormalize(self, latents: np.ndarray) -> np.ndarray:
        return (np.asarray(latents, np.float32) * self.latents_std + self.latents_mean).astype(
            np.float32
        )

    def encode_raw(self, frames_uint8: np.ndarray) -> np.ndarray:
        """Raw posterior mean of one clip (or a batch), uint8 pixels in."""
        return self.codec.encode(np.asarray(frames_uint8, np.float32) / 127.5 - 1.0)

    def to_latents(self, frames_uint8: np.ndarray) -> np.ndarray:
        return self.normalize(self.encode_raw(frames_uint8))

    def to_pixels(self, latents: np.ndarray) -> np.ndarray:
        """Normalised latents [T', H', W', C] -> [0, 1] floats [1 + 4(T'-1), 8H', 8W', 3]."""
        pixels = self.codec.decode(self.denormalize(latents))
        return np.clip((pixels + 1.0) / 2.0, 0.0, 1.0)

    def encode_batch(
        self, frames_uint8_BTHWC: np.ndarray, chunk_latent_frames: int = 1, pad_to: int = 1
    ) -> np.ndarray:
        """Raw posterior means of a batch of same-shape clips, the batch sharded over all local
        devices: padded (with copies of the last clip, dropped from the result) to at least
        `pad_to` and to a multiple of the device count. A fixed `pad_to` means one compile per
        clip shape, whatever the batch's fill.

        Used to build latent caches: every device encodes its share, in temporal chunks with the
        causal context carried (as `VaeCodec` does, so results match it up to float rounding).
        No spatial tiling: cache clips are sized to a token budget, so they are small.
        """
        x = np.asarray(frames_uint8_BTHWC, np.float32) / 127.5 - 1.0
        if x.ndim != 5:
            raise ValueError(f"encode_batch takes [B, T, H, W, 3] clips; got shape {x.shape}")
        mesh, chunk_fn, state = self._sharded()
        n_dev = mesh.size
        B = x.shape[0]
        padded = max(B, pad_to)
        pad = padded + (-padded % n_dev) - B
        if pad:  # repeat the last clip: a real clip, so no NaN or odd value can appear
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        batch_sharding = jax.NamedSharding(mesh, jax.P("batch"))
        tf = self.temporal_factor
        chunks = [slice(0, 1)] + [
            slice(s, min(s + chunk_latent_frames * tf, x.shape[1]))
            for s in range(1, x.shape[1], chunk_latent_frames * tf)
        ]
        outputs, previous = [], None
        for i, chunk in enumerate(chunks):
            piece = jax.device_put(x[:, chunk], batch_sharding)
            out, previous = chunk_fn(state, piece, previous, i == 0)
            outputs.append(np.asarray(out))
        return np.concatenate(outputs, axis=1)[:B]

    def _sharded(self):
        """A 1-axis mesh of the local devices, the weights replicated on it, a jitted chunk."""
        if self._sharded_encode is None:
            devices = jax.local_devices()
            mesh = jax.make_mesh(
                (len(devices),),
                ("batch",),
                axis_types=(jax.sharding.AxisType.Auto,),
                devices=devices,
            )
            graphdef, state = nnx.split(self.model)
            state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))

            def encode_chunk(state, x, previous, first):
                ctx = CausalContext(previous, first)
                mean, _ = nnx.merge(graphdef, state).encode(x, ctx)
                return mean, ctx.carried

            self._sharded_encode = (mesh, jax.jit(encode_chunk, static_argnums=3), state)
        return self._sharded_encode


def check_same_vae(cached: Mapping, stage_identity: Mapping, source: str) -> None:
    """Raises VaeMismatchError unless a cache's VAE (its metadata) is the stage's VAE.

    Weights (hash) and statistics must match; the directories may differ (a VAE copied
    elsewhere is the same VAE), but both are named so the user sees which is which.
    """
    problems = []
    if cached.get("params_sha256") != stage_identity["params_sha256"]:
        problems.append(
            f"weights differ (sha256 {str(cached.get('params_sha256'))[:12]}... vs "
            f"{stage_identity['params_sha256'][:12]}...)"
        )
    for key in ("latents_mean", "latents_std"):
        a = np.asarray(cached.get(key, []), np.float32)
        b = np.asarray(stage_identity[key], np.float32)
        if a.shape != b.shape or not np.array_equal(a, b):
            problems.append(f"{key} differs ({a.tolist()} vs {b.tolist()})")
    if problems:
        raise VaeMismatchError(
            f"dataset {source!r} holds latents of the VAE in {cached.get('vae_dir')!r}, but "
            f"config model.vae_dir={stage_identity['vae_dir']!r} is another VAE: "
            f"{'; '.join(problems)}. A DiT must train on latents of the VAE it samples with: "
            f"rebuild the cache with `python -m data_pipelines.build --dataset {source} "
            f"--vae_dir {stage_identity['vae_dir']} --data_dir DATA_DIR --overwrite`, or set "
            f"model.vae_dir to the cache's VAE"
        )


def _dir_stamp(path: str) -> tuple:
    """File names, sizes and mtimes under `path`: a changed VAE dir is loaded afresh."""
    stamp = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            stamp.append(
                (os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns)
            )
    return tuple(sorted(stamp))


@functools.lru_cache(maxsize=2)
def _load_latent_space(vae_dir: str, stamp: tuple) -> LatentSpace:
    del stamp  # part of the cache key only
    try:
        from jaxsora.vae_dir import load_vae_dir
    except ImportError as e:  # the VAE export module is part of the latent-space feature
        raise ImportError(
            f"model.compression='vae' needs jaxsora.vae_dir.load_vae_dir ({e})"
        ) from e
    try:
        model, mean, std = load_vae_dir(vae_dir)
    except Exception as e:  # a half-written or foreign directory fails in many ways
        raise ValueError(
            f"config model.vae_dir={vae_dir!r} is not a loadable VAE directory "
            f"({type(e).__name__}: {e}); {TRAIN_VAE_HINT}"
        ) from e
    if mean is None or std is None:
        raise ValueError(
            f"config model.vae_dir={vae_dir!r} holds a VAE without latents_mean/latents_std "
            "(the VAE trainer measures them when it finishes); the DiT needs them to normalise "
            f"its latents: finish the VAE's training or re-save it with statistics "
            f"(jaxsora.vae_dir.save_vae_dir(model, (mean, std), dir)); {TRAIN_VAE_HINT}"
        )
    return LatentSpace(model, mean, std, vae_dir)


def load_latent_space(vae_dir: str | None) -> LatentSpace:
    """The VAE stage of `model.vae_dir`; loaded once per process per directory content, since
    the trainer and sampler ask for the stage several times before compiling."""
    if not vae_dir:
        raise ValueError(
            f"config model.compression='vae' needs model.vae_dir, the directory of a trained "
            f"VAE; {TRAIN_VAE_HINT}"
        )
    path = os.path.abspath(os.path.expanduser(vae_dir))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"config model.vae_dir={vae_dir!r}: no directory at {path}; {TRAIN_VAE_HINT}"
        )
    return _load_latent_space(path, _dir_stamp(path))


def make_stage(model_config: str | Mapping, vae_dir: str | None = None) -> PixelSpace | LatentSpace:
    """The stage named by `config.model` (its `compression` and `vae_dir`), or by a name.

    A bad `model.vae_dir` fails here, naming the field and how to make the directory, which
    the trainer and the sampler reach before compiling anything.
    """
    if isinstance(model_config, str):
        name = model_config
    else:
        name = model_config["compression"]
        vae_dir = vae_dir or model_config.get("vae_dir")
    if name == "pixels":
        return PixelSpace()
    if name == "vae":
        return load_latent_space(vae_dir)
    raise ValueError(
        f"config model.compression={name!r} is not a known compression stage; use 'pixels' "
        "or 'vae' (with model.vae_dir)"
    )
