"""The DiT in and out of PyTorch conventions: safetensors + config.json, run by the self-contained
PyTorch package jaxsora/export/torch_dit, and imported back into a jaxsora run directory.

Export (`export_dit`) streams: the checkpoint's parameters are restored from Orbax a few at a
time (a partial restore, `PyTreeRestore(partial_restore=True)`, of only those leaves, as host
numpy arrays, whatever mesh or process count wrote them), each checked against its saved crc32,
converted and written at its place in the safetensors file(s), whose headers are written first
from the checkpoint's metadata. Peak memory is one read batch (`_READ_BYTES`, or the largest
leaf if bigger: a scanned model's leaf is all layers of one weight) plus its transposed copy.

Import (`import_dit`) reads config.json and the weights (single or sharded; pickles refused by
tables.py), checks every key and shape against the model the config builds (every missing,
unexpected and misshapen key in one table), and writes step 0 of a jaxsora run with the trainer's
own TrainState and Checkpointer: model = EMA = the weights, a fresh optimizer, the run's config.

One declarative table (`RULES`) maps our parameter paths to PyTorch names in both directions;
the transforms are transposes, so a round trip is bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import time
from collections.abc import Mapping

import numpy as np

from jaxsora.export import tables
from jaxsora.export.vae import AS_IS, Rule, Transform, match_rules

CONFIG_FILE = "config.json"
FORMAT = "jaxsora-dit"
FORMAT_VERSION = 1
_READ_BYTES = 1 << 24  # 16 MiB of parameters per partial restore (one leaf if larger)

LINEAR = Transform("linear kernel [I,O] -> nn.Linear weight [O,I]", (1, 0))
MATRIX = Transform("as is", (0, 1))

# (PyTorch name, our path, transform), `{m}` any dotted module path; the first match wins in
# either direction, so the embedding comes before the generic `weight` row.
RULES: tuple[Rule, ...] = (
    Rule("{m}.embed.weight", "{m}.embed.embedding", MATRIX),  # nn.Embedding is [vocab, D] too
    Rule("label_embed.weight", "label_embed.embedding", MATRIX),  # class-conditional models
    Rule("{m}.weight", "{m}.kernel", LINEAR),
    Rule("{m}.bias", "{m}.bias", AS_IS),
    Rule("{m}.scale", "{m}.scale", AS_IS),  # RMSNorm gains (QK-norm)
    Rule("{m}.pos", "{m}.pos", MATRIX),  # the caption encoder's learned positions
    Rule("{m}.null", "{m}.null", AS_IS),  # the frozen-encoder null caption token
)

# DiTConfig fields that shape the weights or the function (not dtype/attention/remat/scan).
WEIGHT_FIELDS = (
    "patch_dim",
    "width",
    "depth",
    "num_heads",
    "mlp_ratio",
    "text_vocab",
    "text_len",
    "text_width",
    "text_depth",
    "text_heads",
    "text_embed_dim",
    "rope_theta",
    "frame_positions",
    "num_classes",
    "positions",
    "qk_norm",
    "learn_sigma",
    "time_freq_shift",
    "mlp_norm_eps",
)


def torch_key(path: str) -> tuple[str, Transform]:
    """The PyTorch name of one of our (unrolled) parameter paths, and its transform."""
    found = match_rules(RULES, path, reverse=True)
    if found is None:
        raise AssertionError(f"no conversion rule for our param {path}: add one to RULES")
    return found


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor: where it lives in our params (a scanned stack's layer, or a leaf)."""

    key: str  # PyTorch name
    path: str  # our param path as stored (`blocks.ada.kernel` when scanned)
    layer: int | None  # index along a scanned stack's leading axis
    ours: tuple[int, ...]  # our per-layer shape
    transform: Transform

    @property
    def shape(self) -> tuple[int, ...]:
        return self.transform.torch_shape(self.ours)


