"""Scaling sweeps (jaxsora/scaling): the fit recovers a known law and exponent from noisy
points, the frontier is the lower envelope of the runs, and an interrupted sweep, run again,
skips its finished runs and resumes the interrupted one from its checkpoint."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxsora.scaling import __main__ as cli
from jaxsora.scaling import fit, sweep

QUICK = "experiments/scaling_cpu.py:quick"


def test_the_fit_recovers_a_known_law_from_noisy_points():
    a, b, c = 0.8, 0.35, 0.9
    C = np.geomspace(1e11, 1e13, 16)
    rng = np.random.default_rng(0)
    L = fit.law(C / C.min(), a, b, c) * (1 + 0.003 * rng.standard_normal(len(C)))
    f = fit.fit_law(C, L)
    # Tolerances: 0.3% noise on 16 points over two decades.
    assert abs(f["b"] - b) < 0.05 and abs(f["a"] - a) < 0.1 and abs(f["c"] - c) < 0.05, f
    ci = fit.bootstrap(C, L, f["C0"])
    # The exponent's interval covers the truth and is narrow; a and c trade off against each
    # other, so their point-resampling intervals are narrower than their true spread.
    assert ci["b"][0] <= b <= ci["b"][1] and ci["b"][1] - ci["b"][0] < 0.2, ci
    for name, true in zip("ac", (a, c), strict=True):
        assert ci[name][0] - 0.05 <= true <= ci[name][1] + 0.05, (name, ci[name], true)


def test_n_opt_recovers_a_known_exponent():
    C = np.geomspace(1e12, 1e16, 20)
    N = 3e2 * C**0.41 * np.exp(0.05 * np.random.default_rng(1).standard_normal(len(C)))
    n = fit.fit_n_opt(C, N)
    assert abs(n["alpha"] - 0.41) < 0.03 and n["alpha_ci95"][0] < 0.41 < n["alpha_ci95"][1]


def test_the_frontier_is_the_lower_envelope_of_the_points():
    grid = np.geomspace(1e10, 1e12, 9)
    small = np.stack([grid[:6], 2.0 - 0.1 * np.arange(6)], 1)  # fast early, stops at 1.5
    big = np.stack([grid[1:], 2.3 - 0.2 * np.arange(8)], 1)  # slow start, ends at 0.9
    C, L, who = fit.frontier({"small": small, "big": big})
    assert C[0] == grid[1]  # where both sizes have a point
    assert who == ["small"] * 4 + ["big"] * 4, who
    assert np.all(np.diff(L) < 0) and np.isclose(L[-1], 0.9)
    for c, v in zip(C, L, strict=True):  # each is the lowest loss reached with at most c
        reached = [k[k[:, 0] <= c, 1].min() for k in (small, big) if k[0, 0] <= c]
        assert v == min(reached)


def test_a_changed_sweep_is_refused_for_the_runs_it_changes(tmp_path):
    r = sweep.RunPlan("W16_c0", "W16", 1e9, 10, 1e8, 100, {"total_steps": 10})
    sweep.check_plan(str(tmp_path), [r])
    sweep.check_plan(str(tmp_path), [r])  # the same plan again: fine
    with pytest.raises(ValueError, match=r"W16_c0.*another --out"):
        sweep.check_plan(str(tmp_path), [dataclasses.replace(r, fields={"total_steps": 11})])


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(data_dir, tmp_path):
    out = str(tmp_path / "sweep")
    spec = sweep.load_sweep(QUICK)
    runs = {r.name: r for r in sweep.plan(spec, data_dir)}
    assert sorted(runs) == ["W16_c0", "W16_c1"]
    sweep.run(QUICK, out, data_dir, only=["W16_c0"])
    first = runs["W16_c0"]
    with open(sweep.result_path(out, first.name)) as f:
        result = json.load(f)
    metrics = os.path.join(sweep.run_dir(out, first.name), "metrics.jsonl")
    stamp = os.stat(metrics).st_mtime_ns

    # W16_c1 interrupted halfway: the trainer saved its checkpoint and exited (Ctrl-C, SIGTERM).
    second = runs["W16_c1"]
    stopped = dataclasses.replace(second, fields={**second.fields, "stop_after": second.steps // 2})
    with pytest.raises(sweep.SweepInterrupted, match="rerun to resume"):
        sweep.train_one(out, spec["base"], stopped)
    assert not os.path.exists(sweep.result_path(out, second.name))

    done = sweep.run(QUICK, out, data_dir)
    assert [d["name"] for d in done] == ["W16_c0", "W16_c1"]
    assert done[0] == result and os.stat(metrics).st_mtime_ns == stamp  # not trained again
    with open(os.path.join(sweep.run_dir(out, second.name), "train.log")) as f:
        log = f.read()
    assert log.count("-m jaxsora.train") == 2 and f"at step {second.steps // 2}" in log
    assert done[1]["steps"] == second.steps and done[1]["val_loss"] > 0

    # fit and samples read the finished sweep (4+ frontier points from the two curves).
    assert cli.main(["fit", out]) == 0
    with open(os.path.join(out, "scaling.json")) as f:
        summary = json.load(f)
    assert {"a", "b", "c", "ci95", "n_opt", "frontier"} <= set(summary)
    assert cli.main(["samples", out]) == 0
    assert os.path.getsize(os.path.join(out, "scaling.png")) > 0
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
