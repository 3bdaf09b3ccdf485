"""The matmul kernels under the train step: JAX (XLA:CPU) against PyTorch on this CPU.

    python -m benchmarks.matmul_kernels [--reps 50]

Why: on a CPU the default config's step is mostly matmuls of width 128-512, so the speed of
the kernel each framework calls bounds how far ahead of PyTorch a JAX step can get. Measured:
- the default config's MLP matmul (4 packs x 512 tokens, 128 to 512) in float32, in the three
  forms a train step runs: forward `x @ w`, input gradient `dy @ w^T` and weight gradient
  `x^T @ dy` (a contraction over the 2,048 tokens);
- a 2048^3 matmul in float32 and bfloat16: on CPUs with AMX (Intel Sapphire Rapids and later)
  PyTorch's bfloat16 goes through oneDNN's AMX kernels, and XLA:CPU has no such path.
JAX and torch alternate call by call on the same threads' worth of work; medians, in GFLOP/s.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
TOKENS, WIDTH, HIDDEN = 2048, 128, 512  # the default config's B * L, model.width, MLP width
SQUARE = 2048


def cases(jax, jnp, torch):
    """{name: (FLOPs, JAX call, torch call or None)}; every call blocks until done."""
    contract = lambda lhs_dim, rhs_dim: (((lhs_dim,), (rhs_dim,)), ((), ()))  # noqa: E731
    out = {}

    def add(name, flop, jax_fn, jax_args, torch_fn, torch_shapes, dtype):
        f = jax.jit(jax_fn)
        args = [jnp.ones(s, dtype) for s in jax_args]
        run_jax = lambda: f(*args).block_until_ready()  # noqa: E731
        run_torch = None
        if torch is not None:
            targs = [torch.ones(s, dtype=getattr(torch, dtype)) for s in torch_shapes]
            run_torch = lambda: torch_fn(*targs)  # noqa: E731
        out[name] = (flop, run_jax, run_torch)

    mlp = 2.0 * TOKENS * WIDTH * HIDDEN
    x, w, dy = (TOKENS, WIDTH), (WIDTH, HIDDEN), (TOKENS, HIDDEN)
    add("mlp_forward_float32", mlp, jnp.matmul, (x, w), lambda a, b: a @ b, (x, w), "float32")
    add(
        "mlp_input_grad_float32",
        mlp,
        lambda dy, w: jax.lax.dot_general(dy, w, contract(1, 1)),
        (dy, w),
        lambda dy, w: dy @ w.t(),
        (dy, w),
        "float32",
    )
    add(
        "mlp_weight_grad_float32",
        mlp,
        lambda x, dy: jax.lax.dot_general(x, dy, contract(0, 0)),
        (x, dy),
        lambda x, dy: x.t() @ dy,
        (x, dy),
        "float32",
    )
    sq = (SQUARE, SQUARE)
    for dtype in ("float32", "bfloat16"):
        add(
            f"square_{dtype}",
            2.0 * SQUARE**3,
            jnp.matmul,
            (sq, sq),
            lambda a, b: a @ b,
            (sq, sq),
            dtype,
        )
    return out


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(os.cpu_count())

    with common.json_stdout() as emit:
        gflops = {}
        matmuls = cases(jax, jnp, torch)
        for name, (flop, run_jax, run_torch) in matmuls.items():
            calls = {"jax": run_jax, **({"torch": run_torch} if run_torch else {})}
            for call in calls.values():
                for _ in range(FLAGS.warmup):
                    call()
            times = {who: [] for who in calls}
            for _ in range(FLAGS.reps):  # alternated: load from other processes falls on both
                for who, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[who].append(time.perf_counter() - start)
            for who, ts in times.items():
                gflops[f"{who}_{name}"] = round(flop / common.summary(ts)["median"] / 1e9, 1)
        record = {
            "benchmark": "matmul_kernels",
            "gflops": gflops,
            "cpu_flags": common.cpu_flags(("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "machine": common.machine_info(),
        }
        if torch is not None:
            record["jax_over_torch"] = {
                name: round(gflops[f"jax_{name}"] / gflops[f"torch_{name}"], 2) for name in matmuls
            }
        emit(record)


def define_flags() -> None:
    flags.DEFINE_integer("reps", 50, "Timed calls of each matmul (median reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed calls of each first.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
