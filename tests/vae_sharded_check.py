"""Run as a subprocess with 4 simulated CPU devices (the backend must not have started yet).

One VAE train step on one device and on a data2 x fsdp2 mesh (batch split 4 ways, weights
replicated), from the same state and batch; prints the metrics and the largest parameter
difference as JSON for tests/test_vae.py.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)

import json  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import vae_tiny  # noqa: E402
from jaxsora import sharding, train_vae  # noqa: E402
from jaxsora.data import pipeline  # noqa: E402
from jaxsora.data.vae_data import parse_buckets  # noqa: E402

# One group of 4 one-frame clips: one VAE graph to compile per mesh (the sharding of the batch,
# not the temporal layers, is under test; tests above cover those).
BUCKET = dict(frames=1, height=16, width=16, videos=4, images=0)


def one_step(config, devices, batch):
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: train_vae.VaeTrainState(config)))
    state = jax.jit(lambda: nnx.state(train_vae.VaeTrainState(config)), out_shardings=replicated)()
    step_fn = train_vae.make_step_fn(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, pipeline.to_global(batch, mesh, rules))
    params = [np.asarray(x) for x in jax.tree.leaves(state["model"])]
    return {k: float(v) for k, v in metrics.items()}, params


def main():
    c = vae_tiny.get_config("runlocal")
    c.data.buckets = [BUCKET]
    rng = np.random.default_rng(0)
    (b,) = parse_buckets([BUCKET])
    batch = {
        "video": rng.uniform(-1, 1, (b.videos, b.frames, b.height, b.width, 3)).astype("f4"),
        "image": rng.uniform(-1, 1, (b.images, 1, b.height, b.width, 3)).astype("f4"),
    }
    c.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
    one, p1 = one_step(c, jax.devices()[:1], batch)
    c.mesh = dict(data=2, fsdp=2, context=1, tensor=1)
    many, p2 = one_step(c, jax.devices(), batch)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(p1, p2, strict=True))
    print("RESULT " + json.dumps({"one": one, "mesh": many, "param_max_diff": diff}))


if __name__ == "__main__":
    main()
