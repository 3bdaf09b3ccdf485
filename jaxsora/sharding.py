"""The device mesh and the map from logical axis names to mesh axes.

Legend of mesh axes (config `mesh`, sizes multiply to the device count, -1 = the rest):
  data     pure data parallelism: batch split, weights replicated
  fsdp     batch split and weights sharded (ZeRO-3 style), gathered layer by layer
  context  the token axis of a pack split (packs too long for one device)
  tensor   heads and MLP hidden units split (Megatron style)

Legend of logical axes (config `sharding_rules`, each maps to a mesh axis or None):
  batch    packs in a batch               embed    model width
  length   tokens in a pack               mlp      MLP hidden units, adaLN outputs
  heads    attention heads x head_dim     kv       one head's features (never sharded)
  vocab    caption vocabulary             patch    patch features
  layers   stacked DiT blocks (scanned; never sharded: each step needs one whole layer)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("layers", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 to the devices left over; the product must equal the device count."""
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config mesh={sizes}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"config mesh={sizes}: {num_devices} devices are not divisible by {known}"
            )
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"config mesh={sizes} needs {math.prod(shape)} devices but {num_devices} are present; "
            "set one axis to -1 to take the rest"
        )
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_mesh(
    spec: Sequence[str | None], rules: Sequence[tuple[str, object]]
) -> PartitionSpec:
    """('embed', 'mlp') -> PartitionSpec('fsdp', 'tensor') under the rules; unknown names fail."""
    table = dict(rules)
    out, used = [], set()
    for name in spec:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no entry in config sharding_rules")
        axes = table[name]
        axes_t = tuple(a for a in (axes if isinstance(axes, tuple | list) else (axes,)) if a)
        axes_t = tuple(a for a in axes_t if a not in used)  # a mesh axis shards one dim only
        used.update(axes_t)
        out.append(axes_t if len(axes_t) > 1 else (axes_t[0] if axes_t else None))
    return PartitionSpec(*out)


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A weight dimension that its mesh axes do not divide, so it is kept whole on each device."""

    path: str  # e.g. model/blocks/0/ada/kernel
    shape: tuple[int, ...]
    dim: int
    logical: str  # the dimension's logical name, e.g. embed
    axes: tuple[str, ...]  # the mesh axes the rules map it to
    size: int  # their product, which does not divide shape[dim]
    nbytes: int  # of the whole array

    def __str__(self) -> str:
        axes = "x".join(self.axes)
        return (
            f"{self.path} {self.shape}: dim {self.dim} ({self.logical}={self.shape[self.dim]}) "
            f"over {axes}={self.size}"
        )


def _axis_names(axes) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else ((axes,) if axes else ())


def fit_to_mesh(
    shape: Sequence[int], pspec: PartitionSpec, mesh_sizes: dict[str, int]
) -> tuple[PartitionSpec, list[int]]:
    """`pspec` with every dimension its mesh axes do not divide unsharded, and those dims."""
    fixed, dropped = [], []
    for i, (dim, axes) in enumerate(
        zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)), strict=False)
    ):
        size = math.prod(mesh_sizes[a] for a in _axis_names(axes))
        fixed.append(axes if dim % size == 0 else None)
        if dim % size:
            dropped.append(i)
    return PartitionSpec(*fixed), dropped


def plan_state_shardings(
    state: nnx.State, mesh_sizes: dict[str, int], rules
) -> tuple[nnx.State, list[Replicated]]:
    """PartitionSpecs for a state from its weights' logical annotations, given the mesh's axis
    sizes alone (no devices: testable for any pod), and the dimensions left unsharded."""
    specs = nnx.get_partition_spec(state)
    replicated: list[Replicated] = []

    def to_spec(path, spec, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        logical = tuple(spec) if spec is not None else ()
        pspec = logical_to_mesh(logical, rules)
        fixed, dropped = fit_to_mesh(shape, pspec, mesh_sizes)
        for i in dropped:
            axes = _axis_names(pspec[i])
            replicated.append(
                Replicated(
                    path=_path_name(path),
                    shape=shape,
                    dim=i,
                    logical=str(logical[i]),
                    axes=axes,
                    size=math.prod(mesh_sizes[a] for a in axes),
                    nbytes=math.prod(shape) * np.dtype(leaf.dtype).itemsize,
                )
            )
        return fixed

    return jax.tree_util.tree_map_with_path(to_spec, specs, state), replicated


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            parts.append(k.name)
    return "/".join(parts)


def replication_report(
    replicated: Sequence[Replicated], mesh_sizes: dict[str, int], shown: int = 12
) -> str:
    """One summary of the unsharded dimensions: the model's weights (their EMA and optimizer
    copies are counted, not listed), and how much memory stays replicated."""
    arrays = {r.path: r.nbytes for r in replicated}
    listed = [r for r in replicated if r.path.startswith("model/")] or list(replicated)
    lines = [f"  {r}" for r in listed[:shown]]
    if len(listed) > shown:
        lines.append(f"  ... and {len(listed) - shown} more")
    causes = collections.Counter(
        f"{r.logical}={r.shape[r.dim]} over {'x'.join(r.axes)}={r.size}" for r in listed
    )
    mesh = {a: n for a, n in mesh_sizes.items() if n > 1}
    return (
        f"{len(arrays)} arrays of the training state ({sum(arrays.values()) / 2**20:.1f} MiB, "
        f"with the EMA and optimizer copies) keep a dimension whole on every device, because "
        f"mesh {mesh} does not divide it as sharding_rules ask ("
        + ", ".join(f"{c}: {n} weights" for c, n in causes.items())
        + "):\n"
        + "\n".join(lines)
    )


def check_replication(
    replicated: Sequence[Replicated], mesh_sizes: dict[str, int], strict: bool
) -> None:
    """Logs the replicated weights once; with `strict`, they are an error."""
    if not replicated:
        return
    report = replication_report(replicated, mesh_sizes)
    fix = (
        "Fix: choose mesh sizes (config mesh) that divide these dimensions, or map their logical "
        "axes to other mesh axes in config sharding_rules"
    )
    if strict:
        raise ValueError(
            f"bad config: strict_sharding=True and {report}\n{fix}, or set "
            "strict_sharding=False to accept the replication"
        )
    logging.warning("sharding: %s\n%s (strict_sharding=True makes this an error)", report, fix)


def state_shardings(state: nnx.State, mesh: Mesh, rules, strict: bool = False) -> nnx.State:
    """NamedShardings for a model/optimizer state from its weights' logical annotations.

    A dimension whose size the mesh axes do not divide is left unsharded: logged (it costs the
    memory sharding was meant to save), or an error with `strict`.
    """
    mesh_sizes = dict(mesh.shape)
    specs, replicated = plan_state_shardings(state, mesh_sizes, rules)
    check_replication(replicated, mesh_sizes, strict)
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Packs split over the batch axes; everything else in a batch stays whole per device."""
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_axes(rules) -> tuple[str, ...]:
    return _axis_names(logical_to_mesh(("batch",), rules)[0])


