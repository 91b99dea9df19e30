"""The device mesh and the one table mapping logical axis names to mesh axes.

Parameters carry logical axis names in their NNX metadata (`out_sharding=("embed", "mlp")`, with
`eager_sharding=False` so that NNX itself never interprets them) and activations are annotated with
`constrain(x, ("batch", "seq", "act_embed"))`. RULES below is the only place where those names meet the
mesh axes ('data', 'fsdp', 'tensor', 'context'). Where a dimension is not divisible by its mesh axes, the
axes that do not fit are dropped for that dimension (it is replicated over them) instead of failing.

Style: classic jit with NamedShardings over a mesh whose axes are all AxisType.Auto. Activation
constraints apply when the mesh is set with `jax.set_mesh(mesh)` around the jitted call (or its tracing);
without a mesh they are no-ops, so the same model code runs on one device.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from megadoc_jax.config import MESH_AXES

LogicalAxes = Sequence[str | None]

# logical axis name -> mesh axes it is split over, in order ('()' = replicated).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # batch rows: data parallel and FSDP both split the batch
    "seq": ("context",),  # activation length (context parallelism)
    "embed": ("fsdp",),  # the model dimension of a parameter: FSDP shards the weights
    "act_embed": (),  # the model dimension of an activation stays whole
    "norm": (),  # norm scales: small, replicated
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),  # the stacking axis of scanned layers
}


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None, dcn_data: int = 1) -> Mesh:
    """A mesh with axes MESH_AXES (missing axes have size 1) over `devices` (default: all devices).

    `devices` may be abstract devices, e.g. `jax.experimental.topologies.get_topology_desc(...).devices`,
    to compile for TPUs ahead of time on a machine without them. With `dcn_data` > 1 (config mesh.dcn_data,
    multislice) the data axis spans that many slices: `jax.experimental.mesh_utils.create_hybrid_device_mesh`
    lays each slice out over its own chips, with sizes["data"] / dcn_data of the data axis inside a slice.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"make_mesh: unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = tuple(int(sizes.get(axis, 1)) for axis in MESH_AXES)
    if any(size < 1 for size in shape):
        raise ValueError(f"make_mesh: axis sizes must be positive, got {dict(zip(MESH_AXES, shape))}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"make_mesh: the axis sizes {dict(zip(MESH_AXES, shape))} multiply to {math.prod(shape)} "
            f"but there are {len(devices)} devices"
        )
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    granule, count = granules(devices)
    if dcn_data == 1:
        if count > 1 and granule == "slice_index":  # jax.make_mesh refuses these with a less helpful message
            raise ValueError(f"mesh.dcn_data: the devices are in {count} TPU slices: set mesh.dcn_data={count}")
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(shape, devices, dcn_data), MESH_AXES, axis_types=axis_types)


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh of these axis sizes (MESH_AXES order, Auto axes): enough to build and check the
    shardings of an abstract train state for a target that is not at hand (a GPU cluster), not to compile."""
    shape = tuple(int(sizes.get(axis, 1)) for axis in MESH_AXES)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def granules(devices: Sequence[Any]) -> tuple[str, int]:
    """How devices group into DCN granules: ('slice_index', slices) where devices carry a slice index (TPU),
    else ('process_index', processes), jax's fallback for platforms without slices."""
    attr = "slice_index" if all(getattr(d, "slice_index", None) is not None for d in devices) else "process_index"
    return attr, len({getattr(d, attr) for d in devices})


def hybrid_device_grid(shape: tuple[int, ...], devices: Sequence[Any], dcn_data: int) -> np.ndarray:
    """The devices as an array of `shape` (sizes in MESH_AXES order) whose data axis is dcn_data granules
    (slices) of shape[0] / dcn_data each; ValueError naming mesh.dcn_data when the devices do not split so."""
    data_axis = MESH_AXES.index("data")
    if dcn_data < 1 or shape[data_axis] % dcn_data:
        raise ValueError(f"mesh.dcn_data={dcn_data} does not divide the data axis of {shape[data_axis]}")
    granule, count = granules(devices)
    what = "TPU slices" if granule == "slice_index" else "processes (the devices carry no slice_index)"
    if count != dcn_data:
        raise ValueError(f"mesh.dcn_data={dcn_data} but the {len(devices)} devices are in {count} {what}")
    per_granule = collections.Counter(getattr(d, granule) for d in devices)
    if len(set(per_granule.values())) > 1:
        raise ValueError(f"mesh.dcn_data: the {what} hold different numbers of devices: {dict(per_granule)}")
    ici_shape = [size // dcn_data if axis == data_axis else size for axis, size in enumerate(shape)]
    dcn_shape = [dcn_data if axis == data_axis else 1 for axis in range(len(shape))]
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape,
        dcn_shape,
        devices,
        process_is_granule=granule == "process_index",
        # as jax.make_mesh allows on v5e: any per-slice shape whose size fits, physical axes split if need be
        allow_split_physical_axes=True,
    )


def logical_to_spec(
    logical_axes: LogicalAxes, shape: Sequence[int] | None = None, axis_sizes: dict[str, int] | None = None
) -> PartitionSpec:
    """PartitionSpec over mesh axes for logical axis names (None = replicated dimension).

    With `shape` and `axis_sizes` (mesh axis -> size), each dimension keeps the longest prefix of its
    mesh axes whose product divides it; mesh axes of size 1, or already used by an earlier dimension of
    the same array, are skipped.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match the shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise ValueError(f"unknown logical axis {name!r}; sharding.RULES knows {sorted(RULES)}")
        kept: list[str] = []
        for mesh_axis in RULES[name]:
            if mesh_axis in used:
                continue
            if shape is not None and axis_sizes is not None:
                if axis_sizes[mesh_axis] == 1:  # splits nothing; leaving it out keeps specs canonical
                    continue
                if shape[dim] % (math.prod(axis_sizes[a] for a in kept) * axis_sizes[mesh_axis]):
                    break
            kept.append(mesh_axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape)))


def splits(logical_axis: str) -> bool:
    """Whether the current mesh splits a logical axis over more than one device (False with no mesh set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(axis, 1) for axis in RULES[logical_axis]) > 1


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if x.ndim != len(logical_axes):
        raise ValueError(f"constrain: logical axes {tuple(logical_axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape)))


def _variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """From the variable's logical axes (`out_sharding` metadata); no metadata: replicated."""
    logical_axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return named_sharding(mesh, logical_axes, variable.shape)


def _map_variables(fn: Callable[[nnx.Variable], Any], state: Any) -> Any:
    return jax.tree.map(fn, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every variable of an (abstract) NNX state, from its logical axes."""
    return _map_variables(lambda v: v.replace(_variable_sharding(v, mesh)), state)


def abstract_state(state: Any, mesh: Mesh) -> Any:
    """An (abstract) NNX state with jax.ShapeDtypeStruct values that carry each variable's NamedSharding."""
    return _map_variables(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_variable_sharding(v, mesh))), state
    )
