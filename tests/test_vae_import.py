"""diffusers AutoencoderKLWan <-> VideoVAE: numerics against PyTorch, strictness, round trips.

Small random Wan 2.1-layout VAEs are built in diffusers, their weights perturbed (PyTorch's init
leaves every norm gain at 1), saved with save_pretrained (config.json + safetensors) and imported;
the JAX posterior and decode must match PyTorch's on a video and on images.
"""

import dataclasses
import json
import os
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxsora import vae_dir as vae_format  # noqa: E402
from jaxsora.export import __main__ as export_cli  # noqa: E402
from jaxsora.export import vae as export  # noqa: E402
from jaxsora.models.vae import VAEConfig  # noqa: E402

# Measured on CPU, float32, both configs, video and images: posterior mean and log-variance
# within 1.5e-6 of PyTorch relative to their largest value (<= 8.4e-7 absolute), decoded pixels
# within 3.3e-6 absolute. The bounds leave more than 10x margin.
ATOL_LATENT_REL = 2e-5
ATOL_PIXELS = 5e-5

DIFFUSERS_CONFIGS = {
    # Wan 2.1 shape at toy width: time downsampled at the two deeper levels, no attention but
    # the mid blocks'.
    "small": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),
    # Encoder attention at scale 1/2, a wider decoder, z_dim 16, time downsampled first.
    "attn": dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        attn_scales=[0.5],
        temperal_downsample=[True, True, False],
    ),
}


def _expected_cfg(d: dict) -> VAEConfig:
    return VAEConfig(
        base_dim=d["base_dim"],
        decoder_base_dim=d.get("decoder_base_dim"),
        z_dim=d["z_dim"],
        dim_mult=tuple(d["dim_mult"]),
        num_res_blocks=d["num_res_blocks"],
        attn_scales=tuple(d["attn_scales"]),
        temporal_downsample=tuple(d["temperal_downsample"]),
    )


class Wan:
    """A saved diffusers VAE: the torch model, its folder, and what we expect to import."""

    def __init__(self, name: str, folder: str):
        d = DIFFUSERS_CONFIGS[name]
        rng = np.random.default_rng(len(name))
        self.latents_mean = tuple(float(x) for x in rng.normal(size=d["z_dim"]).round(4))
        self.latents_std = tuple(float(x) for x in rng.uniform(0.5, 3, d["z_dim"]).round(4))
        torch.manual_seed(0)
        tm = diffusers.AutoencoderKLWan(
            **d, latents_mean=list(self.latents_mean), latents_std=list(self.latents_std)
        ).eval()
        with torch.no_grad():  # every weight, gains included, away from its trivial init
            for p in tm.parameters():
                p.mul_(1 + 0.3 * torch.randn_like(p))
        tm.save_pretrained(folder)
        self.torch_model, self.folder, self.cfg = tm, folder, _expected_cfg(d)
        self.weights = os.path.join(folder, export.DIFFUSERS_WEIGHTS_FILE)
        self.config_json = os.path.join(folder, "config.json")
        self.state_dict = load_file(self.weights)
        self.model = export.load_safetensors_vae(self.weights, self.cfg)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch's OpenMP threads and XLA's pool fight over the cores once JAX has run: the
    reference forward passes take 60x longer (6 s instead of 0.1 s on 2 cores) without this."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_BUILT: dict[str, Wan] = {}


def _wan(name: str, tmp_path_factory) -> Wan:
    if name not in _BUILT:
        _BUILT[name] = Wan(name, str(tmp_path_factory.mktemp(name)))
    return _BUILT[name]


@pytest.fixture(params=sorted(DIFFUSERS_CONFIGS))
def wan(request, tmp_path_factory) -> Wan:
    return _wan(request.param, tmp_path_factory)


@pytest.fixture
def small(tmp_path_factory) -> Wan:
    return _wan("small", tmp_path_factory)


@nnx.jit
def _encode_and_decode(model, x, z):
    """Posterior of `x`, and the clamped decode of `z` (diffusers' decode clamps); one compile."""
    mean, logvar = model.encode(x)
    return mean, logvar, jnp.clip(model.decode(z), -1.0, 1.0)


def _torch_encode(tm, x):
    """diffusers 0.42 passes its frame cache to encoder attention blocks (attn_scales), whose
    forward takes none and fails; attention is per frame and needs no cache, so drop it. The
    released Wan 2.1 VAE has attn_scales=[] and never reaches this."""
    block = diffusers.models.autoencoders.autoencoder_kl_wan.WanAttentionBlock
    forward = block.forward
    with mock.patch.object(block, "forward", lambda self, x, **_: forward(self, x)):
        return tm.encode(x).latent_dist


def _to_torch(x_BTHWC: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x_BTHWC.transpose(0, 4, 1, 2, 3)))


def _from_torch(x) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


