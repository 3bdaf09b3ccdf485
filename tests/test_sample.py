"""Sampling at any size: mixed requests in one packed pass come back in their requested shapes."""

import dataclasses
import functools
import re
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxsora import sample
from jaxsora.compression import make_stage
from jaxsora.data import packing
from jaxsora.diffusion import flow
from jaxsora.models.dit import make_model
from jaxsora.models.tokenizer import caption_words, tokenize
from jaxsora.train import dit_config, null_text_mask
from tests.conftest import randomize_params, runlocal_config


@functools.cache
def shared_model_and_config():
    """One randomized runlocal model for every sampling test module: the jitted sampler's
    compilations are kept between modules only for the same model."""
    config = runlocal_config("unused")  # the data dir is never read
    return randomize_params(make_model(dit_config(config), seed=0), scale=0.05), config


@pytest.fixture(scope="module")
def model_and_config():
    return shared_model_and_config()


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
    """The guided velocity at guidance g is v_uncond + g (v_cond - v_uncond): g=1 is the
    conditional model alone, g=0 the unconditional one, and the caption makes them differ; one
    Euler step of flow.solver_step moves by dt times it."""
    model, config = model_and_config
    r = sample.Request("a red circle moving left", frames=2, height=8, width=12, seed=1)
    example = sample.request_example(r, config, model.cfg.patch_dim, make_stage(config.model))
    shape = packing.PackShape(  # generate's pack shape: its compiled velocity is reused
        config.sample.seq_len, config.data.max_segments, model.cfg.patch_dim, config.model.text_len
    )
    batch = {
        k: jnp.asarray(v)
        for k, v in packing.stack_packs([packing.build_pack([example], shape)]).items()
    }
    S = config.data.max_segments
    t, t_next = jnp.full((1, S), 0.7), jnp.full((1, S), 0.6)
    x = batch["tokens"]
    v = {g: np.asarray(sample.guided_velocity(model, batch, x, t, g)) for g in (0.0, 1.0, 3.0)}
    call = nnx.jit(
        lambda m, ids, mask: m(x, t, batch["segment_ids"], batch["positions"], ids, mask)
    )
    v_cond = call(model, batch["text_ids"], batch["text_mask"])
    v_uncond = call(model, batch["text_ids"], null_text_mask(batch["text_mask"]))
    live = np.asarray(batch["segment_ids"][0] > 0)
    for g, expected in ((1.0, v_cond), (0.0, v_uncond)):
        np.testing.assert_allclose(v[g][0, live], np.asarray(expected)[0, live], atol=1e-5)
    assert np.abs(v[1.0] - v[0.0])[0, live].max() > 1e-3, "the caption must matter"
    np.testing.assert_allclose(
        (v[3.0] - v[1.0])[0, live], 2 * (v[1.0] - v[0.0])[0, live], atol=1e-5
    )
    step = flow.solver_step(
        lambda x, t: jnp.asarray(v[3.0]), x, t, t_next, batch["segment_ids"], "euler"
    )
    np.testing.assert_allclose(
        np.asarray(step)[0, live], np.asarray(x - 0.1 * v[3.0])[0, live], atol=1e-5
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
    with pytest.raises(sample.SamplingInterrupted, match="euler step 3 of 5"):
        sample.generate(model, config, [r], steps=5, guidance=1.0, should_stop=stop_at_third)
    assert polled == [0, 1, 2]


# ------------------------------------------------------------------------------- requests file

GOOD = '{"prompt": "a red circle", "frames": 4, "height": 8, "width": 8, "name": "first"}'


def requests_file(tmp_path, *lines: str) -> str:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_unnamed_requests_are_named_after_their_lines_so_none_is_overwritten(tmp_path):
    unnamed = '{"prompt": "a cat", "frames": 1, "height": 8, "width": 8}'
    path = requests_file(tmp_path, GOOD, unnamed, "", unnamed, unnamed, unnamed)
    requests = sample.read_requests(path)
    assert [r.name for r in requests] == ["first", "line002", "line004", "line005", "line006"]


def test_two_requests_writing_the_same_files_name_both_lines(tmp_path):
    same = '{"prompt": "a cat", "frames": 1, "height": 8, "width": 8, "name": "first.mp4"}'
    path = requests_file(tmp_path, GOOD, "", same)
    with pytest.raises(ValueError, match=rf"^{path}:1 and {path}:3 both write 'first'"):
        sample.read_requests(path)


def test_a_name_may_hold_subfolders_inside_out_dir(tmp_path):
    line = '{"prompt": "a cat", "frames": 1, "height": 8, "width": 8, "name": "cats/01"}'
    (request,) = sample.read_requests(requests_file(tmp_path, line))
    assert request.name == "cats/01"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "a cat", "frames": 1,', "not valid JSON"),
        ('["a cat", 1, 8, 8]', "a request is a JSON object"),
        ('{"prompt": "a cat", "frames": "4", "height": 8, "width": 8}', "frames='4' must be a"),
        ('{"prompt": "a cat", "frames": 4.0, "height": 8, "width": 8}', "frames=4.0 must be a"),
        ('{"prompt": "a cat", "frames": 1, "height": -8, "width": 8}', "height=-8 must be a"),
        ('{"prompt": "a cat", "frames": 1, "height": 8, "width": true}', "width=True must be"),
        ('{"prompt": "a cat", "frames": 1, "height": 8, "width": 8, "seed": -1}', "seed=-1"),
        ('{"prompt": "a cat", "frame": 1, "height": 8, "width": 8}', "did you mean 'frames'"),
        ('{"prompt": "a cat", "frames": 1, "height": 8}', "missing ['width']"),
        ('{"prompt": 5, "frames": 1, "height": 8, "width": 8}', "prompt=5 must be a string"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": "../x"}', "name='../x'"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": "/tmp/x"}', "inside"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": "a/../../b"}', "inside"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": ""}', "name=''"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": "a//b"}', "inside"),
        ('{"prompt": "x", "frames": 1, "height": 8, "width": 8, "name": 3}', "name=3 must be"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path, line, needle):
    path = requests_file(tmp_path, GOOD, line)
    with pytest.raises(ValueError, match=rf"^{path}:2: ") as e:
        sample.read_requests(path)
    assert needle in str(e.value)


