"""The JAX train step against a plain PyTorch implementation of the same model, on this CPU.

    python -m benchmarks.torch_peer [--reps 10 --warmup 3 --torch_compile]

First proves the two are the same model: jaxsora's DiT weights are copied into the port in
benchmarks/torch_dit.py and the forward outputs (and, with --grad_parity, the loss gradients) must
agree in float32. Then times the whole train step (forward, backward, clipping, AdamW, EMA) of
both on one identical batch (the tiny config's B, L, S), alternating JAX and torch step by step
so that load from other processes on a shared machine falls on both alike; medians are reported.

Then torch.compile: a second copy of the weights is compiled (--compile_budget seconds at most;
past that the record is printed with the compile reported as slow) and JAX, eager and compiled
steps alternate step by step; those three-way figures are the ones reported.
"""

from __future__ import annotations

import os
import threading
import time

from absl import app, flags, logging

from benchmarks import common

FLAGS = flags.FLAGS
GAP_S = 0.1


def compile_budgeted(step, batch, budget: int, on_timeout) -> float:
    """Runs the torch.compile'd step once (compiling forward and backward) and returns the
    seconds it took. Past `budget` seconds `on_timeout()` runs (it prints the record so far)
    and the process ends: a compile cannot be interrupted from Python."""
    watchdog = threading.Timer(budget, lambda: (on_timeout(), os._exit(0)))
    watchdog.daemon = True
    watchdog.start()
    start = time.perf_counter()
    step(batch)
    watchdog.cancel()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
    except ImportError:  # a checkout installed without the torch extra: say so, as one line
        skip("PyTorch is not installed; install it with `pip install -e '.[torch]'`")
        return

    threads = FLAGS.torch_threads or os.cpu_count()
    torch.set_num_threads(threads)

    import jax
    from flax import nnx

    from benchmarks import torch_dit, train_step
    from jaxsora import train
    from jaxsora.models.dit import make_model

    with common.json_stdout() as emit:
        load_start = common.load_average()
        config = train_step.tiny_config()
        try:
            batch_np = train_step.make_batch(config, FLAGS.data_dir)
        except FileNotFoundError as e:  # --data_dir without the dataset
            emit({"benchmark": "torch_peer", "skipped": str(e), "machine": common.machine_info()})
            return
        stats = common.batch_stats(batch_np)

        # ------------------------------------------------------------------ same model, proven
        start = time.perf_counter()
        probe = make_model(train.dit_config(config), config.seed)
        torch_dit.randomize(probe)
        max_abs_diff = torch_dit.check_parity(probe, batch_np)
        grad_diff = (
            torch_dit.check_grad_parity(probe, batch_np, config.flow) if FLAGS.grad_parity else None
        )
        parity_s = time.perf_counter() - start
        logging.info(
            "parity: forward max |diff| %.3g, gradient %s (%.0fs)",
            max_abs_diff,
            grad_diff,
            parity_s,
        )
        del probe

        # ------------------------------------------------------------------ both train steps
        jax_step = train_step.build_jax_step(config, batch_np)
        jax_params = sum(x.size for x in jax.tree.leaves(nnx.state(jax_step.model(), nnx.Param)))
        torch_model = torch_dit.from_jax(jax_step.model())  # the same initial weights
        torch_params = torch_dit.count_params(torch_model)
        if torch_params != jax_params:
            raise AssertionError(f"parameter counts differ: torch {torch_params}, JAX {jax_params}")
        torch_step = torch_dit.TrainStep(torch_model, config)
        torch_batch = torch_dit.to_torch(batch_np)

        def run_torch() -> float:
            return torch_step(torch_batch)

        def run_torch_1thread() -> float:
            """Same step on one thread: a 2-thread OpenMP team stalls whenever another process
            holds a core, one thread does not, so the pair shows how much of a gap is load."""
            torch.set_num_threads(1)
            try:
                return torch_step(torch_batch)
            finally:
                torch.set_num_threads(threads)

        for _ in range(FLAGS.warmup):
            jax_step()
            run_torch()
        runs = {"jax": jax_step, "torch": run_torch}
        if FLAGS.torch_1thread and threads > 1:
            runs["torch_1thread"] = run_torch_1thread
        times = alternate(runs, FLAGS.reps)
        record = {
            "benchmark": "torch_peer",
            "config": train_step.config_summary(config),
            "batch": "pipeline" if FLAGS.data_dir else "synthetic (online packer)",
            "batch_stats": stats,
            "params": {"jax": int(jax_params), "torch": int(torch_params)},
            "max_abs_diff": max_abs_diff,
            "grad_max_rel_diff": grad_diff,
            "parity_s": parity_s,
            "jax_compile_s": jax_step.compile_s,
            "torch_threads": threads,
            "torch_attention": "F.scaled_dot_product_attention, boolean segment mask",
            "torch_compile": {"status": "not tried (--notorch_compile)"},
        }
        record.update(step_figures(times, stats))

        def finish() -> None:
            record["loss_after_steps"] = {name: float(fn()) for name, fn in runs.items()}
            record["load_average"] = {"start": load_start, "end": common.load_average()}
            record["machine"] = common.machine_info()
            emit(common.round_floats(record))

        if FLAGS.torch_compile:
            # A second copy of the initial weights, compiled; then all three alternate step by
            # step, and those are the figures reported (the eager-only round is kept as a
            # cross-check of load: it should agree).
            compiled_model = torch_dit.from_jax(jax_step.model())
            compiled_step = torch_dit.TrainStep(
                compiled_model, config, compile_model=torch.compile(compiled_model)
            )
            record["torch_compile"] = {"status": f"slow: over {FLAGS.compile_budget} s"}
            compile_s = compile_budgeted(
                compiled_step, torch_batch, FLAGS.compile_budget, on_timeout=finish
            )
            record["torch_compile"] = {"status": "ok", "compile_s": compile_s}
            runs["torch_compiled"] = lambda: compiled_step(torch_batch)
            for _ in range(FLAGS.warmup):
                runs["torch_compiled"]()
            record["two_way_round"] = {k: record[k] for k in ("jax_step_s", "torch_step_s")}
            record.update(step_figures(alternate(runs, FLAGS.reps), stats))
        finish()


