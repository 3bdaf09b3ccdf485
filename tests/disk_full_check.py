"""Run as a subprocess with two small tmpfs mounted at DIR/preflight and DIR/mid_save (by
tests/test_checkpointing.py, in a private mount namespace): fills each with checkpoints of a
small state, refused once by the free-space check and once failing inside Orbax's asynchronous
write, then restores what is left. Prints RESULT {...}."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxsora.checkpointing import Checkpointer, abstract_like


class _Data:
    def get_state(self) -> dict:
        return {"next_index": 0}

    def set_state(self, state: dict) -> None:
        pass


def fill(workdir: str, preflight: bool) -> dict:
    """Saves steps 1, 2, ... as the train loop does (no wait between) until one raises."""
    rng = np.random.default_rng(0)  # incompressible: the bytes on disk are the array's bytes
    state = {f"w{i}": jnp.asarray(rng.standard_normal(2000, dtype=np.float32)) for i in range(100)}
    ckpt = Checkpointer(workdir, keep=1)  # keep=1: the last good one must survive a failed save
    if not preflight:  # as if something else filled the disk while the save was being written
        ckpt._check_free_space = lambda step, state: None
    error = None
    for step in range(1, 6):
        try:
            ckpt.save(step, state, _Data(), "{}")
        except OSError as e:
            error = e
            break
    left = sorted(os.listdir(ckpt.directory))
    step, restored = Checkpointer(workdir, read_only=True).restore_latest(abstract_like(state))
    same = all(np.array_equal(restored[k], state[k]) for k in state)
    return {"error": str(error), "errno": getattr(error, "errno", None), "left": left,
            "restored": step, "same": bool(same)}  # fmt: skip


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    results = {mode: fill(os.path.join(sys.argv[1], mode), mode == "preflight")
               for mode in ("preflight", "mid_save")}  # fmt: skip
    print("RESULT " + json.dumps(results), flush=True)
