"""VAE weights in and out of diffusers' `AutoencoderKLWan` layout, and a VAE's format on disk.

Import: a diffusers state dict (the Wan 2.1 VAE, or one trained with diffusers) becomes a
`VideoVAE` through one declarative table of (diffusers key, our path, layout transform), checked
strictly against the model's abstract shapes: a missing, extra, aliased or misshapen key is an
error, and all of them are reported at once, in one table, before anything is computed.

Export: the same table read backwards gives PyTorch the weights trained here; a round trip is
bitwise (the transforms are transposes and reshapes).

On disk, a VAE of this project is a directory: `vae_config.json` (the `VAEConfig` fields plus
the latent normalisation statistics) and `params/` (an Orbax checkpoint of the weights). The VAE
trainer writes its final weights in the same format (`save_vae_dir` / `load_vae_dir`).

Command line:

  python -m jaxsora.export import-vae --safetensors diffusion_pytorch_model.safetensors \
      --diffusers_config config.json --out runs/wan21_vae
  python -m jaxsora.export export-vae --vae_dir runs/wan21_vae --out vae.safetensors
  python -m jaxsora.export export-vae --vae_dir runs/wan21_vae --out hf_vae/  # + config.json,
      # loadable with diffusers.AutoencoderKLWan.from_pretrained("hf_vae")
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxsora.models.vae import VAEConfig, VideoVAE, vae_config_from_dict

# The statistics of the released Wan 2.1 VAE's latents (diffusers' defaults for
# AutoencoderKLWan): latents are normalised as (z - mean) / std before diffusion.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

CONFIG_FILE = "vae_config.json"
PARAMS_DIR = "params"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_MAX_ROWS = 100  # a wholly wrong file would otherwise print thousands of lines


# --------------------------------------------------------------------------------------------
# The conversion table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change: ours = transpose(torch without its trailing unit axes, perm).

    One description gives both directions and the expected PyTorch shape, so the importer can
    report shapes in the layout of the file the user holds.
    """

    name: str
    perm: tuple[int, ...]
    unit_axes: int = 0  # trailing size-1 axes PyTorch has and we do not

    def torch_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
        assert len(ours) == len(self.perm), f"{self.name} applied to a param of shape {ours}"
        inverse = np.argsort(self.perm)
        return tuple(int(ours[i]) for i in inverse) + (1,) * self.unit_axes

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[: w.ndim - self.unit_axes]).transpose(self.perm)

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        t = w.transpose(np.argsort(self.perm))
        return np.array(t.reshape(t.shape + (1,) * self.unit_axes), order="C")  # a copy: writable


