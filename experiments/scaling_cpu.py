"""A scaling sweep for 2 CPU cores within 30 minutes (`make scaling`; 19 min 20 s measured): 3
model sizes x 3 training budgets of the tiny pixel-space DiT on the synthetic clips, text-to-video.

    python -m jaxsora.scaling run --sweep experiments/scaling_cpu.py --out runs/scaling
    python -m jaxsora.scaling fit runs/scaling
    python -m jaxsora.scaling samples runs/scaling

Sizes are DiT blocks of width 32 / 64 / 128 (depth 2 / 3 / 4): 0.25M, 0.50M and 1.75M
parameters with a width-64 caption encoder. Budgets are 2e11, 6e11 and 1.8e12 model FLOPs (3x
apart), from 15 steps of the largest model to 2746 of the smallest. Every run validates 6 times
on the same held-out packs and scores its samples at the end. Variant `quick` (tests): one size
of the runlocal model at two budgets, a few steps each.
"""

SIZES = {
    "W32": {"model.width": 32, "model.depth": 2, "model.num_heads": 2},
    "W64": {"model.width": 64, "model.depth": 3, "model.num_heads": 2},
    "W128": {"model.width": 128, "model.depth": 4, "model.num_heads": 2},
}


def get_sweep(arg: str | None = None) -> dict:
    sweep = {
        "base": "experiments/tiny.py:t2v",
        "sizes": SIZES,
        "budgets": [2e11, 6e11, 1.8e12],
        # optim.lr: what the README's curve was measured with (tiny.py's own is 2e-3 since).
        "overrides": {"eval.packs": 4, "model.text_width": 64, "optim.lr": 1e-3},
        "evals": 6,
        "warmup_fraction": 0.1,
        "quality_prompts": 20,
        "quality_steps": 16,
    }
    if arg == "quick":
        sweep.update(
            base="experiments/tiny.py:runlocal,t2v",
            sizes={"W16": {"model.width": 16, "model.depth": 1, "model.num_heads": 2}},
            budgets=[6e8, 1.2e9],
            overrides={"eval.packs": 2},
            evals=4,
            quality_prompts=2,
            quality_steps=2,
        )
    return sweep
