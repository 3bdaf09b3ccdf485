"""Run as a subprocess with 8 simulated CPU devices (the backend must not have started yet).

Computes the train loss and every parameter's gradient for one packed batch on a 1-device mesh
and on 8-device meshes, and prints per-leaf differences as JSON for tests/test_sharding.py.

The weights are perturbed first (tests/conftest.py::randomize_params): at initialisation
adaLN-Zero's zero `ada` and `patch_out` make every gate and the output zero, so self-attention,
the MLP and the modulation would never touch the loss, and a bug in the context-parallel or
tensor-sharded attention would pass unseen.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import tiny  # noqa: E402
from jaxsora import sharding  # noqa: E402
from jaxsora import train as trainer  # noqa: E402
from jaxsora.data import packing  # noqa: E402
from jaxsora.models.tokenizer import tokenize  # noqa: E402
from tests.conftest import randomize_params  # noqa: E402

MESHES = {
    "data2_fsdp2_tensor2": (dict(data=2, fsdp=2, context=1, tensor=2), "xla"),
    "data2_context2_tensor2": (dict(data=2, fsdp=1, context=2, tensor=2), "context"),
    # Two heads per context device: the all-to-all must put every head back in its place.
    "fsdp4_context2": (dict(data=1, fsdp=4, context=2, tensor=1), "context"),
}


# Compiled without LLVM's optimisations: a third of the compile time, the same float semantics,
# and the reference and the sharded programs compiled alike.
FAST = {"xla_backend_optimization_level": 0}
# Two full train steps (optimizer, EMA, the state handed back to the compiled step) on the mesh
# where XLA once re-sharded updated weights over `context`; gradients are compared on all.
TWO_STEP_MESHES = ("data2_context2_tensor2",)


def config_for(mesh_sizes, attention):
    c = tiny.get_config("runlocal")
    # Width 32 (= text_width) and 8 packs (2 per batch shard on data2_fsdp2_tensor2): with width
    # 64 or 4 packs that mesh passed while XLA mis-partitioned the gradient of the per-segment
    # conditioning (time and caption encoders; see DiT.__call__).
    c.model.width, c.model.num_heads, c.model.depth = 32, 4, 2
    c.data.seq_len, c.data.max_segments, c.batch_size = 128, 6, 8
    c.mesh, c.model.attention = mesh_sizes, attention
    return c


def make_batch(config):
    rng = np.random.default_rng(0)
    examples = []
    for k in range(60):
        grid = (int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(2, 6)))
        n = int(np.prod(grid))
        pos = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)
        ids, mask = tokenize(f"caption number {k}", config.model.text_len, config.model.text_vocab)
        examples.append(
            {
                "patches": rng.uniform(-1, 1, (n, 48)).astype(np.float32),
                "positions": pos.reshape(-1, 3).astype(np.int32),
                "grid": np.array(grid, np.int32),
                "text_ids": ids,
                "text_mask": mask,
            }
        )
    shape = packing.PackShape(
        config.data.seq_len, config.data.max_segments, 48, config.model.text_len
    )
    packs = packing.pack_examples(examples, shape)[: config.batch_size]
    assert len(packs) == config.batch_size
    return packing.stack_packs(packs)


def placed(config, devices, values):
    """(mesh, rules, graphdef, state) of a train state on this mesh, holding `values` if given."""
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    graphdef, state = nnx.split(trainer.create_train_state(config, mesh, rules))
    if values is not None:  # the same numbers everywhere, placed on this mesh's shardings
        state = jax.tree.map(lambda x, v: jax.device_put(v, x.sharding), state, values)
    return mesh, rules, graphdef, state


def global_batch(config, mesh, rules):
    return {
        k: jax.device_put(v, sharding.batch_sharding(mesh, rules, v.ndim))
        for k, v in make_batch(config).items()
    }


def live_values(config):
    """A 1-device train state with every model (and EMA) weight perturbed, as numpy."""
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:1])
    state = trainer.create_train_state(config, mesh, tuple(tuple(r) for r in config.sharding_rules))
    randomize_params(state.model, scale=0.1)
    nnx.update(state.ema, nnx.state(state.model, nnx.Param))
    return jax.tree.map(np.asarray, nnx.state(state))


def loss_and_grads(config, devices, values):
    mesh, rules, graphdef, state = placed(config, devices, values)
    model_def, model_state = nnx.split(nnx.merge(graphdef, state).model)
    batch = global_batch(config, mesh, rules)

    def fn(model_state, batch):
        model = nnx.merge(model_def, model_state)
        grad_fn = nnx.value_and_grad(trainer.loss_and_metrics, has_aux=True)
        (loss, _), grads = grad_fn(model, batch, jax.random.key(3), config)
        return loss, nnx.state(grads)

    with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
        loss, grads = jax.jit(fn).lower(model_state, batch).compile(FAST)(model_state, batch)
    sharded = any(
        len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(model_state)
    )
    flat = {
        "/".join(map(str, path)): np.asarray(g)
        for path, g in jax.tree_util.tree_leaves_with_path(
            grads.to_pure_dict(), is_leaf=lambda x: isinstance(x, jax.Array)
        )
    }
    return float(loss), flat, sharded


def two_train_steps(config, devices, values):
    """Losses of two full train steps (optimizer, EMA) through the trainer's own step function:
    the second step also checks that the state keeps the shardings the step was compiled for."""
    mesh, rules, graphdef, state = placed(config, devices, values)
    batch = global_batch(config, mesh, rules)
    step_fn = trainer.make_step_fn(graphdef, config, jax.tree.map(lambda x: x.sharding, state))
    losses = []
    with jax.set_mesh(mesh), sharding.activation_sharding(mesh, rules):
        compiled = step_fn.lower(state, batch).compile(FAST)
        for _ in range(2):
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


def leaf_errors(grads, ref):
    """Per parameter: max |g - g_ref| and max |g_ref| (the test divides one by the other)."""
    assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))
    return {k: [float(np.abs(grads[k] - ref[k]).max()), float(np.abs(ref[k]).max())] for k in ref}


def main():
    base = config_for(dict(data=1, fsdp=1, context=1, tensor=1), "xla")
    values = live_values(base)
    ref_loss, ref_grads, _ = loss_and_grads(base, jax.devices()[:1], values)
    out = {
        "reference_loss": ref_loss,
        "reference_two_steps": two_train_steps(base, jax.devices()[:1], values),
    }
    for name, (mesh_sizes, attention) in MESHES.items():
        config = config_for(mesh_sizes, attention)
        loss, grads, sharded = loss_and_grads(config, jax.devices(), values)
        out[name] = {
            "loss": loss,
            "grad_errors": leaf_errors(grads, ref_grads),
            "weights_sharded": sharded,
        }
        if name in TWO_STEP_MESHES:
            out[name]["two_steps"] = two_train_steps(config, jax.devices(), values)
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
