"""The denoiser as a StableHLO artifact: one export serves packs of any count and length, runs in
a process where the model code (jaxsora.models, flax) cannot be imported, and gives the model's
own output; a training run's checkpoint exports the same way; a params file or signature that
does not fit the program is refused before anything runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsora import train as trainer
from jaxsora.data import packing
from jaxsora.export import stablehlo
from jaxsora.models.dit import make_model
from jaxsora.models.tokenizer import tokenize
from jaxsora.sample import load_run
from tests.conftest import REPO, randomize_params, runlocal_config

# The artifact compiles to the same XLA program as the model's own jit on this backend: equal
# to float32 rounding (measured: exactly 0.0 on CPU).
TOL = 1e-5
CASES = [(1, 64), (2, 96)]  # (packs B, tokens per pack L), both through one artifact
CAPTIONS = ["a red circle moving left", "a blue square", "a photo of a cat", "green on grey"]


def small_config():
    """runlocal's DiT (pixels, 1x4x4 patches: P = 48, S = 16, Lt = 16); the data is not read."""
    return runlocal_config("unused")


def example(rng, grid, shape: packing.PackShape, vocab: int, caption: str, cond_frames=()):
    n = int(np.prod(grid))
    positions = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)
    positions = positions.reshape(-1, 3).astype(np.int32)
    ex = {
        "patches": rng.standard_normal((n, shape.patch_dim)).astype(np.float32),
        "positions": positions,
        "grid": np.array(grid, np.int32),
        "cond": np.isin(positions[:, 0], cond_frames),
    }
    if shape.text_dim:
        k = 1 + len(caption) % shape.text_len
        ex["text_emb"] = rng.standard_normal((shape.text_len, shape.text_dim)).astype(np.float32)
        ex["text_mask"] = np.arange(shape.text_len) < k
    else:
        ex["text_ids"], ex["text_mask"] = tokenize(caption, shape.text_len, vocab)
    return ex


def model_inputs(cfg, S: int, Lt: int, B: int, L: int, seed: int) -> tuple[np.ndarray, ...]:
    """B packs of L tokens from jaxsora.data.packing: three or four clips each, the first given
    its first frame clean (cond_mask), padding at the end, per-segment times."""
    shape = packing.PackShape(L, S, cfg.patch_dim, Lt, cfg.text_embed_dim)
    rng = np.random.default_rng(seed)
    grids = [(2, 2, 5), (1, 3, 4), (3, 2, 2)] + ([(2, 3, 4)] if L >= 96 else [])
    packs = []
    for b in range(B):
        examples = [
            example(rng, g, shape, cfg.text_vocab, CAPTIONS[(i + b) % 4], (0,) if i == 0 else ())
            for i, g in enumerate(grids)
        ]
        packs.append(packing.build_pack(examples, shape))
    batch = packing.stack_packs(packs)
    assert (batch["segment_ids"] == 0).any() and batch["cond_mask"].any()
    t = np.zeros((B, S), np.float32)
    t[:, : len(grids)] = rng.uniform(0.05, 0.95, (B, len(grids)))
    text = batch["text_emb"] if cfg.text_embed_dim else batch["text_ids"]
    return (
        batch["tokens"],
        t,
        batch["segment_ids"],
        batch["positions"],
        text,
        batch["text_mask"],
        batch["cond_mask"],
    )


@nnx.jit
def forward(model, *inputs):
    return model(*inputs)


# Run with `python -c SCRIPT dir...`: loads each dir's artifact with every import of the model
# code refused, calls it on dir/inputs.npz, writes dir/outputs.npz.
BLOCKED_LOAD = """
import sys

class RefuseModelCode:
    def find_spec(self, name, path=None, target=None):
        if name == "flax" or name.startswith(("flax.", "jaxsora.models")):
            raise ImportError(f"{name}: the exported denoiser must run without the model code")

sys.meta_path.insert(0, RefuseModelCode())
import numpy as np
from jaxsora.export.stablehlo import load_denoiser

for out_dir in sys.argv[1:]:
    call = load_denoiser(out_dir)
    inputs = np.load(f"{out_dir}/inputs.npz")
    n = len({k.split("/")[0] for k in inputs})
    outputs = {str(i): np.asarray(call(*(inputs[f"{i}/{j}"] for j in range(7)))) for i in range(n)}
    np.savez(f"{out_dir}/outputs.npz", **outputs)
loaded = [m for m in sys.modules if m == "flax" or m.startswith(("flax.", "jaxsora.models"))]
assert not loaded, loaded
"""


