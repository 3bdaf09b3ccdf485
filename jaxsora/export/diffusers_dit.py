"""The original-DiT configuration in and out of diffusers' `DiTTransformer2DModel` layout.

A jaxsora DiT built with `models.dit.original_dit_fields` (class labels, absolute 2D sin-cos
positions, no QK-norm, learned sigma) is the DiT paper's architecture; this module maps its
weights to the folder `DiTTransformer2DModel.from_pretrained` loads (`config.json` +
`diffusion_pytorch_model.safetensors`, sharded with an index above a size), streamed from the
checkpoint like every DiT export (`dit.stream_export`), and back (`import_diffusers`), checked
against a strict key/shape table. The traps of the layout, each handled here and tested:

- diffusers keeps a copy of the timestep and class embedders in every block
  (`transformer_blocks.<i>.norm1.emb`), and the final layer reads block 0's: export writes our
  one embedder into every block; import requires the copies to be equal and says which differ.
- diffusers' timestep frequencies divide by `half - 1` (`downscale_freq_shift=1`), the DiT
  paper's code by `half`: a model exports only with `model.time_freq_shift=1` (which
  `original_dit_fields` sets), so diffusers computes exactly our function; import sets it.
- the patch embedding is a Conv2d `[D, C, p, p]` over pixels, our patches are `(p, q, c)` rows
  of a Linear; the output rows are `(p, q, c)` over `2C` channels (mean, then variance), ours
  are `[velocity patch | variance patch]`: the permutations below map one to the other.
- diffusers' MLP LayerNorm has `norm_eps` (1e-5 by default), the others 1e-6: it is
  `model.mlp_norm_eps`, carried both ways.

diffusers' positions are exact at `sample_size` (it rescales them for other input sizes, ours are
each image's integer patch coordinates at any size), and it unpatchifies square images only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from jaxsora.export import dit as dit_export
from jaxsora.export import tables
from jaxsora.export.dit import AS_IS, LINEAR, MATRIX, Entry, Layout

CLASS_NAME = "DiTTransformer2DModel"
STEM = "diffusion_pytorch_model"
JAXSORA_FILE = "jaxsora.json"  # what diffusers' config has no place for: class names, the run
DIFFUSERS_VERSION = "0.42.1"
# diffusers' DiTTransformer2DModel settings our model is: anything else is refused on import.
FIXED = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "upcast_attention": False,
}


@dataclasses.dataclass(frozen=True)
class PatchIn:
    """Our patch Linear kernel [p*p*C, D] ((p, q, c) rows) <-> Conv2d weight [D, C, p, p]."""

    p: int
    c: int
    name: str = "patch linear [(p q c), D] -> conv2d [D, C, p, p]"

    def torch_shape(self, ours):
        return (int(ours[1]), self.c, self.p, self.p)

    def to_torch(self, w):
        return np.ascontiguousarray(w.reshape(self.p, self.p, self.c, -1).transpose(3, 2, 0, 1))

    def to_ours(self, w):
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


@dataclasses.dataclass(frozen=True)
class PatchOut:
    """Our output [D, H*p*p*C] (H = 2 with learned sigma: [velocity patch | variance patch])
    <-> proj_out_2 rows (p, q, c) over H*C channels (diffusers' unpatchify, mean channels
    first); a bias is the same without D."""

    p: int
    c: int
    halves: int
    bias: bool = False
    name: str = "output [D, (h p q c)] -> linear [(p q h c), D]"

    def torch_shape(self, ours):
        return (int(ours[-1]),) if self.bias else (int(ours[1]), int(ours[0]))

    def to_torch(self, w):
        w = w[None] if self.bias else w  # [D or 1, H*p*p*C]
        t = w.reshape(-1, self.halves, self.p, self.p, self.c).transpose(2, 3, 1, 4, 0)
        t = t.reshape(-1, w.shape[0])
        return np.ascontiguousarray(t[:, 0] if self.bias else t)

    def to_ours(self, w):
        w = w[:, None] if self.bias else w  # [(p q h c), D or 1]
        o = w.reshape(self.p, self.p, self.halves, self.c, -1).transpose(4, 2, 0, 1, 3)
        o = o.reshape(w.shape[1], -1)
        return np.ascontiguousarray(o[0] if self.bias else o)


# Our module (unrolled) -> diffusers' module, for the plain Linear layers of one block.
BLOCK_MODULES = {
    "ada": "norm1.linear",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.out": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Our per-model embedders -> their copy in each block's norm1.emb.
EMBEDDERS = {
    "time_mlp1": "timestep_embedder.linear_1",
    "time_mlp2": "timestep_embedder.linear_2",
}


def keys_of(cfg, channels: int):
    """`dit.entries`' layout function for diffusers: (our unrolled path) -> [(key, transform)]."""
    p = _patch_size(cfg, channels)
    halves = 2 if cfg.learn_sigma else 1

    def linear(module: str, leaf: str):
        return (f"{module}.weight", LINEAR) if leaf == "kernel" else (f"{module}.bias", AS_IS)

    def keys(path: str) -> list:
        module, _, leaf = path.rpartition(".")
        if path == "patch_in.kernel":
            return [("pos_embed.proj.weight", PatchIn(p, channels))]
        if path == "patch_in.bias":
            return [("pos_embed.proj.bias", AS_IS)]
        if module == "patch_out":
            bias = leaf == "bias"
            return [
                (f"proj_out_2.{'bias' if bias else 'weight'}", PatchOut(p, channels, halves, bias))
            ]
        if module == "final_ada":
            return [linear("proj_out_1", leaf)]
        if path == "label_embed.embedding":
            name = "norm1.emb.class_embedder.embedding_table.weight"
            return [(f"transformer_blocks.{i}.{name}", MATRIX) for i in range(cfg.depth)]
        if module in EMBEDDERS:
            return [
                linear(f"transformer_blocks.{i}.norm1.emb.{EMBEDDERS[module]}", leaf)
                for i in range(cfg.depth)
            ]
        parts = module.split(".")
        if parts[0] == "blocks" and ".".join(parts[2:]) in BLOCK_MODULES:
            return [
                linear(f"transformer_blocks.{parts[1]}.{BLOCK_MODULES['.'.join(parts[2:])]}", leaf)
            ]
        raise AssertionError(f"no diffusers name for our param {path}: add it to diffusers_dit")

    return keys


