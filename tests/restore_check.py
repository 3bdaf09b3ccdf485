"""Run as a subprocess: restores a run's latest checkpoint onto N simulated devices (fsdp=N) and
saves the model weights to an .npz, so tests can compare restores across device counts."""

import sys

import jax

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxsora import sharding  # noqa: E402
from jaxsora import train as trainer  # noqa: E402
from jaxsora.checkpointing import Checkpointer  # noqa: E402


def restore(workdir: str, devices: int) -> tuple[dict[str, np.ndarray], int]:
    """Model weights by path, and how many devices the biggest weight is split over."""
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step()
    config = ml_collections.ConfigDict(ckpt.saved_config(step))
    config.mesh = dict(data=1, fsdp=devices, context=1, tensor=1)
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:devices])
    _, state = nnx.split(trainer.create_train_state(config, mesh, tuple(config.sharding_rules)))
    restored = ckpt.restore(step, trainer.checkpoint_target(state))
    ckpt.close()
    leaves = jax.tree_util.tree_leaves_with_path(restored["model"])
    biggest = max((x for _, x in leaves), key=lambda x: x.size)
    shards = len({str(s.index) for s in biggest.addressable_shards})
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, shards


if __name__ == "__main__":
    weights, shards = restore(sys.argv[1], int(sys.argv[2]))
    np.savez(sys.argv[3], __shards__=np.array(shards), **weights)
