"""The original-DiT configuration and diffusers' DiTTransformer2DModel
(jaxsora/export/diffusers_dit.py), both directions, on perturbed weights:

- export: our model's weights in diffusers' layout give DiTTransformer2DModel the JAX model's
  output (velocity and learned-sigma channels), for images packed together in JAX, a null class
  among them;
- import: a random diffusers DiT (embedders tied across blocks, as published checkpoints have
  them) imported with `import_diffusers` gives the diffusers output in JAX;
- the CLI on a trained run: export-dit --format diffusers -> from_pretrained matches the run's
  model; import-dit back is bit-exact and fine-tunes;
- refusals: a model diffusers cannot hold (captions, RoPE, the DiT paper's own timestep
  frequencies), differing embedder copies, a wrong class count, a missing key.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxsora import sample as sampler  # noqa: E402
from jaxsora import train as trainer  # noqa: E402
from jaxsora.export import diffusers_dit, tables  # noqa: E402
from jaxsora.export import dit as dit_export  # noqa: E402
from jaxsora.export.__main__ import main as export_cli  # noqa: E402
from jaxsora.models.dit import make_model  # noqa: E402
from tests.conftest import randomize_params  # noqa: E402

C, P, SIZE = 3, 2, 8  # pixels, patch 2, 8 x 8 images: 16 tokens each
# float32, max |diffusers - jax| / max |jax|. Measured ~4e-7 at t near 0; at t = 0.9 ~1.1e-5,
# all from the timestep features: sin/cos of 1000 t f (up to 900 rad) differ by an ulp of
# their argument between XLA's and PyTorch's float32 sin/exp.
RTOL = 2e-6  # t <= 0.001
RTOL_ANY_T = 5e-5


def _config(data_dir, arg="runlocal"):
    from experiments import dit_image

    c = dit_image.get_config(arg)
    c.data.data_dir = data_dir
    c.data.sources = [dict(name="synthetic_clips/small", weight=1.0)]
    c.model.patch = (1, P, P)
    c.data.min_tokens, c.data.max_tokens = 16, 64
    return c


def _diffusers_model(cfg, **config):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**{**diffusers_dit.diffusers_config(cfg, C, SIZE), **config})


def _jax_images(model, images, t, labels):
    return diffusers_dit.forward_images(model, images, t, labels)


def _diffusers_images(model, images, t, labels, num_classes):
    assert model.config.num_embeds_ada_norm == num_classes
    return diffusers_dit.diffusers_forward_images(model, images, t, labels)


def _inputs(seed=0, small_t=False):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((3, SIZE, SIZE, C)).astype(np.float32)
    t = np.array([0.9, 0.3, 0.6], np.float32) * (1e-3 if small_t else 1.0)
    return images, t, [1, None, 4]


def _assert_close(ours_fn, theirs_fn, seed):
    """Equal at small t (the weights and the layout), and at any t within float32's noise."""
    for small_t, rtol in ((True, RTOL), (False, RTOL_ANY_T)):
        images, t, labels = _inputs(seed, small_t)
        got, want = theirs_fn(images, t, labels), ours_fn(images, t, labels)
        assert _rel(got, want) < rtol, (t, _rel(got, want))
        assert np.abs(want[..., C:]).max() > 0.1  # the learned-sigma channels are compared too


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_export_gives_diffusers_the_jax_output(data_dir):
    config = _config(data_dir)
    cfg = trainer.dit_config(config)
    assert cfg.num_classes == 5 and cfg.learn_sigma and not cfg.qk_norm
    model = randomize_params(make_model(cfg, 0), scale=0.1)
    theirs = _diffusers_model(cfg)
    state = {k: torch.from_numpy(v) for k, v in diffusers_dit.state_dict(model, C).items()}
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    _assert_close(
        lambda *a: _jax_images(model, *a),
        lambda *a: _diffusers_images(theirs, *a, cfg.num_classes),
        seed=0,
    )


def _tied_random_diffusers(cfg, seed=0):
    """A random DiTTransformer2DModel, every weight perturbed (nothing starts at zero), with
    the blocks' embedder copies tied to block 0's as converted checkpoints have them."""
    torch.manual_seed(seed)
    model = _diffusers_model(cfg, norm_eps=1e-5)  # diffusers' default MLP norm eps
    state = model.state_dict()
    for k, v in state.items():
        state[k] = v + 0.1 * torch.randn_like(v)
    for k in list(state):
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            state[k] = state["transformer_blocks.0." + k.split(".", 2)[2]].clone()
    model.load_state_dict(state)
    return model.eval()


def test_import_of_a_random_diffusers_dit_gives_its_output_in_jax(data_dir, tmp_path):
    config = _config(data_dir)
    cfg = trainer.dit_config(config)
    theirs = _tied_random_diffusers(cfg)
    folder = str(tmp_path / "hf")
    theirs.save_pretrained(folder, safe_serialization=True)
    run = str(tmp_path / "run")
    assert diffusers_dit.import_diffusers(folder, run, config=config) == 0
    model, run_config = sampler.load_run(run)
    assert run_config.model.time_freq_shift == 1 and run_config.model.mlp_norm_eps == 1e-5
    _assert_close(
        lambda *a: _jax_images(model, *a),
        lambda *a: _diffusers_images(theirs, *a, cfg.num_classes),
        seed=1,
    )


