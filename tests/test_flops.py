"""Model and hardware FLOPs (jaxsora/flops.py) against counts that do not share its formulas:
the matmuls in the traced train step, XLA's cost analysis of the compiled step, and the sum over
each segment run alone."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.common import synthetic_batch
from experiments import tiny
from jaxsora import flops, sharding
from jaxsora import train as trainer
from tests.flop_count import matmul_flops


def step_and_state(config):
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    graphdef, state = nnx.split(trainer.create_train_state(config, mesh, rules))
    return trainer.make_step_fn(graphdef, config), state


def traced_step_flops(config, batch, cond_branch: int | None = None) -> int:
    step_fn, state = step_and_state(config)
    return matmul_flops(step_fn, state, batch, cond_branch=cond_branch)


def loss_einsum_flops(batch) -> int:
    """The loss's per-segment average is an einsum of 2*B*L*S FLOPs, and its transpose as many:
    the one matmul of the step that is not the model's (a hundred-thousandth of it)."""
    B, L = batch["segment_ids"].shape
    return 2 * 2 * B * L * batch["grid"].shape[1]


@pytest.mark.parametrize(
    "remat,scan,text",
    [
        ("none", False, "hashed"),
        ("full", True, "hashed"),
        ("dots", True, "minilm"),
        ("none", True, "class"),
    ],
)
def test_hardware_count_is_every_matmul_of_the_traced_step(remat, scan, text):
    """`minilm`: the frozen encoder's embeddings come in the pack, projected by the DiT.
    `class`: the original-DiT configuration (experiments/dit_image.py): no captions, no
    cross-attention, twice the output channels."""
    if text == "class":
        from experiments import dit_image

        config = dit_image.get_config()
    else:
        config = tiny.get_config(f"text={text}")
    config.model.remat, config.model.scan_layers, config.model.depth = remat, scan, 2
    batch = synthetic_batch(config)
    counted = flops.train_step_flops(trainer.dit_config(config), batch).hardware
    # The windowed backend's cross-attention takes its windows on these packs (its cond's true
    # branch), and its self-attention is dense at this length (tests/test_windowed.py).
    traced = traced_step_flops(config, batch, cond_branch=1)
    assert traced == counted + loss_einsum_flops(batch), (counted, traced)


@pytest.mark.slow
def test_hardware_count_agrees_with_xla_cost_analysis():
    """XLA also counts elementwise work (norms, softmax, GELU, AdamW), which the matmul count
    leaves out: measured 4.3% on top for the tiny config (1.043x)."""
    config = tiny.get_config()
    # XLA adds up every branch of a conditional (the windowed backend's fallback), so this
    # compares the plain dense path.
    config.model.attention = "xla"
    batch = synthetic_batch(config)
    step_fn, state = step_and_state(config)
    # LLVM's optimisation level changes the machine code, not the HLO that XLA counts.
    compiled = step_fn.lower(state, batch).compile({"xla_backend_optimization_level": 0})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    counted = flops.train_step_flops(trainer.dit_config(config), batch).hardware
    assert 1.0 <= cost["flops"] / counted <= 1.08, (cost["flops"], counted)


def alone(batch, b, k):
    """Segment k of pack b as a batch of its own: exactly its tokens and its caption's tokens."""
    rows = batch["segment_ids"][b] == k
    m = int(batch["text_mask"][b, k - 1].sum())
    return {
        "tokens": batch["tokens"][b, rows][None],
        "segment_ids": np.ones((1, int(rows.sum())), np.int32),
        "positions": batch["positions"][b, rows][None],
        "grid": batch["grid"][b, k - 1][None, None],
        "text_ids": batch["text_ids"][b, k - 1, :m][None, None],
        "text_mask": np.ones((1, 1, m), bool),
        "cond_mask": np.zeros((1, int(rows.sum())), bool),
    }


def test_model_count_is_the_work_of_each_segment_run_alone():
    """Model FLOPs of packs == the traced matmuls of every segment in a batch of its own, with no
    padding and no other segment's caption: the work the examples need, whoever packs them."""
    config = tiny.get_config("runlocal")
    batch = synthetic_batch(config, seed=3)
    cfg = trainer.dit_config(config)
    step_fn, state = step_and_state(config)
    traced = 0
    for b in range(batch["segment_ids"].shape[0]):
        for k in np.unique(batch["segment_ids"][b][batch["segment_ids"][b] > 0]):
            one = alone(batch, b, int(k))
            traced += matmul_flops(step_fn, state, one) - loss_einsum_flops(one)
    counted = flops.train_step_flops(cfg, batch)
    assert traced == counted.model, (traced, counted.model)
    segments = sum(len(np.unique(s[s > 0])) for s in batch["segment_ids"])
    assert segments >= 2 * len(batch["segment_ids"]), "packs must hold several segments"
    assert counted.hardware > 1.3 * counted.model, "dense attention and padding cost extra"


def test_splash_count_is_the_kernels_own_tile_mask():
    from jaxsora.models.splash import computed_tiles

    rng = np.random.default_rng(0)
    for _ in range(5):
        sizes = rng.integers(1, 200, size=8)
        ids = np.concatenate([np.full(n, k + 1) for k, n in enumerate(sizes)])[:1024]
        seg = np.zeros((1, 1024), np.int32)
        seg[0, : len(ids)] = ids
        assert flops.splash_tiles(seg) == computed_tiles(jnp.asarray(seg), jnp.asarray(seg))
    config = tiny.get_config()
    config.model.attention = "splash"
    batch = synthetic_batch(config)
    cfg = trainer.dit_config(config)
    dense = flops.hardware_work(batch["segment_ids"], batch["text_mask"], "xla")
    tiled = flops.hardware_work(batch["segment_ids"], batch["text_mask"], "splash")
    assert tiled.self_pairs < dense.self_pairs
    assert flops.step_flops(cfg, tiled) < flops.step_flops(cfg, dense)
