"""The grid of a sweep file, and the runner that trains it, resumably.

A sweep file is Python with `get_sweep(arg) -> dict` (experiments/scaling_cpu.py):

  base      the experiment config every run starts from ("experiments/tiny.py:t2v")
  sizes     {size name: {dotted config field: value}}: the model sizes
  budgets   [model FLOPs]: the training compute of a run (jaxsora/flops.py's count over real
            tokens); a run trains round(budget / its mean step FLOPs) steps
  overrides {dotted field: value}: set in every run
  evals     validations per run (eval.every = total_steps // evals; the last step always)
  warmup_fraction   optim.warmup_steps as a fraction of the run's steps
  quality_prompts, quality_steps   the sample-quality score at each run's last step

Every (size, budget) pair is one run, `<out>/runs/<size>_c<k>`, trained by its own
`python -m jaxsora.train` process (log: `train.log` beside its checkpoints). A run is finished
when its `result.json` exists, written only after the trainer logged the last step's
validation; `run` skips finished runs and restarts the others, which resume from their last
checkpoint, so an interrupted sweep is continued by running the same command again. The plan
(each run's steps and fields) is saved in `<out>/plan.json`; a sweep file changed under an
existing plan is refused for the runs it would change, naming them. `--only NAME` trains one
run, so runs can be spread over machines that share `<out>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import logging

REQUIRED = ("base", "sizes", "budgets")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    name: str
    size: str
    budget: float  # model FLOPs asked for
    steps: int
    step_flops: float  # mean model FLOPs of one step of this size
    params: int
    fields: dict  # dotted config field -> value, on top of the base config

    def flags(self) -> list[str]:
        return [f"--config.{k}={v}" for k, v in self.fields.items()]


def load_sweep(path: str) -> dict:
    """The sweep file's `get_sweep(arg)` (`path[:arg]`), checked."""
    from jaxsora.config_files import load_spec_file

    file = path.partition(":")[0]
    module, arg = load_spec_file(path, "--sweep")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{file}: a sweep file defines get_sweep(arg) -> dict")
    sweep = dict(module.get_sweep(arg))
    missing = [k for k in REQUIRED if not sweep.get(k)]
    if missing:
        raise ValueError(f"{file}: get_sweep() must give {missing} (see jaxsora/scaling/sweep.py)")
    budgets = list(sweep["budgets"])
    if budgets != sorted(budgets) or len(set(budgets)) != len(budgets) or budgets[0] <= 0:
        raise ValueError(f"{file}: budgets {budgets} must be positive and increasing")
    sweep.setdefault("overrides", {})
    sweep.setdefault("evals", 6)
    sweep.setdefault("warmup_fraction", 0.1)
    sweep.setdefault("quality_prompts", 20)
    sweep.setdefault("quality_steps", 16)
    return sweep


def run_config(sweep: dict, size: str, data_dir: str):
    """The base config with the sweep's overrides and the size's fields (no budget yet)."""
    from jaxsora.config_files import load_config

    config = load_config(sweep["base"])
    fields = {"data.data_dir": os.path.abspath(data_dir), **sweep["overrides"]}
    fields.update(sweep["sizes"][size])
    for key, value in fields.items():
        _set(config, key, value)
    return config, fields


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise ValueError(f"sweep field {dotted!r}: the base config has no such field")
    node[leaf] = value


def mean_step_flops(config, batches: int = 8) -> float:
    """Mean model FLOPs of the run's first `batches` training batches (the packs are ~full)."""
    from jaxsora import flops
    from jaxsora import train as trainer
    from jaxsora.compression import make_stage
    from jaxsora.data import pipeline

    source = pipeline.make_batches(config, make_stage(config.model))
    cfg = trainer.dit_config(config)
    total = sum(flops.train_step_flops(cfg, next(source)).model for _ in range(batches))
    return total / batches