@pytest.mark.slow
def test_cli_exports_a_trained_run_that_diffusers_loads_and_imports_it_back(data_dir, tmp_path):
    from diffusers import DiTTransformer2DModel

    config = _config(data_dir, "runlocal,steps=2")
    run = str(tmp_path / "run")
    trainer.train(config, run)
    out = str(tmp_path / "hf")
    export_cli(
        [
            "export-dit",
            "--workdir",
            run,
            "--format",
            "diffusers",
            "--out",
            out,
            "--sample_size",
            str(SIZE),
        ]
    )
    with open(os.path.join(out, diffusers_dit.JAXSORA_FILE)) as f:
        assert json.load(f)["class_names"] == list(config.text.class_names)
    ours, _ = sampler.load_run(run)
    randomize_params(ours, scale=0.1)  # a 2-step model is near its zero init: test on more
    theirs = DiTTransformer2DModel.from_pretrained(out).eval()
    state = {k: torch.from_numpy(v) for k, v in diffusers_dit.state_dict(ours, C).items()}
    theirs.load_state_dict(state, strict=True)  # the same names and shapes as the file's
    _assert_close(
        lambda *a: _jax_images(ours, *a), lambda *a: _diffusers_images(theirs, *a, 5), seed=2
    )

    back = str(tmp_path / "back")
    export_cli(["import-dit", "--src", out, "--out", back])
    a, b = sampler.load_run(run)[0], sampler.load_run(back)[0]
    flat = lambda m: diffusers_dit.state_dict(m, C)  # noqa: E731
    for k, v in flat(a).items():
        np.testing.assert_array_equal(v, flat(b)[k], err_msg=k)
    # The generic safetensors format holds a class-conditional model too (not the torch
    # package, which runs the caption-conditioned DiT).
    plain, plain_back = str(tmp_path / "plain"), str(tmp_path / "plain_back")
    dit_export.export_dit(run, plain)
    dit_export.import_dit(plain, plain_back)
    for k, v in flat(a).items():
        np.testing.assert_array_equal(v, flat(sampler.load_run(plain_back)[0])[k], err_msg=k)
    with pytest.raises(ValueError, match="--format diffusers"):
        dit_export.check_torch_package(dit_export.saved_run(run)[1])
    from jaxsora.export.torch_dit import load_pretrained

    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        load_pretrained(plain)

    _, back_config = sampler.load_run(back)
    assert trainer.dit_config(back_config) == trainer.dit_config(config)
    trainer.train(back_config, back)  # fine-tunes from the import (the same compiled step)
    assert sorted(os.listdir(os.path.join(back, "checkpoints"))) == ["0", "2"]


def test_models_diffusers_cannot_hold_are_refused(data_dir):
    from experiments import tiny

    text_cfg = trainer.dit_config(tiny.get_config("runlocal"))
    why = " ".join(diffusers_dit.unsupported(text_cfg, (1, 4, 4)))
    assert "caption-conditioned" in why and "positions='rope'" in why and "qk_norm" in why
    config = _config(data_dir)
    config.model.time_freq_shift = 0  # the DiT paper's own frequencies
    why = " ".join(diffusers_dit.unsupported(trainer.dit_config(config), (1, P, P)))
    assert "time_freq_shift=0" in why and "half - 1" in why
    why = " ".join(diffusers_dit.unsupported(trainer.dit_config(config), (1, P, P), "data"))
    assert "flow.prediction='data'" in why and "x0" in why
    with pytest.raises(ValueError, match="not an original-DiT model"):
        diffusers_dit.state_dict(make_model(trainer.dit_config(config), 0), C)


def test_bad_diffusers_folders_are_refused_naming_the_keys(data_dir, tmp_path):
    config = _config(data_dir)
    cfg = trainer.dit_config(config)
    untied = _diffusers_model(cfg)  # a fresh one: each block's embedder initialised apart
    folder = str(tmp_path / "untied")
    untied.save_pretrained(folder, safe_serialization=True)
    with pytest.raises(tables.WeightTableError, match=r"transformer_blocks\.1\.norm1\.emb\."):
        diffusers_dit.import_diffusers(folder, str(tmp_path / "a"), config=config)

    wrong = _config(data_dir)
    wrong.text.class_names = ["circle", "square"]
    with pytest.raises(ValueError, match="num_embeds_ada_norm=5 classes"):
        diffusers_dit.import_diffusers(folder, str(tmp_path / "b"), config=wrong)

    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    weights = load_file(path)
    del weights["proj_out_2.bias"]
    save_file(weights, path)
    with pytest.raises(tables.WeightTableError, match=r"proj_out_2\.bias"):
        diffusers_dit.import_diffusers(folder, str(tmp_path / "c"), config=config)
    with pytest.raises(ValueError, match="pass --config"):
        diffusers_dit.import_diffusers(folder, str(tmp_path / "d"))
