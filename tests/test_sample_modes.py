"""Conditioned sampling: image-to-video, extension, connection, loops and SDEdit, mixed in one
packed call, in pixel and latent space; image guidance; the requests file's new fields; prompt
extension."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxsora import conditioning, prompts, sample
from jaxsora.compression import LatentSpace
from jaxsora.models.dit import make_model
from jaxsora.models.vae import VAEConfig, VideoVAE
from jaxsora.train import dit_config
from tests.conftest import randomize_params, write_ramp_mp4
from tests.test_sample import shared_model_and_config

PIXEL_TOL = 1e-5  # held frames vs the canvas / 255 (the uint8 -> [-1, 1] -> [0, 1] round trip)


def write_png(path, height, width, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "photo": write_png(d / "photo.png", 20, 30, seed=0),
        "a": write_ramp_mp4(d / "a.mp4", 6, 16, 16, phase=10),
        "b": write_ramp_mp4(d / "b.mp4", 5, 16, 24, phase=200),
    }


@pytest.fixture(scope="module")
def model_and_config():
    return shared_model_and_config()


def mode_requests(media):
    R = sample.Request
    return [
        R("a red circle", 3, 8, 12, name="image", seed=1, image=media["photo"]),
        R("a blue square", 4, 12, 8, name="forward", seed=2, extend=media["a"], context_frames=2),
        R("a cat", 3, 8, 8, name="backward", seed=3, extend=media["a"], direction="backward"),
        R("a green cross", 4, 8, 8, name="connect", seed=4, connect=(media["a"], media["b"])),
        R("a white diamond", 3, 8, 8, name="loop", seed=5, image=media["photo"], loop=True),
        R("plain text to video", 2, 8, 8, name="plain", seed=6),
    ]


def assert_holds_its_frames(request, out):
    canvas = conditioning.build_canvas(request)
    if canvas is None:
        return
    known = canvas.known
    assert known.any() and not known.all(), request.name
    np.testing.assert_allclose(
        out[known], canvas.frames[known] / 255.0, atol=PIXEL_TOL, err_msg=request.name
    )
    # The rest is generated: the random model does not copy the fill.
    assert np.abs(out[~known] - canvas.frames[~known] / 255.0).max() > 0.05, request.name


def test_every_mode_holds_its_frames_mixed_in_one_packed_call_and_alone(model_and_config, media):
    model, config = model_and_config
    requests = mode_requests(media)
    canvases = {r.name: conditioning.build_canvas(r) for r in requests}
    assert canvases["forward"].known.tolist() == [True, True, False, False]
    assert canvases["backward"].known.tolist() == [False, False, True]  # 3 // 2 frames
    assert canvases["connect"].known.tolist() == [True, False, False, True]
    assert canvases["loop"].known.tolist() == [True, False, True]
    a = conditioning.read_frames(media["a"], "first", 6)
    np.testing.assert_array_equal(
        canvases["forward"].frames[:2], conditioning.resize_cover(a[-2:], 12, 8)
    )
    np.testing.assert_array_equal(
        canvases["backward"].frames[2:], conditioning.resize_cover(a[:1], 8, 8)
    )
    videos = sample.generate(model, config, requests, steps=2, guidance=2.0)
    for r, v in zip(requests, videos, strict=True):
        assert v.shape == (r.frames, r.height, r.width, 3)
        assert_holds_its_frames(r, v)
    loop = videos[4]
    np.testing.assert_array_equal(loop[-1], loop[0])
    # The same request alone: its conditioned output does not depend on its pack-mates.
    alone = sample.generate(model, config, [requests[1]], steps=2, guidance=2.0)[0]
    np.testing.assert_allclose(alone, videos[1], atol=1e-5)


def test_a_loop_without_a_source_loops_from_the_image_it_generates_first(model_and_config):
    model, config = model_and_config
    r = sample.Request("a red circle", frames=3, height=8, width=8, seed=7, loop=True)
    image = sample.generate(
        model, config, [dataclasses.replace(r, frames=1, loop=False)], steps=2, guidance=2.0
    )[0]
    polled = []
    video = sample.generate(
        model, config, [r], steps=2, guidance=2.0, should_stop=lambda i: polled.append(i) or False
    )[0]
    assert polled == [0, 1, 0, 1], "two passes: the first frame, then the loop"
    np.testing.assert_allclose(video[0], np.round(image[0] * 255) / 255, atol=PIXEL_TOL)
    np.testing.assert_array_equal(video[-1], video[0])


def test_edit_strength_near_zero_keeps_the_video_and_one_ignores_it(
    model_and_config, media, monkeypatch
):
    model, config = model_and_config
    edit = sample.Request("a red circle", 3, 8, 8, seed=8, edit=media["a"], strength=0.01)
    source = conditioning.build_canvas(edit).frames / 255.0
    calls = []
    spied = sample.guided_velocity
    monkeypatch.setattr(
        sample, "guided_velocity", lambda *a, **k: calls.append(1) or spied(*a, **k)
    )
    plain = dataclasses.replace(edit, edit=None, strength=None)
    full = dataclasses.replace(edit, strength=1.0)
    near, ignored, unconditioned = sample.generate(
        model, config, [edit, full, plain], steps=3, guidance=2.0
    )
    assert len(calls) == 3, "steps=N: N model evaluations, whatever the strength"
    assert np.abs(near - source).max() < 0.03
    assert np.abs(ignored - source).max() > 0.2
    np.testing.assert_allclose(ignored, unconditioned, atol=1e-5)  # t=1: the noise alone
    calls.clear()
    sample.generate(model, config, [edit], steps=3, guidance=2.0, solver="heun")
    assert len(calls) == 6


def test_image_guidance_runs_three_passes_with_the_frames_dropped_in_the_first(
    model_and_config, media
):
    """v = v00 + s_img (v0F - v00) + s_txt (vTF - v0F); the (no text, no frames) pass clears
    cond_mask and sees the conditioning tokens noised to t with the request's own noise."""
    model, config = model_and_config
    r = mode_requests(media)[1]  # extend forward
    batch = sample_batch(model, config, r)
    x, t = batch["clean"] * 0.3 + batch["noise"] * 0.7, jnp.full((1, config.data.max_segments), 0.7)
    v = {
        gs: np.asarray(sample.guided_velocity(model, batch, x, t, *gs, three_pass=True))
        for gs in ((0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (3.0, 2.0))
    }
    v00, v0f, vtf = v[0.0, 0.0], v[0.0, 1.0], v[1.0, 1.0]
    np.testing.assert_allclose(v[3.0, 2.0], v00 + 2 * (v0f - v00) + 3 * (vtf - v0f), atol=1e-4)
    # The two unconditional passes are the two-pass guidance at g=0 (the null caption): with
    # the frames held, and with cond_mask cleared and the held tokens noised to t = 0.7.
    cond = batch["cond_mask"]
    free = jnp.where(cond[..., None], 0.3 * batch["clean"] + 0.7 * batch["noise"], x)
    no_frames = {**batch, "cond_mask": jnp.zeros_like(cond)}
    live = np.asarray(batch["segment_ids"] > 0)
    np.testing.assert_allclose(
        v00[live],
        np.asarray(sample.guided_velocity(model, no_frames, free, t, 0.0))[live],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        v0f[live],
        np.asarray(sample.guided_velocity(model, batch, x, t, 0.0))[live],
        atol=1e-5,
    )
    assert np.abs(v0f - v00)[live].max() > 1e-3, "the frames must matter"
    # Through generate: held frames stay exact at any image guidance.
    out = sample.generate(model, config, [r], steps=2, guidance=2.0, image_guidance=1.5)[0]
    assert_holds_its_frames(r, out)


def sample_batch(model, config, r):
    """The device batch generate builds for one request (via its own packing code)."""
    captured = {}
    real = sample.guided_velocity

    def spy(model, batch, *args):
        captured.update(batch)
        raise StopIteration

    sample.guided_velocity = spy
    try:
        with pytest.raises(StopIteration):
            sample.generate(model, config, [r], steps=1, guidance=1.0)
    finally:
        sample.guided_velocity = real
    return captured


# ------------------------------------------------------------------------------- latent space


# The smallest causal VAE of the real kind (4x time, 8x space, 4 channels): its encoder compiles
# in a third of the time of tests/test_latents.py's, and random weights exercise the plumbing.
TINY_VAE = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=0)


