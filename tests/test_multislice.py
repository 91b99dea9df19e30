"""mesh.dcn_data: the data axis over several TPU slices (sharding.make_mesh with jax's hybrid mesh), checked
with fake TPU devices that carry slice_index and chip coordinates (no multislice TPU exists here), with the
abstract devices of a 2-slice topology from libtpu, and the plain mesh unchanged on the 8 fake CPU devices."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import numpy as np
import pytest

from megadoc_jax import aot, sharding
from megadoc_jax import config as config_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What jax's mesh utilities read of a TPU device."""

    id: int
    slice_index: int
    coords: tuple[int, int, int]
    process_index: int = 0
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v5 lite"


def fake_slices(slices: int, x: int = 2, y: int = 2) -> list[FakeTpu]:
    """`slices` slices of x*y chips each, numbered slice by slice."""
    devices = []
    for s in range(slices):
        for j in range(y):
            for i in range(x):
                devices.append(FakeTpu(id=len(devices), slice_index=s, coords=(i, j, 0), process_index=s))
    return devices


def test_the_data_axis_spans_the_slices_and_the_rest_stays_inside_one():
    grid = sharding.hybrid_device_grid((4, 2, 1, 1), fake_slices(2), dcn_data=2)  # data 4 = 2 slices x 2
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert grid.shape == (4, 2, 1, 1)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # fsdp pairs never cross the DCN
    assert sorted(d.id for d in grid.flat) == list(range(8))


def test_three_slices_with_fsdp_inside_each():
    grid = sharding.hybrid_device_grid((3, 4, 1, 1), fake_slices(3), dcn_data=3)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert [set(slice_of[i].flat) for i in range(3)] == [{0}, {1}, {2}]


@pytest.mark.parametrize(
    "shape, devices, dcn_data, message",
    [
        ((4, 2, 1, 1), fake_slices(1, 2, 4), 2, r"mesh.dcn_data=2 but the 8 devices are in 1 TPU slices"),
        ((3, 4, 1, 1), fake_slices(3), 2, r"mesh.dcn_data=2 does not divide the data axis of 3"),
        ((2, 4, 1, 1), fake_slices(4, 1, 2), 2, r"mesh.dcn_data=2 but the 8 devices are in 4 TPU slices"),
    ],
)
def test_devices_that_do_not_split_so_are_named(shape, devices, dcn_data, message):
    with pytest.raises(ValueError, match=message):
        sharding.hybrid_device_grid(shape, devices, dcn_data)


def test_slices_of_different_sizes_are_named():
    small = [dataclasses.replace(d, id=4 + d.id, slice_index=1) for d in fake_slices(1, 1, 2)]
    with pytest.raises(ValueError, match=r"the TPU slices hold different numbers of devices: \{0: 4, 1: 2\}"):
        sharding.hybrid_device_grid((2, 3, 1, 1), fake_slices(1) + small, dcn_data=2)


def test_cpu_devices_have_no_slices_so_processes_are_the_granules():
    assert sharding.granules(jax.devices()) == ("process_index", 1)
    with pytest.raises(ValueError, match=r"mesh.dcn_data=2 but the 8 devices are in 1 processes"):
        sharding.make_mesh({"data": 2, "fsdp": 4}, jax.devices(), dcn_data=2)


def test_dcn_data_1_is_the_plain_mesh_on_the_8_cpu_devices():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    plain = jax.make_mesh(
        (2, 4, 1, 1), config_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=jax.devices()
    )
    assert mesh == plain and mesh.devices.tolist() == plain.devices.tolist()


def test_the_config_refuses_a_data_axis_the_slices_do_not_divide():
    mesh = config_lib.MeshConfig(data=-1, fsdp=4, dcn_data=2)
    assert mesh.sizes(16) == {"data": 4, "fsdp": 4, "tensor": 1, "context": 1}
    with pytest.raises(config_lib.ConfigError, match=r"mesh.dcn_data: 2 slices do not divide the data axis of size 3"):
        config_lib.MeshConfig(data=3, fsdp=4, dcn_data=2).sizes(12)
    with pytest.raises(config_lib.ConfigError, match=r"mesh.dcn_data: must be 1 \(one slice\) or more, got 0"):
        config_lib.from_dict({"mesh": {"dcn_data": 0}})


@needs_libtpu
def test_a_two_slice_topology_from_libtpu_builds_the_hybrid_mesh():
    devices = aot.tpu_topology_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, devices, dcn_data=2)
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(ValueError, match=r"the devices are in 2 TPU slices: set mesh.dcn_data=2"):
        sharding.make_mesh({"data": 2, "fsdp": 4}, devices)
