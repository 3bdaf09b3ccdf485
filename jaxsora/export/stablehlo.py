"""The DiT's forward pass as a StableHLO artifact (`jax.export`): reloaded and called with jax,
numpy and safetensors alone, no jaxsora model code.

    python -m jaxsora.export export-dit --format stablehlo --workdir runs/default --out dit_hlo/

writes three files to the output folder:

  denoiser.stablehlo   the serialized `jax.export.Exported` of a pure function
                       f(params, x_BLP, t_BS, segment_ids_BL, positions_BL3, text, text_mask_BSLt,
                       cond_mask_BL) -> v_BLP, polymorphic in the number of packs (b) and the pack
                       length (l); S, Lt, P (and Dt) are fixed by the run
  params.safetensors   the weights as a flat {dotted path: array} file: weights live outside the
                       program (a smaller program, and weights of another step of the same run
                       swap in without re-exporting)
  signature.json       inputs (names, dtypes, shapes with "b"/"l" as strings), the output, the
                       params' order in the program's argument tree, the calling convention
                       version and the model config

`params` is the flat dict itself (its jax.tree order is its sorted keys), so a caller rebuilds
the argument from the safetensors file by name; `load_denoiser` also checks the recorded order
against the program's own argument tree and refuses a file that disagrees.

This module imports no model code at import time: `load_denoiser` runs where jaxsora.models (and
flax) are not installed; `export_denoiser` imports them when called.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

PROGRAM_FILE = "denoiser.stablehlo"
PARAMS_FILE = "params.safetensors"
SIGNATURE_FILE = "signature.json"
FORMAT = "jaxsora-dit-stablehlo/1"
# Lowered for every platform at once (one module, a platform index chosen at call time): the
# model is plain jnp (the "xla" attention backend), so the artifact runs wherever jax does.
PLATFORMS = ("cpu", "cuda", "tpu")
# The model's inputs after params, in call order.
INPUT_NAMES = (
    "x_BLP",
    "t_BS",
    "segment_ids_BL",
    "positions_BL3",
    "text",
    "text_mask_BSLt",
    "cond_mask_BL",
)


def dotted(path) -> str:
    """'blocks.self_attn.q.kernel', 'captions.layers.0.mlp.fc1.bias' from a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            raise TypeError(f"unexpected key {key!r} in a params path")
    return ".".join(parts)


def input_specs(
    patch_dim: int, max_segments: int, text_len: int, text_embed_dim: int
) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of each model input; "b" and "l" are the symbolic dims."""
    S, Lt, P = max_segments, text_len, patch_dim
    text = ("text_BSLtDt", "float32", ("b", S, Lt, text_embed_dim))
    if not text_embed_dim:
        text = ("text_BSLt", "int32", ("b", S, Lt))
    return [
        ("x_BLP", "float32", ("b", "l", P)),
        ("t_BS", "float32", ("b", S)),
        ("segment_ids_BL", "int32", ("b", "l")),
        ("positions_BL3", "int32", ("b", "l", 3)),
        text,
        ("text_mask_BSLt", "bool", ("b", S, Lt)),
        ("cond_mask_BL", "bool", ("b", "l")),
    ]


def _sds(shape, dtype, dims: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in shape), jnp.dtype(dtype))


def export_denoiser(
    model,
    *,
    max_segments: int,
    text_len: int,
    out_dir: str,
    platforms: tuple[str, ...] = PLATFORMS,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Writes the denoiser of `model` (a jaxsora DiT) to `out_dir`; returns a summary (sizes in
    bytes, export seconds). `metadata` goes into signature.json as "source"."""
    import dataclasses

    from flax import nnx

    cfg = model.cfg
    if text_len > cfg.text_len:
        raise ValueError(
            f"text_len={text_len} exceeds the model's caption length model.text_len="
            f"{cfg.text_len} (its learned positions); export with text_len <= {cfg.text_len}"
        )
    if cfg.attention != "xla":
        # splash is a Pallas TPU kernel, context/ring need a mesh: none belongs in a portable
        # single-device artifact, and the weights do not depend on the backend.
        model = nnx.merge(*nnx.split(model))  # a copy: the caller's model is left as it was
        for _, m in nnx.iter_graph(model):
            if getattr(m, "backend", "xla") != "xla":
                m.backend = "xla"
    start = time.perf_counter()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = params.to_pure_dict()
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [dotted(p) for p, _ in paths]
    if len(set(names)) != len(names):
        raise ValueError("two params share a dotted path; the flat file would lose one")
    flat = {
        n: np.ascontiguousarray(np.asarray(leaf)) for n, (_, leaf) in zip(names, paths, strict=True)
    }

    def denoiser(flat_params, x_BLP, t_BS, segment_ids_BL, positions_BL3, text, mask, cond_BL):
        state = jax.tree.map(lambda v: v, params)  # a fresh State to fill; `params` is kept
        nested = jax.tree.unflatten(treedef, [flat_params[n] for n in names])
        nnx.replace_by_pure_dict(state, nested)
        net = nnx.merge(graphdef, state, rest)
        return net(x_BLP, t_BS, segment_ids_BL, positions_BL3, text, mask, cond_BL)

    specs = input_specs(cfg.patch_dim, max_segments, text_len, cfg.text_embed_dim)
    packs, length = jax.export.symbolic_shape("b, l")
    dims = {"b": packs, "l": length}
    param_specs = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in flat.items()}
    exported = jax.export.export(jax.jit(denoiser), platforms=platforms)(
        param_specs, *(_sds(shape, dtype, dims) for _, dtype, shape in specs)
    )
    blob = exported.serialize()
    export_seconds = time.perf_counter() - start

    os.makedirs(out_dir, exist_ok=True)
    program_path = os.path.join(out_dir, PROGRAM_FILE)
    with open(program_path, "wb") as f:
        f.write(blob)
    params_path = os.path.join(out_dir, PARAMS_FILE)
    save_file(flat, params_path, metadata={"format": FORMAT})
    order = _program_param_order(exported)  # the argument tree's flatten order, from the program
    signature = {
        "format": FORMAT,
        "program": PROGRAM_FILE,
        "params_file": PARAMS_FILE,
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "symbolic_dims": {"b": "packs", "l": "tokens per pack"},
        "call": "f(params, " + ", ".join(n for n, _, _ in specs) + ") -> v_BLP",
        "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in specs],
        "output": {"name": "v_BLP", "dtype": "float32", "shape": ["b", "l", cfg.patch_dim]},
        "params": {
            "order": order,
            "shapes": {n: list(flat[n].shape) for n in order},
            "dtypes": {n: str(flat[n].dtype) for n in order},
        },
        "max_segments": max_segments,
        "text_len": text_len,
        "model_config": dataclasses.asdict(cfg),
        "source": dict(metadata or {}),
    }
    signature_path = os.path.join(out_dir, SIGNATURE_FILE)
    with open(signature_path, "w") as f:
        json.dump(signature, f, indent=2)
        f.write("\n")
    return {
        "out_dir": out_dir,
        "program_bytes": os.path.getsize(program_path),
        "params_bytes": os.path.getsize(params_path),
        "signature_bytes": os.path.getsize(signature_path),
        "num_params": int(sum(a.size for a in flat.values())),
        "num_param_arrays": len(flat),
        "export_seconds": round(export_seconds, 3),
        "platforms": list(exported.platforms),
    }


