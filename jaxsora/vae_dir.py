"""A VAE of this project on disk: a directory with `vae_config.json` (the `VAEConfig` fields plus
the latent normalisation statistics) and `params/` (an Orbax checkpoint of the weights).

The VAE trainer writes its final weights in this format, `python -m jaxsora.export import-vae`
writes imported ones in it, and `model.vae_dir` (jaxsora/compression.py) reads it. Loading checks
the weights against the config shape for shape before reading them, and reports every mismatch at
once (`jaxsora/export/tables.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsora.export.tables import report, shape_str
from jaxsora.models.vae import VAEConfig, VideoVAE, vae_config_from_dict

CONFIG_FILE = "vae_config.json"
PARAMS_DIR = "params"


def abstract_params(cfg: VAEConfig):
    """(graphdef, flat abstract params {dotted path: Param of ShapeDtypeStruct}); no FLOPs."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)))
    # One filter: nnx.split fails loudly if the VAE ever grows non-Param state.
    graphdef, params = nnx.split(abstract, nnx.Param)
    flat = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(params)}
    return graphdef, flat


def build_vae(graphdef, flat: dict, values: Mapping[str, np.ndarray]) -> VideoVAE:
    """The model from `abstract_params`' output with every param's value given by path."""
    assert set(values) == set(flat), "caller must have checked the paths"
    state = nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(values[name], jnp.float32))) for name, (p, v) in flat.items()]
    )
    return nnx.merge(graphdef, state)


def config_summary(cfg: VAEConfig) -> str:
    return (
        f"base_dim={cfg.base_dim}, decoder_base_dim={cfg.decoder_base_dim}, z_dim={cfg.z_dim}, "
        f"dim_mult={list(cfg.dim_mult)}, num_res_blocks={cfg.num_res_blocks}, "
        f"attn_scales={list(cfg.attn_scales)}, "
        f"temporal_downsample={list(cfg.temporal_downsample)}"
    )


def check_stats(mean, std, z_dim: int, source: str) -> tuple[tuple[float, ...], ...]:
    for name, v in (("latents_mean", mean), ("latents_std", std)):
        if len(v) != z_dim:
            raise ValueError(
                f"{source}: {name} has {len(v)} entries but z_dim={z_dim}: give one per latent "
                "channel (measure them on your data; diffusers' defaults are Wan 2.1's, z_dim=16)"
            )
    if any(s <= 0 for s in std):
        raise ValueError(f"{source}: latents_std must be positive, got {list(std)}")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def save_vae_dir(
    model: VideoVAE,
    stats: tuple[Sequence[float], Sequence[float]] | None,
    directory: str,
    overwrite: bool = False,
) -> None:
    """Writes `directory/{vae_config.json, params/}`; `stats` is (latents_mean, latents_std)
    or None while unknown. The JSON is written last, so its presence means a complete save.

    Collective, like any Orbax save: with several processes, call it on every one of them
    (each writes its shards of the weights; process 0 writes the JSON)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    cfg = model.cfg
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    mean, std = (None, None)
    if stats is not None and stats[0] is not None:
        mean, std = (list(x) for x in check_stats(*stats, cfg.z_dim, directory))
    config.update(latents_mean=mean, latents_std=std)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise ValueError(
            f"{directory} already holds a VAE ({PARAMS_DIR}/ exists): choose another output "
            "directory or delete it"
        )
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(config_path) and jax.process_index() == 0:
        os.remove(config_path)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, pure, force=overwrite)
    if jax.process_index() == 0:
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def load_vae_config(directory: str) -> tuple[VAEConfig, tuple | None, tuple | None]:
    """(VAEConfig, latents_mean, latents_std) of a VAE directory; the stats may be None."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(
            f"{path} does not exist: {directory} is not a VAE directory (make one with "
            "`python -m jaxsora.export import-vae` or the VAE trainer), or its save did not finish"
        )
    with open(path) as f:
        d = json.load(f)
    mean, std = d.pop("latents_mean", None), d.pop("latents_std", None)
    try:
        cfg = vae_config_from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    if mean is not None and std is not None:
        mean, std = check_stats(mean, std, cfg.z_dim, path)
    return cfg, mean, std


def load_vae_dir(
    directory: str, dtype: str | None = None
) -> tuple[VideoVAE, tuple[float, ...] | None, tuple[float, ...] | None]:
    """(model, latents_mean, latents_std) from a VAE directory; `dtype` overrides the compute
    dtype (e.g. bfloat16 on TPU; params stay float32). Weights are checked against the config
    shape for shape before they are read, and all mismatches reported at once."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    cfg, mean, std = load_vae_config(directory)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise ValueError(f"{params_dir} does not exist: the VAE directory lost its weights")
    graphdef, flat = abstract_params(cfg)
    with ocp.StandardCheckpointer() as checkpointer:
        meta = _flatten(dict(checkpointer.metadata(params_dir).item_metadata.tree))
        rows = []
        for name in sorted(set(meta) | set(flat)):
            if name not in flat:
                rows.append((name, "-", f"{shape_str(meta[name].shape)} unexpected"))
            elif name not in meta:
                rows.append((name, shape_str(flat[name][1].shape), "missing"))
            elif tuple(meta[name].shape) != tuple(flat[name][1].shape):
                rows.append((name, shape_str(flat[name][1].shape), shape_str(meta[name].shape)))
        if rows:
            fix = (
                f"{params_dir} was not written for the config in {CONFIG_FILE} "
                f"({config_summary(cfg)}): restore the matching {CONFIG_FILE} or re-export"
            )
            raise ValueError(report(params_dir, "loading a VAE", rows, fix))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            checkpointer.metadata(params_dir).item_metadata.tree,
        )
        restored = _flatten(checkpointer.restore(params_dir, target))
    return build_vae(graphdef, flat, restored), mean, std
