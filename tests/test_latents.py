"""Latent space: the VAE stage, the latent cache (encoded once, round-trips, sharded over
devices, bad media skipped), the DiT pipeline reading it without the encoder, VAE identity
checks, and a DiT trained and sampled in latent space.

A small random VAE (4x time, 8x space, 4 latent channels) stands in for a trained one: every
property here is about plumbing and shapes, which random weights exercise fully.
"""

import dataclasses
import json
import os
import re
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from data_pipelines.build import build
from jaxsora import compression, sample
from jaxsora import train as trainer
from jaxsora.compression import LatentSpace, VaeMismatchError, make_stage
from jaxsora.data import latent_records, pipeline, video
from jaxsora.data.media import decode_example
from jaxsora.models.vae import BadShapeError, VAEConfig, VideoVAE
from tests.conftest import REPO, run_module_result, write_ramp_mp4

VAE_CFG = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
STATS = ([0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5])
# Cached latents vs a fresh one-clip encode: batched and sharded encodes may round differently
# from one-clip ones (measured: bitwise equal on this CPU). Decoding the two must agree as well.
TOLERANCE = 1e-5


def random_vae(seed: int) -> VideoVAE:
    """`make_vae`'s init drawn with NumPy: the eager JAX init compiles one kernel per weight
    shape (30+ compiles, half a minute on 2 busy cores); this compiles nothing."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoVAE(VAE_CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "gamma" in jax.tree_util.keystr(path):
            return jax.numpy.ones(x.shape, np.float32)
        bound = 1 / np.sqrt(np.prod(x.shape[:-1]) if len(x.shape) > 1 else 16)
        return jax.numpy.asarray(rng.uniform(-bound, bound, x.shape), np.float32)

    values = jax.tree_util.tree_map_with_path(draw, state.to_pure_dict())
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def save_vae(path, seed=0, stats=STATS) -> str:
    from jaxsora.vae_dir import save_vae_dir

    save_vae_dir(random_vae(seed), stats, str(path))
    return str(path)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    return save_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def stage(vae_dir) -> LatentSpace:
    return make_stage("vae", vae_dir)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, vae_dir) -> str:
    """video_folder (two 9-frame clips of one size, a photo, a corrupt file) and its latents.

    Few pixel shapes on purpose: the encoder compiles once per shape.
    """
    folder = tmp_path_factory.mktemp("media")
    write_ramp_mp4(folder / "clip_a.mp4", 9, 32, 48, phase=0)
    write_ramp_mp4(folder / "clip_b.mp4", 12, 32, 48, phase=3)  # 12 frames: cut to 9 (1 + 4k)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 24, 3), np.uint8)).save(
        folder / "photo.png"
    )
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    data_dir = str(tmp_path_factory.mktemp("tfds_latents"))
    build("video_folder", data_dir, folder=str(folder))
    build("latents:video_folder", data_dir, vae_dir=vae_dir)
    return data_dir


def records(data_dir, name="latents/video_folder", split="train"):
    src = tfds.data_source(name, split=split, data_dir=data_dir)
    return src, [src[i] for i in range(len(src))]


def latent_config(data_dir, vae_dir, arg="runlocal"):
    from experiments import latent_tiny

    c = latent_tiny.get_config(arg)
    c.data.data_dir, c.model.vae_dir = data_dir, vae_dir
    c.data.sources = [dict(name="latents/video_folder", weight=1.0)]
    return c


class FakeStage:
    """The factors of the VAE stage without a VAE: for the pure sizing rules."""

    channels, temporal_factor, spatial_factor, causal = 4, 4, 8, True

    def normalize(self, z):
        return np.asarray(z, np.float32)


def test_causal_sizing_gives_1_plus_4k_frames_and_whole_patches_within_budget():
    s = FakeStage()
    for (T, H, W), patch, budget, want_t in [
        ((16, 90, 160), (1, 2, 2), 64, 13),  # 4 latent frames fit: first 13 frames kept
        ((1, 160, 90), (1, 2, 2), 40, 1),  # an image stays one frame
        ((4, 64, 64), (1, 2, 2), 40, 1),  # 4 frames are one latent frame: frame 0 alone
        ((1, 64, 64), (2, 2, 2), 40, 5),  # p_t=2 needs 2 latent frames: the frame is repeated
        ((17, 64, 64), (1, 2, 2), 2, 5),  # over budget: 1x1 patches, time cut to fit
    ]:
        frames = np.random.default_rng(0).integers(0, 255, (T, H, W, 3), np.uint8)
        out = pipeline.frames_to_latent_grid(frames, patch, s, budget)
        t, h, w = out.shape[:3]
        assert t == want_t and (t - 1) % 4 == 0, (T, H, W, out.shape)
        assert h % (8 * patch[1]) == 0 and w % (8 * patch[2]) == 0
        tokens = (1 + (t - 1) // 4) // patch[0] * (h // 16) * (w // 16)
        assert tokens <= budget
        if T == 16:  # a contiguous cut from frame 0, not frames spread over the clip
            np.testing.assert_array_equal(out, video.resize_frames(frames[:13], h, w))
            assert abs(np.log((w / h) / (W / H))) < 0.3


def test_cached_latents_are_cut_at_frame_0_and_cropped_to_the_budget():
    spec = pipeline.ExampleSpec(
        patch=(1, 2, 2),
        min_tokens=1,
        max_tokens=20,
        max_frames=9,
        frame_stride=1,
        text_len=8,
        text_vocab=64,
    )
    z = np.random.default_rng(0).standard_normal((5, 7, 10, 4)).astype(np.float32)
    ex = pipeline.cached_example(z, "x", spec, FakeStage(), np.random.default_rng(0))
    # max_frames=9 pixel frames -> 3 latent frames; 3 x 5 patches per frame = 15 tokens, so
    # only 1 latent frame fits 20: time is cut first, starting at latent frame 0.
    assert tuple(ex["grid"]) == (1, 3, 5)
    np.testing.assert_array_equal(ex["patches"][0], z[0, 0:2, 0:2].reshape(-1))
    tight = pipeline.cached_example(
        z, "x", dataclasses.replace(spec, max_tokens=6), FakeStage(), np.random.default_rng(0)
    )
    t, h, w = tight["grid"]
    assert t == 1 and h * w <= 6 and w >= h  # centre-cropped, aspect kept
    big = dataclasses.replace(spec, max_tokens=100, max_frames=17)
    assert tuple(
        pipeline.cached_example(z, "x", big, FakeStage(), np.random.default_rng(0))["grid"]
    ) == (5, 3, 5)


def test_latent_space_shapes_for_an_image_and_a_video(stage):
    assert (stage.channels, stage.temporal_factor, stage.spatial_factor) == (4, 4, 8)
    rng = np.random.default_rng(0)
    # The cached clips' pixel shape: the compiled encoder and decoder are reused by other tests.
    for T, H, W in ((1, 80, 128), (9, 80, 128)):
        frames = rng.integers(0, 255, (T, H, W, 3), np.uint8)
        z = stage.to_latents(frames)
        assert z.shape == (1 + (T - 1) // 4, H // 8, W // 8, 4) and z.dtype == np.float32
        np.testing.assert_allclose(stage.normalize(stage.encode_raw(frames)), z, atol=1e-6)
        np.testing.assert_allclose(stage.denormalize(z), stage.encode_raw(frames), atol=1e-5)
        x = stage.to_pixels(z)
        assert x.shape == (T, H, W, 3) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(BadShapeError, match=r"T = 1 \+ 4k"):
        stage.to_latents(np.zeros((8, 16, 16, 3), np.uint8))


def test_a_bad_vae_dir_fails_before_compiling_naming_the_field_and_the_fix(tmp_path):
    from experiments import latent_tiny

    with pytest.raises(ValueError, match="needs model.vae_dir"):
        make_stage({"compression": "vae"})
    with pytest.raises(FileNotFoundError, match=r"model.vae_dir=.*train-latent.*train_vae"):
        make_stage({"compression": "vae", "vae_dir": str(tmp_path / "missing")})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "vae_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.vae_dir=.*not a loadable VAE directory"):
        make_stage({"compression": "vae", "vae_dir": str(tmp_path / "junk")})
    no_stats = save_vae(tmp_path / "no_stats", stats=None)
    with pytest.raises(ValueError, match="without latents_mean/latents_std"):
        make_stage({"compression": "vae", "vae_dir": no_stats})
    with pytest.raises(ValueError, match="'pixels' or 'vae'"):
        make_stage({"compression": "wavelets"})
    config = latent_tiny.get_config("runlocal")
    config.data.data_dir = str(tmp_path)
    config.model.vae_dir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model.vae_dir"):
        trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_cache_round_trips_counts_bad_media_and_records_the_vae(cache_dir, stage):
    src, cached = records(cache_dir)
    meta = src.dataset_info.metadata
    assert meta["vae"] == json.loads(json.dumps(stage.identity))
    assert meta["skipped"] == {"train": 1}  # corrupt.mp4, logged and counted, not fatal
    assert sorted(r["path"].decode().rsplit("/", 1)[1] for r in cached) == [
        "clip_a.mp4",
        "clip_b.mp4",
        "photo.png",
    ]
    _, source = records(cache_dir, "video_folder")
    sizing = meta["sizing"]
    for r in cached:
        frames = decode_example(source[int(r["source_index"])], max_frames=sizing["max_frames"])
        clip = pipeline.frames_to_latent_grid(
            frames, tuple(sizing["patch"]), stage, sizing["max_tokens"]
        )
        assert r["pixel_shapes"].tolist() == [list(clip.shape[:3])]
        assert r["token_budgets"].tolist() == [sizing["max_tokens"]]
        t, h, w = clip.shape[:3]
        (z,) = latent_records.sizes(r)
        assert z.shape == (1 + (t - 1) // 4, h // 8, w // 8, 4)
        assert z.shape[0] * (h // 16) * (w // 16) <= sizing["max_tokens"]
        fresh = stage.encode_raw(clip)
        np.testing.assert_allclose(z, fresh, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(
            stage.to_pixels(stage.normalize(z)),
            stage.to_pixels(stage.normalize(fresh)),
            atol=TOLERANCE,
            rtol=0,
        )
    assert {tuple(r["pixel_shapes"][0]) for r in cached} == {(9, 80, 128), (1, 224, 144)}


# Two workers in one process: the VAE compiles once per pixel shape for both (a
# multi_processing pair would compile everything twice); tests/test_beam_builds.py runs two
# worker processes.
BEAM_THREADS = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_threading"
MULTIRES = "latents/video_folder_multires"  # token budgets (32, 64, 128)


@pytest.fixture(scope="module")
def multires_dirs(cache_dir, vae_dir, tmp_path_factory):
    """The cache_dir folder's latents at three budgets: built here, and on Beam."""
    dirs = str(tmp_path_factory.mktemp("multires_here")), str(tmp_path_factory.mktemp("beam"))
    for data_dir, beam in zip(dirs, (None, BEAM_THREADS), strict=True):
        build(
            MULTIRES.replace("/", ":"),
            data_dir,
            vae_dir=vae_dir,
            source_data_dir=cache_dir,
            beam_options=beam,
        )
    return dirs