def test_a_prompt_the_tokenizer_cannot_read_is_warned_about_by_name(tmp_path, caplog):
    line = '{"prompt": "🙂 !!", "frames": 1, "height": 8, "width": 8, "name": "emoji"}'
    path = requests_file(tmp_path, GOOD, line)
    with caplog.at_level("WARNING"):
        sample.read_requests(path)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{path}:2: request 'emoji'" in warning and "unconditional" in warning


# ---------------------------------------------------------------------------------- tokenizer


def former_tokenize(caption: str, text_len: int, vocab_size: int) -> np.ndarray:
    """The ASCII-only tokenizer every trained model and built dataset so far used."""
    words = re.findall(r"[a-z0-9]+", caption.lower())[: text_len - 1]
    ids = np.zeros((text_len,), np.int32)
    ids[0] = 1
    for i, word in enumerate(words, start=1):
        ids[i] = 2 + zlib.crc32(word.encode()) % (vocab_size - 2)
    return ids


def test_ascii_captions_keep_exactly_their_former_ids():
    caption = "A red circle, moving LEFT on a_blue background (2x)!"
    golden = [1, 707, 1937, 163, 180, 268, 2030, 707, 590, 584, 1180, 0, 0, 0, 0, 0]
    assert tokenize(caption, 16, 2048)[0].tolist() == golden
    rng = np.random.default_rng(0)
    for _ in range(500):  # every ASCII character, punctuation and control ones included
        caption = "".join(map(chr, rng.integers(0, 128, rng.integers(0, 60))))
        ids, mask = tokenize(caption, 12, 512)
        np.testing.assert_array_equal(ids, former_tokenize(caption, 12, 512), err_msg=caption)
        np.testing.assert_array_equal(mask, ids != 0)


def test_non_ascii_words_are_read_not_dropped():
    assert caption_words("Un café à Paris") == ["un", "café", "à", "paris"]
    assert caption_words("cafe\u0301") == ["café"]  # decomposed accent: NFKC composes it
    assert caption_words("Красный круг") == ["красный", "круг"]
    assert caption_words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in the word
    assert caption_words("红色的猫") == ["红", "色", "的", "猫"]  # no spaces: a word each
    assert caption_words("ｆｕｌｌ width") == ["full", "width"]
    assert caption_words("🙂 !!") == []
    ids, _ = tokenize("un café", 8, 2048)
    assert ids[2] != tokenize("un caf", 8, 2048)[0][2]
    assert (tokenize("红色的猫", 8, 2048)[1]).sum() == 5  # start + 4 words


def test_a_run_with_a_frozen_text_encoder_samples_from_its_embeddings(tmp_path):
    """text.encoder=minilm: prompts are embedded by MiniLM (the pack carries text_emb), an
    image prompt is held exactly, and the prompt steers the sample."""
    config = runlocal_config("unused", "runlocal,text=minilm")
    model = randomize_params(make_model(dit_config(config), seed=0), scale=0.05)
    assert model.cfg.text_embed_dim == 384
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "still.png")
    r = sample.Request("a red circle", 3, 8, 12, image=str(tmp_path / "still.png"), seed=2)
    out = sample.generate(
        model, config, [r, dataclasses.replace(r, prompt="a blue cross")], steps=2, guidance=2.0
    )
    np.testing.assert_allclose(out[0][0], image / 255.0, atol=1e-5)
    assert np.abs(out[0][1:] - out[1][1:]).max() > 1e-3, "the prompt must matter"
