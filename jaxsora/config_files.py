"""Experiment configs named on a command line: `path/to/config.py[:args]` -> its
`get_config(args)`, as the trainers' --config reads them (ml_collections' config_flags), for
the tools that take a config without being trainers (jaxsora.params, jaxsora.export), and the
same for other Python spec files (the scaling sweeps' `get_sweep`)."""

from __future__ import annotations

import importlib.util
import os


def load_spec_file(spec: str, flag: str = "--config"):
    """(the module of `path` in `path[:arg]`, arg or None); a missing file names the flag."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location("jaxsora_cli_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, arg or None


def load_config(spec: str):
    module, arg = load_spec_file(spec)
    return module.get_config(arg)