def test_a_multires_cache_holds_each_budget_and_beam_writes_the_same_records(
    multires_dirs, cache_dir, stage
):
    here, beam = multires_dirs
    src, cached = records(here, MULTIRES)
    beam_src, beam_cached = records(beam, MULTIRES)
    assert len(cached) == len(beam_cached) == 3
    for a, b in zip(cached, beam_cached, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta, beam_meta = src.dataset_info.metadata, beam_src.dataset_info.metadata
    assert meta["skipped"] == beam_meta["skipped"] == {"train": 1}  # corrupt.mp4
    assert meta["counts"] == beam_meta["counts"] == {"train": {"undecodable": 1, "written": 3}}
    assert meta["storage"] == beam_meta["storage"]
    assert set(meta["storage"]["train"]) == {"32", "64", "128"}

    _, source = records(cache_dir, "video_folder")
    sizing = meta["sizing"]
    for r in cached:
        zs = latent_records.sizes(r)
        budgets = r["token_budgets"].tolist()
        assert budgets == sorted(budgets, reverse=True) and set(budgets) <= {32, 64, 128}
        assert len({z.shape for z in zs}) == len(zs) >= 2  # distinct sizes, stored once each
        frames = decode_example(source[int(r["source_index"])], max_frames=sizing["max_frames"])
        for z, budget, pixels in zip(zs, budgets, r["pixel_shapes"], strict=True):
            assert latent_records.tokens(z, (1, 2, 2)) <= budget
            clip = pipeline.frames_to_latent_grid(frames, (1, 2, 2), stage, budget)
            assert tuple(pixels) == clip.shape[:3]
        # The smallest size against a fresh encode (the largest is the single-budget test's).
        np.testing.assert_allclose(zs[-1], stage.encode_raw(clip), atol=TOLERANCE, rtol=0)


def test_training_from_a_multires_cache_draws_several_sizes_per_clip(multires_dirs, vae_dir, stage):
    config = latent_config(multires_dirs[0], vae_dir)
    config.data.sources = [dict(name=MULTIRES, weight=1.0)]
    batches = pipeline.make_batches(config, stage)
    sizes: dict[str, set] = {}
    for i in range(30):  # 10 epochs of 3 records: each draw is seeded by its own index
        record = batches._records[i]
        example = batches.example_at(i)
        sizes.setdefault(record["path"], set()).add(example["patches"].shape[0])
    assert len(sizes) == 3
    for path, seen in sizes.items():
        assert len(seen) >= 2, (path, seen)
    # A budget that admits one size only: that size, every time, and no draw from the rng.
    config.data.max_tokens = 40
    spec = pipeline.example_spec(config)
    _, cached = records(multires_dirs[0], MULTIRES)
    for r in cached:
        options = latent_records.sizes(r)
        rng = np.random.default_rng(0)
        chosen = latent_records.choose(options, spec.patch, spec.min_tokens, 40, rng)
        counts = [latent_records.tokens(z, spec.patch) for z in options]
        assert latent_records.tokens(chosen, spec.patch) <= 40
        if sum(spec.min_tokens <= n <= 40 for n in counts) == 1:
            assert rng.integers(1 << 30) == np.random.default_rng(0).integers(1 << 30)


def test_the_pipeline_reads_cached_latents_without_ever_encoding(
    cache_dir, vae_dir, stage, monkeypatch
):
    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran while reading cached latents")

    for obj, name in [
        (LatentSpace, "encode_raw"),
        (LatentSpace, "to_latents"),
        (LatentSpace, "encode_batch"),
        (compression.VaeCodec, "encode"),
        (compression.VideoVAE, "encode"),
    ]:
        monkeypatch.setattr(obj, name, no_encoder)
    config = latent_config(cache_dir, vae_dir)
    batch = next(pipeline.make_batches(config, stage))
    assert batch["tokens"].shape[-1] == 1 * 2 * 2 * 4  # p_t * p_h * p_w * z_dim
    _, cached = records(cache_dir)
    # The cache was sized for this budget: every example is a whole cached clip, normalised.
    expected = [
        video.patchify(stage.normalize(latent_records.sizes(r)[0]), (1, 2, 2))[0] for r in cached
    ]
    seen = 0
    for b in range(config.batch_size):
        for s in range(1, batch["segment_ids"][b].max() + 1):
            tokens = batch["tokens"][b][batch["segment_ids"][b] == s]
            assert any(e.shape == tokens.shape and np.array_equal(e, tokens) for e in expected)
            seen += 1
    assert seen >= 2


def test_latents_of_another_vae_or_in_pixel_space_are_refused(cache_dir, tmp_path, vae_dir):
    other = make_stage("vae", save_vae(tmp_path / "other_vae", seed=1))
    with pytest.raises(VaeMismatchError, match=r"'latents/video_folder'.*other_vae.*weights"):
        pipeline.make_batches(latent_config(cache_dir, other.vae_dir), other)
    restats = make_stage("vae", save_vae(tmp_path / "restats", stats=(STATS[0], [1.0] * 4)))
    with pytest.raises(VaeMismatchError, match=f"{re.escape(vae_dir)}.*latents_std differs"):
        pipeline.make_batches(latent_config(cache_dir, restats.vae_dir), restats)
    with pytest.raises(VaeMismatchError, match="model.compression='vae'"):
        pipeline.make_batches(latent_config(cache_dir, vae_dir), compression.PixelSpace())


def test_a_dit_trains_on_cached_latents_and_samples_through_the_decoder(
    cache_dir, vae_dir, stage, tmp_path
):
    config = latent_config(cache_dir, vae_dir, "runlocal,steps=3")
    config.model.depth = 1  # the plumbing is the point: half the compile time
    config.peak_flops_per_device = 1e11  # skip measuring a matmul
    assert trainer.dit_config(config).patch_dim == 16
    last = trainer.train(config, str(tmp_path))
    assert np.isfinite(last["loss"]) and last["skipped_media"] == 0
    model, saved = sample.load_run(str(tmp_path))
    assert saved.model.vae_dir == os.path.abspath(vae_dir)
    # The cache's pixel shapes again (the VAE decoder compiled for them is reused).
    requests = [
        sample.Request("a clip", frames=9, height=80, width=128, name="clip"),
        sample.Request("an image", frames=1, height=80, width=128, name="image"),
    ]
    videos = sample.generate(model, saved, requests, steps=2, guidance=1.5)
    for r, v in zip(requests, videos, strict=True):
        assert v.shape == (r.frames, r.height, r.width, 3)
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    assert sample.request_grid(requests[0], saved) == (3, 5, 8)
    with pytest.raises(ValueError, match=r"frames=8 must be 1 \+ 4k.*; try 5"):
        sample.request_grid(sample.Request("x", frames=8, height=16, width=16), saved)
    with pytest.raises(ValueError, match=r"height=24 must be a positive multiple of 16.*try 16"):
        sample.request_grid(sample.Request("x", frames=1, height=24, width=16), saved)


@pytest.mark.slow
def test_the_cache_encoder_shards_the_batch_over_all_local_devices(vae_dir, stage, tmp_path):
    out_path = str(tmp_path / "sharded.npy")
    out = run_module_result("tests.test_latents", "sharded", vae_dir, out_path)
    assert out["devices"] == 3 and out["shards"] == [3, 3]  # frame 0, then one 4-frame chunk
    batched = np.load(out_path)
    clips = sharded_check_clips()
    assert batched.shape == (len(clips), 2, 10, 16, 4)  # 4 clips, padded to 6 and cut back
    alone = np.stack([stage.encode_raw(c) for c in clips])  # one clip at a time, one device
    np.testing.assert_allclose(batched, alone, atol=TOLERANCE, rtol=0)


def sharded_check_clips() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (4, 5, 80, 128, 3), np.uint8)


