"""Sharding: the step on 8 simulated devices equals the step on 1; compile time is flat in depth."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsora import sharding
from jaxsora import train as trainer
from tests.conftest import run_module_result, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_step_on_8_devices_matches_1_device():
    """On perturbed weights (every gate live), each parameter's gradient on 8 devices equals its
    1-device gradient to 1e-4 of that parameter's own gradient scale."""
    result = run_module_result("tests.sharded_step_check")
    ref = result.pop("reference_loss")
    ref_two = result.pop("reference_two_steps")
    assert set(result) == {"data2_fsdp2_tensor2", "data2_context2_tensor2", "fsdp4_context2"}
    for name, r in result.items():
        assert r["weights_sharded"], f"{name}: weights were not actually sharded"
        assert abs(r["loss"] - ref) <= 1e-5 * abs(ref), (name, r["loss"], ref)
        errors = r["grad_errors"]
        assert len(errors) > 40, f"{name}: only {len(errors)} gradient leaves compared"
        dead = [leaf for leaf, (_, scale) in errors.items() if scale == 0]
        assert not dead, f"{name}: gradients identically zero (a path the loss never sees): {dead}"
        bad = {leaf: e for leaf, e in errors.items() if e[0] > 1e-4 * e[1]}
        assert not bad, f"{name}: gradients differ from 1 device (max diff, scale): {bad}"
    # Two full steps: the update is the same, and the state fits the compiled step again.
    np.testing.assert_allclose(
        result["data2_context2_tensor2"]["two_steps"], ref_two, rtol=1e-5, err_msg="two steps"
    )


def test_logical_rules_map_to_mesh_axes_and_unknown_names_fail():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_mesh(("embed", "mlp"), rules) == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    assert sharding.logical_to_mesh(("batch", "length"), rules) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), "context"
    )
    with pytest.raises(ValueError, match="sharding_rules"):
        sharding.logical_to_mesh(("nonsense",), rules)
    assert sharding.mesh_shape(dict(data=-1, tensor=2), 8) == (4, 1, 1, 2)
    with pytest.raises(ValueError, match="devices"):
        sharding.mesh_shape(dict(data=3), 8)


def lowered_matmuls(depth: int, scan: bool) -> int:
    """dot_general ops in the lowered train step of a runlocal DiT `depth` blocks deep: what XLA
    has to compile. Lowered from shapes alone (nothing is allocated or compiled)."""
    from jaxsora.training import make_optimizer

    config = runlocal_config("unused")
    config.model.depth, config.model.scan_layers = depth, scan
    cfg, tx = trainer.dit_config(config), make_optimizer(config.optim, config.total_steps)
    abstract = nnx.eval_shape(lambda: trainer.TrainState(trainer.make_model(cfg, 0), tx, 0))
    graphdef, state = nnx.split(abstract)
    B, L, S, Lt = config.batch_size, config.data.seq_len, config.data.max_segments, 16
    shapes = {
        "tokens": ((B, L, 48), np.float32),
        "segment_ids": ((B, L), np.int32),
        "positions": ((B, L, 3), np.int32),
        "grid": ((B, S, 3), np.int32),
        "text_ids": ((B, S, Lt), np.int32),
        "text_mask": ((B, S, Lt), bool),
        "cond_mask": ((B, L), bool),
    }
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
    text = trainer.make_step_fn(graphdef, config).lower(state, batch).as_text()
    return text.count("dot_general")


def test_scanned_blocks_compile_one_block_whatever_the_depth():
    """With scan_layers the step holds one block's matmuls at any depth (so compile time does not
    grow with depth: benchmarks/sharded_step.py times it); unrolled, they grow with it."""
    scanned = {d: lowered_matmuls(d, scan=True) for d in (4, 16)}
    unrolled = {d: lowered_matmuls(d, scan=False) for d in (4, 16)}
    assert scanned[4] == scanned[16], scanned
    assert unrolled[16] > 3 * (unrolled[4] - scanned[4]), unrolled