def _patch_size(cfg, channels: int) -> int:
    p = math.isqrt(cfg.patch_dim // channels)
    assert p * p * channels == cfg.patch_dim, (cfg.patch_dim, channels)
    return p


def unsupported(cfg, patch, prediction: str = "velocity") -> list[str]:
    """Why the DiT `cfg` (patch (p_t, p_h, p_w)), trained with `flow.prediction`, is not a
    DiTTransformer2DModel: [] when it is."""
    why = []
    if prediction != "velocity":  # diffusers' pipelines read the output as the velocity
        why.append(f"flow.prediction={prediction!r} (the output is x0, not the velocity)")
    if not cfg.num_classes:
        why.append("it is caption-conditioned (text.encoder='class' gives class labels)")
    if cfg.positions != "sincos":
        why.append(f"model.positions={cfg.positions!r} (diffusers' DiT: 'sincos')")
    if cfg.qk_norm:
        why.append("model.qk_norm=True (diffusers' DiT has no QK-norm)")
    if cfg.frame_positions:
        why.append("model.frame_positions=True (diffusers' DiT has no fractional positions)")
    if cfg.mlp_ratio != 4.0:
        why.append(f"model.mlp_ratio={cfg.mlp_ratio} (diffusers' DiT: 4)")
    if tuple(patch)[0] != 1 or patch[1] != patch[2]:
        why.append(f"model.patch={tuple(patch)} (diffusers' DiT: (1, p, p), images)")
    if cfg.time_freq_shift != 1:
        why.append(
            "model.time_freq_shift=0: the DiT paper's timestep frequencies, which diffusers "
            "does not compute (it divides by half - 1: time_freq_shift=1); the export would "
            "give other outputs. Train or fine-tune with model.time_freq_shift=1, or export "
            "with --format safetensors"
        )
    return why


def diffusers_config(cfg, channels: int, sample_size: int) -> dict:
    """config.json for `DiTTransformer2DModel.from_pretrained`."""
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.width // cfg.num_heads,
        "in_channels": channels,
        "out_channels": channels * (2 if cfg.learn_sigma else 1),
        "num_layers": cfg.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "patch_size": _patch_size(cfg, channels),
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_eps": cfg.mlp_norm_eps,
        **FIXED,
    }


