"""What the DiT and VAE trainers share: run bookkeeping that is checkpointed, the optimizer, the
non-finite stop, the compiled step's memory line, and a quieter Orbax log. (Their config checks
are in `config_checks.py`.)"""

from __future__ import annotations

import logging as pylogging

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx


class RunVar(nnx.Variable):
    """Bookkeeping that is checkpointed with the weights: step and base RNG key."""


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, o.warmup_steps, max(total_steps, o.warmup_steps + 1), end_value=0.1 * o.lr
    )
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask
        ),
    )


def weight_decay_mask(params):
    """True for the weights AdamW decays: kernels (Linear and conv weight matrices, stacked over
    `layers` or not). Biases, norm scales, embeddings and learned positional tables (`pos`) are
    not decayed: pulling a gain towards 0 or a token's embedding towards the origin is not the
    regularisation weight decay is for.

    Decided by the parameter's name, not its rank (a scanned bias is 2-D). optax calls this on
    the params at init (nnx Variables: paths end in `.value`) and at every update (plain
    arrays), so the name is the last string key of the path either way.
    """

    def is_kernel(path, _) -> bool:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        names = [n for n in names if isinstance(n, str)]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def check_finite(step: int, metrics: dict) -> dict:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step}: {values}. The run stopped; lower "
            "optim.lr or raise optim.warmup_steps, then rerun to resume from the last checkpoint"
        )
    return values


def check_finite_or_wait(ckpt, step: int, metrics: dict) -> dict:
    """`check_finite`; before the run stops, the last good checkpoint (`ckpt`'s save perhaps
    still in the background) is committed, so the rerun resumes from it."""
    try:
        return check_finite(step, metrics)
    except FloatingPointError:
        ckpt.wait()
        raise


def memory_summary(compiled) -> str:
    try:
        m = compiled.memory_analysis()
        return (
            f"arguments {m.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
            f"{m.temp_size_in_bytes / 2**20:.1f} MiB, "
            f"outputs {m.output_size_in_bytes / 2**20:.1f} MiB"
        )
    except Exception as e:  # some backends do not report it
        return f"unavailable ({e})"


def quiet_orbax_info_logs() -> None:
    """Orbax logs a dozen INFO lines per save through absl; keep its warnings, drop the chatter."""

    def keep(record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname

    pylogging.getLogger("absl").addFilter(keep)
