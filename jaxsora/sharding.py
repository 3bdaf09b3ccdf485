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

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
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


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for a model/optimizer state from its weights' logical annotations.

    A dimension whose size the mesh axes do not divide is left unsharded rather than failing.
    """
    specs = nnx.get_partition_spec(state)

    def to_sharding(spec, leaf):
        shape = getattr(leaf, "shape", ())
        pspec = logical_to_mesh(tuple(spec) if spec is not None else (), rules)
        fixed = []
        for dim, axes in zip(
            shape, tuple(pspec) + (None,) * (len(shape) - len(pspec)), strict=False
        ):
            names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
            size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            fixed.append(axes if dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*fixed))

    return jax.tree.map(to_sharding, specs, state)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Packs split over the batch axes; everything else in a batch stays whole per device."""
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
    axes = logical_to_mesh(("batch",), rules)[0]
    names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


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
    spec = logical_to_mesh(names, rules)
    fixed = []
    for dim, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec)), strict=False):
        axis_names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
        size = int(np.prod([mesh.shape[a] for a in axis_names])) if axis_names else 1
        fixed.append(axes if dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fixed)))
