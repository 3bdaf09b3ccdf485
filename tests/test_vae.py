"""The causal video VAE: causality, images as one-frame videos, chunked == whole, tiling, shapes,
bad shapes, and its trainer (loss falls, resume is bitwise exact, a data-parallel step matches
one device)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsora.models.vae import BadShapeError, VAEConfig, make_vae
from jaxsora.vae_inference import Tiling, VaeCodec, blend_weights, tile_starts
from tests.conftest import REPO, run_module_result

SMALL = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def model():
    return make_vae(SMALL, seed=3)


# Jitted: op-by-op, a conv VAE is slow enough to dominate the suite.
encode = nnx.jit(lambda m, v: m.encode(v))
decode = nnx.jit(lambda m, z: m.decode(z))


def clip(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def latent_frame_of(frame: int) -> int:
    """Pixel frame 0 is latent frame 0; frames 4k-3..4k are latent frame k."""
    return 0 if frame == 0 else (frame + 3) // 4


def test_changing_frame_k_changes_no_earlier_latent(model):
    video = clip((1, 13, 16, 24, 3))
    base, _ = encode(model, video)
    for k in (0, 1, 4, 5, 8, 12):
        changed, _ = encode(model, video.at[:, k].set(-video[:, k]))
        first = latent_frame_of(k)
        np.testing.assert_array_equal(np.asarray(changed[:, :first]), np.asarray(base[:, :first]))
        assert not np.allclose(changed[:, first], base[:, first]), f"frame {k} had no effect"


def test_latent_frames_have_zero_gradient_from_later_frames(model):
    """The same property through the math: d latent_j / d frame_k == 0 for every k after j."""
    video = clip((1, 9, 16, 16, 3))
    for j in range(3):
        grad = nnx.jit(jax.grad(lambda v, j=j: jnp.sum(model.encode(v)[0][:, j] ** 2)))(video)
        per_frame = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3, 4))
        last_input = 0 if j == 0 else 4 * j
        assert np.all(per_frame[last_input + 1 :] == 0.0), per_frame
        assert per_frame[last_input] > 0


def test_decoder_is_causal_too(model):
    z = clip((1, 4, 2, 3, SMALL.z_dim), seed=1)
    base = decode(model, z)
    changed = decode(model, z.at[:, 2].add(1.0))
    # Latent frame 2 decodes to pixel frames 5..8; frames 0..4 must not move.
    np.testing.assert_array_equal(np.asarray(changed[:, :5]), np.asarray(base[:, :5]))
    assert not np.allclose(changed[:, 5], base[:, 5])


def test_an_image_encodes_like_the_first_frame_of_a_video(model):
    video = clip((2, 9, 24, 16, 3))
    image_mean, image_logvar = encode(model, video[:, :1])
    video_mean, video_logvar = encode(model, video)
    # Equal up to float rounding (the convs run over different tensor sizes): 1e-5.
    np.testing.assert_allclose(image_mean[:, 0], video_mean[:, 0], atol=1e-5)
    np.testing.assert_allclose(image_logvar[:, 0], video_logvar[:, 0], atol=1e-5)
    np.testing.assert_allclose(
        decode(model, image_mean), decode(model, video_mean)[:, :1], atol=1e-5
    )


@pytest.mark.parametrize("frames,height,width", [(1, 8, 8), (5, 16, 40), (9, 40, 16), (13, 24, 24)])
def test_shapes_for_several_aspect_ratios_and_durations(model, frames, height, width):
    mean, logvar = encode(model, clip((1, frames, height, width, 3)))
    expected = (1, 1 + (frames - 1) // 4, height // 8, width // 8, SMALL.z_dim)
    assert mean.shape == logvar.shape == expected
    assert SMALL.latent_shape(frames, height, width) == expected[1:]
    assert decode(model, mean).shape == (1, frames, height, width, 3)


@pytest.mark.parametrize(
    "shape,needle",
    [((1, 6, 16, 16, 3), "T = 1 + 4k"), ((1, 5, 20, 16, 3), "H=20"), ((1, 5, 16, 4, 3), "W=4")],
)
def test_a_bad_shape_names_the_dimension_and_the_fix(model, shape, needle):
    with pytest.raises(BadShapeError, match="trim|crop") as e:
        encode(model, clip(shape))
    assert needle in str(e.value)


def test_chunked_encode_and_decode_equal_the_whole_clip(model):
    """Stated tolerance: 1e-5 absolute (measured 5e-7 on latents, 5e-6 on pixels). 13 frames in
    chunks of 2 latent frames: frame 0 alone, a full chunk, then a short last chunk."""
    video = clip((1, 13, 16, 24, 3))
    mean, _ = encode(model, video)
    whole = np.clip(np.asarray(decode(model, mean)), -1, 1)
    codec = VaeCodec(model, Tiling(chunk_latent_frames=2))
    np.testing.assert_allclose(codec.encode(np.asarray(video)), mean, atol=1e-5)
    np.testing.assert_allclose(codec.decode(np.asarray(mean)), whole, atol=1e-5)


def test_tiles_cover_the_frame_and_their_weights_crossfade():
    assert tile_starts(20, 8, 4) == [0, 4, 8, 12]
    assert tile_starts(21, 8, 2) == [0, 6, 12, 13]
    assert tile_starts(6, 8, 2) == [0]
    total = np.zeros(21)
    for s in tile_starts(21, 8, 2):
        total[s : s + 8] += blend_weights(8, s, 8, 21, 2)
    assert total.min() > 0.3  # every position is covered with weight
    w = blend_weights(8, 6, 8, 21, 2)
    assert w[0] < w[1] < w[2] == 1.0 and w[-1] < w[-2] < 1.0


def local_copy(model):
    """The same network with no spatial context: 3x3 kernels keep only their centre tap and the
    per-frame attention adds nothing. Tiles then see all they need, so tiling must be exact:
    a test of the tiling arithmetic (placement, scale, blending) on its own."""
    graphdef, state = nnx.split(model)

    def centre(path, x):
        name = jax.tree_util.keystr(path)
        if "kernel" in name and x.ndim >= 4 and x.shape[-3] == 3:  # a 3x3 window
            mask = np.zeros((3, 3), np.float32)
            mask[1, 1] = 1.0
            return x * jnp.asarray(mask).reshape((1,) * (x.ndim - 4) + (3, 3, 1, 1))
        if "attentions" in name and "proj" in name:
            return jnp.zeros_like(x)
        return x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(centre, state))


def test_tiled_encode_and_decode_are_exact_without_spatial_context(model):
    local = local_copy(model)
    video = clip((1, 5, 64, 48, 3), seed=4)
    whole = VaeCodec(local)
    tiled = VaeCodec(local, Tiling(chunk_latent_frames=1, tile_latent=(4, 3), tile_overlap=2))
    z = whole.encode(np.asarray(video))
    np.testing.assert_allclose(tiled.encode(np.asarray(video)), z, atol=1e-5)
    np.testing.assert_allclose(tiled.decode(z), whole.decode(z), atol=1e-5)


def test_one_tile_covering_the_clip_is_the_whole_clip(model):
    video = clip((1, 5, 32, 24, 3), seed=5)
    whole = VaeCodec(model)
    big_tile = VaeCodec(model, Tiling(tile_latent=(4, 3), tile_overlap=1))
    np.testing.assert_array_equal(
        big_tile.encode(np.asarray(video)), whole.encode(np.asarray(video))
    )


# ---------------------------------------------------------------------------------- training


def vae_config(data_dir, arg="runlocal"):
    from experiments import vae_tiny

    c = vae_tiny.get_config(arg)
    c.data.data_dir = data_dir
    return c


def test_a_few_training_steps_reduce_the_reconstruction_loss(data_dir):
    from jaxsora import train_vae

    c = vae_config(data_dir)
    # Images alone (one-frame videos, the cheapest graph to compile): the loss, not the shapes,
    # is under test here.
    c.data.buckets = [dict(frames=1, height=16, width=16, videos=0, images=4)]
    c.optim.lr, c.optim.warmup_steps = 3e-3, 1
    batches = train_vae.vae_data.make_vae_batches(c)
    batch = {k: jnp.asarray(v) for k, v in batches.batch_at(0).items()}
    state = train_vae.VaeTrainState(c)
    step = nnx.jit(lambda s, b: train_vae.train_step(s, b, c))
    l1 = [float(step(state, batch)["image_l1"]) for _ in range(20)]
    assert np.mean(l1[-3:]) < 0.85 * np.mean(l1[:3]), l1


def run_train_vae(workdir, data_dir, cache_dir, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "jaxsora.train_vae",
        "--config",
        # One bucket: a batch is a pure function of (seed, step), so a second bucket adds a
        # compile (18 s of ~50) and nothing the resume could get wrong.
        "experiments/vae_tiny.py:runlocal,steps=4,onebucket",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *overrides,
    ]
    # Three runs compile the same steps: a shared compilation cache compiles them once.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f) if "loss" in row}


@pytest.mark.slow
def test_vae_resume_in_a_fresh_process_matches_the_uninterrupted_run_bitwise(data_dir, tmp_path):
    from jaxsora.vae_dir import load_vae_dir

    cache = str(tmp_path / "jax_cache")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train_vae(straight, data_dir, cache)
    run_train_vae(resumed, data_dir, cache, "--config.stop_after=2")
    assert sorted(metrics(resumed)) == [1, 2]
    assert not os.path.exists(os.path.join(resumed, "vae")), "exported before the end"
    second = run_train_vae(resumed, data_dir, cache)
    assert "resumed from" in second.stderr
    a, b = metrics(straight), metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
    m1, mean1, std1 = load_vae_dir(straight + "/vae")
    m2, mean2, _ = load_vae_dir(resumed + "/vae")
    for x, y in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(mean1), np.asarray(mean2))
    assert np.all(np.asarray(std1) > 0)


@pytest.mark.slow
def test_vae_train_step_on_a_data_parallel_mesh_matches_one_device():
    result = run_module_result("tests.vae_sharded_check")
    for name in ("loss", "video_l1", "video_ssim", "grad_norm"):
        one, many = result["one"][name], result["mesh"][name]
        assert abs(one - many) <= 1e-5 * max(1.0, abs(one)), (name, one, many)
    assert result["param_max_diff"] < 1e-5


@pytest.mark.slow
def test_the_adversarial_flag_trains_a_discriminator_beside_the_vae(data_dir):
    from jaxsora import train_vae

    c = vae_config(data_dir, "runlocal,adv")
    c.loss.adversarial_start = 1  # step 0 without the term, step 1 with it
    c.data.buckets = [dict(frames=1, height=16, width=16, videos=0, images=2)]
    batch = {
        k: jnp.asarray(v) for k, v in train_vae.vae_data.make_vae_batches(c).batch_at(0).items()
    }
    state = train_vae.VaeTrainState(c)
    disc_before = jax.tree.map(np.asarray, nnx.state(state.disc, nnx.Param))
    step = nnx.jit(lambda s, b: train_vae.train_step(s, b, c))
    first, second = step(state, batch), step(state, batch)
    assert np.isfinite(float(first["d_loss"])) and np.isfinite(float(second["g_adv"]))
    # Before adversarial_start the generator loss does not include the term; after, it does.
    recon_only = c.loss.l1 * second["image_l1"] + c.loss.ssim * (1 - second["image_ssim"])
    recon_only += c.loss.kl * second["image_kl"]
    np.testing.assert_allclose(
        float(second["loss"]),
        float(recon_only + c.loss.adversarial_weight * second["g_adv"]),
        rtol=1e-5,
    )
    disc_after = jax.tree.map(np.asarray, nnx.state(state.disc, nnx.Param))
    changed = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(a != b))),
        disc_before,
        disc_after,
    )
    kernels = [
        c
        for name, c in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple))
        if "kernel" in name
    ]
    # (The head's bias may stay put: with every logit inside the hinge margin its gradient is
    # mean(-1 over reals) + mean(+1 over fakes) = 0.)
    assert kernels and all(kernels), changed


def test_the_vae_export_is_atomic_and_a_partial_one_counts_as_absent(model, tmp_path, monkeypatch):
    """A crash mid-export once left a `vae/` that every rerun took for a finished export."""
    from jaxsora import train_vae
    from jaxsora.vae_dir import CONFIG_FILE, load_vae_dir

    workdir = str(tmp_path)
    real_save = train_vae.save_vae_dir

    def crash_after_the_weights(model, stats, directory, **kw):
        real_save(model, stats, directory, **kw)
        os.remove(os.path.join(directory, CONFIG_FILE))  # killed before the JSON was written
        raise OSError("planted crash mid-export")

    monkeypatch.setattr(train_vae, "save_vae_dir", crash_after_the_weights)
    with pytest.raises(OSError, match="planted"):
        train_vae.export_vae(model, ([0.0] * 4, [1.0] * 4), workdir)
    assert not os.path.exists(os.path.join(workdir, "vae"))  # nothing a loader could take
    assert not train_vae._exported(workdir)
    monkeypatch.undo()
    os.makedirs(os.path.join(workdir, "vae", "params"))  # an older version's partial export
    assert not train_vae._exported(workdir)

    for mean in (0.5, 0.25):  # the rerun exports; a later one (more training) replaces it
        train_vae.export_vae(model, ([mean] * 4, [1.0] * 4), workdir)
        assert train_vae._exported(workdir)
        _, latents_mean, _ = load_vae_dir(os.path.join(workdir, "vae"))
        assert list(latents_mean) == [mean] * 4
    assert sorted(os.listdir(workdir)) == ["vae"]  # no partial or replaced copy is left