CONV3D = Transform("conv3d [O,I,kt,kh,kw] -> [kt,kh,kw,I,O]", (2, 3, 4, 1, 0))
CONV2D = Transform("conv2d [O,I,kh,kw] -> [kh,kw,I,O]", (2, 3, 1, 0))
CONV1X1_AS_LINEAR = Transform("1x1 conv2d [O,I,1,1] -> linear [I,O]", (1, 0), unit_axes=2)
GAMMA_VIDEO = Transform("norm gamma [C,1,1,1] -> [C]", (0,), unit_axes=3)
GAMMA_IMAGE = Transform("attention norm gamma [C,1,1] -> [C]", (0,), unit_axes=2)
AS_IS = Transform("as is", (0,))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table. `{m}` stands for any dotted module path, the same on both sides,
    so the row reads as a regex in either direction (import and export share one table)."""

    diffusers: str
    ours: str
    transform: Transform

    def match(self, key: str, *, reverse: bool = False) -> str | None:
        src, dst = (self.ours, self.diffusers) if reverse else (self.diffusers, self.ours)
        m = _template_regex(src).fullmatch(key)
        return None if m is None else dst.replace("{m}", m["m"])


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    literal = [re.escape(part) for part in template.split("{m}")]
    return re.compile(r"(?P<m>[\w.]+?)".join(literal))


# Ordered: the first row that matches wins (in both directions), so the specific rows come
# before the generic `weight`/`bias` ones.
RULES: tuple[Rule, ...] = (
    # WanResample wraps its 2D conv in nn.Sequential(upsample-or-pad, conv): `resample.1`.
    Rule("{m}.resample.1.weight", "{m}.resample.kernel", CONV2D),
    Rule("{m}.resample.1.bias", "{m}.resample.bias", AS_IS),
    # The attention's q/k/v and output projections are 1x1 Conv2d; ours are nnx.Linear.
    Rule("{m}.to_qkv.weight", "{m}.to_qkv.kernel", CONV1X1_AS_LINEAR),
    Rule("{m}.proj.weight", "{m}.proj.kernel", CONV1X1_AS_LINEAR),
    # RMS norm gains broadcast over (T,H,W) in PyTorch; the attention's over (H,W) only.
    Rule("{m}.norm.gamma", "{m}.norm.gamma", GAMMA_IMAGE),
    Rule("{m}.gamma", "{m}.gamma", GAMMA_VIDEO),
    # Every other weight is a (causal) Conv3d.
    Rule("{m}.weight", "{m}.kernel", CONV3D),
    Rule("{m}.bias", "{m}.bias", AS_IS),
)


def to_ours(key: str) -> tuple[str, Transform] | None:
    """Our dotted param path for a diffusers key, or None when no rule covers it."""
    for rule in RULES:
        path = rule.match(key)
        if path is not None:
            return path, rule.transform
    return None


def to_diffusers(path: str) -> tuple[str, Transform]:
    for rule in RULES:
        key = rule.match(path, reverse=True)
        if key is not None:
            return key, rule.transform
    raise AssertionError(f"no conversion rule for our param {path}: add one to RULES")


# --------------------------------------------------------------------------------------------
# Abstract model, strict filling, one report
# --------------------------------------------------------------------------------------------


def _abstract_params(cfg: VAEConfig):
    """(graphdef, flat abstract params {dotted path: Param of ShapeDtypeStruct}); no FLOPs."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: VideoVAE(cfg, rngs=nnx.Rngs(0)))
    # One filter: nnx.split fails loudly if the VAE ever grows non-Param state.
    graphdef, params = nnx.split(abstract, nnx.Param)
    flat = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(params)}
    return graphdef, flat


def _build(graphdef, flat: dict, values: Mapping[str, np.ndarray]) -> VideoVAE:
    """The model from `_abstract_params`' output with every param's value given by path."""
    assert set(values) == set(flat), "caller must have checked the paths"
    state = nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(values[name], jnp.float32))) for name, (p, v) in flat.items()]
    )
    return nnx.merge(graphdef, state)


def _shape(s) -> str:
    return str(tuple(int(x) for x in s))


def _report(source: str, what: str, rows: list[tuple[str, str, str]], fix: str) -> str:
    """One message: the file, a table of every problem, and what to do about it."""
    shown = rows[:_MAX_ROWS]
    header = ("key", "expected shape", "found")
    width = [max(len(r[i]) for r in [header, *shown]) for i in range(3)]
    lines = [f"{source}: {len(rows)} problem(s) {what}:"]
    for r in [header, *shown]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more")
    lines.append(f"Fix: {fix}")
    return "\n".join(lines)


def _config_summary(cfg: VAEConfig) -> str:
    return (
        f"base_dim={cfg.base_dim}, decoder_base_dim={cfg.decoder_base_dim}, z_dim={cfg.z_dim}, "
        f"dim_mult={list(cfg.dim_mult)}, num_res_blocks={cfg.num_res_blocks}, "
        f"attn_scales={list(cfg.attn_scales)}, "
        f"temporal_downsample={list(cfg.temporal_downsample)}"
    )