def tiny_vae(seed: int = 0) -> VideoVAE:
    """Drawn with NumPy: an eager JAX init compiles one kernel per weight shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(TINY_VAE, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda x: jnp.asarray(rng.uniform(-0.3, 0.3, x.shape), np.float32), state.to_pure_dict()
    )
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def latent_setup(model_and_config):
    """A random causal VAE stage and a DiT of patch (1, 2, 2) on it."""
    _, pixel_config = model_and_config
    config = pixel_config.copy_and_resolve_references()
    config.model.compression, config.model.patch = "vae", (1, 2, 2)
    stage = LatentSpace(tiny_vae(), [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5])
    cfg = dataclasses.replace(dit_config(pixel_config), patch_dim=16)
    return randomize_params(make_model(cfg, seed=0), scale=0.05), config, stage


def test_latent_space_holds_the_conditioning_latents_exactly(latent_setup, media):
    model, config, stage = latent_setup
    R = sample.Request
    requests = [
        R("an image", 5, 16, 16, seed=1, image=media["photo"]),  # latent frame 0 of 2
        R("forward", 9, 16, 16, seed=2, extend=media["a"], context_frames=5),  # 2 of 3
        R("backward", 9, 16, 16, seed=3, extend=media["a"], direction="backward"),  # 4: 1 of 3
        R("a loop", 9, 16, 16, seed=4, image=media["photo"], loop=True),  # first and last
        # Pixels 0-2 and 6-8: latent 1 (pixels 1-4) and 2 (5-8) are only partly known.
        R("connect", 9, 16, 16, seed=5, connect=(media["a"], media["b"]), context_frames=3),
    ]
    held_frames = [[0], [0, 1], [2], [0, 2], [0]]
    latents = sample.generate_latents(model, config, requests, steps=2, guidance=2.0, stage=stage)
    for r, z, held in zip(requests, latents, held_frames, strict=True):
        canvas = conditioning.for_stage(conditioning.build_canvas(r), 4, True)
        clean = stage.to_latents(canvas.frames)
        assert z.shape == clean.shape == (1 + (r.frames - 1) // 4, 2, 2, 4)
        np.testing.assert_array_equal(z[held], clean[held], err_msg=r.name)
        free = [j for j in range(z.shape[0]) if j not in held]
        assert np.abs(z[free] - clean[free]).max() > 0.05, r.name


# ------------------------------------------------------------------------------ requests file


def requests_file(tmp_path, *rows) -> str:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


BASE = {"prompt": "a red circle", "frames": 4, "height": 8, "width": 8}


def test_media_fields_are_read_relative_to_the_requests_file(tmp_path, media):
    (tmp_path / "clips").mkdir()
    write_png(tmp_path / "clips" / "p.png", 8, 8, seed=1)
    path = requests_file(
        tmp_path,
        {**BASE, "image": "clips/p.png"},
        {**BASE, "connect": [media["a"], media["b"]], "context_frames": 2},
        {**BASE, "edit": media["a"], "strength": 1},
        {**BASE, "extend": media["a"], "direction": "backward", "loop": False},
    )
    image, connect, edit, extend = sample.read_requests(path)
    assert image.image == str(tmp_path / "clips" / "p.png")
    assert connect.connect == (media["a"], media["b"]) and connect.context_frames == 2
    assert edit.strength == 1 and extend.direction == "backward"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"image": 3}, "image=3 must be a file path"),
        ({"image": "missing.png"}, "image='missing.png': no such file"),
        ({"extend": "nope.mp4"}, "extend='nope.mp4': no such file"),
        ({"edit": "gone.mp4", "strength": 0.5}, "edit='gone.mp4': no such file"),
        ({"connect": "A"}, "connect='A' must be a list of two video paths"),
        ({"connect": ["A"]}, "must be a list of two video paths"),
        ({"connect": ["A", "B", "C"]}, "must be a list of two video paths"),
        ({"connect": ["{a}", "missing.mp4"]}, "connect='missing.mp4': no such file"),
        ({"extend": "{a}", "direction": "sideways"}, "direction='sideways' must be 'forward' or"),
        ({"direction": "forward"}, "needs extend"),
        ({"extend": "{a}", "context_frames": 0}, "context_frames=0 must be a whole number"),
        ({"extend": "{a}", "context_frames": 1.5}, "context_frames=1.5 must be"),
        ({"extend": "{a}", "context_frames": 5}, "context_frames=5 is more than frames=4"),
        ({"connect": ["{a}", "{b}"], "context_frames": 3}, "more than frames=4"),
        ({"context_frames": 2}, "needs extend or connect"),
        ({"edit": "{a}", "strength": 0}, "strength=0 must be a number in (0, 1]"),
        ({"edit": "{a}", "strength": 1.5}, "strength=1.5 must be"),
        ({"edit": "{a}", "strength": "0.5"}, "strength='0.5' must be"),
        ({"edit": "{a}", "strength": True}, "strength=True must be"),
        ({"strength": 0.5}, "needs edit"),
        ({"loop": "yes"}, "loop='yes' must be true or false"),
        ({"loop": True, "edit": "{a}"}, "not from edit"),
        ({"image": "{p}", "extend": "{a}"}, "image and extend given together"),
        ({"stregth": 0.5}, "did you mean 'strength'"),
    ],
)
def test_a_bad_conditioning_field_is_an_error_naming_the_file_and_line(
    tmp_path, media, extra, needle
):
    fill = {"{a}": media["a"], "{b}": media["b"], "{p}": media["photo"]}
    extra = {
        k: [fill.get(x, x) for x in v]
        if isinstance(v, list)
        else fill.get(v, v)
        if isinstance(v, str)
        else v
        for k, v in extra.items()
    }
    path = requests_file(tmp_path, BASE, {**BASE, **extra})
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2: ") as e:
        sample.read_requests(path)
    assert needle in str(e.value)


def test_an_undecodable_file_fails_before_sampling_naming_the_request_and_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    (r,) = sample.read_requests(requests_file(tmp_path, {**BASE, "name": "x", "extend": str(bad)}))
    with pytest.raises(ValueError, match=rf"request 'x': {re.escape(str(bad))}: cannot decode"):
        sample.load_canvases([r])


# --------------------------------------------------------------------------- prompt extension


def test_the_template_writes_the_synthetic_captions_grammar():
    from data_pipelines.synthetic_clips import synthetic_clips as sc

    grammar = re.compile(
        rf"an? ({'|'.join(sc.COLORS)}) ({'|'.join(sc.SHAPES)})( moving "
        rf"({'|'.join(sc.DIRECTIONS)}))? on an? ({'|'.join(sc.COLORS)}) background"
    )
    for i in range(20):  # the pattern is the builder's grammar
        assert grammar.fullmatch(sc.make_example("train", i)["caption"])
    extend = prompts.get_prompt_extender("template")
    assert extend("red circle") == "a red circle on a blue background"
    assert extend("Orange square moving left over purple") == (
        "an orange square moving left on a purple background"
    )
    assert extend("blue") == "a blue circle on a white background"  # defaults, colours differ
    for p in ("red circle", "a cross moving up", "", "green on yellow", "zebra"):
        assert grammar.fullmatch(extend(p)), p
    assert prompts.get_prompt_extender("identity")("red circle") == "red circle"
    assert prompts.get_prompt_extender("json:dumps")("x") == '"x"'


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("no_such_module_xyz:extend", "cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", "has no attribute 'no_such_function'"),
        ("os:sep", "has a non-callable 'sep'"),
        ("llama", "is not one of ('identity', 'template') or 'package.module:function'"),
    ],
)
def test_a_bad_prompt_extension_is_an_error_naming_it(name, needle):
    with pytest.raises(ValueError, match=re.escape(f"prompt extension {name!r}")) as e:
        prompts.get_prompt_extender(name)
    assert needle in str(e.value)


def test_sampling_extends_every_prompt_before_tokenizing(model_and_config, caplog):
    model, config = model_and_config
    short = sample.Request("red circle", frames=1, height=8, width=8, name="short", seed=9)
    full = dataclasses.replace(short, prompt="a red circle on a blue background")
    with caplog.at_level("INFO"):
        a, b = sample.generate(
            model, config, [short, full], steps=2, guidance=2.0, prompt_extension="template"
        )
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(
        "'red circle' extended to 'a red circle on a blue" in r.getMessage() for r in caplog.records
    )
    c = sample.generate(model, config, [short], steps=2, guidance=2.0)[0]  # identity by default
    assert np.abs(c - a).max() > 1e-3


# ------------------------------------------------------------------------------------ CLI flags


@pytest.fixture
def cli_flags():
    """The sampler's absl flags, parsed from a command line and reset afterwards."""
    from absl import flags
    from absl.testing import flagsaver

    if "connect" not in flags.FLAGS:
        sample.define_flags()
    with flagsaver.flagsaver():

        def parse(*argv):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["sample", "--workdir", "unused", "--prompt", "a cat", *argv])
            return sample.flag_request()

        yield parse
    flags.FLAGS.unparse_flags()


def test_cli_flags_make_the_single_request_checked_like_a_files(cli_flags, media):
    from absl import app

    r = cli_flags("--frames", "4", "--connect", f"{media['a']},{media['b']}")
    assert r.connect == (media["a"], media["b"]) and r.frames == 4
    r = cli_flags("--extend", media["a"], "--direction", "backward", "--context_frames", "1")
    assert (r.extend, r.direction, r.context_frames) == (media["a"], "backward", 1)
    assert cli_flags("--edit", media["a"], "--strength", "0.5").strength == 0.5
    assert cli_flags("--image", media["photo"], "--loop", "--frames", "3").loop
    with pytest.raises(app.UsageError, match="--connect takes two paths"):
        cli_flags("--connect", media["a"])
    with pytest.raises(ValueError, match=r"^flags: --image='nope.png': no such file"):
        cli_flags("--image", "nope.png")
    with pytest.raises(ValueError, match="strength=2.0 must be a number in"):
        cli_flags("--edit", media["a"], "--strength", "2")