def alternate(runs: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each run's steps, taken in turn: background load on a shared machine hits all
    alike; the gap lets the other framework's worker threads, which spin a while after a step,
    go idle."""
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            time.sleep(GAP_S)
            times[name] += common.timed(fn, 0, 1)
    return times


def step_figures(times: dict[str, list[float]], stats: dict) -> dict:
    jt, tt = common.summary(times["jax"]), common.summary(times["torch"])
    out = {
        "jax_step_s": jt["median"],
        "torch_step_s": tt["median"],
        "jax_step": jt,
        "torch_step": tt,
        "jax_tokens_per_s": stats["real_tokens"] / jt["median"],
        "torch_tokens_per_s": stats["real_tokens"] / tt["median"],
        "speedup": tt["median"] / jt["median"],  # > 1: JAX is faster
        # Fastest steps: what each does when no other process takes a core.
        "speedup_min": tt["min"] / jt["min"],
    }
    if "torch_1thread" in times:
        out["torch_1thread_step"] = common.summary(times["torch_1thread"])
    if "torch_compiled" in times:
        ct = common.summary(times["torch_compiled"])
        out["torch_compiled_step"] = ct
        out["torch_compiled_step_s"] = ct["median"]
        out["torch_compiled_tokens_per_s"] = stats["real_tokens"] / ct["median"]
        out["speedup_vs_compiled"] = ct["median"] / jt["median"]
    return out


def skip(reason: str) -> None:
    """The benchmark's one JSON line when it cannot run here; `make bench` goes on."""
    with common.json_stdout() as emit:
        emit({"benchmark": "torch_peer", "skipped": reason, "machine": common.machine_info()})


def define_flags() -> None:
    """Defined only when run as a script, so importing the module never clashes on flag names."""
    flags.DEFINE_integer("reps", 10, "Timed steps of each framework (median reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps of each first.")
    flags.DEFINE_string("data_dir", "", "Take the batch from the real pipeline here.")
    flags.DEFINE_bool("grad_parity", True, "Also check the loss gradients agree.")
    flags.DEFINE_bool("torch_compile", True, "Also time a torch.compile'd model.")
    flags.DEFINE_integer("compile_budget", 600, "Seconds allowed to torch.compile.")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = os.cpu_count().")
    flags.DEFINE_bool("torch_1thread", True, "Also time torch on one thread (load check).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