def default_sample_size(saved: Mapping, patch_size: int) -> int:
    """A square grid of about the run's largest example (data.max_tokens patches), in latent
    pixels: where diffusers' positions equal ours exactly."""
    side = max(1, math.isqrt(int(saved["data"]["max_tokens"])))
    return side * patch_size


def layout(sample_size: int | None = None) -> Layout:
    def channels_of(saved, cfg):
        patch = [int(x) for x in saved["model"]["patch"]]
        return patch, cfg.patch_dim // math.prod(patch)

    def check(saved, cfg):
        patch, _ = channels_of(saved, cfg)
        why = unsupported(cfg, patch, (saved.get("flow") or {}).get("prediction", "velocity"))
        if why:
            raise ValueError(
                "this run's DiT is not the original-DiT configuration diffusers' "
                f"{CLASS_NAME} holds: " + "; ".join(why) + ". Export it with --format "
                "safetensors or torch (experiments/dit_image.py is a DiT-paper config)"
            )

    def configs(saved, cfg, workdir, step, use_ema):
        _, channels = channels_of(saved, cfg)
        size = sample_size or default_sample_size(saved, _patch_size(cfg, channels))
        return {
            dit_export.CONFIG_FILE: diffusers_config(cfg, channels, size),
            JAXSORA_FILE: {
                "format": "jaxsora-dit-diffusers",
                "class_names": list((saved.get("text") or {}).get("class_names", [])),
                "source": {
                    "workdir": workdir,
                    "step": step,
                    "weights": "ema" if use_ema else "raw",
                },
                "jaxsora_config": dict(saved),
            },
        }

    def keys_for(saved, cfg):
        return keys_of(cfg, channels_of(saved, cfg)[1])

    return Layout(STEM, keys_for, check, configs)


def export_diffusers(
    workdir: str,
    out_dir: str,
    *,
    step: int | None = None,
    use_ema: bool = True,
    sample_size: int | None = None,
    max_shard_bytes: int = 2**30,
) -> dict:
    """Writes the run's original-DiT model as a `DiTTransformer2DModel` folder (config.json,
    diffusion_pytorch_model*.safetensors) plus jaxsora.json (class names, the run config).
    Returns `dit.stream_export`'s summary."""
    return dit_export.stream_export(
        workdir,
        out_dir,
        layout(sample_size),
        step=step,
        use_ema=use_ema,
        max_shard_bytes=max_shard_bytes,
    )


