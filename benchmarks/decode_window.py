"""Peak memory and time of decoding one example's window of a long HD clip, against decoding the
whole clip and cutting the window afterwards (what the pipeline did before).

    python -m benchmarks.decode_window [--seconds 60 --height 1080 --width 1920 --fps 30]

Generates the clip once (H.264, x264 preset ultrafast, a keyframe every --gop_s seconds, a
textured pan so every frame differs) and caches it under --cache_dir. Then each measurement runs
in a fresh process that reads the file's bytes, as a `video_folder` record holds them, and
decodes once through `jaxsora.data.media`:

- windowed: `decode_example_window` for a --window-frame window at the start, middle and end;
- whole: `decode_example`, the whole clip as uint8 RGB, then the window cut from it;
- baseline: only the bytes read and the modules imported, the floor under both.

Peak memory is the child's resident high-water mark (VmHWM; ru_maxrss would not do, Linux
carries it over from the forking parent across exec). If the whole clip would not fit in the
memory available, whole decoding is measured on a prefix of the clip and scaled to the clip's
length (memory above the baseline and time both grow linearly with the frames); the JSON line
says so. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Whole decoding holds every frame twice at its peak: the decoded list and the stacked array.
WHOLE_COPIES = 2
WHOLE_SHARE_OF_AVAILABLE = 0.25  # of MemAvailable: leave the rest to whatever else runs


def peak_rss_mib() -> float:
    """This process's resident high-water mark, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def clip_path(cache_dir: str, seconds: int, height: int, width: int, fps: int, gop_s: float) -> str:
    name = f"pan_{width}x{height}_{fps}fps_{seconds}s_gop{gop_s:g}s.mp4"
    return os.path.join(cache_dir, name)