def dit_state_shapes():
    """The runlocal DiT's whole training state (model, EMA, optimizer), as shapes only."""
    from jaxsora.training import make_optimizer

    config = runlocal_config("unused")
    cfg, tx = trainer.dit_config(config), make_optimizer(config.optim, config.total_steps)
    return nnx.state(nnx.eval_shape(lambda: trainer.TrainState(trainer.make_model(cfg, 0), tx, 0)))


def test_weights_a_pod_mesh_does_not_divide_are_reported_and_strict_makes_them_an_error(
    monkeypatch,
):
    """width 32 over fsdp=3 cannot be split: those weights would be whole on every device."""
    state, rules = dit_state_shapes(), sharding.DEFAULT_RULES
    fits = dict(data=1, fsdp=4, context=1, tensor=2)
    specs, replicated = sharding.plan_state_shardings(state, fits, rules)
    assert replicated == []
    assert specs["model"]["blocks"][0]["ada"]["kernel"] == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )

    pod = dict(data=1, fsdp=3, context=1, tensor=2)
    specs, replicated = sharding.plan_state_shardings(state, pod, rules)
    ada = [r for r in replicated if r.path == "model/blocks/0/ada/kernel"]
    assert [(r.shape, r.dim, r.logical, r.axes, r.size) for r in ada] == [
        ((32, 192), 0, "embed", ("fsdp",), 3)
    ]
    # The dimension is dropped from the spec; the one the mesh divides stays sharded.
    assert specs["model"]["blocks"][0]["ada"]["kernel"] == jax.sharding.PartitionSpec(
        None, "tensor"
    )
    assert {r.path.split("/")[0] for r in replicated} == {"model", "ema", "optimizer"}

    warnings = []
    monkeypatch.setattr(sharding.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    sharding.check_replication(replicated, pod, strict=False)
    assert len(warnings) == 1  # once, summarised
    assert "model/blocks/0/ada/kernel (32, 192): dim 0 (embed=32) over fsdp=3" in warnings[0]
    assert "embed=32 over fsdp=3" in warnings[0] and "strict_sharding" in warnings[0]
    with pytest.raises(ValueError, match=r"strict_sharding=True(.|\n)*ada/kernel(.|\n)*Fix"):
        sharding.check_replication(replicated, pod, strict=True)


def test_the_batch_axes_must_split_the_batch_between_processes():
    """Each process feeds its own packs: a batch shard held by two processes would get both."""
    axes, batch = sharding.MESH_AXES, ("data", "fsdp")
    two_by_two = np.arange(4) // 2  # 2 processes x 2 devices, in device order

    # data=2: shard 0 on process 0, shard 1 on process 1.
    assert sharding.batch_split_error(two_by_two.reshape(2, 1, 1, 2), axes, batch) is None
    # data=1, tensor=4: one batch shard, fed by both processes.
    error = sharding.batch_split_error(two_by_two.reshape(1, 1, 1, 4), axes, batch)
    assert "batch shard 0 of 1 sits on devices of processes [0, 1]" in error
    # data=2, tensor=2, but the rules put the batch on tensor: tensor rows cross processes.
    assert "processes [0, 1]" in sharding.batch_split_error(
        two_by_two.reshape(2, 1, 1, 2), axes, ("tensor",)
    )
    # 4 processes, data=2 (each batch shard on 2 processes).
    four = np.arange(4).reshape(2, 1, 1, 2)
    assert "processes [0, 1]" in sharding.batch_split_error(four, axes, batch)
    # Every shard on one process, but process 0 would feed twice as many packs.
    uneven = np.array([0, 0, 1, 2]).reshape(4, 1, 1, 1)
    assert "unequal" in sharding.batch_split_error(uneven, axes, batch)
    # The check on this process's real mesh passes (one process).
    sharding.check_batch_spans_processes(sharding.make_mesh(dict(data=-1)), sharding.DEFAULT_RULES)
