"""The sweep's pictures: `scaling.png` (validation loss against model FLOPs per size, the
frontier and its fit; the quality score against compute) and `samples.png` (the same prompts
and seeds at increasing compute, Sora's base / 4x / 32x figure)."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxsora.scaling import fit, sweep

ROW_GAP = 6  # white pixels between the rows of the samples grid


def scaling_png(path: str, finished: list[dict], curves: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a CI machine or a pod
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in finished))
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0.0, 0.85, len(sizes))), strict=True))
    fig, (ax, aq) = plt.subplots(1, 2, figsize=(12, 4.6))
    labelled = set()
    for r in finished:
        c = curves[r["name"]]
        label = None if r["size"] in labelled else f"{r['size']} ({r['params'] / 1e6:.2f}M)"
        labelled.add(r["size"])  # one legend entry per size
        ax.plot(c[:, 0], c[:, 1], "-", color=colours[r["size"]], alpha=0.8, label=label)
        ax.plot(c[-1, 0], c[-1, 1], "o", color=colours[r["size"]])
    F = np.array([[p["model_flops"], p["val_loss"]] for p in summary["frontier"]])
    ax.plot(F[:, 0], F[:, 1], "k.", ms=7, label="frontier (lower envelope)")
    xs = np.geomspace(F[:, 0].min(), F[:, 0].max() * 2, 100)
    ax.plot(
        xs,
        fit.law(xs / summary["C0"], summary["a"], summary["b"], summary["c"]),
        "k--",
        label=f"fit: {summary['a']:.3g} (C/C0)^-{summary['b']:.3f} + {summary['c']:.3f}",
    )
    ax.set_yscale("log")
    _finish(
        ax,
        "model FLOPs (cumulative, real tokens)",
        "validation loss (8 fixed t, held-out packs)",
        "validation loss vs compute",
    )
    for size in sizes:
        rows = sorted((r for r in finished if r["size"] == size), key=lambda r: r["budget"])
        rows = [r for r in rows if "quality_score" in r]
        if rows:
            aq.plot(
                [r["model_flops_total"] for r in rows],
                [r["quality_score"] for r in rows],
                "o-",
                color=colours[size],
                label=size,
            )
    _finish(
        aq,
        "model FLOPs",
        "quality score (mean attribute accuracy)",
        "sample quality vs compute (run ends)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log compute axis, labels, legend and grid: both panels alike."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def samples_png(out: str, path: str, columns: int = 6, cell: int = 64) -> list[str]:
    """A grid: one row per finished run (sizes, then budgets increasing), one column per prompt
    of the fixed set, each cell the clip's first and last frames side by side. Returns the
    rows' labels."""
    from PIL import Image, ImageDraw

    finished = sorted(sweep.results(out), key=lambda r: (r["params"], r["budget"]))
    rows, labels = [], []
    for r in finished:
        workdir = sweep.run_dir(out, r["name"])
        stem = os.path.join(workdir, "eval", f"quality_step{r['steps']}")
        if not os.path.exists(stem + ".npz"):
            continue
        with open(stem + ".json") as f:
            requests = json.load(f)["requests"][:columns]
        clips = np.load(stem + ".npz")
        cells = [_cell(clips[q["name"]], cell) for q in requests]
        row = np.concatenate(cells, axis=1)
        rows.append(np.concatenate([row, np.full((ROW_GAP, *row.shape[1:]), 255, np.uint8)]))
        labels.append(f"{r['size']}  {r['model_flops_total']:.2g} FLOPs")
        prompts = [q["prompt"] for q in requests]
    if not rows:
        raise FileNotFoundError(f"no finished run in {out} has samples (eval/quality_step*.npz)")
    label_w = 150
    grid = np.concatenate(rows, axis=0)
    img = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0] + 14 * len(prompts)), "white")
    img.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        draw.text((4, i * (cell + ROW_GAP) + cell // 2 - 6), text, fill="black")
    for j, prompt in enumerate(prompts):  # the column prompts, listed under the grid
        draw.text((4, grid.shape[0] + 14 * j), f"column {j + 1}: {prompt}", fill="black")
    img.save(path)
    return labels


def _cell(clip: np.ndarray, size: int) -> np.ndarray:
    """The first and last frames side by side, each fitted into a size x size square,
    nearest-neighbour upscaled (the pixels as generated)."""
    from PIL import Image

    tiles = []
    for frame in (clip[0], clip[-1]):
        h, w = frame.shape[:2]
        s = min(size / h, size / w)
        im = Image.fromarray(frame).resize((max(1, int(w * s)), max(1, int(h * s))), 0)
        tile = np.full((size, size, 3), 255, np.uint8)
        a = np.asarray(im)
        y, x = (size - a.shape[0]) // 2, (size - a.shape[1]) // 2
        tile[y : y + a.shape[0], x : x + a.shape[1]] = a
        tiles.append(tile)
    gap = np.full((size, 4, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], np.full((size, 8, 3), 255, np.uint8)], 1)