def write_clip(path: str, seconds: int, height: int, width: int, fps: int, gop_s: float) -> None:
    """A textured pan, generated in YUV (no colour conversion) and encoded ultrafast; written
    to a temporary name first so an interrupted run never leaves a short clip in the cache."""
    import av

    rows = np.cos(np.arange(height) / 17.0)[:, None] * 40
    strip = (np.sin(np.arange(3 * width) / 23.0)[None, :] * 60 + 120 + rows).astype(np.uint8)
    chroma = np.full((height // 4, width), 128, np.uint8)  # a (H/2 x W/2) plane, row-packed
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(max(1, round(gop_s * fps)))}
        for t in range(seconds * fps):
            offset = (11 * t) % (2 * width)
            shade = np.uint8(t % 64)
            planes = [strip[:, offset : offset + width], chroma + shade, chroma - shade]
            frame = av.VideoFrame.from_ndarray(np.concatenate(planes), format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def probe(clip: str, mode: str, start: int, frames: int, reps: int) -> dict:
    """The child side: read the file, decode as `mode` says, report time and peak memory."""
    from jaxsora.data.media import decode_example, decode_example_window

    with open(clip, "rb") as f:
        record = {"media": f.read(), "media_kind": b"video", "path": clip.encode()}
    window = np.arange(start, start + frames)
    if mode == "baseline":
        return {"peak_rss_mib": peak_rss_mib()}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        if mode == "window":
            out = decode_example_window(record, lambda n: window)
        else:  # whole: `frames` is the prefix length to decode, 0 for all of it
            clip_frames = decode_example(record, max_frames=frames or None)
            out = clip_frames[-min(16, len(clip_frames)) :]
            decoded = len(clip_frames)
            del clip_frames
        times.append(time.perf_counter() - t0)
        assert out.dtype == np.uint8 and out.ndim == 4
    result = {"peak_rss_mib": peak_rss_mib(), "seconds": common.summary(times)}
    if mode == "whole":
        result["frames_decoded"] = decoded
    return result


def run_probe(clip: str, mode: str, start: int = 0, frames: int = 0, reps: int = 1) -> dict:
    """`probe` in a fresh process, so each peak is that decode's alone."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.decode_window",
        f"--probe={mode}:{start}:{frames}:{reps}",
        f"--clip={clip}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"probe {mode} failed (rc={out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def whole_prefix(total_frames: int, height: int, width: int) -> int:
    """Frames whole decoding may hold here: all of them if they fit in the memory share."""
    available = mem_available_bytes()
    if available is None:
        return total_frames
    per_frame = WHOLE_COPIES * height * width * 3
    return max(1, min(total_frames, int(available * WHOLE_SHARE_OF_AVAILABLE // per_frame)))


def measure(clip: str, total_frames: int, height: int, width: int, window: int, reps: int):
    baseline = run_probe(clip, "baseline")["peak_rss_mib"]
    positions = {"start": 0, "middle": (total_frames - window) // 2, "end": total_frames - window}
    windowed = {}
    for name, start in positions.items():
        r = run_probe(clip, "window", start, window, reps)
        windowed[name] = {"first_frame": start, **r}
    prefix = whole_prefix(total_frames, height, width)
    whole = run_probe(clip, "whole", 0, 0 if prefix == total_frames else prefix)
    whole["prefix"] = prefix < total_frames
    if whole["prefix"]:
        scale = total_frames / whole["frames_decoded"]
        whole["note"] = (
            f"the whole clip would not fit in {WHOLE_SHARE_OF_AVAILABLE:.0%} of the memory "
            f"available; decoded its first {whole['frames_decoded']} frames and scaled memory "
            "above the baseline and time linearly to the clip's length"
        )
        whole["scaled_peak_rss_mib"] = baseline + (whole["peak_rss_mib"] - baseline) * scale
        whole["scaled_seconds"] = whole["seconds"]["median"] * scale
    return baseline, windowed, whole


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.probe:
        mode, start, frames, reps = FLAGS.probe.split(":")
        print(json.dumps(probe(FLAGS.clip, mode, int(start), int(frames), int(reps))))
        return
    with common.json_stdout() as emit:
        seconds, height, width, fps = FLAGS.seconds, FLAGS.height, FLAGS.width, FLAGS.fps
        record = {
            "benchmark": "decode_window",
            "machine": common.machine_info(),
            "mem_available_gib": round((mem_available_bytes() or 0) / 2**30, 2),
        }
        import av

        if "libx264" not in av.codecs_available:
            record["skipped"] = "this PyAV build has no libx264 encoder to generate the clip"
            emit(record)
            return
        path = clip_path(FLAGS.cache_dir, seconds, height, width, fps, FLAGS.gop_s)
        generated_s = None
        if not os.path.exists(path):
            t0 = time.perf_counter()
            write_clip(path, seconds, height, width, fps, FLAGS.gop_s)
            generated_s = time.perf_counter() - t0
        total = seconds * fps
        baseline, windowed, whole = measure(path, total, height, width, FLAGS.window, FLAGS.reps)
        end = windowed["end"]["peak_rss_mib"] - baseline
        whole_rss = whole.get("scaled_peak_rss_mib", whole["peak_rss_mib"]) - baseline
        whole_s = whole.get("scaled_seconds", whole["seconds"]["median"])
        record.update(
            {
                "clip": {
                    "path": path,
                    "seconds": seconds,
                    "fps": fps,
                    "width": width,
                    "height": height,
                    "frames": total,
                    "gop_s": FLAGS.gop_s,
                    "mib": os.path.getsize(path) / 2**20,
                    "codec": "h264 (x264 ultrafast)",
                    "generated_s": generated_s,  # None: taken from the cache
                },
                "window_frames": FLAGS.window,
                "baseline_peak_rss_mib": baseline,
                "windowed": windowed,
                "whole": whole,
                # Above the baseline (the bytes and the imports, the same for both paths).
                "memory_ratio_whole_vs_window_end": whole_rss / max(end, 1e-9),
                "time_ratio_whole_vs_window_end": whole_s / windowed["end"]["seconds"]["median"],
                "load_average": common.load_average(),
            }
        )
        emit(common.round_floats(record))


def define_flags() -> None:
    """Defined only when run as a script, so importing the module never clashes on flag names."""
    flags.DEFINE_integer("seconds", 60, "Clip length.")
    flags.DEFINE_integer("height", 1080, "Clip height in pixels.")
    flags.DEFINE_integer("width", 1920, "Clip width in pixels.")
    flags.DEFINE_integer("fps", 30, "Frames per second.")
    flags.DEFINE_float("gop_s", 2.0, "Seconds between keyframes (phones and streaming: 1-2).")
    flags.DEFINE_integer("window", 16, "Frames in one example's window.")
    flags.DEFINE_integer("reps", 3, "Windowed decodes per child (median reported).")
    flags.DEFINE_string("cache_dir", "data/bench", "Where the generated clip is kept.")
    flags.DEFINE_string("probe", None, "internal: MODE:START:FRAMES:REPS, decode, print JSON")
    flags.DEFINE_string("clip", None, "internal: the clip a probe decodes")


if __name__ == "__main__":
    define_flags()
    app.run(main)
