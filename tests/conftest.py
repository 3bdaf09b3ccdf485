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
