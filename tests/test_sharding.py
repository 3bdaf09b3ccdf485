"""Sharding: the step on 8 simulated devices equals the step on 1; compile time is flat in depth."""

import os
import time

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


def compile_seconds(data_dir, depth):
    config = runlocal_config(data_dir)
    config.model.depth, config.model.scan_layers = depth, True
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    graphdef, state = nnx.split(trainer.create_train_state(config, mesh, rules))
    B, L, S, Lt = config.batch_size, config.data.seq_len, config.data.max_segments, 16
    batch = {
        "tokens": np.zeros((B, L, 48), np.float32),
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.zeros((B, L, 3), np.int32),
        "grid": np.ones((B, S, 3), np.int32),
        "text_ids": np.ones((B, S, Lt), np.int32),
        "text_mask": np.ones((B, S, Lt), bool),
        "cond_mask": np.zeros((B, L), bool),
    }
    start = time.perf_counter()
    # Unoptimised machine code: depth changes how much HLO there is, which is what is measured.
    trainer.make_step_fn(graphdef, config).lower(state, batch).compile(
        {"xla_backend_optimization_level": 0}
    )
    return time.perf_counter() - start


@pytest.mark.slow
def test_compile_time_of_16_layers_is_close_to_4_layers(data_dir):
    compile_seconds(data_dir, 2)  # warm caches shared by both
    t4, t16 = compile_seconds(data_dir, 4), compile_seconds(data_dir, 16)
    # Unrolled, 16 layers compile about 4x longer; scanned, one block is compiled either way.
    assert t16 < 1.5 * t4 + 1.0, (t4, t16)
