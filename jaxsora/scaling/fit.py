"""The compute-optimal frontier of a sweep and the power law fitted to it.

Points are the validations of every run (from a quarter of its steps on, jaxsora/scaling/
sweep.py): (cumulative model FLOPs C, validation loss L), the loss of the same held-out packs
at the same fixed timesteps and noise in every run (jaxsora/validation.py), so all runs share
one axis. The frontier is their lower envelope (Kaplan et al.'s compute-efficient frontier):
in order of compute, each point lower than every point before it, from the first C by which
every size has been validated. The law is

    L(C) = a * (C / C0)^(-b) + c        (C0: the smallest C on the frontier, for conditioning)

fitted by least squares on the frontier, with 95% intervals from a bootstrap over the frontier
points (resampled with replacement, refitted). N_opt(C) is the parameter count of the run on
the frontier at each C, fitted as N_opt = k * C^alpha in log-log space (with a bootstrap
interval on alpha); with few sizes it is a step function and alpha is coarse, which the
summary says.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

BOOTSTRAP = 400


def law(c_rel: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.power(c_rel, -b) + c


def fit_law(C: np.ndarray, L: np.ndarray, C0: float | None = None) -> dict:
    """Least-squares a, b, c of L = a (C / C0)^-b + c (a, b > 0; 0 <= c < min L)."""
    C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
    if len(C) < 4:
        raise ValueError(f"fitting a, b, c needs at least 4 points, got {len(C)}")
    C0 = float(C0 or C.min())
    x = C / C0
    lo = float(L.min())
    # Start from c = 0.9 min L and the log-log slope of L - c.
    c_init = 0.9 * lo
    slope, intercept = np.polyfit(np.log(x), np.log(np.maximum(L - c_init, 1e-9)), 1)
    p0 = (float(np.exp(intercept)), float(max(-slope, 1e-3)), c_init)
    params, cov = optimize.curve_fit(
        law,
        x,
        L,
        p0=p0,
        bounds=([1e-12, 1e-4, 0.0], [np.inf, 10.0, lo]),
        maxfev=20000,
    )
    a, b, c = (float(v) for v in params)
    return {"a": a, "b": b, "c": c, "C0": C0, "stderr": [float(s) for s in np.sqrt(np.diag(cov))]}


def bootstrap(C, L, C0, n: int = BOOTSTRAP, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of a, b, c over `n` resamples of the points."""
    rng = np.random.default_rng(seed)
    C, L = np.asarray(C), np.asarray(L)
    draws = []
    for _ in range(n):
        i = rng.integers(0, len(C), len(C))
        if len(np.unique(C[i])) < 4:
            continue
        try:
            f = fit_law(C[i], L[i], C0)
        except (RuntimeError, ValueError):  # a resample the optimiser cannot fit
            continue
        draws.append((f["a"], f["b"], f["c"]))
    d = np.array(draws)
    return {
        k: [float(np.percentile(d[:, j], 2.5)), float(np.percentile(d[:, j], 97.5))]
        for j, k in enumerate("abc")
    } | {"resamples": len(draws)}


def frontier(curves: dict[str, np.ndarray], groups=None):
    """(C, L, run) of the validation points no other point beats: the running minimum of the
    loss over all points in order of compute (a run that got lower with less compute could
    have stopped there), from where every group has a point.

    `groups` (run -> model size; default each run its own) sets the start: the frontier begins
    at the first C by which every size has been validated, so that no size holds the low end
    only because its first validation came earlier."""
    groups = groups or {name: name for name in curves}
    starts: dict[str, float] = {}
    for name, c in curves.items():
        starts[groups[name]] = min(starts.get(groups[name], np.inf), float(c[:, 0].min()))
    lo = max(starts.values())
    points = sorted(
        (float(C), float(L), name) for name, c in curves.items() for C, L in c if lo <= C
    )
    out, best = [], np.inf
    for C, L, name in points:
        if best > L:
            out.append((C, L, name))
            best = L
    C, L, who = zip(*out, strict=True) if out else ((), (), ())
    return np.array(C), np.array(L), list(who)


def fit_n_opt(C, N, seed: int = 0) -> dict:
    """N_opt = k C^alpha, least squares in log-log, with a bootstrap interval on alpha."""
    x, y = np.log(np.asarray(C, np.float64)), np.log(np.asarray(N, np.float64))
    alpha, logk = np.polyfit(x, y, 1)
    rng = np.random.default_rng(seed)
    alphas = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) >= 2:
            alphas.append(np.polyfit(x[i], y[i], 1)[0])
    return {
        "alpha": float(alpha),
        "k": float(np.exp(logk)),
        "alpha_ci95": [float(np.percentile(alphas, 2.5)), float(np.percentile(alphas, 97.5))],
        "sizes_on_frontier": int(len(np.unique(N))),
    }


def summarize(finished: list[dict], curves: dict[str, np.ndarray]) -> dict:
    """The fit JSON: law, intervals, N_opt, the frontier and each run's final numbers."""
    C, L, who = frontier(curves, groups={r["name"]: r["size"] for r in finished})
    fitted = fit_law(C, L)
    params = {r["name"]: r["params"] for r in finished}
    N = np.array([params[w] for w in who], np.float64)
    summary = {
        "law": "L(C) = a * (C / C0)^(-b) + c",
        **{k: fitted[k] for k in ("a", "b", "c", "C0")},
        "stderr_abc": fitted["stderr"],
        "ci95": bootstrap(C, L, fitted["C0"]),
        "frontier": [
            {"model_flops": float(c), "val_loss": float(v), "run": w, "params": int(params[w])}
            for c, v, w in zip(C, L, who, strict=True)
        ],
        "runs": finished,
    }
    if len(np.unique(N)) >= 2:
        summary["n_opt"] = fit_n_opt(C, N)
    else:
        summary["n_opt"] = {
            "alpha": None,
            "note": f"one size ({who[0]}'s) is best at every compute: no N_opt trend to fit",
        }
    # Which size is best at each budget, by final loss (the grid's own compute-optimal runs).
    by_budget: dict[float, dict] = {}
    for r in finished:
        b = r["budget"]
        if b not in by_budget or r["val_loss"] < by_budget[b]["val_loss"]:
            by_budget[b] = r
    summary["best_at_budget"] = [
        {"budget": b, "run": r["name"], "size": r["size"], "val_loss": r["val_loss"]}
        for b, r in sorted(by_budget.items())
    ]
    return summary