def call_without_model_code(runs: dict[str, list[tuple]]) -> dict[str, list[np.ndarray]]:
    """{artifact dir: input tuples} -> {artifact dir: outputs}, all in one fresh process."""
    for out_dir, cases in runs.items():
        arrays = {f"{i}/{j}": a for i, case in enumerate(cases) for j, a in enumerate(case)}
        np.savez(os.path.join(out_dir, "inputs.npz"), **arrays)
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_LOAD, *runs],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {d: np.load(os.path.join(d, "outputs.npz")) for d in runs}
    return {d: [outputs[d][str(i)] for i in range(len(c))] for d, c in runs.items()}


def real_tokens(out_BLP: np.ndarray, inputs: tuple) -> np.ndarray:
    """The outputs at real tokens only: what padding tokens output depends on the attention
    backend (windowed gives 0, xla lets padding attend padding) and is never used."""
    return np.where((inputs[2] > 0)[..., None], out_BLP, 0.0)


def assert_parity(model, got: list, cases: list[tuple]) -> list[float]:
    errors = []
    for (B, L), v, inputs in zip(CASES, got, cases, strict=True):
        want = np.asarray(forward(model, *inputs))
        assert np.shape(v) == want.shape == (B, L, model.cfg.patch_dim)
        assert np.abs(want).max() > 0.1  # randomized weights: a real, non-zero output
        errors.append(float(real_tokens(np.abs(np.asarray(v) - want), inputs).max()))
    assert max(errors) < TOL, f"max abs error per case {dict(zip(CASES, errors, strict=True))}"
    return errors


@pytest.mark.slow
def test_artifact_runs_without_the_model_code_for_any_pack_shape(tmp_path):
    """runlocal's DiT as it trains (unrolled blocks) and as pods run it (scanned blocks), each
    one artifact called on two pack shapes in a process that cannot import the model."""
    config = small_config()
    S, Lt = config.data.max_segments, config.model.text_len
    models, runs = {}, {}
    for scan_layers in (False, True):
        cfg = dataclasses.replace(trainer.dit_config(config), scan_layers=scan_layers)
        model = randomize_params(make_model(cfg, seed=0))
        out_dir = str(tmp_path / f"scan_{scan_layers}")
        summary = stablehlo.export_denoiser(model, max_segments=S, text_len=Lt, out_dir=out_dir)
        assert summary["program_bytes"] > 0
        assert summary["params_bytes"] >= 4 * summary["num_params"]

        with open(os.path.join(out_dir, stablehlo.SIGNATURE_FILE)) as f:
            signature = json.load(f)
        shapes = {x["name"]: x["shape"] for x in signature["inputs"]}
        assert shapes["x_BLP"] == ["b", "l", cfg.patch_dim]
        assert shapes["text_BSLt"] == ["b", S, Lt]
        num_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert len(signature["params"]["order"]) == num_params
        models[out_dir] = model
        runs[out_dir] = [model_inputs(cfg, S, Lt, B, L, seed=B) for B, L in CASES]

    got = call_without_model_code(runs)
    for out_dir, model in models.items():
        assert_parity(model, got[out_dir], runs[out_dir])


def test_frozen_text_encoder_model_takes_float_caption_embeddings(tmp_path):
    cfg = dataclasses.replace(trainer.dit_config(small_config()), text_embed_dim=8)
    model = randomize_params(make_model(cfg, seed=0))
    S, Lt = 4, 8
    stablehlo.export_denoiser(model, max_segments=S, text_len=Lt, out_dir=str(tmp_path))
    call = stablehlo.load_denoiser(str(tmp_path))
    text = call.signature["inputs"][4]
    assert (text["name"], text["dtype"], text["shape"]) == (
        "text_BSLtDt",
        "float32",
        ["b", S, Lt, 8],
    )
    cases = [model_inputs(cfg, S, Lt, B, L, seed=B) for B, L in CASES]
    assert_parity(model, [call(*c) for c in cases], cases)


