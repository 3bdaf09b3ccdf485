"""Shared fixtures: small datasets built once per test session, and the runlocal config."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, fresh each run: the many training
    processes the tests start (runs, their resumed reruns, pods) compile the same steps, and
    each compile is a large share of a short run on 2 cores. Set by the controller before the
    xdist workers start, so workers and every process they launch inherit it; JAX reads it at
    import. Fresh per run, so compile-time tests still measure real compiles."""
    if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsora-xla-cache-")
        config._jaxsora_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
        # Every compile cached, not only those over 1 s: a fresh training process compiles
        # hundreds of small programs (its eager ops, its init) that the previous one compiled.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if "PYTEST_XDIST_WORKER" not in os.environ:
        # LLVM unoptimised: the suite's programs run a few steps each, and compiling them is
        # most of their time (a 4-step VAE run: 39 s instead of 70 s, the same losses to the
        # last bit). Numerics are the same float semantics; every run in a test is compiled
        # alike. Tests that compare against PyTorch or scikit-image keep their tolerances.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def pytest_unconfigure(config):
    cache = getattr(config, "_jaxsora_cache_dir", None)
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


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
    trivially true; perturb every weight so the tests exercise the real computation.

    The noise is drawn in NumPy: eager jax.random calls compile once per leaf shape, which was
    most of a small test's time on a 2-core machine."""
    import jax
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32),
        nnx.state(model, nnx.Param),
    )
    nnx.update(model, noisy)
    return model


def run_fast_compiled(fn, *args):
    """jit(fn)(*args), compiled without LLVM's optimisations: a third of the compile time of
    small test programs, the same float semantics, and every variant compiled alike."""
    import jax

    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def run_module_result(module: str, *args: str, timeout: int = 600) -> dict:
    """Runs `python -m module` in a fresh process (one that may configure simulated devices before
    JAX starts) and returns the JSON it printed after "RESULT "; fails with its stderr if none."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # A forced device count there would fight jax_num_cpu_devices; the other flags stay.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
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


def write_ramp_mp4(path, frames, height, width, phase):
    """A moving colour ramp, H.264: every frame differs (a wrong frame index shows) and so do
    clips of another `phase`."""
    import av
    import numpy as np

    y, x = np.mgrid[:height, :width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.stack(
                [(x * 9 + 23 * i + phase) % 256, (y * 11 + 5 * i) % 256, np.full_like(x, phase)],
                -1,
            ).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, each module's tests kept together (module fixtures are
    set up once per worker): xdist then hands the many quick tests out last, and the two
    workers finish together instead of one waiting on a long test that started late."""
    heavy = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in heavy)
