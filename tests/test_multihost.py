"""Several processes on localhost, as on a pod: preemption, exact resume, resharded restore, a
killed peer. Each process is a real `python -m jaxsora.train` joined by jax.distributed (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsora.launch import free_port, process_env
from jaxsora.sample import load_run
from tests import restore_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def train_command(workdir, data_dir, steps, *overrides):
    return [
        sys.executable,
        "-m",
        "jaxsora.train",
        "--config",
        f"experiments/tiny.py:runlocal,steps={steps},source=synthetic_clips/small",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        "--config.log_every=1",
        "--config.checkpoint_every=3",
        "--config.batch_size=4",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        *overrides,
    ]  # weights sharded across processes


def start_pod(workdir, data_dir, steps, *overrides, processes=2, heartbeat=100):
    """The processes a pod (or jaxsora.launch) runs, with their PIDs so tests can signal one."""
    port = free_port()
    children = []
    for i in range(processes):
        env = process_env(port, processes, i, devices_per_process=2, heartbeat_timeout=heartbeat)
        log = open(os.path.join(str(workdir) + f".p{i}.log"), "a")  # noqa: SIM115
        children.append(
            subprocess.Popen(
                train_command(workdir, data_dir, steps, *overrides),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return children


def wait_all(children, timeout=600):
    return [c.wait(timeout=timeout) for c in children]


def logs(workdir, processes=2):
    return "\n".join(open(f"{workdir}.p{i}.log").read()[-2000:] for i in range(processes))


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def wait_for_step(workdir, step, children, timeout=600, log=logs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            os.path.exists(os.path.join(workdir, "metrics.jsonl"))
            and max(losses(workdir), default=0) >= step
        ):
            return
        assert all(c.poll() is None for c in children), log(workdir)
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """12 steps on 2 processes x 2 devices, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("pod") / "straight")
    children = start_pod(workdir, data_dir, steps=12)
    assert wait_all(children) == [0, 0], logs(workdir)
    return workdir


def test_sigterm_to_one_host_saves_everywhere_and_resume_is_bitwise_exact(
    straight_run, data_dir, tmp_path
):
    workdir = str(tmp_path / "preempted")
    children = start_pod(workdir, data_dir, steps=12)
    wait_for_step(workdir, 4, children)
    children[1].send_signal(signal.SIGTERM)  # one host is preempted
    assert wait_all(children) == [0, 0], logs(workdir)
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    stopped = saved[-1]
    assert 4 <= stopped < 12, saved
    assert max(losses(workdir)) == stopped
    for i in range(2):  # both hosts wrote their iterator state at the same step
        assert os.path.exists(
            os.path.join(workdir, "checkpoints", str(stopped), "data", f"process_{i}-of-2.json")
        )

    children = start_pod(workdir, data_dir, steps=12)
    assert wait_all(children) == [0, 0], logs(workdir)
    a, b = losses(straight_run), losses(workdir)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    for use_ema in (False, True):  # restored here on 1 process x 1 device
        (m1, _), (m2, _) = load_run(straight_run, use_ema), load_run(workdir, use_ema)
        import jax
        from flax import nnx

        for x, y in zip(
            jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_written_on_2x2_restores_identically_on_1x4_and_1x1_and_exports(
    straight_run, tmp_path
):
    out = str(tmp_path / "restored_1x4.npz")
    done = subprocess.run(
        [sys.executable, "-m", "tests.restore_check", straight_run, "4", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    on_four = np.load(out)
    assert int(on_four["__shards__"]) == 4, "restored weights must really be split 4 ways"
    on_one, shards = restore_check.restore(straight_run, 1)
    assert shards == 1
    assert set(on_one) == set(on_four.files) - {"__shards__"}
    for name, value in on_one.items():
        np.testing.assert_array_equal(value, on_four[name], err_msg=name)

    # The DiT export streams the 2-process checkpoint here, in one process, leaf by leaf: the
    # file holds exactly the weights a whole restore gives (jaxsora/export/dit.py).
    from jaxsora.export import dit as dit_export
    from jaxsora.export import tables

    summary = dit_export.export_dit(straight_run, str(tmp_path / "export"))
    exported = tables.load_safetensors(summary["out_dir"])
    whole = dit_export.torch_state_dict(load_run(straight_run)[0])
    assert exported.keys() == whole.keys()
    for name, value in whole.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_sigkill_of_a_peer_ends_the_job_and_leaves_the_last_checkpoint_usable(data_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    heartbeat = 10
    children = start_pod(workdir, data_dir, steps=100_000, heartbeat=heartbeat)
    wait_for_step(workdir, 7, children)  # checkpoints at 3 and 6 exist
    children[1].kill()
    killed_at = time.monotonic()
    code = children[0].wait(timeout=heartbeat + 120)
    waited = time.monotonic() - killed_at
    assert code != 0, "the survivor must fail, not report success"
    assert waited < heartbeat + 60, waited
    model, config = load_run(workdir)  # the last committed checkpoint restores
    assert config.total_steps == 100_000 and model is not None


def launcher_log(workdir):
    return open(f"{workdir}.launch.log").read()[-4000:]


def test_ctrl_c_through_the_launcher_saves_the_same_step_everywhere_and_resumes_exactly(
    straight_run, data_dir, tmp_path
):
    """A terminal's Ctrl-C goes to its whole foreground process group: here the launcher's (a
    shell job of its own), which holds every process it started unless they have a session of
    their own. It must act as SIGTERM: all save one step and exit 0."""
    workdir = str(tmp_path / "interrupted")
    command = [sys.executable, "-m", "jaxsora.launch", "--processes", "2"]
    command += ["--devices-per-process", "2", "--", *train_command(workdir, data_dir, 12)]
    with open(f"{workdir}.launch.log", "w") as log:
        launcher = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for_step(workdir, 3, [launcher], log=launcher_log)
    os.killpg(launcher.pid, signal.SIGINT)
    assert launcher.wait(timeout=300) == 0, launcher_log(workdir)
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    stopped = saved[-1]
    assert 3 <= stopped < 12 and max(losses(workdir)) == stopped, (saved, launcher_log(workdir))
    for i in range(2):  # both hosts wrote their iterator state at the same step
        assert os.path.exists(
            os.path.join(workdir, "checkpoints", str(stopped), "data", f"process_{i}-of-2.json")
        )

    # The losses so far are the uninterrupted run's (resuming from such a save is bitwise exact:
    # the SIGTERM test above; a rerun here would double this test's time).
    a, b = losses(straight_run), losses(workdir)
    assert sorted(b) == list(range(1, stopped + 1))
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}
