"""Checkpoints that lose nothing: a damaged step gives way to the previous one (or stops the run
under the strict flag), a data-iterator file tells damage from another process count, checksums
catch flipped weights, a full disk ends in one clear error, and the resume rules
(jaxsora/resume.py) refuse, allow or log each class of config field.

One real run of the training CLI writes checkpoints 3 and 6; every damage kind is applied to a
copy and restored in this process through the trainer's Checkpointer and restore target."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import vae_tiny
from jaxsora import sharding, training, validation
from jaxsora import train as trainer
from jaxsora.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    resume_check,
)
from jaxsora.compression import make_stage
from jaxsora.data import pipeline
from jaxsora.resume import check_resume
from tests.conftest import REPO, runlocal_config
from tests.test_train import run_train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> str:
    """The training CLI, 6 steps: checkpoints 3 and 6."""
    workdir = str(tmp_path_factory.mktemp("checkpointing") / "run")
    run_train(workdir, data_dir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    return workdir


@pytest.fixture(scope="module")
def trained(run, data_dir):
    """(config, restore target) as the trainer builds them for that run."""
    config = runlocal_config(data_dir, "runlocal,steps=6")
    config.log_every = 1
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.sharding_rules)
    _, state = nnx.split(trainer.create_train_state(config, mesh, rules))
    return config, trainer.checkpoint_target(state)


def copy_run(run, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(run, workdir)
    return workdir


def restore(workdir, config, target, **checkpointer):
    """What train() does at start-up: (step, state) or None, and the data iterator."""
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, **checkpointer)
    batches = validation.CountedBatches(pipeline.make_batches(config, make_stage(config.model)))
    try:
        return ckpt.restore_latest(target, batches, resume_check(config)), batches
    finally:
        ckpt.close()


def data_state(workdir, step) -> dict:
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- damage
def _largest_state_file(step_dir) -> str:
    walk = os.walk(os.path.join(step_dir, "state"))
    files = [os.path.join(root, f) for root, _, names in walk for f in names]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_state_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip(step_dir):
    """64 bytes inverted mid-file. The arrays are zstd-compressed: the flip either breaks the
    decompression (a read error) or decodes to other numbers (only the checksum can tell: they
    loaded silently, and finite, before checksums). Either must be caught."""
    path = _largest_state_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _rewrite_weights(step_dir):
    """The arrays rewritten by a valid writer with one weight changed (a well-formed file with
    wrong numbers, as a flip that still decompresses gives): only the checksum can tell."""
    import orbax.checkpoint as ocp

    state = os.path.join(step_dir, "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(state)
        kernel = tree["model"]["blocks"]
        tree["model"]["blocks"] = jax.tree.map(lambda x: np.asarray(x) + 1e-3, kernel)
        checkpointer.save(state + ".rewritten", tree)
    shutil.rmtree(state)
    os.rename(state + ".rewritten", state)


def _write(relative, text):
    def damage(step_dir):
        with open(os.path.join(step_dir, relative), "w") as f:
            f.write(text)

    return damage


def _remove(relative):
    def damage(step_dir):
        path = os.path.join(step_dir, relative)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    return damage


DATA_FILE = "data/process_0-of-1.json"
DAMAGE = {  # kind: (damage, what the warning says)
    "truncated array file": (_truncate, "reading it failed: OUT_OF_RANGE"),
    "flipped array bytes": (_flip, ("differ from their saved crc32", "reading it failed")),
    "rewritten weights": (_rewrite_weights, "differ from their saved crc32"),
    "no _METADATA": (_remove("state/_METADATA"), "state/_METADATA is missing"),
    "no manifest.ocdbt": (_remove("state/manifest.ocdbt"), "state/manifest.ocdbt is missing"),
    "no state/": (_remove("state"), "state/ is missing"),
    "no data/": (_remove("data"), "data/ is missing"),
    "garbage config": (_write("config/metadata", "{garbage"), "config/metadata is not valid JSON"),
    "empty data file": (_write(DATA_FILE, ""), f"{DATA_FILE} is empty"),
    "deleted data file": (_remove(DATA_FILE), f"{DATA_FILE} is missing"),
    "garbled data file": (_write(DATA_FILE, '{"next_ind'), f"{DATA_FILE} is not valid JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_latest_step_stops_under_the_flag_or_gives_way_to_the_previous(
    kind, run, trained, tmp_path, caplog
):
    config, target = trained
    workdir = copy_run(run, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    bad = os.path.join(checkpoints, "6")
    damage, why = DAMAGE[kind]
    damage(bad)

    with pytest.raises(CheckpointCorruptError) as strict:
        restore(workdir, config, target, fall_back=False)
    whys = why if isinstance(why, tuple) else (why,)
    assert f"checkpoint {bad} is damaged" in str(strict.value), str(strict.value)
    assert any(w in str(strict.value) for w in whys), str(strict.value)
    assert "stop_on_damaged_checkpoint=False" in str(strict.value)
    assert sorted(os.listdir(checkpoints)) == ["3", "6"]  # the strict stop moves nothing

    with caplog.at_level(logging.WARNING):
        (step, state), batches = restore(workdir, config, target)
    assert step == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"checkpoint {bad} is damaged" in warnings[0], warnings
    assert any(w in warnings[0] for w in whys) and "resumed from step 3" in warnings[0]
    assert sorted(os.listdir(checkpoints)) == ["3", "corrupt"]
    assert os.listdir(os.path.join(checkpoints, "corrupt")) == ["6"]  # kept for inspection
    assert batches.get_state() == data_state(workdir, 3)  # the stream is step 3's too
    assert int(state["step"]) == 3


def test_after_a_fallback_the_run_saves_that_step_again(run, trained, tmp_path):
    config, target = trained
    workdir = copy_run(run, tmp_path)
    _write("config/metadata", "[]")(os.path.join(workdir, "checkpoints", "6"))
    ckpt = Checkpointer(workdir)
    batches = pipeline.make_batches(config, make_stage(config.model))
    step, state = ckpt.restore_latest(target, batches, resume_check(config))
    assert step == 3
    ckpt.save(6, state, batches, config.to_json())
    ckpt.close()
    assert Checkpointer(workdir).latest_step() == 6
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt", "6"))


def test_another_process_count_is_the_only_fresh_start_of_the_stream(
    run, trained, tmp_path, caplog
):
    config, target = trained
    workdir = copy_run(run, tmp_path)
    data = os.path.join(workdir, "checkpoints", "6", "data")
    os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
    with caplog.at_level(logging.WARNING):
        (step, _), batches = restore(workdir, config, target)
    assert step == 6  # the weights resume; the position is per process, so the stream restarts
    assert "data iterator starts afresh" in caplog.text and "written by 2 processes" in caplog.text
    fresh = validation.CountedBatches(pipeline.make_batches(config, make_stage(config.model)))
    assert batches.get_state() == fresh.get_state()


def test_when_no_step_loads_it_is_an_error_and_nothing_moves(run, trained, tmp_path):
    config, target = trained
    workdir = copy_run(run, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    for step in ("3", "6"):
        _remove("data")(os.path.join(checkpoints, step))
    with pytest.raises(CheckpointCorruptError, match=f"no checkpoint in {checkpoints} can be"):
        restore(workdir, config, target)
    assert sorted(os.listdir(checkpoints)) == ["3", "6"]


def test_a_config_the_checkpoint_refuses_never_falls_back(run, trained, tmp_path):
    config, target = trained
    workdir = copy_run(run, tmp_path)
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.width = 64
    with pytest.raises(CheckpointMismatchError, match="model.width=32"):
        restore(workdir, other, target)
    # A state of another shape, whatever the config says, is refused as such, not as damage.
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.depth = 3
    with pytest.raises(CheckpointMismatchError, match="holds another state: ema.blocks.2"):
        Checkpointer(workdir).restore_latest(abstract_state(other))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def abstract_state(config):
    """The trainer's state for `config` on one device, without initialising it (as the sampler
    builds its restore target)."""
    cfg = trainer.dit_config(config)
    tx = training.make_optimizer(config.optim, config.total_steps)
    abstract = nnx.eval_shape(
        lambda: trainer.TrainState(trainer.make_model(cfg, config.seed), tx, config.seed)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.split(abstract)[1].to_pure_dict(),
    )


def test_keep_checkpoints_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints=0 must be >= 1"):
        Checkpointer(str(tmp_path), keep=0)


# ---------------------------------------------------------------------------------- disk full
def _private_mounts() -> list[str] | None:
    """A command prefix whose mounts vanish with it: root needs only a mount namespace."""
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = prefix + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"]
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
            return prefix
    return None


def test_a_full_disk_ends_in_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    prefix = _private_mounts()
    if prefix is None:
        pytest.skip(
            "a real full disk needs a small tmpfs in a private mount namespace (root, or "
            "unprivileged user namespaces for `unshare --user`), which this machine refuses; the "
            "free-space refusal is still tested by test_a_save_the_disk_cannot_hold_is_refused_"
            "before_a_byte_is_written"
        )
    # 1,500 KiB: the first checkpoint (~870 KiB) fits, the second does not.
    mounts = " && ".join(
        f"mkdir -p {tmp_path}/{m} && mount -t tmpfs -o size=1500k tmpfs {tmp_path}/{m}"
        for m in ("preflight", "mid_save")
    )
    command = f"{mounts} && exec {sys.executable} -m tests.disk_full_check {tmp_path}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        prefix + ["sh", "-c", command], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    for mode, r in results.items():
        assert r["errno"] == 28 and "no space left on device" in r["error"], (mode, r)
        assert f"{tmp_path}/{mode}/checkpoints" in r["error"], r
        assert r["left"] == ["1"], (mode, r)  # no *.orbax-checkpoint-tmp, step 1 kept (keep=1)
        assert r["restored"] == 1 and r["same"], (mode, r)
    assert "nothing was written" in results["preflight"]["error"]
    assert "step 2" in results["mid_save"]["error"]
    assert "partial save was removed" in results["mid_save"]["error"]
    # Orbax's echoes of the failed write (1,500+ lines in a training run) are gone.
    assert "Event loop is closed" not in done.stderr and "never retrieved" not in done.stderr
    assert len(done.stderr.splitlines()) < 30, done.stderr[-3000:]


# -------------------------------------------------------------------------------- resume rules
@pytest.fixture(scope="module")
def saved_config(data_dir) -> dict:
    """What a run of the runlocal config saves as its config (the checkpoint's `config` item)."""
    return json.loads(runlocal_config(data_dir, "runlocal,steps=6").to_json())


def changed(config: dict, name: str, value) -> dict:
    out = json.loads(json.dumps(config))
    *path, last = name.split(".")
    node = out
    for key in path:
        node = node[key]
    node[last] = value
    return out


WHERE = "runs/x/checkpoints/6"


@pytest.mark.parametrize(
    "name, value",
    [("model.width", 64), ("model.vae_dir", "/elsewhere"), ("vae.z_dim", 8)],
)
def test_a_field_that_defines_the_weights_is_refused_even_with_the_flag(saved_config, name, value):
    vae = json.loads(vae_tiny.get_config().to_json())
    saved = saved_config if name.startswith("model") else vae
    with pytest.raises(CheckpointMismatchError, match=f"{name}=.* but the config says {name}="):
        check_resume(saved, changed(saved, name, value), WHERE, allow_schedule_change=True)


def test_a_checkpoint_from_before_a_new_model_field_reads_as_its_old_meaning(saved_config):
    """model.frame_positions did not exist before 2026-12-02: a config saved without it was
    trained without fractional positions, so it resumes under False and is refused under True;
    likewise flow.prediction (velocity before it existed)."""
    old = json.loads(json.dumps(saved_config))
    del old["model"]["frame_positions"]
    check_resume(old, changed(saved_config, "model.frame_positions", False), WHERE)
    with pytest.raises(CheckpointMismatchError, match="model.frame_positions=False but the"):
        check_resume(old, changed(saved_config, "model.frame_positions", True), WHERE)
    # flow.prediction (2026-12-03): absent meant velocity; data is another objective.
    old = json.loads(json.dumps(saved_config))
    del old["flow"]["prediction"]
    check_resume(old, changed(saved_config, "flow.prediction", "velocity"), WHERE)
    with pytest.raises(CheckpointMismatchError, match="flow.prediction='velocity' -> 'data'"):
        check_resume(old, changed(saved_config, "flow.prediction", "data"), WHERE)


def test_scan_layers_is_refused_as_another_parameter_tree(saved_config):
    with pytest.raises(CheckpointMismatchError, match="another parameter tree"):
        check_resume(saved_config, changed(saved_config, "model.scan_layers", True), WHERE)


@pytest.mark.parametrize(
    "name, value",
    [
        ("model.attention", "splash"),
        ("model.dtype", "bfloat16"),
        ("model.remat", "full"),
        ("optim.accum_steps", 2),
        ("mesh.fsdp", 4),
        ("checkpoint_every", 100),
        ("vae.dtype", "bfloat16"),
    ],
)
def test_an_execution_field_may_change_and_is_logged(saved_config, name, value, caplog):
    saved = saved_config if not name.startswith("vae") else vae_tiny.get_config().to_dict()
    saved = json.loads(json.dumps(saved))
    with caplog.at_level(logging.INFO):
        check_resume(saved, changed(saved, name, value), WHERE)
    assert f"resuming with {name} changed" in caplog.text


@pytest.mark.parametrize(
    "name, value",
    [("optim.lr", 5e-4), ("optim.ema_decay", 0.9), ("total_steps", 10), ("batch_size", 4)],
)
def test_a_schedule_field_needs_the_flag_and_is_then_logged(saved_config, name, value, caplog):
    current = changed(saved_config, name, value)
    with pytest.raises(CheckpointMismatchError, match=f"{name}=.*allow_schedule_change=True"):
        check_resume(saved_config, current, WHERE)
    with caplog.at_level(logging.INFO):
        check_resume(saved_config, current, WHERE, allow_schedule_change=True)
    assert f"resuming with {name} changed" in caplog.text and "(schedule)" in caplog.text


def test_the_trainer_resumes_with_new_execution_settings(run, trained, tmp_path):
    """The rule on a real restore: another attention backend, remat, compute dtype and
    accumulation load the CPU checkpoint as it is."""
    config, _ = trained
    moved = ml_collections.ConfigDict(config.to_dict())
    moved.model.attention, moved.model.remat, moved.model.dtype = "splash", "full", "bfloat16"
    moved.optim.accum_steps = 2
    (step, state), _ = restore(copy_run(run, tmp_path), moved, abstract_state(moved))
    assert step == 6
    np.testing.assert_array_equal(np.asarray(state["step"]), 6)


def test_a_save_the_disk_cannot_hold_is_refused_before_a_byte_is_written(tmp_path, monkeypatch):
    """The pre-flight check on any machine (no mount needed): with less free space than the
    state needs, save() raises one ENOSPC error naming the directory, writes nothing, and the
    last good checkpoint still restores."""
    import errno

    import jax.numpy as jnp

    from jaxsora import checkpointing
    from tests.disk_full_check import _Data

    state = {"w": jnp.arange(50_000, dtype=jnp.float32)}
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, state, _Data(), "{}")
    ckpt.wait()
    real = shutil.disk_usage
    monkeypatch.setattr(
        checkpointing.shutil,
        "disk_usage",
        lambda path: real(path)._replace(free=100_000),  # less than step 1's ~200 KB
    )
    with pytest.raises(checkpointing.CheckpointDiskFullError) as err:
        ckpt.save(2, state, _Data(), "{}")
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert "no space left on device" in message and ckpt.directory in message, message
    assert "nothing was written" in message and "checkpoints/1" in message, message
    ckpt.close()
    assert sorted(os.listdir(ckpt.directory)) == ["1"]
    step, restored = Checkpointer(str(tmp_path), read_only=True).restore_latest(
        checkpointing.abstract_like(state)
    )
    assert step == 1 and np.array_equal(restored["w"], np.asarray(state["w"]))