def _sharded_check(vae_dir: str, out_path: str) -> None:
    """In a fresh process with 3 CPU devices: 4 clips padded to 6, a third on each device."""
    jax.config.update("jax_num_cpu_devices", 3)
    stage = make_stage("vae", vae_dir)
    shards = []
    real_put = jax.device_put

    def spy(x, sharding=None, *a, **k):
        out = real_put(x, sharding, *a, **k)
        if getattr(x, "ndim", 0) == 5:
            shards.append(len({s.device for s in out.addressable_shards}))
        return out

    jax.device_put = spy
    np.save(out_path, stage.encode_batch(sharded_check_clips()))
    jax.device_put = real_put
    print("RESULT " + json.dumps({"devices": len(jax.local_devices()), "shards": shards}))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    if sys.argv[1] == "sharded":
        _sharded_check(sys.argv[2], sys.argv[3])


def test_budgets_per_clip_draws_a_seeded_subset_and_bad_budgets_are_named():
    from data_pipelines.latents.latents import LatentsConfig

    config = LatentsConfig(name="t", token_budgets=(32, 64, 128), budgets_per_clip=2, seed=3)
    drawn = [tuple(config.budgets_for(i)) for i in range(40)]
    assert all(len(d) == 2 and list(d) == sorted(d, reverse=True) for d in drawn)
    assert len(set(drawn)) == 3  # every pair of the three budgets occurs
    assert drawn == [tuple(config.budgets_for(i)) for i in range(40)]  # a function of (seed, i)
    assert LatentsConfig(name="t", token_budgets=(32, 64)).budgets_for(5) == [64, 32]
    assert LatentsConfig(name="t", max_tokens=96).budgets_for(0) == [96]
    for bad, match in [
        (dict(token_budgets=(32, 32)), "must be distinct positive"),
        (dict(token_budgets=(0, 8)), "must be distinct positive"),
        (dict(token_budgets=(32, 64), budgets_per_clip=3), "at most the 2 token_budgets"),
    ]:
        with pytest.raises(ValueError, match=match):
            _ = LatentsConfig(name="t", **bad).budgets
