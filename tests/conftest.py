"""Shared fixtures: small datasets built once per test session, and the runlocal config."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """synthetic_clips (default and small) built into one TFDS data dir."""
    from data_pipelines.build import build

    path = str(tmp_path_factory.mktemp("tfds"))
    build("synthetic_clips:small", path)
    build("synthetic_clips", path)
    return path


def runlocal_config(data_dir: str, arg: str = "runlocal"):
    from experiments import tiny

    c = tiny.get_config(arg)
    c.data.data_dir = data_dir
    c.data.sources = [dict(name="synthetic_clips/small", weight=1.0)]
    return c


def randomize_params(model, scale: float = 0.2, seed: int = 1):
    """adaLN-Zero starts every block and the output at zero, which makes output properties
    trivially true; perturb every weight so the tests exercise the real computation."""
    import jax
    from flax import nnx

    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))
    return model


def run_module_result(module: str, *args: str, timeout: int = 600) -> dict:
    """Runs `python -m module` in a fresh process (one that may configure simulated devices before
    JAX starts) and returns the JSON it printed after "RESULT "; fails with its stderr if none."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # a forced device count there would fight jax_num_cpu_devices
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{module} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))
