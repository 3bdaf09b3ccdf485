"""Experiment configs named on a command line: `path/to/config.py[:args]` -> its
`get_config(args)`, as the trainers' --config reads them (ml_collections' config_flags), for
the tools that take a config without being trainers (jaxsora.params, jaxsora.export)."""

from __future__ import annotations

import importlib.util
import os


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location("jaxsora_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