def entries(param_shapes: Mapping[str, tuple[int, ...]], keys_of=None) -> dict[str, Entry]:
    """{PyTorch name: Entry} for our params {path: shape}; scanned blocks (`blocks.<leaf>` with
    a leading depth axis) become `blocks.<i>.<leaf>`, as unrolled ones are named.

    `keys_of(unrolled path)` -> [(PyTorch name, transform), ...] names a layout (default: ours,
    `RULES`, one name per param); a layout may give one param several names (diffusers repeats
    the DiT's embedders in every block: jaxsora/export/diffusers_dit.py)."""
    keys_of = keys_of or (lambda path: [torch_key(path)])
    out: dict[str, Entry] = {}
    for path, shape in sorted(param_shapes.items()):
        parts = path.split(".")
        if parts[0] == "blocks" and not parts[1].isdigit():
            layers = [(".".join(["blocks", str(i), *parts[1:]]), i) for i in range(shape[0])]
            per_layer = tuple(shape[1:])
        else:
            layers, per_layer = [(path, None)], tuple(shape)
        for unrolled, i in layers:
            for key, transform in keys_of(unrolled):
                assert key not in out, f"two params export to {key}: the layout is not one-to-one"
                out[key] = Entry(key, path, i, per_layer, transform)
    return dict(sorted(out.items()))


def abstract_param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{our path: shape} of the DiT `cfg` builds; no FLOPs."""
    from flax import nnx

    from jaxsora.models.dit import make_model

    abstract = nnx.eval_shape(lambda: make_model(cfg, 0))
    return {
        ".".join(map(str, p)): tuple(v.shape)
        for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }


def torch_state_dict(model, keys_of=None) -> dict[str, np.ndarray]:
    """A live DiT's weights by PyTorch name, in PyTorch layouts (the table `export_dit`
    streams from a checkpoint, applied in memory); `keys_of`: another layout (`entries`)."""
    import jax
    from flax import nnx

    flat = {
        ".".join(map(str, p)): np.asarray(jax.device_get(v[...]))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    table = entries({k: v.shape for k, v in flat.items()}, keys_of)
    return {
        k: e.transform.to_torch(flat[e.path] if e.layer is None else flat[e.path][e.layer])
        for k, e in table.items()
    }


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def export_config(saved: Mapping, cfg, *, workdir: str, step: int, use_ema: bool) -> dict:
    """config.json: the DiTConfig fields (top level, as transformers' configs are), what a pack
    holds, the flow's schedule and the sampler defaults, the text encoder's identity (a frozen
    one), and the run's whole saved config (`jaxsora_config`, what `import_dit` rebuilds from)."""
    m, d, s = saved["model"], saved["data"], saved["sample"]
    patch = [int(p) for p in m["patch"]]
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **dataclasses.asdict(cfg),
        "pack": {
            "max_segments": int(d["max_segments"]),
            "text_len": int(m["text_len"]),
            "patch": patch,
            "compression": m.get("compression", "pixels"),
            "channels": cfg.patch_dim // math.prod(patch),
            "seq_len": int(d["seq_len"]),
            **({"vae_dir": m["vae_dir"]} if m.get("vae_dir") else {}),
        },
        "flow": {
            "base_tokens": saved["flow"]["base_tokens"],
            "prediction": saved["flow"].get("prediction", "velocity"),
        },
        "sample": {
            "steps": int(s["steps"]),
            "guidance": float(s["guidance"]),
            "image_guidance": float(s.get("image_guidance", 1.0)),
            "solver": s.get("solver", "euler"),
            "seq_len": int(s["seq_len"]),
        },
        "source": {"workdir": workdir, "step": step, "weights": "ema" if use_ema else "raw"},
    }
    text = saved.get("text") or {}
    from jaxsora.data import captions

    if text.get("encoder") == captions.CLASS:
        out["text"] = {"encoder": captions.CLASS, "class_names": list(text["class_names"])}
    elif text.get("encoder", captions.HASHED) != captions.HASHED:
        from ml_collections import ConfigDict

        spec = captions.text_spec(ConfigDict(dict(saved)))
        out["text"] = {
            "encoder": spec.encoder,
            "checkpoint": spec.checkpoint,
            "identity": captions.frozen_encoder(spec).identity,
        }
    out["jaxsora_config"] = dict(saved)
    return out


