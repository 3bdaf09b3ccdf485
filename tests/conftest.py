"""Shared fixtures: small datasets built once per test session, and the runlocal config."""

import pytest


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
