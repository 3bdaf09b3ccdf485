"""The model family (experiments/dit_video.py) and `python -m jaxsora.params`: the abstract
parameter count is the built model's, the sizes grow as the DiT paper's do, and the per-token
FLOPs are the traced forward pass's matmuls."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import dit_video
from jaxsora import params
from jaxsora.models.dit import make_model
from tests.flop_count import matmul_flops


def _real_count(cfg) -> int:
    model = make_model(cfg, 0)
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("arg", ["size=S,patch=2", "size=S,patch=4", "runlocal"])
def test_the_abstract_count_is_the_built_models(arg):
    cfg = params.dit_config_of(dit_video.get_config(arg), channels=16)
    counts = params.param_counts(cfg)
    assert counts["total"] == _real_count(cfg)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_the_family_grows_like_dits_and_the_3b_model_is_3b(capsys):
    totals = {}
    for size, (width, depth, *_) in dit_video.SIZES.items():
        line = params.summary(dit_video.get_config(f"size={size}"), channels=16)
        totals[size] = line["params"]
        # DiT's blocks (attention 4 D^2, MLP 8 D^2, adaLN 6 D^2) plus cross-attention (4 D^2)
        blocks = line["params_by_module"]["blocks"]
        assert abs(blocks / (depth * 22 * width**2) - 1) < 0.01, (size, blocks)
    assert totals["S"] < totals["B"] < totals["L"] < totals["XL"] < totals["3B"]
    assert 2.5e9 < totals["3B"] < 3.5e9
    params.main(["--config", "experiments/dit_video.py:size=3B", "--channels", "16"])
    line = json.loads(capsys.readouterr().out)
    assert line["params"] == totals["3B"] and line["mesh"]["fsdp"] == 32
    with pytest.raises(SystemExit, match="pass --channels"):
        params.main(["--config", "experiments/dit_video.py:size=S,vae_dir=/nonexistent"])


def test_flops_per_token_are_the_traced_forward_matmuls():
    config = dit_video.get_config("runlocal")
    cfg = params.dit_config_of(config)
    n, m = 48, config.model.text_len
    model = make_model(cfg, 0)
    graphdef, state = nnx.split(model)
    inputs = (
        jnp.zeros((1, n, cfg.patch_dim)),
        jnp.full((1, 1), 0.5),
        jnp.ones((1, n), jnp.int32),
        jnp.zeros((1, n, 3), jnp.int32),
        jnp.ones((1, 1, m), jnp.int32),
        jnp.ones((1, 1, m), bool),
    )
    traced = matmul_flops(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *inputs)
    # per-token time runs the per-segment layers for t and for 0: flops.py counts both
    per_token = params.per_token_flops(cfg, n, m)
    assert np.isclose(per_token["forward"] * n, traced, rtol=0), (per_token["forward"] * n, traced)
    assert per_token["train_step"] > 2.9 * per_token["forward"]