def _dit_config(saved: Mapping):
    from ml_collections import ConfigDict

    from jaxsora import train as trainer

    return trainer.dit_config(ConfigDict(dict(saved)))


# --------------------------------------------------------------------------------------------
# Export: streamed from the Orbax checkpoint into safetensors
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int32": "I32"}


class _SafetensorsWriter:
    """A safetensors file written in place: the header (every key, shape and offset) first, then
    each tensor at its offset, in any order; renamed into place once every tensor is there."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.path, self._tmp = path, path + ".partial"
        header: dict = {"__metadata__": {"format": "pt"}}
        self._offsets: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}
        offset = 0
        for key, shape, dtype in specs:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": _ST_DTYPES[dtype.name],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._offsets[key] = (offset, n, shape, dtype)
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self._start = 8 + len(blob)
        self.nbytes = offset
        self._f = open(self._tmp, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._f.truncate(self._start + offset)
        self._left = set(self._offsets)

    def write(self, key: str, array: np.ndarray) -> None:
        offset, n, shape, dtype = self._offsets[key]
        assert array.shape == shape and array.dtype == dtype, (key, array.shape, shape)
        self._f.seek(self._start + offset)
        self._f.write(np.ascontiguousarray(array).data)
        self._left.discard(key)

    def close(self) -> None:
        self._f.close()
        assert not self._left, f"{self.path}: never written: {sorted(self._left)}"
        os.replace(self._tmp, self.path)


def _plan_shards(specs, max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _nested(name: str, value) -> dict:
    """`ema.blocks.0.ada.kernel` -> {"ema": {"blocks": {"0": {"ada": {"kernel": value}}}}}."""
    out: dict = {}
    node = out
    parts = name.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _merge(into: dict, tree: dict) -> dict:
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def _saved_checksums(step_dir: str) -> dict:
    """{array name: its slices' crc32}, every process's file (jaxsora/checkpointing.py)."""
    directory = os.path.join(step_dir, "checksums")
    out: dict = {}
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if not (name.startswith("process_") and name.endswith(".json")):
                continue
            with open(os.path.join(directory, name)) as f:
                out.update(json.load(f)["arrays"])
    return out


def _read_batches(leaves: list[tuple[str, tuple[int, ...], np.dtype]]):
    batch, size = [], 0
    for leaf in leaves:
        n = math.prod(leaf[1]) * leaf[2].itemsize
        if batch and size + n > _READ_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(leaf)
        size += n
    if batch:
        yield batch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where `stream_export` writes a DiT: the weight files' stem (`model`, diffusers'
    `diffusion_pytorch_model`), the PyTorch names (`keys_for(saved config, DiTConfig)` gives
    `entries` its `keys_of`), a check of the model (raises when the layout cannot hold it), and
    the JSON files beside the weights."""

    stem: str
    keys_for: object  # (saved, cfg) -> ((unrolled path) -> [(key, transform)]) | None (RULES)
    check: object  # (saved config, DiTConfig) -> None
    configs: object  # (saved, cfg, workdir, step, use_ema) -> {file name: dict}


def _jaxsora_configs(saved, cfg, workdir, step, use_ema) -> dict[str, dict]:
    return {CONFIG_FILE: export_config(saved, cfg, workdir=workdir, step=step, use_ema=use_ema)}


JAXSORA_LAYOUT = Layout("model", lambda saved, cfg: None, lambda saved, cfg: None, _jaxsora_configs)


def export_dit(
    workdir: str,
    out_dir: str,
    *,
    step: int | None = None,
    use_ema: bool = True,
    max_shard_bytes: int = 2**30,
    for_torch_package: bool = False,
) -> dict:
    """Writes the run's DiT (EMA weights by default) to `out_dir` as `model.safetensors` (or
    `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json` above
    `max_shard_bytes`) and `config.json`, loadable with `jaxsora.export.torch_dit.load_pretrained`
    (`for_torch_package`: refused, before anything is read, for a model it cannot run).
    Returns {"out_dir", "files", "step", "weights", "num_params", "total_bytes", "seconds"}."""
    return stream_export(
        workdir,
        out_dir,
        TORCH_LAYOUT if for_torch_package else JAXSORA_LAYOUT,
        step=step,
        use_ema=use_ema,
        max_shard_bytes=max_shard_bytes,
    )


def saved_run(workdir: str, step: int | None = None) -> tuple[int, dict, str]:
    """(step, its saved run config, its directory) of a run's checkpoint (default: latest)."""
    from jaxsora.checkpointing import Checkpointer

    workdir = os.path.abspath(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; is it a jaxsora run?")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise FileNotFoundError(f"{ckpt.directory}: no committed checkpoint to export")
        elif not os.path.isdir(os.path.join(ckpt.step_dir(step), "state")):
            raise FileNotFoundError(
                f"{ckpt.step_dir(step)}: no committed checkpoint of step {step} (the latest is "
                f"{ckpt.latest_step()})"
            )
        return step, ckpt.saved_config(step), ckpt.step_dir(step)
    finally:
        ckpt.close()


def check_torch_package(saved: Mapping) -> None:
    """The PyTorch package (torch_dit/) runs jaxsora's caption-conditioned DiT."""
    if (saved.get("text") or {}).get("encoder") == "class":
        raise ValueError(
            "--format torch: the PyTorch package runs the caption-conditioned DiT, and this run "
            "is class-conditional (text.encoder='class'); export its original-DiT model to "
            "PyTorch with --format diffusers (DiTTransformer2DModel), or --format safetensors"
        )


TORCH_LAYOUT = dataclasses.replace(
    JAXSORA_LAYOUT, check=lambda saved, cfg: check_torch_package(saved)
)


def stream_export(
    workdir: str,
    out_dir: str,
    layout: Layout,
    *,
    step: int | None = None,
    use_ema: bool = True,
    max_shard_bytes: int = 2**30,
) -> dict:
    """`export_dit` in any `Layout`: the checkpoint's params streamed into safetensors."""
    import orbax.checkpoint as ocp
    from etils import epath

    from jaxsora.checkpoint_checksums import named_leaves, verify_checksums

    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    step, saved, where = saved_run(workdir, step)
    cfg = _dit_config(saved)
    layout.check(saved, cfg)
    prefix = "ema" if use_ema else "model"
    state_dir = epath.Path(where) / "state"
    meta = ocp.StandardCheckpointHandler().metadata(state_dir)
    meta = getattr(meta, "tree", meta)
    stored = {
        n: (tuple(x.shape), np.dtype(x.dtype))
        for n, x in named_leaves(meta, lambda x: hasattr(x, "shape"))
        if n.startswith(prefix + ".")
    }
    found = {n.removeprefix(prefix + "."): s for n, (s, _) in stored.items()}
    tables.check_table(
        found,
        abstract_param_shapes(cfg),
        f"{where}/state ({prefix})",
        fix="the checkpoint's params are not the model its own saved config builds",
    )
    table = entries(found, layout.keys_for(saved, cfg))
    specs = [(k, e.shape, np.dtype(np.float32)) for k, e in table.items()]
    shards = _plan_shards(specs, max_shard_bytes)
    stem = layout.stem
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    index_file = f"{stem}.safetensors.index.json"
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):  # an earlier export's weights would mix with these
        if old.startswith(stem) and old.endswith(".safetensors") and old not in names:
            os.remove(os.path.join(out_dir, old))
    writers = [
        _SafetensorsWriter(os.path.join(out_dir, n), s) for n, s in zip(names, shards, strict=True)
    ]
    writer_of = {spec[0]: w for w, s in zip(writers, shards, strict=True) for spec in s}
    by_path: dict[str, list[Entry]] = {}
    for e in table.values():
        by_path.setdefault(e.path, []).append(e)
    checksums = _saved_checksums(where)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        leaves = [(f"{prefix}.{p}", *stored[f"{prefix}.{p}"]) for p in sorted(by_path)]
        for batch in _read_batches(leaves):
            item, restore_args = {}, {}
            for name, _, _ in batch:
                _merge(item, _nested(name, 0))
                _merge(restore_args, _nested(name, ocp.RestoreArgs(restore_type=np.ndarray)))
            restored = handler.restore(
                state_dir,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
            _, bad = verify_checksums(restored, checksums)
            if bad:
                raise ValueError(
                    f"checkpoint {where}: {len(bad)} array slice(s) differ from their saved "
                    f"crc32, first {bad[0]} (a flipped or rewritten weight file); export another "
                    "step with step=..."
                )
            for name, array in named_leaves(restored):
                for e in by_path[name.removeprefix(prefix + ".")]:
                    w = array if e.layer is None else array[e.layer]
                    writer_of[e.key].write(e.key, e.transform.to_torch(w).astype(np.float32))
            del restored
    finally:
        handler.close()
    for w in writers:
        w.close()
    total = sum(w.nbytes for w in writers)
    if len(writers) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: os.path.basename(writer_of[k].path) for k in table},
        }
        with open(os.path.join(out_dir, index_file), "w") as f:
            json.dump(index, f, indent=2)
    else:  # a stale index of an earlier sharded export would shadow nothing but mislead
        stale = os.path.join(out_dir, index_file)
        if os.path.exists(stale):
            os.remove(stale)
    for name, contents in layout.configs(saved, cfg, workdir, step, use_ema).items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(contents, f, indent=2)
            f.write("\n")
    return {
        "out_dir": os.path.abspath(out_dir),
        "files": [w.path for w in writers],
        "step": step,
        "weights": "ema" if use_ema else "raw",
        "num_params": sum(math.prod(e.shape) for e in table.values()),
        "total_bytes": total,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Import: safetensors -> a jaxsora run at step 0
# --------------------------------------------------------------------------------------------


def _truncation(path: str) -> str | None:
    """Which keys of a safetensors file lie past its end, when its header says more bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    have = size - 8 - n
    cut = sorted(
        k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > have
    )
    if not cut:
        return None
    need = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return (
        f"{path}: truncated: its header needs {need} bytes of tensor data, the file holds "
        f"{max(have, 0)}; {len(cut)} key(s) are cut off: {', '.join(cut)}. Copy or export the "
        "file again"
    )


def _read_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    try:
        return tables.read_shapes(files)
    except ValueError:
        for path in files:
            why = _truncation(path)
            if why:
                raise ValueError(why) from None
        raise


def read_export_config(src: str) -> tuple[str, dict]:
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no config.json beside the weights; an exported DiT folder holds both "
            "(jaxsora.export.dit.export_dit writes them)"
        )
    with open(path) as f:
        return path, json.load(f)


def import_dit(src: str, out_workdir: str, *, config=None) -> int:
    """Writes the DiT of an exported folder (or its weights file / index) as step 0 of a jaxsora
    run in `out_workdir`: model = EMA = the weights, a fresh optimizer, the run config saved as
    the trainer saves it, so `python -m jaxsora.train --workdir out_workdir` fine-tunes it (with
    a --config whose model fields match) and `python -m jaxsora.sample` samples it.

    The run config is config.json's `jaxsora_config` (the exported run's), or `config` (a
    ConfigDict, e.g. the fine-tune's own; its DiT must be config.json's). Returns the step (0).
    """
    from ml_collections import ConfigDict

    from jaxsora import train as trainer

    files = tables.weight_files(src)  # refuses .bin/.pt/.pth/.ckpt before anything is read
    config_path, exported = read_export_config(src)
    if config is None:
        if "jaxsora_config" not in exported:
            raise ValueError(
                f"{config_path}: no `jaxsora_config` (the run config export_dit saves); pass "
                "the run config to build around these weights: import_dit(..., config=...)"
            )
        config = ConfigDict(exported["jaxsora_config"])
    cfg = trainer.dit_config(config)
    differ = [
        f"{f}={exported.get(f)!r} (the run config builds {getattr(cfg, f)!r})"
        for f in WEIGHT_FIELDS
        if f in exported and exported[f] != getattr(cfg, f)
    ]
    if differ:
        raise ValueError(
            f"{config_path}: the weights' DiT is not the run config's: {', '.join(differ)}; "
            "import with the config the weights were trained with"
        )
    source = ", ".join(files) if len(files) > 1 else files[0]
    table = entries(abstract_param_shapes(cfg))
    found = _read_shapes(files)
    tables.check_table(
        found,
        {k: e.shape for k, e in table.items()},
        source,
        fix=f"the weights are not the DiT of {config_path}: check the folder and its config",
    )
    arrays = read_float_arrays(files, source)
    return write_run(config, cfg, params_from_arrays(arrays, table), out_workdir)


def read_float_arrays(files: list[str], source: str) -> dict[str, np.ndarray]:
    arrays = tables.load_safetensors(files)
    odd = sorted(k for k, a in arrays.items() if not np.issubdtype(a.dtype, np.floating))
    if odd:
        raise tables.WeightTableError(
            f"{source}: not floating point: " + ", ".join(f"{k} ({arrays[k].dtype})" for k in odd)
        )
    return arrays


def params_from_arrays(arrays: dict[str, np.ndarray], table: Mapping[str, Entry]) -> dict:
    """{our param path: float32 array} from PyTorch-named arrays (scanned stacks re-stacked);
    a param with several names takes its first (callers check that the copies agree)."""
    values: dict[str, dict] = {}
    for k, e in table.items():
        layers = values.setdefault(e.path, {})
        if e.layer not in layers:
            layers[e.layer] = e.transform.to_ours(arrays[k]).astype(np.float32)
    return {
        path: (v[None] if None in v else np.stack([v[i] for i in sorted(v)]))
        for path, v in values.items()
    }


def write_run(config, cfg, params: Mapping[str, np.ndarray], out_workdir: str) -> int:
    """Step 0 of a jaxsora run in `out_workdir` holding `params` as model and EMA, a fresh
    optimizer and the run config, as the trainer writes it. Returns the step (0)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxsora import train as trainer
    from jaxsora import training
    from jaxsora.checkpointing import Checkpointer
    from jaxsora.data import packing

    out_workdir = os.path.abspath(out_workdir)
    os.makedirs(out_workdir, exist_ok=True)
    ckpt = Checkpointer(out_workdir, keep=config.get("keep_checkpoints", 2))
    try:
        if ckpt.latest_step() is not None:
            raise ValueError(
                f"{ckpt.directory} already holds checkpoint step {ckpt.latest_step()}: import "
                "into a new --workdir"
            )
        tx = training.make_optimizer(config.optim, config.total_steps)
        with jax.default_device(jax.devices()[0]):
            ts = trainer.TrainState(trainer.make_model(cfg, config.seed), tx, config.seed)
            for module in (ts.model, ts.ema):
                flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
                nnx.update(
                    module,
                    nnx.from_flat_state(
                        [
                            (p, v.replace(jnp.asarray(params[".".join(map(str, p))])))
                            for p, v in flat
                        ]
                    ),
                )
        # The data stream of a fresh run: the packer's own initial state.
        fresh = packing.OnlinePacker(lambda i: None, packing.PackShape(1, 1, 1, 1), 1)
        ckpt.save(0, nnx.state(ts).to_pure_dict(), fresh, config.to_json())
        ckpt.wait()
    finally:
        ckpt.close()
    return 0