def _params(model) -> dict:
    return {
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# ---------------------------------------------------------------------------------------------
# Numerics against PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape",
    [("small", (1, 9, 32, 48)), ("small", (2, 1, 40, 24)), ("attn", (1, 9, 32, 48))],
    ids=["small-video", "small-images", "attn-video"],  # each case is a ~3 s compile on CPU
)
def test_matches_diffusers(name, shape, tmp_path_factory):
    """Same weights, same input: posterior mean/logvar and the clamped decode agree."""
    wan = _wan(name, tmp_path_factory)
    x = np.random.default_rng(1).uniform(-1, 1, (*shape, 3)).astype(np.float32)
    with torch.no_grad():
        post = _torch_encode(wan.torch_model, _to_torch(x))
        t_mean, t_logvar = _from_torch(post.mean), _from_torch(post.logvar)
        t_pixels = _from_torch(wan.torch_model.decode(post.mean).sample)
    # Decode PyTorch's latent on both sides, so the decoder is measured on its own.
    mean, logvar, pixels = _encode_and_decode(wan.model, jnp.asarray(x), jnp.asarray(t_mean))
    pixels = np.asarray(pixels)

    assert mean.shape == t_mean.shape == (shape[0], *wan.cfg.latent_shape(*shape[1:]))
    assert pixels.shape == t_pixels.shape == (*shape, 3)
    for ours, ref in ((mean, t_mean), (logvar, t_logvar)):
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=ATOL_LATENT_REL * scale)
    np.testing.assert_allclose(pixels, t_pixels, rtol=0, atol=ATOL_PIXELS)
    # The comparison means something only if the clamp did not flatten most of the output.
    assert np.mean(np.abs(t_pixels) < 1) > 0.5
    assert np.std(t_pixels) > 0.05


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