def _file_suggests(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig) -> list[str]:
    """Config fields that telltale weights of the file contradict, e.g. `base_dim=8 (not 96)`."""
    ups = [
        k
        for k in state_dict
        if re.fullmatch(r"decoder\.up_blocks\.0\.resnets\.\d+\.conv1\.weight", k)
    ]
    probes = (
        ("base_dim", "encoder.conv_in.weight", 0, cfg.base_dim),
        ("decoder_base_dim", "decoder.conv_out.weight", 1, cfg.decoder_base_dim or cfg.base_dim),
        ("z_dim", "post_quant_conv.weight", 0, cfg.z_dim),
    )
    found = {
        name: (state_dict[key].shape[axis], ours)
        for name, key, axis, ours in probes
        if key in state_dict and state_dict[key].ndim > axis
    }
    if ups:
        found["num_res_blocks"] = (len(ups) - 1, cfg.num_res_blocks)
    return [
        f"{name}={theirs} (not {ours})" for name, (theirs, ours) in found.items() if theirs != ours
    ]


def _import_fix(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, matched: int) -> str:
    if matched == 0:
        fix = (
            f"none of the file's {len(state_dict)} keys is a weight of this VAE: is it an "
            "AutoencoderKLWan file at all (the `vae/` folder of a diffusers Wan 2.1 repo)?"
        )
    else:
        fix = (
            "the checkpoint is not a Wan 2.1 VAE of this config: check base_dim, "
            "decoder_base_dim, z_dim, dim_mult, num_res_blocks, attn_scales and "
            "temporal_downsample against the checkpoint's diffusers config.json (pass it with "
            "--diffusers_config)"
        )
        suggests = _file_suggests(state_dict, cfg)
        if suggests:
            fix += "; the file's weights say " + ", ".join(suggests)
    if any(".downsamples." in k or ".residual." in k for k in state_dict):
        fix += (
            "; the keys look like the original Wan repo's Wan2.1_VAE.pth: load it once with "
            "diffusers (AutoencoderKLWan.from_single_file) and save_pretrained, then import that"
        )
    return fix


def import_diffusers_vae(
    state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, source: str
) -> VideoVAE:
    """A VideoVAE holding a diffusers AutoencoderKLWan state dict (float32 params).

    Strict: every model param is filled by exactly one key (its canonical diffusers name) and
    every key is used; otherwise one ValueError naming `source` lists every missing,
    unexpected or misshapen key, with the fix.
    """
    graphdef, flat = _abstract_params(cfg)
    values: dict[str, np.ndarray] = {}
    seen: set[str] = set()  # our paths that a key of the file names (well shaped or not)
    rows: list[tuple[str, str, str]] = []
    for key in sorted(state_dict):
        w = state_dict[key]
        found = _shape(w.shape)
        hit = to_ours(key)
        if hit is None:
            rows.append((key, "-", f"{found} unexpected (no conversion rule)"))
            continue
        path, transform = hit
        if path not in flat:
            rows.append((key, "-", f"{found} unexpected (this config has no {path})"))
            continue
        canonical = to_diffusers(path)[0]
        if canonical != key:  # another spelling (`resample.weight`): one key per param, always
            rows.append((key, "-", f"{found} unexpected (the name of {path} is {canonical})"))
            continue
        seen.add(path)
        expected = transform.torch_shape(flat[path][1].shape)
        if tuple(w.shape) != expected:
            rows.append((key, _shape(expected), found))
            continue
        if not jnp.issubdtype(w.dtype, jnp.floating):
            rows.append((key, _shape(expected), f"{found} of dtype {w.dtype}, not floating"))
            continue
        values[path] = transform.to_ours(np.asarray(w)).astype(np.float32)
    for path in sorted(set(flat) - seen):
        key, transform = to_diffusers(path)
        rows.append((key, _shape(transform.torch_shape(flat[path][1].shape)), "missing"))
    if rows:
        what = (
            "importing a diffusers AutoencoderKLWan state dict into VAEConfig("
            + _config_summary(cfg)
            + ")"
        )
        raise ValueError(_report(source, what, rows, _import_fix(state_dict, cfg, len(seen))))
    return _build(graphdef, flat, values)


