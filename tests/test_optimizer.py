"""The optimizer step: weight decay only on weight matrices, and gradient accumulation that is
exactly one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import tiny
from jaxsora import sharding, training
from jaxsora import train as trainer
from jaxsora.data import packing
from jaxsora.models.dit import DiTConfig, make_model
from tests.conftest import randomize_params, run_fast_compiled

# float32 on CPU: the same sums taken in another order move results by a few ulps, so each leaf
# must match to 1e-5 of its own largest magnitude.
RTOL = 1e-5


def leaf_name(path) -> str:
    return [k.key for k in path if isinstance(getattr(k, "key", None), str)][-1]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_weight_decay_moves_kernels_and_leaves_biases_scales_embeddings_alone(scan_layers):
    """Zero gradients and a large decay: one AdamW step shrinks every kernel (stacked
    [layers, in, out] ones too) and leaves every other parameter bit for bit."""
    cfg = DiTConfig(
        patch_dim=12, width=32, depth=2, num_heads=2, text_vocab=64, text_len=6, text_width=16,
        text_depth=1, text_heads=2, scan_layers=scan_layers,
    )  # fmt: skip
    model = randomize_params(make_model(cfg, seed=0))
    o = tiny.get_config().optim
    o.lr, o.warmup_steps, o.weight_decay = 0.1, 0, 0.5  # lr(0) = 0.1: decay is lr * wd = 5%
    optimizer = nnx.Optimizer(model, training.make_optimizer(o, total_steps=10), wrt=nnx.Param)
    before = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param).to_pure_dict())
    before = {jax.tree_util.keystr(p): (leaf_name(p), np.asarray(x)) for p, x in before}
    graphdef, state = nnx.split((optimizer, model))

    def update(state):
        optimizer, model = nnx.merge(graphdef, state)
        optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
        return nnx.state(model, nnx.Param)

    after = jax.tree_util.tree_leaves_with_path(run_fast_compiled(update, state).to_pure_dict())
    after = {jax.tree_util.keystr(p): np.asarray(x) for p, x in after}

    names = {name for name, _ in before.values()}
    assert names == {"kernel", "bias", "scale", "embedding", "pos"}, names
    for key, (name, old) in before.items():
        new = after[key]
        if name == "kernel":
            # Zero gradients: AdamW's only move is the decoupled decay, p <- p * (1 - lr * wd).
            np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=key)
            assert old.ndim == (3 if scan_layers and "blocks" in key else 2), key
        else:
            np.testing.assert_array_equal(new, old, err_msg=f"{key} was decayed")


def accumulation_config(accum: int):
    c = tiny.get_config("runlocal")
    c.batch_size = 4
    c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
    c.model.text_len = 6
    c.model.scan_layers = False  # the micro-batch scan is what is tested; unrolled compiles faster
    c.data.seq_len, c.data.max_segments = 64, 4
    # lr(0) = 0.1: one step moves each weight by ~0.1, far above its float32 rounding, so the
    # moves themselves can be compared to 1e-5.
    c.optim.lr, c.optim.warmup_steps = 0.1, 0
    c.optim.accum_steps = accum
    return c


def packed_batch(config) -> dict:
    """4 packs with 1 to 4 segments each (uneven, so averaging micro-batch means would differ
    from the whole batch's mean), some padding and some conditioning tokens."""
    rng = np.random.default_rng(0)
    L, S, Lt = config.data.seq_len, config.data.max_segments, config.model.text_len
    shape = packing.PackShape(seq_len=L, max_segments=S, patch_dim=48, text_len=Lt)
    packs = []
    for sizes in ((60,), (20, 30), (10, 12, 30), (5, 9, 14, 20)):
        examples = []
        for n in sizes:
            examples.append(
                {
                    "patches": rng.standard_normal((n, 48)).astype(np.float32),
                    "positions": rng.integers(0, 4, (n, 3)).astype(np.int32),
                    "grid": np.array([1, 2, -(-n // 2)], np.int32),
                    "text_ids": rng.integers(1, 64, Lt).astype(np.int32),
                    "text_mask": np.arange(Lt) < rng.integers(1, Lt + 1),
                    "cond": rng.random(n) < 0.2,
                }
            )
        packs.append(packing.build_pack(examples, shape))
    return packing.stack_packs(packs)


def initial_values(config):
    """A perturbed one-device train state, split; the same for every accum_steps (the step
    reads accum_steps from the config it is traced with, not from the state)."""
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:1])
    rules = tuple(tuple(r) for r in config.sharding_rules)
    state = randomize_params(trainer.create_train_state(config, mesh, rules))
    return nnx.split(state)


def one_step(graphdef, values, config, batch):
    """Normalised gradients, loss sums, metrics and new weights of one train step: the body of
    `train.train_step`, its gradients kept (one compile for both)."""

    def grads_and_step(values, batch):
        ts = nnx.merge(graphdef, values)
        key = jax.random.fold_in(jax.random.wrap_key_data(ts.rng[...]), ts.step[...])
        draws = trainer.draw_randomness(key, batch, config)
        grads, sums = trainer.batch_grads(ts.model, batch, draws, config)
        metrics = trainer.apply_grads(ts, grads, sums, config)
        return grads, sums, metrics, nnx.state(ts.model, nnx.Param)

    grads, sums, metrics, params = run_fast_compiled(grads_and_step, values, batch)
    return flat(grads), jax.device_get(sums), jax.device_get(metrics), flat(params)


def flat(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_leaves_close(got: dict, ref: dict, what: str):
    assert got.keys() == ref.keys()
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        err = float(np.abs(got[k] - ref[k]).max())
        assert err <= RTOL * max(scale, 1e-30), f"{what} {k}: off by {err} (|ref| up to {scale})"


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_big_batch():
    """accum_steps = 2 and 4 against 1 on the same 4 packs, weights, step and key: loss, metrics
    and every gradient leaf to RTOL of the leaf's largest magnitude, and the weights after the
    optimizer step."""
    config = accumulation_config(1)
    batch = packed_batch(config)
    graphdef, values = initial_values(config)
    initial = flat(values["model"].filter(nnx.Param))
    ref_grads, ref_sums, ref_metrics, ref_params = one_step(graphdef, values, config, batch)
    assert ref_sums["count"] == 10 and ref_metrics["segments"] == 10  # 1 + 2 + 3 + 4 segments
    assert max(float(np.abs(g).max()) for g in ref_grads.values()) > 1e-3, "trivial gradients"
    for accum in (2, 4):
        config = accumulation_config(accum)
        grads, _, metrics, params = one_step(graphdef, values, config, batch)
        for name in ("loss", "grad_norm", "segments"):
            np.testing.assert_allclose(
                metrics[name], ref_metrics[name], rtol=RTOL, err_msg=f"accum={accum} {name}"
            )
        assert_leaves_close(grads, ref_grads, f"accum={accum} gradient")
        # Adam's first move is lr * g / (|g| + eps), about lr * sign(g). Where g is near zero
        # its float32 rounding (up to ~5e-6 of the leaf's largest gradient, more in leaves such
        # as a key bias whose gradient is mostly cancellation) is a large part of it, and the
        # move amplifies that: those elements prove nothing about accumulation. Where |g| is
        # over 1% of the leaf's largest, the moves (~lr = 0.1) must agree to RTOL of lr.
        for k, p0 in initial.items():
            well = np.abs(ref_grads[k]) > 1e-2 * np.abs(ref_grads[k]).max()
            move, ref_move = (params[k] - p0)[well], (ref_params[k] - p0)[well]
            assert float(np.abs(ref_move).min(initial=1.0)) > 0.05, k  # the step moved them
            err = float(np.abs(move - ref_move).max(initial=0.0))
            assert err <= RTOL * 0.1, f"accum={accum} move of {k}: off by {err}"
