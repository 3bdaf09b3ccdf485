"""The DiT export (jaxsora/export/dit.py) and its PyTorch package (jaxsora/export/torch_dit).

- a checkpoint written by a real 8-device fsdp x tensor training run (a subprocess, scanned
  blocks) exports to safetensors and imports back bit-exactly, EMA and raw; the import trains;
- the PyTorch DiT matches the JAX forward on a pack (null caption, conditioning tokens, hashed
  ids and frozen-encoder embeddings) and on each segment alone, with perturbed weights;
- the PyTorch sampler matches jaxsora.sample.generate_latents, and flow.sample with Heun,
  three-pass image guidance and clamped conditioning tokens;
- sharded export, and every bad input refused naming the file and the keys;
- the PyTorch package imports and runs with jax and jaxsora made unimportable.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxsora import sample as sampler  # noqa: E402
from jaxsora import train as trainer  # noqa: E402
from jaxsora.data import packing  # noqa: E402
from jaxsora.diffusion import flow  # noqa: E402
from jaxsora.export import dit as export  # noqa: E402
from jaxsora.export import tables  # noqa: E402
from jaxsora.export.torch_dit import DiT as TorchDiT  # noqa: E402
from jaxsora.export.torch_dit import load_pretrained, segment_latents  # noqa: E402
from jaxsora.export.torch_dit import sample as torch_sample  # noqa: E402
from jaxsora.models.dit import DiTConfig, make_model  # noqa: E402
from jaxsora.models.tokenizer import tokenize  # noqa: E402
from tests.conftest import randomize_params, run_fast_compiled, runlocal_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARD_RTOL = 1e-5  # float32, max |torch - jax| / max |jax|; measured ~1e-7..1e-6
SAMPLE_RTOL = 1e-4  # a few steps of the same arithmetic; measured ~1e-6

TRAIN = "experiments/tiny.py:runlocal,steps=3,source=synthetic_clips/small"
# Scanned blocks (one stacked leaf per weight) on the sharded mesh: the export splits them.
RUN_FLAGS = ("--config.batch_size=4", "--config.model.scan_layers=True")


def _train_command(workdir, data_dir, *overrides):
    return [
        sys.executable,
        "-m",
        "jaxsora.train",
        "--config",
        TRAIN,
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *RUN_FLAGS,
        *overrides,
    ]


class _Background:
    """A CLI run in a fresh process, started now and waited for when its result is needed, so
    the in-process tests run while it compiles."""

    def __init__(self, cmd, workdir, env=None):
        self.workdir = str(workdir)
        self._log = open(self.workdir + ".log", "w")  # noqa: SIM115
        env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
        env.pop("XLA_FLAGS", None)
        self._proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait(self) -> str:
        rc = self._proc.wait(timeout=600)
        self._log.close()
        if rc != 0:
            with open(self.workdir + ".log") as f:
                pytest.fail(f"{self._proc.args} failed (rc={rc}):\n{f.read()[-4000:]}")
        return self.workdir

    def kill(self):
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture(scope="module")
def run8(data_dir, tmp_path_factory):
    """Three steps of `python -m jaxsora.train` on 8 simulated CPU devices, data=1 x fsdp=4 x
    tensor=2 (jaxsora.distributed reads JAXSORA_LOCAL_DEVICES), started in the background."""
    workdir = tmp_path_factory.mktemp("export_dit") / "run8"
    run = _Background(
        _train_command(
            workdir,
            data_dir,
            "--config.mesh.data=1",
            "--config.mesh.fsdp=4",
            "--config.mesh.tensor=2",
        ),
        workdir,
        env={"JAXSORA_LOCAL_DEVICES": "8"},
    )
    yield run
    run.kill()


@pytest.fixture(scope="module")
def exported(run8, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export_dit") / "ema")
    summary = export.export_dit(run8.wait(), out)
    assert summary["step"] == 3 and summary["weights"] == "ema"
    return out


@pytest.fixture(scope="module")
def tuned(data_dir, tmp_path_factory):
    """A live model exported in memory (torch_state_dict + export_config), imported with
    `import_dit`, and a 1-step fine-tune of the import (`python -m jaxsora.train`) started in
    the background, beside the 8-device run: (model params, imported workdir, the run)."""
    from experiments import tiny

    root = tmp_path_factory.mktemp("export_dit")
    config = tiny.get_config(TRAIN.split(":", 1)[1])
    config.data.data_dir = data_dir
    config.batch_size, config.model.scan_layers = 4, True  # RUN_FLAGS
    cfg = trainer.dit_config(config)
    model = _perturbed(cfg)
    folder = str(root / "live")
    os.makedirs(folder)
    save_file(export.torch_state_dict(model), os.path.join(folder, tables.SINGLE_FILE))
    saved = json.loads(config.to_json())
    with open(os.path.join(folder, export.CONFIG_FILE), "w") as f:
        json.dump(export.export_config(saved, cfg, workdir="-", step=0, use_ema=True), f)
    workdir = str(root / "imported")
    assert export.import_dit(folder, workdir) == 0
    shutil.copytree(workdir, str(root / "as_imported"))  # step 0, before the fine-tune adds 1
    run = _Background(_train_command(workdir, data_dir, "--config.stop_after=1"), workdir)
    yield _params(model), workdir, str(root / "as_imported"), run
    run.kill()


# --------------------------------------------------------------------------------- inputs


def _config():
    return runlocal_config("unused")


def _perturbed(cfg: DiTConfig):
    return randomize_params(make_model(cfg, 0), scale=0.1)


def _torch_model(jax_model, cfg=None) -> TorchDiT:
    """The PyTorch DiT holding the JAX model's weights through the export's table, strictly."""
    model = TorchDiT(cfg or jax_model.cfg)
    state = {k: torch.from_numpy(v) for k, v in export.torch_state_dict(jax_model).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _examples(cfg: DiTConfig, rng, grids, with_null: bool = True):
    examples = []
    for k, grid in enumerate(grids):
        n = int(np.prod(grid))
        pos = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1)
        ex = {
            "patches": rng.standard_normal((n, cfg.patch_dim)).astype(np.float32),
            "positions": pos.reshape(-1, 3).astype(np.int32),
            "grid": np.array(grid, np.int32),
            "cond": np.arange(n) < (n // 3 if k == 1 else 0),  # segment 2: its head is clean
        }
        if cfg.text_embed_dim:
            emb = rng.standard_normal((cfg.text_len, cfg.text_embed_dim)).astype(np.float32)
            mask = np.arange(cfg.text_len) < 3 + k
            ex.update(text_emb=emb, text_mask=mask)
        else:
            ids, mask = tokenize(f"a red circle number {k}", cfg.text_len, cfg.text_vocab)
            ex.update(text_ids=ids, text_mask=mask)
        if with_null and k == len(grids) - 1:
            ex["text_mask"] = np.zeros_like(ex["text_mask"])  # the null caption
        examples.append(ex)
    return examples


def _pack(cfg: DiTConfig, examples, seq_len: int, max_segments: int) -> dict:
    shape = packing.PackShape(
        seq_len, max_segments, cfg.patch_dim, cfg.text_len, text_dim=cfg.text_embed_dim
    )
    return packing.stack_packs([packing.build_pack(examples, shape)])


def _inputs(batch: dict, t_BS) -> list[np.ndarray]:
    text = batch["text_emb"] if "text_emb" in batch else batch["text_ids"]
    return [
        batch["tokens"],
        t_BS,
        batch["segment_ids"],
        batch["positions"],
        text,
        batch["text_mask"],
        batch["cond_mask"],
    ]


def _torch_forward(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(np.array(x, copy=True)) for x in inputs)).numpy()


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "text_embed_dim, frame_positions",
    [(0, False), (24, False), (0, True)],
    ids=["hashed_ids", "frozen_embeddings", "frame_positions"],
)
def test_torch_forward_matches_jax_packed_and_each_segment_unpacked(
    run8, tuned, text_embed_dim, frame_positions
):
    """float32, perturbed weights (adaLN-Zero would make the output 0), a null caption and clean
    conditioning tokens in the pack; each segment alone (its own pack of one) gives the same
    tokens as in the pack."""
    cfg = DiTConfig(
        patch_dim=48, width=32, depth=2, num_heads=2, text_vocab=2048, text_len=16,
        text_width=32, text_depth=1, text_heads=2, text_embed_dim=text_embed_dim,
        rope_theta=100.0, frame_positions=frame_positions, scan_layers=False,
    )  # fmt: skip
    jax_model = _perturbed(cfg)
    torch_model = _torch_model(jax_model)
    rng = np.random.default_rng(0)
    grids = [(2, 3, 4), (3, 2, 5), (1, 4, 4)]
    examples = _examples(cfg, rng, grids)
    batch = _pack(cfg, examples, seq_len=112, max_segments=4)
    t_BS = rng.uniform(0.05, 0.95, (1, 4)).astype(np.float32)
    inputs = _inputs(batch, t_BS)
    graphdef, state = nnx.split(jax_model)
    forward = lambda state, *x: nnx.merge(graphdef, state)(*x)
    want = np.asarray(run_fast_compiled(forward, state, *map(jnp.asarray, inputs)))
    assert np.abs(want).max() > 0.1  # not the trivial adaLN-Zero output
    got = _torch_forward(torch_model, inputs)
    packed_err = _rel(got, want)
    assert packed_err < FORWARD_RTOL, packed_err
    seg = batch["segment_ids"][0]
    unpacked_err = 0.0
    for k, ex in enumerate(examples):
        alone = _pack(cfg, [ex], seq_len=len(ex["patches"]), max_segments=1)
        got_k = _torch_forward(torch_model, _inputs(alone, t_BS[:, k : k + 1]))[0]
        unpacked_err = max(unpacked_err, _rel(got_k, want[0][seg == k + 1]))
    assert unpacked_err < FORWARD_RTOL, unpacked_err
    print(
        f"forward rel err ({text_embed_dim=}): packed {packed_err:.2g}, unpacked {unpacked_err:.2g}"
    )


def _requests():
    return [
        sampler.Request("a red circle moving left", frames=2, height=16, width=16, seed=1),
        sampler.Request("a blue square", frames=1, height=24, width=32, seed=2),
    ]


def _sample_pack(config, requests, patch_dim):
    """The requests laid out as generate_latents lays them out (one pack here): (order, pack)."""
    examples = [sampler.request_example(r, config, patch_dim) for r in requests]
    sizes = [len(ex["patches"]) for ex in examples]
    seq_len = max(config.sample.seq_len, *sizes)
    (order,) = packing.first_fit_decreasing(sizes, seq_len, config.data.max_segments)
    cfg = trainer.dit_config(config)
    return order, _pack(cfg, [examples[i] for i in order], seq_len, config.data.max_segments)


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_torch_sampler_matches_jax(run8, tmp_path, prediction):
    """Euler with text guidance against generate_latents (the CLI's sampler), then Heun with
    three-pass image guidance and clamped conditioning tokens against flow.sample; for a
    network of either output (flow.prediction)."""
    config = _config()
    config.flow.prediction = prediction
    cfg = trainer.dit_config(config)
    jax_model = _perturbed(cfg)
    torch_model = _torch_model(jax_model)
    export_cfg = {
        "flow": {"base_tokens": config.flow.base_tokens, "prediction": prediction},
        "sample": {"guidance": 3.0},
    }
    requests = _requests()
    want = sampler.generate_latents(jax_model, config, requests, steps=3, guidance=3.0)
    order, batch = _sample_pack(config, requests, cfg.patch_dim)
    x = torch_sample(
        torch_model, export_cfg, batch["tokens"], batch["segment_ids"], batch["positions"],
        batch["grid"], batch["text_ids"], batch["text_mask"], steps=3, solver="euler",
    )  # fmt: skip
    got = segment_latents(x, batch["segment_ids"], batch["grid"], tuple(config.model.patch))[0]
    euler_err = max(_rel(g, want[i]) for g, i in zip(got, order, strict=True))
    assert euler_err < SAMPLE_RTOL, euler_err

    # Conditioning: the first 10 tokens of request 1 held clean; Heun; image guidance 1.5.
    rng = np.random.default_rng(3)
    clean = rng.standard_normal(batch["tokens"].shape).astype(np.float32)
    cond = (batch["segment_ids"] == 1) & (np.arange(batch["segment_ids"].shape[1]) < 10)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    jb.update(noise=jb.pop("tokens"), clean=jnp.asarray(clean), cond_mask=jnp.asarray(cond))
    want = flow.sample(
        lambda x, t: sampler.guided_velocity(jax_model, jb, x, t, 3.0, 1.5, True, prediction),
        jb["noise"],
        jb["segment_ids"],
        flow.resolution_shift(jb["grid"], config.flow.base_tokens),
        2,
        solver="heun",
        clean_BLP=jb["clean"],
        cond_mask_BL=jb["cond_mask"],
        final_correction=prediction == "velocity",
    )
    got = torch_sample(
        torch_model, export_cfg, batch["tokens"], batch["segment_ids"], batch["positions"],
        batch["grid"], batch["text_ids"], batch["text_mask"], steps=2, solver="heun",
        image_guidance=1.5, clean_BLP=clean, cond_mask_BL=cond,
    ).numpy()  # fmt: skip
    live = batch["segment_ids"] > 0
    heun_err = _rel(got[live], np.asarray(want)[live])
    assert heun_err < SAMPLE_RTOL, heun_err
    np.testing.assert_array_equal(got[cond], clean[cond])  # the clamp holds them exactly
    print(f"sampler rel err: euler+cfg {euler_err:.2g}, heun+image guidance {heun_err:.2g}")


@pytest.mark.slow
def test_torch_package_runs_without_jax_or_jaxsora(exported, tmp_path):
    """The folder copied out alone, jax and jaxsora unimportable: loads the export and samples."""
    shutil.copytree(
        os.path.join(REPO, "jaxsora", "export", "torch_dit"),
        tmp_path / "torch_dit",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    script = f"""
import sys
for name in ("jax", "jaxlib", "flax", "jaxsora"):
    sys.modules[name] = None  # any import of them fails
import torch, torch_dit
model, config = torch_dit.load_pretrained({exported!r})
L, S, Lt, P = 40, config["pack"]["max_segments"], config["text_len"], config["patch_dim"]
seg = torch.zeros(1, L, dtype=torch.int32); seg[0, :32] = 1
pos = torch.zeros(1, L, 3, dtype=torch.int32)
grid = torch.zeros(1, S, 3, dtype=torch.int32); grid[0, 0] = torch.tensor([2, 4, 4])
ids = torch.ones(1, S, Lt, dtype=torch.int32); mask = torch.zeros(1, S, Lt, dtype=torch.bool)
mask[0, 0, :3] = True
x = torch_dit.sample(model, config, torch.randn(1, L, P), seg, pos, grid, ids, mask, steps=2)
assert torch.isfinite(x).all() and x.shape == (1, L, P)
print("OK", [m for m in sys.modules if m.startswith(("jax", "flax"))])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "OK"


# --------------------------------------------------------------------------------- round trip


def _params(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _assert_bitwise(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_from_8_device_checkpoint_is_bitwise(run8, exported, tmp_path):
    """EMA (the default) and raw weights: checkpoint (8-device mesh, scanned blocks) ->
    safetensors (this process, 1 device) -> import -> load_run is every parameter bit for bit,
    and the imported run's config is the exported run's."""
    ema, config = sampler.load_run(run8.workdir)
    raw, _ = sampler.load_run(run8.workdir, use_ema=False)
    assert config.model.scan_layers and dict(config.mesh)["fsdp"] == 4
    with open(os.path.join(exported, "config.json")) as f:
        exported_config = json.load(f)
    assert exported_config["width"] == config.model.width
    assert exported_config["pack"]["max_segments"] == config.data.max_segments
    assert exported_config["flow"]["base_tokens"] == config.flow.base_tokens
    assert "text" not in exported_config  # hashed captions carry no encoder identity

    imported = str(tmp_path / "imported")
    assert export.import_dit(exported, imported) == 0
    back, back_config = sampler.load_run(imported)
    _assert_bitwise(_params(back), _params(ema))
    assert back_config.to_dict() == config.to_dict()

    raw_dir = str(tmp_path / "raw")
    export.export_dit(run8.workdir, raw_dir, use_ema=False)
    raw_params = _params(raw)
    raw_file = tables.load_safetensors(raw_dir)
    _assert_bitwise(export.torch_state_dict(raw), raw_file)
    assert any(not np.array_equal(raw_params[k], v) for k, v in _params(ema).items())


def test_sharded_export_writes_the_index_and_loads_back_identically(run8, exported, tmp_path):
    sharded = str(tmp_path / "sharded")
    summary = export.export_dit(run8.wait(), sharded, max_shard_bytes=64 * 1024)
    with open(os.path.join(sharded, tables.INDEX_FILE)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not os.path.exists(os.path.join(sharded, tables.SINGLE_FILE))
    single = tables.load_safetensors(exported)
    shards = tables.load_safetensors(sharded)
    assert index["metadata"]["total_size"] == summary["total_bytes"]
    assert summary["total_bytes"] == sum(v.nbytes for v in single.values())
    assert set(index["weight_map"]) == set(single)
    _assert_bitwise(shards, single)
    t_single, _ = load_pretrained(exported)
    t_sharded, _ = load_pretrained(sharded)
    for k, v in t_single.state_dict().items():
        assert torch.equal(v, t_sharded.state_dict()[k]), k
    # and imported from the index, the same weights again
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    export.import_dit(os.path.join(sharded, tables.INDEX_FILE), a)
    export.import_dit(exported, b)
    _assert_bitwise(_params(sampler.load_run(a)[0]), _params(sampler.load_run(b)[0]))


# --------------------------------------------------------------------------------- bad inputs


def _copy(exported, tmp_path, name) -> str:
    folder = str(tmp_path / name)
    os.makedirs(folder)
    shutil.copy(os.path.join(exported, "config.json"), folder)
    return folder


def test_bad_weights_are_refused_naming_the_file_and_keys(exported, tmp_path):
    weights = load_file(os.path.join(exported, tables.SINGLE_FILE))

    def refused(folder, *needles):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            export.import_dit(folder, str(tmp_path / "never"))
        for needle in needles:
            assert needle in str(e.value), (needle, str(e.value))
        assert not os.path.exists(tmp_path / "never" / "checkpoints")
        return str(e.value)

    # Truncated: the last tensors of the file are cut off.
    folder = _copy(exported, tmp_path, "truncated")
    with open(os.path.join(exported, tables.SINGLE_FILE), "rb") as f:
        data = f.read()
    path = os.path.join(folder, tables.SINGLE_FILE)
    with open(path, "wb") as f:
        f.write(data[:-5000])
    refused(folder, path, "truncated", "time_mlp2.weight")

    # A missing key and an unexpected one, reported together.
    folder = _copy(exported, tmp_path, "keys")
    bad = dict(weights)
    del bad["blocks.1.mlp.fc1.bias"]
    bad["blocks.1.mlp.fc3.bias"] = np.zeros(3, np.float32)
    path = os.path.join(folder, tables.SINGLE_FILE)
    save_file(bad, path)
    msg = refused(folder, path, "blocks.1.mlp.fc1.bias", "missing", "blocks.1.mlp.fc3.bias")
    assert "1 missing, 1 unexpected, 0 misshapen" in msg

    # A misshapen tensor (e.g. a kernel left in JAX's [in, out] layout).
    folder = _copy(exported, tmp_path, "shape")
    bad = dict(weights)
    bad["patch_in.weight"] = np.ascontiguousarray(bad["patch_in.weight"].T)
    path = os.path.join(folder, tables.SINGLE_FILE)
    save_file(bad, path)
    msg = refused(folder, path, "patch_in.weight", "(32, 48)", "(48, 32)")
    assert "1 misshapen" in msg

    # A pickle: refused before it is opened.
    folder = _copy(exported, tmp_path, "pickle")
    path = os.path.join(folder, "pytorch_model.bin")
    with open(path, "wb") as f:
        f.write(b"not really a pickle")
    refused(folder, path, "pickle")
    refused(path, path, "pickle")


def test_the_import_samples_and_fine_tunes(tuned):
    """load_run(import) is the exported model bit for bit; `python -m jaxsora.train` on it runs
    from step 0 with a fresh optimizer (EMA = model = the weights) and writes step 1."""
    params, workdir, as_imported, run = tuned
    for use_ema in (True, False):
        _assert_bitwise(_params(sampler.load_run(as_imported, use_ema)[0]), params)
    run.wait()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert rows[0]["grad_norm"] > 0  # (step 1's learning rate is warmup's 0: weights unchanged)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "1"]
