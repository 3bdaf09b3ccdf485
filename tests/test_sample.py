"""Sampling at any size: mixed requests in one packed pass come back in their requested shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsora import sample
from jaxsora.compression import make_stage
from jaxsora.data import packing
from jaxsora.models.dit import make_model
from jaxsora.train import dit_config, null_text_ids, null_text_mask
from tests.conftest import randomize_params, runlocal_config


@pytest.fixture(scope="module")
def model_and_config(tmp_path_factory):
    config = runlocal_config(str(tmp_path_factory.mktemp("unused")))
    return randomize_params(make_model(dit_config(config), seed=0), scale=0.05), config


def test_mixed_sizes_in_one_call_have_the_requested_shapes(model_and_config):
    model, config = model_and_config
    requests = [
        sample.Request("a red circle moving left", frames=5, height=8, width=20, name="wide"),
        sample.Request("a blue square", frames=3, height=24, width=8, name="tall"),
        sample.Request("a cat", frames=1, height=12, width=12, name="image"),
        # Bigger than config.sample.seq_len: the pack grows to fit instead of failing.
        sample.Request("a big one", frames=2, height=64, width=48, name="big"),
    ]
    videos = sample.generate(model, config, requests, steps=2, guidance=2.0)
    for r, v in zip(requests, videos, strict=True):
        assert v.shape == (r.frames, r.height, r.width, 3), r
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1


def test_a_request_alone_and_packed_with_others_gives_the_same_video(model_and_config):
    model, config = model_and_config
    r = sample.Request("a red circle", frames=2, height=8, width=12, seed=3)
    alone = sample.generate(model, config, [r], steps=2, guidance=1.5)[0]
    others = [sample.Request("a green square", frames=3, height=16, width=8, seed=4), r]
    packed = sample.generate(model, config, others, steps=2, guidance=1.5)[1]
    np.testing.assert_allclose(alone, packed, atol=1e-5)
    other_seed = sample.generate(
        model, config, [sample.Request("a red circle", 2, 8, 12, seed=5)], steps=2, guidance=1.5
    )[0]
    assert np.abs(other_seed - alone).max() > 0.05, "the seed must matter"


def test_guidance_extrapolates_from_the_unconditional_to_the_conditional_velocity(
    model_and_config,
):
    """One Euler step at guidance g moves by v_uncond + g (v_cond - v_uncond): g=1 is the
    conditional model alone, g=0 the unconditional one, and the caption makes them differ."""
    model, config = model_and_config
    r = sample.Request("a red circle moving left", frames=2, height=8, width=12, seed=1)
    example = sample.request_example(r, config, model.cfg.patch_dim, make_stage(config.model))
    shape = packing.PackShape(64, 2, model.cfg.patch_dim, config.model.text_len)
    batch = {
        k: jnp.asarray(v)
        for k, v in packing.stack_packs([packing.build_pack([example], shape)]).items()
    }
    t, t_next = jnp.full((1, 2), 0.7), jnp.full((1, 2), 0.6)
    x = batch["tokens"]
    step = {
        g: np.asarray(sample.euler_step(model, batch, x, t, t_next, g)) for g in (0.0, 1.0, 3.0)
    }
    args = (batch["segment_ids"], batch["positions"])
    v_cond = model(x, t, *args, batch["text_ids"], batch["text_mask"])
    v_uncond = model(
        x, t, *args, null_text_ids(batch["text_ids"]), null_text_mask(batch["text_mask"])
    )
    live = np.asarray(batch["segment_ids"][0] > 0)
    for g, v in ((1.0, v_cond), (0.0, v_uncond)):
        expected = np.asarray(x - 0.1 * v)
        np.testing.assert_allclose(step[g][0, live], expected[0, live], atol=1e-5)
    assert np.abs(step[1.0] - step[0.0])[0, live].max() > 1e-3, "the caption must matter"
    np.testing.assert_allclose(
        (step[3.0] - step[1.0])[0, live], 2 * (step[1.0] - step[0.0])[0, live], atol=1e-5
    )


def test_a_size_the_patch_does_not_divide_is_refused_with_a_suggestion(model_and_config):
    _, config = model_and_config
    with pytest.raises(ValueError, match=r"height=10 must be a positive multiple of 4 .*; try 8"):
        sample.request_grid(sample.Request("x", frames=1, height=10, width=8), config)


def test_sampling_polls_for_preemption_every_step(model_and_config):
    model, config = model_and_config
    polled = []

    def stop_at_third(step):
        polled.append(step)
        return step == 2

    r = sample.Request("a red circle", frames=1, height=8, width=8)
    with pytest.raises(sample.SamplingInterrupted, match="step 3 of 5"):
        sample.generate(model, config, [r], steps=5, guidance=1.0, should_stop=stop_at_third)
    assert polled == [0, 1, 2]