def load_safetensors_vae(path: str, cfg: VAEConfig) -> VideoVAE:
    """Imports a diffusers `.safetensors` VAE file; numpy only, no PyTorch at run time."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state_dict = load_file(path)
    except SafetensorError as e:
        raise ValueError(
            f"{path}: not a readable .safetensors file ({e}); a PyTorch .pt/.pth/.bin file must "
            "first be saved as safetensors (safetensors.torch.save_file(model.state_dict(), F))"
        ) from e
    return import_diffusers_vae(state_dict, cfg, source=path)


def export_diffusers_vae(model: VideoVAE) -> dict[str, np.ndarray]:
    """The model's weights as a diffusers AutoencoderKLWan state dict (PyTorch layouts)."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transform = to_diffusers(".".join(map(str, p)))
        assert key not in out, f"two params export to {key}: RULES is not one-to-one"
        out[key] = transform.to_torch(np.asarray(jax.device_get(v[...])))
    return dict(sorted(out.items()))


def save_safetensors_vae(model: VideoVAE, path: str) -> None:
    """Writes the diffusers state dict; `format: pt` lets transformers-style loaders take it."""
    from safetensors.numpy import save_file

    save_file(export_diffusers_vae(model), path, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# diffusers config.json
# --------------------------------------------------------------------------------------------

_DIFFUSERS_DEFAULTS = dict(
    base_dim=96,
    decoder_base_dim=None,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    in_channels=3,
    out_channels=3,
    latents_mean=list(WAN21_LATENTS_MEAN),
    latents_std=list(WAN21_LATENTS_STD),
    is_residual=False,
    patch_size=None,
)


def vae_config_from_diffusers(
    config_json: Mapping, source: str = "config.json"
) -> tuple[VAEConfig, tuple[float, ...], tuple[float, ...]]:
    """(VAEConfig, latents_mean, latents_std) from a diffusers AutoencoderKLWan config.json.

    Absent fields take diffusers' defaults (which are the released Wan 2.1 VAE). Only the Wan
    2.1 layout is supported: the Wan 2.2 VAE (`is_residual`, `patch_size`) is refused.
    """
    c = {**_DIFFUSERS_DEFAULTS, **config_json}
    class_name = c.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
        raise ValueError(
            f"{source}: _class_name is {class_name!r}, not 'AutoencoderKLWan': pass the "
            "config.json of the VAE (the `vae/` folder of a diffusers Wan repo)"
        )
    if c["is_residual"] or c["patch_size"] is not None:
        raise ValueError(
            f"{source}: is_residual={c['is_residual']}, patch_size={c['patch_size']}: this is a "
            "Wan 2.2-style VAE (residual down/up blocks, patchified input); only the Wan 2.1 "
            "layout (is_residual=false, patch_size=null) is supported"
        )
    try:
        cfg = VAEConfig(
            base_dim=int(c["base_dim"]),
            decoder_base_dim=None if c["decoder_base_dim"] is None else int(c["decoder_base_dim"]),
            z_dim=int(c["z_dim"]),
            dim_mult=tuple(int(m) for m in c["dim_mult"]),
            num_res_blocks=int(c["num_res_blocks"]),
            attn_scales=tuple(float(s) for s in c["attn_scales"]),
            temporal_downsample=tuple(bool(t) for t in c["temperal_downsample"]),
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    mean, std = _check_stats(c["latents_mean"], c["latents_std"], cfg.z_dim, source)
    return cfg, mean, std


def _check_stats(mean, std, z_dim: int, source: str) -> tuple[tuple[float, ...], ...]:
    for name, v in (("latents_mean", mean), ("latents_std", std)):
        if len(v) != z_dim:
            raise ValueError(
                f"{source}: {name} has {len(v)} entries but z_dim={z_dim}: give one per latent "
                "channel (measure them on your data; diffusers' defaults are Wan 2.1's, z_dim=16)"
            )
    if any(s <= 0 for s in std):
        raise ValueError(f"{source}: latents_std must be positive, got {list(std)}")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def vae_config_to_diffusers(
    cfg: VAEConfig,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> dict:
    """The config.json with which `AutoencoderKLWan.from_pretrained` rebuilds this VAE."""
    out = dict(
        _class_name="AutoencoderKLWan",
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=list(cfg.attn_scales),
        temperal_downsample=list(cfg.temporal_downsample),
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        is_residual=False,
        patch_size=None,
        scale_factor_temporal=cfg.temporal_factor,
        scale_factor_spatial=cfg.spatial_factor,
    )
    if latents_mean is not None and latents_std is not None:
        out.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
    return out


# --------------------------------------------------------------------------------------------
# A VAE directory: vae_config.json + params/ (Orbax)
# --------------------------------------------------------------------------------------------


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
        mean, std = (list(x) for x in _check_stats(*stats, cfg.z_dim, directory))
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
        mean, std = _check_stats(mean, std, cfg.z_dim, path)
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
    graphdef, flat = _abstract_params(cfg)
    with ocp.StandardCheckpointer() as checkpointer:
        meta = _flatten(dict(checkpointer.metadata(params_dir).item_metadata.tree))
        rows = []
        for name in sorted(set(meta) | set(flat)):
            if name not in flat:
                rows.append((name, "-", f"{_shape(meta[name].shape)} unexpected"))
            elif name not in meta:
                rows.append((name, _shape(flat[name][1].shape), "missing"))
            elif tuple(meta[name].shape) != tuple(flat[name][1].shape):
                rows.append((name, _shape(flat[name][1].shape), _shape(meta[name].shape)))
        if rows:
            fix = (
                f"{params_dir} was not written for the config in {CONFIG_FILE} "
                f"({_config_summary(cfg)}): restore the matching {CONFIG_FILE} or re-export"
            )
            raise ValueError(_report(params_dir, "loading a VAE", rows, fix))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            checkpointer.metadata(params_dir).item_metadata.tree,
        )
        restored = _flatten(checkpointer.restore(params_dir, target))
    return _build(graphdef, flat, restored), mean, std


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _import_vae(args) -> None:
    if os.path.exists(os.path.join(args.out, PARAMS_DIR)):  # before reading a large file
        raise ValueError(f"{args.out} already holds a VAE: choose another --out or delete it")
    if args.diffusers_config:
        with open(args.diffusers_config) as f:
            cfg, mean, std = vae_config_from_diffusers(json.load(f), source=args.diffusers_config)
    else:
        print("no --diffusers_config: assuming the released Wan 2.1 VAE's config")
        cfg, mean, std = vae_config_from_diffusers({}, source="diffusers' defaults")
    model = load_safetensors_vae(args.safetensors, cfg)
    save_vae_dir(model, (mean, std), args.out)
    print(f"imported {args.safetensors} ({_config_summary(cfg)}) into {args.out}")


def _export_vae(args) -> None:
    model, mean, std = load_vae_dir(args.vae_dir)
    out = args.out
    if out.endswith(".safetensors"):
        save_safetensors_vae(model, out)
    else:  # a diffusers model folder: AutoencoderKLWan.from_pretrained(out)
        os.makedirs(out, exist_ok=True)
        save_safetensors_vae(model, os.path.join(out, DIFFUSERS_WEIGHTS_FILE))
        if mean is None:
            logging.warning(
                "%s has no latents_mean/std: config.json gets diffusers' defaults (Wan 2.1's), "
                "which do not fit another VAE's latents",
                args.vae_dir,
            )
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(vae_config_to_diffusers(model.cfg, mean, std), f, indent=2)
            f.write("\n")
    print(f"exported {args.vae_dir} to {out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsora.export", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import-vae", help="diffusers AutoencoderKLWan .safetensors -> VAE dir")
    p.add_argument("--safetensors", required=True, help="diffusers VAE weights file")
    p.add_argument(
        "--diffusers_config", help="its config.json (default: the released Wan 2.1 VAE's)"
    )
    p.add_argument("--out", required=True, help="VAE directory to write (must not exist)")
    p.set_defaults(run=_import_vae)
    p = sub.add_parser("export-vae", help="VAE dir -> diffusers AutoencoderKLWan weights")
    p.add_argument("--vae_dir", required=True, help="a VAE directory (import-vae, VAE trainer)")
    p.add_argument(
        "--out",
        required=True,
        help="F.safetensors, or a folder for diffusers' from_pretrained (weights + config.json)",
    )
    p.set_defaults(run=_export_vae)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