def test_a_tpu_attention_backend_is_exported_as_the_portable_one(tmp_path):
    """A run trained with splash attention (a Pallas TPU kernel) exports with the dense "xla"
    backend, which runs everywhere and gives the same output; the caller's model is untouched."""
    cfg = dataclasses.replace(trainer.dit_config(small_config()), depth=1, attention="splash")
    model = randomize_params(make_model(cfg, seed=0))
    dense = randomize_params(make_model(dataclasses.replace(cfg, attention="xla"), seed=0))
    stablehlo.export_denoiser(model, max_segments=4, text_len=8, out_dir=str(tmp_path))
    assert model.blocks[0].self_attn.backend == "splash"
    inputs = model_inputs(cfg, 4, 8, 1, 64, seed=0)
    got = stablehlo.load_denoiser(str(tmp_path))(*inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(dense, *inputs)), atol=TOL)


def test_a_signature_or_params_file_that_does_not_fit_the_program_is_refused(tmp_path):
    cfg = trainer.dit_config(small_config())
    model = make_model(dataclasses.replace(cfg, depth=1), seed=0)
    good = str(tmp_path / "good")
    stablehlo.export_denoiser(model, max_segments=2, text_len=4, out_dir=good)
    with pytest.raises(ValueError, match="text_len=32 exceeds"):
        stablehlo.export_denoiser(model, max_segments=2, text_len=32, out_dir=str(tmp_path / "x"))

    swapped = shutil.copytree(good, tmp_path / "swapped")
    with open(swapped / stablehlo.SIGNATURE_FILE) as f:
        signature = json.load(f)
    order = signature["params"]["order"]
    order[0], order[1] = order[1], order[0]
    with open(swapped / stablehlo.SIGNATURE_FILE, "w") as f:
        json.dump(signature, f)
    with pytest.raises(ValueError, match="params.order disagrees"):
        stablehlo.load_denoiser(str(swapped))

    misshapen = shutil.copytree(good, tmp_path / "misshapen")
    from safetensors.numpy import load_file, save_file

    params = load_file(str(misshapen / stablehlo.PARAMS_FILE))
    params["patch_out.bias"] = params["patch_out.bias"][:-1]
    del params["patch_in.bias"]
    save_file(params, str(misshapen / stablehlo.PARAMS_FILE))
    with pytest.raises(ValueError, match=r"missing \['patch_in.bias'\].*patch_out.bias"):
        stablehlo.load_denoiser(str(misshapen))


def test_a_runs_checkpoint_exports_and_matches_load_run(tmp_path):
    """A real run directory (an Orbax checkpoint written by the project's own Checkpointer, via
    import_dit of a perturbed runlocal model: no training needed) exports from its latest step
    and the artifact equals `load_run`'s model."""
    from safetensors.numpy import save_file

    from jaxsora.export import dit as dit_export
    from jaxsora.export import tables

    config = runlocal_config("unused")
    cfg = trainer.dit_config(config)
    folder, workdir = str(tmp_path / "weights"), str(tmp_path / "run")
    os.makedirs(folder)
    model = randomize_params(make_model(cfg, seed=0), scale=0.05)
    save_file(dit_export.torch_state_dict(model), os.path.join(folder, tables.SINGLE_FILE))
    saved = json.loads(config.to_json())
    with open(os.path.join(folder, dit_export.CONFIG_FILE), "w") as f:
        json.dump(dit_export.export_config(saved, cfg, workdir="-", step=0, use_ema=True), f)
    assert dit_export.import_dit(folder, workdir) == 0

    out = str(tmp_path / "hlo")
    summary = stablehlo.export_run_stablehlo(workdir, out)
    assert summary["params_bytes"] > 0
    call = stablehlo.load_denoiser(out)
    assert call.signature["source"] == {"workdir": os.path.abspath(workdir), "ema": True}
    model, config = load_run(workdir)
    S, Lt = config.data.max_segments, config.model.text_len
    cases = [model_inputs(model.cfg, S, Lt, B, L, seed=10 + B) for B, L in CASES]
    got = [call(*c) for c in cases]
    # Three steps from adaLN-Zero leave small outputs: compare relative to their size.
    for v, inputs in zip(got, cases, strict=True):
        want = np.asarray(forward(model, *inputs))
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(
            real_tokens(np.asarray(v), inputs),
            real_tokens(want, inputs),
            rtol=0,
            atol=TOL * np.abs(want).max(),
        )
