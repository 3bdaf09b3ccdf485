"""The JAX train step against a plain PyTorch implementation of the same model, on this CPU.

    python -m benchmarks.torch_peer [--reps 10 --warmup 3 --torch_compile]

First proves the two are the same model: jaxsora's DiT weights are copied into the port in
benchmarks/torch_dit.py and the forward outputs (and, with --grad_parity, the loss gradients) must
agree in float32. Then times the whole train step (forward, backward, clipping, AdamW, EMA) of
both on one identical batch (the tiny config's B, L, S), alternating JAX and torch step by step
so that load from other processes on a shared machine falls on both alike; medians are reported.

torch.compile is tried in a child process (so a slow or failing compile cannot stall or break
the run) with --compile_budget seconds for the compile; past that it is reported as slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from absl import app, flags, logging

from benchmarks import common

FLAGS = flags.FLAGS
SLOW_EXIT = 124  # the compile child ran past its budget
GAP_S = 0.1


def compile_child(budget: int, reps: int, warmup: int, data_dir: str) -> dict:
    """Runs in the child process: compile, then time steps; prints one JSON line."""
    import torch

    from benchmarks import torch_dit, train_step
    from jaxsora import train

    config = train_step.tiny_config()
    batch = torch_dit.to_torch(train_step.make_batch(config, data_dir))
    model = torch_dit.DiT(train.dit_config(config))
    step = torch_dit.TrainStep(model, config, compile_model=torch.compile(model))
    # Past the budget the child ends itself: the parent reports "slow" instead of waiting.
    watchdog = threading.Timer(budget, lambda: os._exit(SLOW_EXIT))
    watchdog.start()
    start = time.perf_counter()
    step(batch)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    watchdog.cancel()
    # Fewer steps than the main comparison: this figure is a side note, and it must not push
    # the benchmark past its couple of minutes.
    times = common.timed(lambda: step(batch), min(warmup, 1), min(reps, 5))
    return {"compile_s": compile_s, "step_s": common.summary(times)}


def run_compiled(budget: int, reps: int, warmup: int, threads: int, data_dir: str) -> dict:
    """torch.compile'd step timings from a child process, or why there are none."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # A warm inductor cache (an earlier run on this machine) makes the compile seconds, not
    # minutes; the record says which it was.
    cache_warm = os.path.isdir(cache_dir()) and bool(os.listdir(cache_dir()))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.torch_peer",
        "--compile_child",
        f"--reps={reps}",
        f"--warmup={warmup}",
        f"--torch_threads={threads}",
        f"--data_dir={data_dir}",
        f"--compile_budget={budget}",
    ]
    start = time.perf_counter()
    try:
        # The child stops itself past the compile budget; this timeout is a backstop.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 120)
    except subprocess.TimeoutExpired:
        return {
            "status": f"unavailable/slow: no result within {budget + 120} s",
            "inductor_cache_was_warm": cache_warm,
        }
    if done.returncode == SLOW_EXIT:
        return {
            "status": f"slow: torch.compile took over {budget} s",
            "inductor_cache_was_warm": cache_warm,
        }
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no stderr"]
        return {"status": f"unavailable: child exited {done.returncode}: {tail[0][:200]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["status"] = "ok"
    result["inductor_cache_was_warm"] = cache_warm
    return result


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
    except ImportError:  # a checkout installed without the torch extra: say so, as one line
        skip("PyTorch is not installed; install it with `pip install -e '.[torch]'`")
        return

    threads = FLAGS.torch_threads or os.cpu_count()
    torch.set_num_threads(threads)
    if FLAGS.compile_child:
        with common.json_stdout() as emit:
            emit(compile_child(FLAGS.compile_budget, FLAGS.reps, FLAGS.warmup, FLAGS.data_dir))
        return

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
        times = {name: [] for name in runs}
        for _ in range(FLAGS.reps):
            # Alternate, so background load on a shared machine hits all alike; the gap lets
            # the other framework's worker threads, which spin a while after a step, go idle.
            for name, fn in runs.items():
                time.sleep(GAP_S)
                times[name] += common.timed(fn, 0, 1)
        jt, tt = common.summary(times["jax"]), common.summary(times["torch"])
        losses = {"jax": jax_step(), "torch": run_torch()}

        compiled = {"status": "not tried (--notorch_compile)"}
        if FLAGS.torch_compile:
            compiled = run_compiled(
                FLAGS.compile_budget, FLAGS.reps, FLAGS.warmup, threads, FLAGS.data_dir
            )
        record = {
            "benchmark": "torch_peer",
            "config": train_step.config_summary(config),
            "batch": "pipeline" if FLAGS.data_dir else "synthetic (online packer)",
            "batch_stats": stats,
            "params": {"jax": int(jax_params), "torch": int(torch_params)},
            "max_abs_diff": max_abs_diff,
            "grad_max_rel_diff": grad_diff,
            "parity_s": parity_s,
            "jax_step_s": jt["median"],
            "torch_step_s": tt["median"],
            "jax_step": jt,
            "torch_step": tt,
            "jax_tokens_per_s": stats["real_tokens"] / jt["median"],
            "torch_tokens_per_s": stats["real_tokens"] / tt["median"],
            "speedup": tt["median"] / jt["median"],  # > 1: JAX is faster
            # Fastest steps: what each does when no other process takes a core.
            "speedup_min": tt["min"] / jt["min"],
            "jax_compile_s": jax_step.compile_s,
            "loss_after_steps": losses,
            "torch_threads": threads,
            "torch_attention": "F.scaled_dot_product_attention, boolean segment mask",
            "torch_compile": compiled,
            "load_average": {"start": load_start, "end": common.load_average()},
            "machine": common.machine_info(),
        }
        if "torch_1thread" in times:
            record["torch_1thread_step"] = common.summary(times["torch_1thread"])
        if compiled.get("status") == "ok":
            med = compiled["step_s"]["median"]
            record["torch_compiled_step_s"] = med
            record["torch_compiled_tokens_per_s"] = stats["real_tokens"] / med
            record["speedup_vs_compiled"] = med / jt["median"]
        emit(common.round_floats(record))


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
    flags.DEFINE_integer("compile_budget", 60, "Seconds allowed to torch.compile.")
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = os.cpu_count().")
    flags.DEFINE_bool("torch_1thread", True, "Also time torch on one thread (load check).")
    flags.DEFINE_bool("compile_child", False, "Internal: the torch.compile child.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
