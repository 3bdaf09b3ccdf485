"""Dataset build throughput: clips per second of the single-process build and of the Apache
Beam DirectRunner with 2 worker processes, for `video_folder` (read, probe, caption) and for
the multi-resolution latent cache of that folder (decode, size at each token budget,
VAE-encode), on a folder generated here; and the cache's storage per budget.

    python -m benchmarks.build_throughput [--clips 600 --latent_clips 120 --repeats 2]

The folder is the synthetic world written as files: H.264 MP4s (2-16 frames, 32-96 px high,
9:16 to 21:9) and PNG stills, captions in captions.jsonl, generated once under --work_dir. The
VAE is `experiments/vae_tiny.py`'s architecture with random weights (encoding costs the same
whatever the weights). Engines alternate (here, beam, here, beam, ...) so drift on a shared
machine hits both; each build runs in a fresh process, goes to a fresh data_dir, and times
`data_pipelines.build.build` alone. Each engine has its own JAX compilation cache: its first
build compiles the encoder for every pixel shape (cold: on this small folder, most of the
time), later ones read the cache (warm: the encoding itself, what a large bucket costs per
clip). Beam's figure includes starting its worker processes. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_OPTIONS = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"


def make_folder(folder: str, n: int) -> None:
    """n synthetic clips as media files (an MP4 per video, a PNG per still) + captions.jsonl."""
    import av
    from PIL import Image

    from data_pipelines.synthetic_clips.synthetic_clips import make_example

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "captions.jsonl"), "w") as captions:
        for i in range(n):
            ex = make_example("train", i)
            frames = ex["frames"]
            if frames.shape[0] == 1:
                name = f"still_{i:05d}.png"
                Image.fromarray(frames[0]).save(os.path.join(folder, name))
            else:
                name = f"clip_{i:05d}.mp4"
                with av.open(os.path.join(folder, name), "w") as out:
                    stream = out.add_stream("libx264", rate=8)
                    stream.height, stream.width = frames.shape[1], frames.shape[2]
                    stream.pix_fmt = "yuv420p"
                    for frame in frames:
                        out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                    out.mux(stream.encode())
            captions.write(json.dumps({"file": name, "caption": ex["caption"]}) + "\n")


def random_vae_dir(path: str) -> str:
    from flax import nnx

    from experiments import vae_tiny
    from jaxsora.models.vae import VideoVAE
    from jaxsora.train_vae import vae_config
    from jaxsora.vae_dir import save_vae_dir

    cfg = vae_config(vae_tiny.get_config())
    model = VideoVAE(cfg, rngs=nnx.Rngs(0))
    z = cfg.z_dim
    save_vae_dir(model, ([0.0] * z, [1.0] * z), path)
    return path


def timed_build(spec: dict) -> dict:
    """One build, in this (fresh) process: the spec's dataset, engine and builder kwargs."""
    from data_pipelines.build import build

    kwargs = dict(spec["kwargs"])
    if "latents_config" in kwargs:
        from data_pipelines.latents.latents import LatentsConfig

        kwargs["config"] = LatentsConfig(**kwargs.pop("latents_config"))
    data_dir = tempfile.mkdtemp(prefix="jaxsora-build-bench-")
    beam = BEAM_OPTIONS if spec["beam"] else None
    start = time.perf_counter()
    builder = build(spec["name"], data_dir, beam_options=beam, **kwargs)
    seconds = time.perf_counter() - start
    metadata = builder.info.metadata
    out = {k: dict(metadata[k]) for k in ("counts", "storage") if k in metadata}
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"seconds": seconds, **out}


def run_child(spec: dict, cache_dir: str) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,  # Beam's worker processes inherit it
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.build_throughput", f"--child={json.dumps(spec)}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"build {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure(name: str, clips: int, repeats: int, **kwargs) -> dict:
    """Each build in a fresh process. Per engine, a fresh compilation cache: the first build
    compiles everything (cold), later ones read it (warm), as a rerun or a cluster whose workers
    share a cache would; engines alternate."""
    engines = (("single_process", False), ("beam_2_workers", True))
    caches = {engine: tempfile.mkdtemp(prefix="jaxsora-build-cache-") for engine, _ in engines}
    times: dict[str, list[float]] = {engine: [] for engine, _ in engines}
    metadata = {}
    for _ in range(repeats):
        for engine, beam in engines:
            result = run_child({"name": name, "beam": beam, "kwargs": kwargs}, caches[engine])
            times[engine].append(result.pop("seconds"))
            metadata[engine] = result
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    out = {"clips": clips, "metadata": metadata}
    for engine, ts in times.items():
        out[f"{engine}_s"] = [round(t, 2) for t in ts]
        out[f"{engine}_cold_clips_per_s"] = round(clips / ts[0], 2)
        if len(ts) > 1:
            out[f"{engine}_warm_clips_per_s"] = round(clips / statistics.median(ts[1:]), 2)
    return out


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child:
        result = timed_build(json.loads(FLAGS.child))
        print("RESULT " + json.dumps(result), flush=True)
        return
    with common.json_stdout() as emit:
        work = os.path.abspath(FLAGS.work_dir)
        folder = os.path.join(work, f"folder_{FLAGS.clips}")
        if not os.path.exists(os.path.join(folder, "captions.jsonl")):
            make_folder(folder, FLAGS.clips)
        record = {"benchmark": "build_throughput", "machine": common.machine_info()}
        record["video_folder"] = measure(
            "video_folder", FLAGS.clips, FLAGS.repeats, folder=folder, overwrite=True
        )
        if FLAGS.latent_clips:
            from data_pipelines.build import build

            source_dir = os.path.join(work, "source")
            build("video_folder", source_dir, folder=folder)
            vae_dir = os.path.join(work, "vae")
            if not os.path.exists(vae_dir):
                random_vae_dir(vae_dir)
            # Two units: one for each Beam worker, the same two for the single process.
            config = dict(
                name="bench",
                source="video_folder",
                max_examples=FLAGS.latent_clips,
                records_per_unit=max(1, FLAGS.latent_clips // 2),
                token_budgets=[int(b) for b in FLAGS.token_budgets.split(",")],
            )
            record["latents"] = measure(
                "latents",
                FLAGS.latent_clips,
                FLAGS.repeats,
                latents_config=config,
                vae_dir=vae_dir,
                source_data_dir=source_dir,
            )
        record["load_average"] = common.load_average()
        emit(record)


if __name__ == "__main__":
    flags.DEFINE_integer("clips", 600, "Media files in the generated folder.")
    flags.DEFINE_integer("latent_clips", 120, "Clips the latent cache encodes (0: skip it).")
    flags.DEFINE_integer("repeats", 2, "Builds per engine, alternated.")
    flags.DEFINE_string("token_budgets", "32,64,128", "The latent cache's budgets per clip.")
    flags.DEFINE_string("child", None, "Internal: one build (a JSON spec) in this process.")
    flags.DEFINE_string(
        "work_dir", os.path.join(tempfile.gettempdir(), "jaxsora-build-bench"), "Folder cache."
    )
    app.run(main)