def read_diffusers_config(src: str) -> tuple[str, dict, dict]:
    """(config.json path, its contents, jaxsora.json's or {}) of a DiTTransformer2DModel folder
    (or of the folder of its weights file / index)."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, dit_export.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json beside the diffusers weights")
    with open(path) as f:
        config = json.load(f)
    extra_path = os.path.join(folder, JAXSORA_FILE)
    extra = {}
    if os.path.isfile(extra_path):
        with open(extra_path) as f:
            extra = json.load(f)
    return path, config, extra


def is_diffusers_dit(src: str) -> bool:
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, dit_export.CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("_class_name") == CLASS_NAME


def run_config_for(dc: Mapping, config_path: str, base, class_names: list[str] | None):
    """The run config of an imported diffusers DiT: `base` (the fine-tune's run config) with
    its model and text fields set from the diffusers config, which alone says the architecture."""
    from ml_collections import ConfigDict

    from jaxsora.models.dit import original_dit_fields

    bad = [f"{k}={dc[k]!r} (jaxsora's DiT: {v!r})" for k, v in FIXED.items() if dc.get(k, v) != v]
    c_in, c_out = int(dc.get("in_channels", 4)), dc.get("out_channels")
    c_out = c_in if c_out is None else int(c_out)
    if c_out not in (c_in, 2 * c_in):
        bad.append(
            f"out_channels={c_out} (in_channels, or twice it with a learned sigma: {c_in} or "
            f"{2 * c_in})"
        )
    if bad:
        raise ValueError(f"{config_path}: not a DiT jaxsora can hold: " + "; ".join(bad))
    classes = int(dc.get("num_embeds_ada_norm") or 0)
    config = ConfigDict(base.to_dict())
    names = list(class_names or config.get("text", {}).get("class_names", None) or [])
    if len(names) != classes:
        raise ValueError(
            f"{config_path}: num_embeds_ada_norm={classes} classes, but "
            f"{'jaxsora.json' if class_names else 'the run config text.class_names'} names "
            f"{len(names)}; give a --config whose text.class_names lists the {classes} class "
            "names in label order (a caption's label is the class it names)"
        )
    m = config.model
    heads, head_dim = int(dc.get("num_attention_heads", 16)), int(dc.get("attention_head_dim", 72))
    p = int(dc.get("patch_size", 2))
    m.width, m.num_heads, m.depth = heads * head_dim, heads, int(dc.get("num_layers", 28))
    m.patch = (1, p, p)
    for field, value in original_dit_fields(classes).items():
        if field != "num_classes":
            m[field] = value
    m.learn_sigma = c_out == 2 * c_in
    m.mlp_norm_eps = float(dc.get("norm_eps", 1e-5))
    m.text_len = 1
    config.text.encoder = "class"
    config.text.class_names = names
    config.data.max_frames = 1
    config.data.tasks = dict(t2v=1.0)
    return config, c_in


def import_diffusers(src: str, out_workdir: str, *, config=None) -> int:
    """Writes a `DiTTransformer2DModel` folder as step 0 of a jaxsora run (model = EMA = the
    weights, a fresh optimizer), which `jaxsora.train` fine-tunes and `jaxsora.sample` samples.
    The run config is `config` (a ConfigDict: data, optimizer, sampler; its model fields are set
    from the diffusers config), or jaxsora.json's when the folder is a jaxsora export."""
    from jaxsora import train as trainer

    files = tables.weight_files(src)
    config_path, dc, extra = read_diffusers_config(src)
    if dc.get("_class_name") != CLASS_NAME:
        raise ValueError(
            f"{config_path}: _class_name={dc.get('_class_name')!r}, not {CLASS_NAME!r}"
        )
    if config is None:
        if "jaxsora_config" not in extra:
            raise ValueError(
                f"{config_path}: a diffusers DiT needs the run config to fine-tune and sample it "
                "with (data, optimizer, class names): pass --config, e.g. "
                "experiments/dit_image.py"
            )
        from ml_collections import ConfigDict

        config = ConfigDict(extra["jaxsora_config"])
    config, channels = run_config_for(dc, config_path, config, extra.get("class_names"))
    trainer.validate(config)
    cfg = trainer.dit_config(config)
    p = int(config.model.patch[1])
    if cfg.patch_dim != p * p * channels:
        raise ValueError(
            f"{config_path}: in_channels={channels}, but the run config's stage "
            f"(model.compression={config.model.get('compression', 'pixels')!r}) has "
            f"{cfg.patch_dim // (p * p)} channels; pass a --config whose stage has {channels} "
            "(a VAE of that z_dim: model.compression='vae', model.vae_dir)"
        )
    source = ", ".join(files) if len(files) > 1 else files[0]
    table = dit_export.entries(dit_export.abstract_param_shapes(cfg), keys_of(cfg, channels))
    tables.check_table(
        dit_export._read_shapes(files),
        {k: e.shape for k, e in table.items()},
        source,
        fix=f"the weights are not the DiT {config_path} describes",
    )
    arrays = dit_export.read_float_arrays(files, source)
    check_copies(arrays, table, source)
    params = dit_export.params_from_arrays(arrays, table)
    return dit_export.write_run(config, cfg, params, out_workdir)


def check_copies(arrays: Mapping[str, np.ndarray], table: Mapping[str, Entry], source: str):
    """diffusers' per-block copies of the embedders must be one embedder: ours has one."""
    first: dict[tuple, str] = {}
    differ = []
    for key, e in table.items():
        here = (e.path, e.layer)
        if here not in first:
            first[here] = key
        elif not np.array_equal(arrays[key], arrays[first[here]]):
            differ.append(f"{key} differs from {first[here]}")
    if differ:
        raise tables.WeightTableError(
            f"{source}: the blocks' copies of the timestep/class embedders differ, and the DiT "
            f"has one embedder (diffusers' final layer reads block 0's): {'; '.join(differ)}"
        )


def state_dict(model, channels: int) -> dict[str, np.ndarray]:
    """A live original-DiT model's weights in diffusers' names and layouts (what
    `export_diffusers` streams from a checkpoint, applied in memory)."""
    why = unsupported(model.cfg, (1, *(2 * [_patch_size(model.cfg, channels)])))
    if why:
        raise ValueError("not an original-DiT model: " + "; ".join(why))
    return dit_export.torch_state_dict(model, keys_of(model.cfg, channels))


# --------------------------------------------------------------------------------------------
# The two models on the same images (parity checks: tests/test_export_diffusers.py, benchmarks)
# --------------------------------------------------------------------------------------------


def forward_images(model, images: np.ndarray, t: np.ndarray, labels: list) -> np.ndarray:
    """Our original-DiT model called as diffusers calls its DiT: images [N, H, W, C] (the
    stage's channels), t [N] in [0, 1], labels (None: the null class) -> [N, H, W, 2C] (velocity
    then variance channels, diffusers' mean/variance order), the images packed as N segments."""
    from jaxsora.data import packing, video

    cfg = model.cfg
    c = images.shape[-1]
    p = _patch_size(cfg, c)
    patch = (1, p, p)
    examples, grids = [], []
    for image, label in zip(images, labels, strict=True):
        patches, positions = video.patchify(image[None], patch)
        grids.append((1, image.shape[0] // p, image.shape[1] // p))
        examples.append(
            {
                "patches": patches,
                "positions": positions,
                "grid": np.array(grids[-1], np.int32),
                "cond": np.zeros(len(patches), bool),
                "text_ids": np.array([label or 0], np.int32),
                "text_mask": np.array([label is not None]),
            }
        )
    n = sum(len(e["patches"]) for e in examples)
    shape = packing.PackShape(n + 8, len(images) + 1, cfg.patch_dim, 1)  # and some padding
    batch = packing.stack_packs([packing.build_pack(examples, shape)])
    t_BS = np.zeros(batch["grid"].shape[:2], np.float32)
    t_BS[0, : len(t)] = t
    out = np.asarray(
        model(
            batch["tokens"],
            t_BS,
            batch["segment_ids"],
            batch["positions"],
            batch["text_ids"],
            batch["text_mask"],
            all_channels=True,
        )
    )[0]
    seg, pd = batch["segment_ids"][0], cfg.patch_dim
    halves = 2 if cfg.learn_sigma else 1
    return np.stack(
        [
            np.concatenate(
                [
                    video.unpatchify(out[seg == k + 1][:, h * pd : (h + 1) * pd], grid, patch)[0]
                    for h in range(halves)
                ],
                axis=-1,
            )
            for k, grid in enumerate(grids)
        ]
    )


def diffusers_forward_images(model, images: np.ndarray, t: np.ndarray, labels: list):
    """A `DiTTransformer2DModel` on the same inputs as `forward_images` (timestep = 1000 t,
    the null class = num_embeds_ada_norm) -> [N, H, W, out_channels]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    null = model.config.num_embeds_ada_norm
    y = torch.tensor([null if label is None else label for label in labels])
    with torch.no_grad():
        out = model(x, timestep=torch.from_numpy(1000.0 * t), class_labels=y).sample
    return out.numpy().transpose(0, 2, 3, 1)