def test_missing_extra_and_misshapen_keys_all_reported(small):
    sd = dict(small.state_dict)
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra_block.weight"] = np.zeros((2, 2, 3, 3, 3), np.float32)
    sd["encoder.conv_in.weight"] = np.zeros((9, 3, 3, 3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        export.import_diffusers_vae(sd, small.cfg, source="some/vae.safetensors")
    msg = str(e.value)
    assert msg.startswith("some/vae.safetensors: 3 problem(s)")
    lines = msg.splitlines()

    def row(key):
        (line,) = [x for x in lines if x.split()[:1] == [key]]
        return line

    assert "(3,)" in row("decoder.conv_out.bias") and "missing" in row("decoder.conv_out.bias")
    assert "(2, 2, 3, 3, 3) unexpected" in row("encoder.extra_block.weight")
    assert "(8, 3, 3, 3, 3)" in row("encoder.conv_in.weight")  # expected
    assert "(9, 3, 3, 3, 3)" in row("encoder.conv_in.weight")  # found
    assert "Fix: the checkpoint is not a Wan 2.1 VAE of this config" in msg


@pytest.mark.parametrize(
    "edit, key, found",
    [
        (lambda sd: sd.pop("quant_conv.bias"), "quant_conv.bias", "missing"),
        (
            lambda sd: sd.update({"encoder.norm_out.beta": np.ones((16, 1, 1, 1), np.float32)}),
            "encoder.norm_out.beta",
            "no conversion rule",
        ),
        (  # another spelling of a key that is present: never fills a param twice
            lambda sd: sd.update(
                {"encoder.down_blocks.1.resample.weight": np.ones((8, 8, 3, 3), np.float32)}
            ),
            "encoder.down_blocks.1.resample.weight",
            "unexpected (the name of encoder.down_blocks.1.resample.kernel is "
            "encoder.down_blocks.1.resample.1.weight)",
        ),
        (  # a gain squeezed to [C] is not the diffusers layout
            lambda sd: sd.update({"encoder.norm_out.gamma": np.ones((16,), np.float32)}),
            "encoder.norm_out.gamma",
            "(16,)",
        ),
    ],
    ids=["missing", "no_rule", "duplicate", "shape"],
)
def test_each_problem_is_an_error_naming_the_key(small, edit, key, found):
    sd = dict(small.state_dict)
    edit(sd)
    with pytest.raises(ValueError, match="1 problem") as e:
        export.import_diffusers_vae(sd, small.cfg, source="vae.safetensors")
    (line,) = [x for x in str(e.value).splitlines() if x.split()[:1] == [key]]
    assert found in line


def test_wrong_config_is_refused(small):
    cfg = dataclasses.replace(small.cfg, num_res_blocks=2)
    with pytest.raises(ValueError, match="missing") as e:
        export.load_safetensors_vae(small.weights, cfg)
    assert small.weights in str(e.value)
    assert "the file's weights say num_res_blocks=1 (not 2)" in str(e.value)


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "vae.pth"
    bad.write_bytes(b"\x80\x02not safetensors")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        export.load_safetensors_vae(str(bad), VAEConfig(base_dim=8, z_dim=4))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_from_diffusers(wan):
    with open(wan.config_json) as f:
        cfg, mean, std = export.vae_config_from_diffusers(json.load(f), source=wan.config_json)
    assert cfg == wan.cfg
    assert (mean, std) == (wan.latents_mean, wan.latents_std)
    back = export.vae_config_from_diffusers(export.vae_config_to_diffusers(cfg, mean, std))
    assert back == (cfg, mean, std)


def test_defaults_are_wan21():
    cfg, mean, std = export.vae_config_from_diffusers({})
    assert cfg == VAEConfig() and len(mean) == len(std) == 16
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 8)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(is_residual=True), "only the Wan 2.1"),
        (dict(patch_size=2), "only the Wan 2.1"),
        (dict(_class_name="AutoencoderKL"), "not 'AutoencoderKLWan'"),
        (dict(z_dim=4), "latents_mean has 16 entries but z_dim=4"),
        (dict(dim_mult=[1, 2]), "temporal_downsample has 3 entries"),
    ],
)
def test_config_refusals(fields, match):
    with pytest.raises(ValueError, match=match) as e:
        export.vae_config_from_diffusers(fields, source="vae/config.json")
    assert str(e.value).startswith("vae/config.json: ")


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_export_round_trip_is_bitwise(wan):
    exported = export.export_diffusers_vae(wan.model)
    assert list(exported) == sorted(wan.state_dict)
    for k, v in wan.state_dict.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert np.array_equal(exported[k], v), k
    # PyTorch takes it strictly, and the other direction is bitwise too.
    fresh = diffusers.AutoencoderKLWan(**wan.torch_model.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    again = export.import_diffusers_vae(exported, wan.cfg, source="exported")
    a, b = _params(wan.model), _params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_round_trip(small, tmp_path):
    vae_dir = str(tmp_path / "vae")
    export_cli.main(
        [
            "import-vae",
            "--safetensors",
            small.weights,
            "--diffusers_config",
            small.config_json,
            "--out",
            vae_dir,
        ]
    )
    with open(os.path.join(vae_dir, vae_format.CONFIG_FILE)) as f:
        saved = json.load(f)
    assert saved["latents_mean"] == list(small.latents_mean)
    assert saved["z_dim"] == 4 and saved["temporal_downsample"] == [False, True, True]

    model, mean, std = vae_format.load_vae_dir(vae_dir)
    assert model.cfg == small.cfg and (mean, std) == (small.latents_mean, small.latents_std)
    a, b = _params(small.model), _params(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    bf16, _, _ = vae_format.load_vae_dir(vae_dir, dtype="bfloat16")  # compute dtype only
    assert bf16.cfg.dtype == "bfloat16" and bf16.encoder.conv_in.kernel[...].dtype == jnp.float32

    # Export to a bare file, and to a folder that diffusers loads as it is.
    out_file, out_dir = str(tmp_path / "out.safetensors"), str(tmp_path / "hf")
    export_cli.main(["export-vae", "--vae_dir", vae_dir, "--out", out_file])
    export_cli.main(["export-vae", "--vae_dir", vae_dir, "--out", out_dir])
    back = load_file(out_file)
    assert back.keys() == small.state_dict.keys()
    assert all(np.array_equal(back[k], small.state_dict[k]) for k in back)
    reloaded = diffusers.AutoencoderKLWan.from_pretrained(out_dir)
    for k, v in reloaded.state_dict().items():
        assert np.array_equal(v.numpy(), small.state_dict[k]), k
    assert list(reloaded.config.latents_mean) == list(small.latents_mean)

    # A second import into the same directory is refused rather than mixing two VAEs.
    with pytest.raises(SystemExit, match="already holds a VAE"):
        export_cli.main(["import-vae", "--safetensors", small.weights, "--out", vae_dir])


def test_vae_dir_with_mismatched_config_is_refused(small, tmp_path):
    vae_dir = str(tmp_path / "vae")
    vae_format.save_vae_dir(small.model, None, vae_dir)
    path = os.path.join(vae_dir, vae_format.CONFIG_FILE)
    with open(path) as f:
        saved = json.load(f)
    assert saved["latents_mean"] is None
    saved["z_dim"] = 6
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="was not written for the config") as e:
        vae_format.load_vae_dir(vae_dir)
    msg = str(e.value)
    assert "post_quant_conv.kernel" in msg and "(1, 1, 1, 6, 6)" in msg and "(1, 1, 1, 4, 4)" in msg


def test_every_rule_is_used_and_the_table_inverts():
    """The export names of a model with every kind of block are the forward table's inverse."""
    cfg = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), attn_scales=(1.0,),
                    temporal_downsample=(True,))  # fmt: skip
    _, flat = vae_format.abstract_params(cfg)
    used = set()
    for path in flat:
        key, transform = export.to_diffusers(path)
        assert export.to_ours(key) == (path, transform)
        used.add(transform)
    assert used == {r.transform for r in export.RULES}


def test_default_config_is_the_wan21_release_layout():
    """Every key and shape of the released Wan 2.1 VAE, without downloading it: diffusers'
    default AutoencoderKLWan on the meta device against our default config's export names."""
    with torch.device("meta"):
        tm = diffusers.AutoencoderKLWan()
    theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    cfg, mean, _ = export.vae_config_from_diffusers(dict(tm.config))
    assert cfg == VAEConfig() and mean == tuple(tm.config.latents_mean)
    _, flat = vae_format.abstract_params(cfg)
    ours = {}
    for path, (_, v) in flat.items():
        key, transform = export.to_diffusers(path)
        ours[key] = transform.torch_shape(v.shape)
    assert ours == theirs
