"""VAE weights in and out of diffusers' `AutoencoderKLWan` layout.

Import: a diffusers state dict (the Wan 2.1 VAE, or one trained with diffusers) becomes a
`VideoVAE` through one declarative table of (diffusers key, our path, layout transform), checked
strictly against the model's abstract shapes: a missing, extra, aliased or misshapen key is an
error, and all of them are reported at once, in one table, before anything is computed.

Export: the same table read backwards gives PyTorch the weights trained here; a round trip is
bitwise (the transforms are transposes and reshapes). The VAE's own directory format is
jaxsora/vae_dir.py; the command line is jaxsora/export/__main__.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsora.export.tables import report, shape_str
from jaxsora.models.vae import VAEConfig, VideoVAE
from jaxsora.vae_dir import abstract_params, build_vae, check_stats, config_summary

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

DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


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
        if m is None:
            return None
        return dst.replace("{m}", m["m"]) if "{m}" in src else dst


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


def match_rules(
    rules: Sequence[Rule], name: str, *, reverse: bool = False
) -> tuple[str, Transform] | None:
    """(the other side's name, the transform) of the first rule matching `name` (a PyTorch
    key, or with `reverse` one of our param paths), None when no rule covers it."""
    for rule in rules:
        other = rule.match(name, reverse=reverse)
        if other is not None:
            return other, rule.transform
    return None


def to_ours(key: str) -> tuple[str, Transform] | None:
    """Our dotted param path for a diffusers key, or None when no rule covers it."""
    return match_rules(RULES, key)


def to_diffusers(path: str) -> tuple[str, Transform]:
    found = match_rules(RULES, path, reverse=True)
    if found is None:
        raise AssertionError(f"no conversion rule for our param {path}: add one to RULES")
    return found


# --------------------------------------------------------------------------------------------
# Abstract model, strict filling, one report
# --------------------------------------------------------------------------------------------


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
    graphdef, flat = abstract_params(cfg)
    values: dict[str, np.ndarray] = {}
    seen: set[str] = set()  # our paths that a key of the file names (well shaped or not)
    rows: list[tuple[str, str, str]] = []
    for key in sorted(state_dict):
        w = state_dict[key]
        found = shape_str(w.shape)
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
            rows.append((key, shape_str(expected), found))
            continue
        if not jnp.issubdtype(w.dtype, jnp.floating):
            rows.append((key, shape_str(expected), f"{found} of dtype {w.dtype}, not floating"))
            continue
        values[path] = transform.to_ours(np.asarray(w)).astype(np.float32)
    for path in sorted(set(flat) - seen):
        key, transform = to_diffusers(path)
        rows.append((key, shape_str(transform.torch_shape(flat[path][1].shape)), "missing"))
    if rows:
        what = (
            "importing a diffusers AutoencoderKLWan state dict into VAEConfig("
            + config_summary(cfg)
            + ")"
        )
        raise ValueError(report(source, what, rows, _import_fix(state_dict, cfg, len(seen))))
    return build_vae(graphdef, flat, values)


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
    mean, std = check_stats(c["latents_mean"], c["latents_std"], cfg.z_dim, source)
    return cfg, mean, std


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