def check_batch_spans_processes(mesh: Mesh, rules) -> None:
    """Each process feeds its own packs (`to_global`), so each batch shard must live on the
    devices of one process, and every process must hold as many shards."""
    process_of = np.vectorize(lambda d: d.process_index)(mesh.devices)
    error = batch_split_error(process_of, mesh.axis_names, batch_axes(rules))
    if error:
        raise ValueError(
            f"bad config: mesh {dict(mesh.shape)} with sharding_rules batch -> "
            f"{batch_axes(rules) or None}: {error}, so processes would feed the same batch "
            "shard. Fix: make the data-parallel axes (mesh.data x mesh.fsdp by default) a "
            f"multiple of the {jax.process_count()} processes, e.g. mesh.data="
            f"{jax.process_count()}, and keep sharding_rules' batch on them"
        )


def batch_split_error(
    process_of: np.ndarray, axis_names: Sequence[str], batch: Sequence[str]
) -> str | None:
    """Why the batch axes do not split the batch between processes, or None when they do.

    `process_of` is mesh-shaped: the process of each device.
    """
    batch_dims = [axis_names.index(a) for a in batch]
    rest = [i for i in range(len(axis_names)) if i not in batch_dims]
    n_shards = math.prod(process_of.shape[i] for i in batch_dims)
    by_shard = process_of.transpose(batch_dims + rest).reshape(n_shards, -1)
    processes = np.unique(process_of)
    for shard, owners in enumerate(by_shard):
        if len(set(owners.tolist())) > 1:
            return (
                f"batch shard {shard} of {n_shards} sits on devices of processes "
                f"{sorted(set(owners.tolist()))}"
            )
    counts = {int(p): int((by_shard[:, 0] == p).sum()) for p in processes}
    if len(set(counts.values())) > 1:
        return f"processes hold unequal numbers of the {n_shards} batch shards ({counts})"
    return None


_ACTIVE: list[tuple[Mesh, tuple]] = []  # (mesh, rules) while a step is traced


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules) -> Iterator[None]:
    """Makes `constrain` (and mesh-aware attention backends) see this mesh while tracing."""
    _ACTIVE.append((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_mesh() -> tuple[Mesh, tuple] | None:
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation to the mesh by logical names; a no-op outside `activation_sharding`.

    A dimension the mesh axes do not divide stays unsharded, as for weights.
    """
    active = active_mesh()
    if active is None:
        return x
    mesh, rules = active
    spec, _ = fit_to_mesh(x.shape, logical_to_mesh(names, rules), dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