def plan(sweep: dict, data_dir: str) -> list[RunPlan]:
    """Every (size, budget) run of the sweep: steps from the budget, validation and
    checkpoints spaced over them, the quality score at the end."""
    from jaxsora import params
    from jaxsora import train as trainer

    runs = []
    for size in sweep["sizes"]:
        config, fields = run_config(sweep, size, data_dir)
        trainer.validate(config)  # a bad size fails before anything trains
        step_flops = mean_step_flops(config)
        n_params = params.param_counts(trainer.dit_config(config))["total"]
        for k, budget in enumerate(sweep["budgets"]):
            steps = max(1, round(budget / step_flops))
            every = max(1, steps // int(sweep["evals"]))
            run_fields = {
                **fields,
                "total_steps": steps,
                "optim.warmup_steps": max(1, round(sweep["warmup_fraction"] * steps)),
                "eval.every": every,
                "checkpoint_every": every,
                "log_every": every,
                "eval.quality_every": steps,
                "eval.quality_prompts": int(sweep["quality_prompts"]),
                "eval.quality_steps": int(sweep["quality_steps"]),
            }
            runs.append(
                RunPlan(f"{size}_c{k}", size, float(budget), steps, step_flops, n_params,
                        run_fields)
            )  # fmt: skip
    return runs


def check_plan(out: str, runs: list[RunPlan]) -> None:
    """The saved plan, or this one saved; a run whose fields changed under it is refused."""
    path = os.path.join(out, "plan.json")
    rows = {r.name: dataclasses.asdict(r) for r in runs}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [n for n in rows if n in saved and saved[n]["fields"] != rows[n]["fields"]]
        if changed:
            raise ValueError(
                f"{path}: the sweep file changes runs {changed} that this sweep already planned "
                "(their steps or fields differ); use another --out, or delete those runs' "
                "folders and their plan.json entries to redo them"
            )
        rows = {**saved, **rows}
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


def run_dir(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


def result_path(out: str, name: str) -> str:
    return os.path.join(run_dir(out, name), "result.json")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished_result(out: str, r: RunPlan) -> dict | None:
    """The run's result when its metrics hold the last step's validation (else None)."""
    rows = read_metrics(run_dir(out, r.name))
    last = [row for row in rows if row["step"] == r.steps and "val_loss" in row]
    if not last:
        return None
    final = {k: v for row in rows if row["step"] == r.steps for k, v in row.items()}
    return {
        "name": r.name,
        "size": r.size,
        "budget": r.budget,
        "steps": r.steps,
        "params": r.params,
        "model_flops_total": final["model_flops_total"],
        "val_loss": final["val_loss"],
        **{k: v for k, v in final.items() if k.startswith("quality_")},
    }


class RunFailed(RuntimeError):
    pass


class SweepInterrupted(RuntimeError):
    pass


def train_one(out: str, base: str, r: RunPlan) -> dict:
    """Trains (or resumes) one run in its own process; returns its result."""
    workdir = run_dir(out, r.name)
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "jaxsora.train", f"--config={base}", *r.flags(),
           f"--workdir={workdir}"]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "xla_cache"))
    log_path = os.path.join(workdir, "train.log")
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RunFailed(f"run {r.name} failed (exit {rc}); its log: {log_path}")
    result = finished_result(out, r)
    if result is None:  # the trainer saved and exited early: Ctrl-C or SIGTERM
        raise SweepInterrupted(f"run {r.name} stopped before step {r.steps}; rerun to resume")
    result["wall_s"] = time.perf_counter() - t0
    with open(result_path(out, r.name) + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(result_path(out, r.name) + ".tmp", result_path(out, r.name))
    return result


def run(sweep_path: str, out: str, data_dir: str, only: list[str] | None = None) -> list[dict]:
    """Trains every unfinished run of the sweep (or those in `only`), in plan order."""
    sweep = load_sweep(sweep_path)
    runs = plan(sweep, data_dir)
    names = [r.name for r in runs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"--only {unknown}: not runs of {sweep_path}; its runs are {names}")
    check_plan(out, runs)
    results, failed = [], []
    for r in runs:
        if only and r.name not in only:
            continue
        done = result_path(out, r.name)
        if os.path.exists(done):
            logging.info("%s: finished, skipped", r.name)
            with open(done) as f:
                results.append(json.load(f))
            continue
        logging.info(
            "%s: %d steps of %.3g model FLOPs (%s params), %s",
            r.name, r.steps, r.step_flops, f"{r.params:,}",
            "resuming" if os.path.isdir(os.path.join(run_dir(out, r.name), "checkpoints"))
            else "starting",
        )  # fmt: skip
        try:
            results.append(train_one(out, sweep["base"], r))
        except RunFailed as e:  # the others still run; the sweep reports it at the end
            logging.error("%s", e)
            failed.append(str(e))
        else:
            res = results[-1]
            logging.info(
                "%s: val_loss %.4f at %.3g FLOPs in %.0fs",
                r.name, res["val_loss"], res["model_flops_total"], res["wall_s"],
            )  # fmt: skip
    if failed:
        raise RunFailed("; ".join(failed))
    return results


def results(out: str) -> list[dict]:
    """The finished runs' results under `out`, in plan order."""
    path = os.path.join(out, "plan.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{out} holds no sweep (no plan.json); run `python -m jaxsora.scaling run --sweep "
            f"FILE --out {out}` first"
        )
    with open(path) as f:
        names = list(json.load(f))
    out_rows = []
    for name in names:
        p = result_path(out, name)
        if os.path.exists(p):
            with open(p) as f:
                out_rows.append(json.load(f))
    return out_rows


# A run's validations before this fraction of its steps are left out of the fit: there the
# loss still tells the initialisation and the warm-up more than the model size (the largest
# model's step-2 loss would otherwise hold the frontier at the smallest compute).
SKIP_FRACTION = 0.25


def curves(out: str, finished: list[dict], skip: float = SKIP_FRACTION) -> dict[str, np.ndarray]:
    """{run name: [[model_flops_total, val_loss], ...]} of each run's validations from
    `skip` of its steps on."""
    return {
        r["name"]: np.array(
            [
                [row["model_flops_total"], row["val_loss"]]
                for row in read_metrics(run_dir(out, r["name"]))
                if "val_loss" in row and row["step"] >= skip * r["steps"]
            ]
        )  # fmt: skip
        for r in finished
    }
