"""Import and export of a DiT-paper-sized model through diffusers' layout: time, peak memory and
parity, one JSON line.

    python -m benchmarks.export_dit --size XL     # DiT-XL/2's transformer (675M parameters)
    python -m benchmarks.export_dit --workdir runs/dit_image   # a trained original-DiT run

1. a random `DiTTransformer2DModel` of the size (PyTorch, every weight perturbed, embedders tied
   across blocks as converted checkpoints have them) is saved with `save_pretrained`;
2. `python -m jaxsora.export import-dit` makes it step 0 of a jaxsora run (experiments/
   dit_image.py's data and optimizer);
3. `python -m jaxsora.export export-dit --format diffusers` streams that checkpoint back out;
4. the export is compared with the original file (bit for bit) and its diffusers forward with
   the JAX model's on two images (relative error at small and large t).

With --workdir, a trained run replaces steps 1-2: it is exported, the export imported, the
import exported again and compared with the first export. Each step runs in a child process
whose peak resident memory (ru_maxrss) is reported beside the model's float32 size. Pixel
channels (3) stand in for SD's 4 latent channels: the transformer is otherwise DiT's (1000
classes, patch 2, learned sigma).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# DiT paper sizes: (heads, head_dim, layers)
SIZES = {"S": (6, 64, 12), "B": (12, 64, 12), "L": (16, 64, 24), "XL": (16, 72, 28)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of `python args` in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{args[:4]} failed with {proc.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out


def _config(size: str, classes: int, channels: int, patch: int, sample_size: int) -> dict:
    heads, head_dim, layers = SIZES[size]
    return dict(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=patch,
        num_embeds_ada_norm=classes,
    )


def make_random(folder: str, config: dict) -> None:
    """Step 1 (a child): the random diffusers DiT, saved, and jaxsora.json's class names."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**config)
    with torch.no_grad():
        state = model.state_dict()
        for v in state.values():
            v.add_(0.02 * torch.randn_like(v))
        for k in state:
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                state[k].copy_(state["transformer_blocks.0." + k.split(".", 2)[2]])
    model.save_pretrained(folder, safe_serialization=True)
    names = [f"class{i}" for i in range(config["num_embeds_ada_norm"])]
    with open(os.path.join(folder, "jaxsora.json"), "w") as f:
        json.dump({"class_names": names}, f)


def compare(original: str, exported: str, workdir: str) -> None:
    """Step 4 (a child): bitwise file equality, and diffusers vs JAX forward."""
    import numpy as np
    from diffusers import DiTTransformer2DModel

    from jaxsora import sample as sampler
    from jaxsora.export.diffusers_dit import diffusers_forward_images, forward_images
    from jaxsora.export.tables import load_safetensors

    a, b = load_safetensors(original), load_safetensors(exported)  # single or sharded
    bitwise = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    del a, b
    theirs = DiTTransformer2DModel.from_pretrained(exported).eval()
    ours, config = sampler.load_run(workdir)
    size = theirs.config.sample_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, size, size, theirs.config.in_channels)).astype(np.float32)
    labels = [3, None]
    errors = {}
    for name, t in (("small_t", [9e-4, 3e-4]), ("t", [0.9, 0.3])):
        t = np.array(t, np.float32)
        want = diffusers_forward_images(theirs, images, t, labels)
        got = forward_images(ours, images, t, labels)
        errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    print(json.dumps({"bitwise": bool(bitwise), "rel_error": errors}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default="XL")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--sample_size", type=int, default=32)
    parser.add_argument(
        "--workdir", help="a trained original-DiT run to round-trip instead of a random model"
    )
    parser.add_argument("--step", choices=("make", "compare"), help=argparse.SUPPRESS)
    parser.add_argument("--dirs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = _config(args.size, args.classes, args.channels, args.patch, args.sample_size)
    if args.step == "make":
        return make_random(args.dirs[0], config)
    if args.step == "compare":
        return compare(*args.dirs)

    me = ["-m", "benchmarks.export_dit"]
    cli = ["-m", "jaxsora.export"]
    with tempfile.TemporaryDirectory() as tmp:
        hf, run, back = (os.path.join(tmp, n) for n in ("hf", "run", "back"))
        if args.workdir:  # a trained run: export it, import the export, export that again
            run = os.path.abspath(args.workdir)
            first = [*cli, "export-dit", "--workdir", run, "--format", "diffusers", "--out", hf]
            _child(first)
            import_cmd = [*cli, "import-dit", "--src", hf, "--out", os.path.join(tmp, "run")]
            make_s = make_mib = 0.0
            again = os.path.join(tmp, "run")
        else:
            size = ["--size", args.size, "--classes", str(args.classes)]
            size += ["--channels", str(args.channels), "--patch", str(args.patch)]
            size += ["--sample_size", str(args.sample_size)]
            make_s, make_mib, _ = _child([*me, *size, "--step", "make", "--dirs", hf])
            import_cmd = [*cli, "import-dit", "--src", hf, "--out", run]
            import_cmd += ["--config", "experiments/dit_image.py"]
            again = run
        import_s, import_mib, _ = _child(import_cmd)
        export_s, export_mib, out = _child(
            [*cli, "export-dit", "--workdir", again, "--format", "diffusers", "--out", back]
        )
        summary = json.loads(out.strip().splitlines()[-1])
        _, compare_mib, out = _child([*me, "--step", "compare", "--dirs", hf, back, run])
        parity = json.loads(out.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "benchmark": "export_dit_diffusers",
                "model": args.workdir or f"random DiT-{args.size}",
                "num_params": summary["num_params"],
                "model_mib": round(summary["total_bytes"] / 2**20, 1),
                "export_files": len(summary["files"]),
                "torch_make_s": round(make_s, 1),
                "import_s": round(import_s, 1),
                "import_peak_rss_mib": round(import_mib),
                "export_s": round(export_s, 1),
                "export_inner_s": round(summary["seconds"], 1),
                "export_peak_rss_mib": round(export_mib),
                "compare_peak_rss_mib": round(compare_mib),
                **parity,
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            }
        )
    )


if __name__ == "__main__":
    main()