def _program_param_order(exported) -> list[str]:
    """The params' names in the order the program takes its flat arguments."""
    (params_idx, *_), _ = jax.tree.unflatten(
        exported.in_tree, list(range(exported.in_tree.num_leaves))
    )
    return sorted(params_idx, key=params_idx.__getitem__)


def load_denoiser(out_dir: str) -> Callable[..., jax.Array]:
    """The exported denoiser of `out_dir` as `call(x, t, seg, pos, text, text_mask, cond_mask)
    -> v` (numpy or jax arrays in, a jax array out; cond_mask may be None: nothing clean).

    Needs jax, numpy and safetensors only. The params file is checked against the program
    (every name, shape and dtype, and the recorded order against the program's argument tree)
    before anything runs."""
    with open(os.path.join(out_dir, SIGNATURE_FILE)) as f:
        signature = json.load(f)
    if signature.get("format") != FORMAT:
        raise ValueError(
            f"{out_dir}/{SIGNATURE_FILE}: format {signature.get('format')!r} is not {FORMAT!r}; "
            "export it again with `python -m jaxsora.export export-dit --format stablehlo`"
        )
    with open(os.path.join(out_dir, signature["program"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    order = signature["params"]["order"]
    program_order = _program_param_order(exported)
    if order != program_order:
        raise ValueError(
            f"{out_dir}/{SIGNATURE_FILE}: params.order disagrees with the program's argument "
            f"tree (first difference at {_first_difference(order, program_order)}); the "
            "signature is damaged or belongs to another export"
        )
    flat = load_file(os.path.join(out_dir, signature["params_file"]))
    missing, extra = sorted(set(order) - set(flat)), sorted(set(flat) - set(order))
    param_avals = exported.in_avals[: len(order)]
    bad = [
        f"{n}: {flat[n].dtype}{list(flat[n].shape)}, program wants {a.dtype}{list(a.shape)}"
        for n, a in zip(order, param_avals, strict=True)
        if n in flat and (tuple(flat[n].shape) != a.shape or flat[n].dtype != a.dtype)
    ]
    if missing or extra or bad:
        raise ValueError(
            f"{out_dir}/{signature['params_file']} does not fit the program: missing {missing}, "
            f"unexpected {extra}, misshapen {bad}"
        )
    params = {n: jnp.asarray(flat[n]) for n in order}
    dtypes = [jnp.dtype(spec["dtype"]) for spec in signature["inputs"]]
    run = jax.jit(exported.call)

    def call(x, t, seg, pos, text, text_mask, cond_mask=None):
        if cond_mask is None:
            cond_mask = np.zeros(np.shape(seg), bool)
        inputs = (x, t, seg, pos, text, text_mask, cond_mask)
        return run(params, *(jnp.asarray(v, d) for v, d in zip(inputs, dtypes, strict=True)))

    call.signature = signature
    call.exported = exported
    return call


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"position {i}: {x!r} vs {y!r}"
    return f"length {len(a)} vs {len(b)}"


def export_run_stablehlo(workdir: str, out: str, use_ema: bool = True) -> dict:
    """The latest checkpoint of a training run (EMA weights by default) as a StableHLO denoiser
    in `out`, for packs of the run's max_segments and caption length."""
    from jaxsora.sample import load_run

    model, config = load_run(workdir, use_ema)
    return export_denoiser(
        model,
        max_segments=config.data.max_segments,
        text_len=config.model.text_len,
        out_dir=out,
        metadata={"workdir": os.path.abspath(workdir), "ema": use_ema},
    )
