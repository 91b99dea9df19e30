"""One table of accelerators: peak dense bf16 FLOP/s, HBM, devices per chip, and TPU topology names.

metrics.py reads it for MFU, aot.py for the libtpu topology of a TPU generation ("v5e" in "v5e:2x2")
and for the HBM a compiled program is checked against, dry_run.py for the memory of the train state.
Entries are matched on jax's exact `Device.device_kind` strings. No JAX here: a device kind is a string.

Vendor capacities in "GB" are read as GiB: HBM stacks come in binary sizes, and Google's TPU pages
state GiB. The usable share is a little smaller (the runtime reserves some: XLA reports 15.75 GiB
available on a v5e chip). NVIDIA datasheets give bf16 Tensor Core figures "with sparsity"; dense is
half of that.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Vendor figures for one chip, and how many JAX devices one chip shows up as."""

    name: str
    device_kinds: tuple[str, ...]  # jax Device.device_kind strings that mean this chip
    peak_bf16_flops_per_chip: float  # dense (no sparsity)
    hbm_bytes_per_chip: int
    devices_per_chip: int  # TensorCores exposed as separate devices (v2, v3, TPU7x) or 1
    source: str
    # TPUs: the generation in libtpu topology names ("v5e:2x2") and the chip_config_name that presents a
    # slice as the runtime does (v4 and v5p compile as two devices per chip by default, but jax runs them
    # in megacore mode: the chip's two TensorCores are one device). Empty for GPUs.
    tpu_generation: str = ""
    tpu_chip_config: str = ""

    @property
    def peak_flops_per_device(self) -> float:
        return self.peak_bf16_flops_per_chip / self.devices_per_chip

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.hbm_bytes_per_chip // self.devices_per_chip


def _tpu(name, kinds, peak, hbm_gib, devices_per_chip, generation, chip_config) -> Accelerator:
    source = f"cloud.google.com/tpu/docs/{generation}"
    return Accelerator(name, kinds, peak, hbm_gib * GIB, devices_per_chip, source, generation, chip_config)


# A table, one entry per line or two (fmt: skip). TPU rows: name, device kinds, peak bf16 FLOP/s per chip,
# HBM GiB per chip, devices per chip, topology generation, chip mode.
ACCELERATORS: tuple[Accelerator, ...] = (
    _tpu("TPU v2", ("TPU v2",), 45e12, 16, 2, "v2", "default"),
    _tpu("TPU v3", ("TPU v3",), 123e12, 32, 2, "v3", "default"),
    _tpu("TPU v4", ("TPU v4",), 275e12, 32, 1, "v4", "megacore"),
    _tpu("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16, 1, "v5e", "default"),
    _tpu("TPU v5p", ("TPU v5p", "TPU v5"), 459e12, 95, 1, "v5p", "megacore"),
    _tpu("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32, 1, "v6e", "default"),
    _tpu("TPU7x", ("TPU7x",), 2307e12, 192, 2, "tpu7x", "default"),
    Accelerator(
        "A100 40GB", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), 312e12, 40 * GIB, 1,
        "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 624 TFLOPS sparse bf16",
    ),
    Accelerator(
        "A100 80GB", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), 312e12, 80 * GIB, 1,
        "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 624 TFLOPS sparse bf16",
    ),
    Accelerator(
        "H100 SXM", ("NVIDIA H100 80GB HBM3",), 989e12, 80 * GIB, 1,
        "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 1979 TFLOPS sparse bf16",
    ),
    Accelerator(
        "H100 PCIe", ("NVIDIA H100 PCIe",), 756e12, 80 * GIB, 1,
        "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): PCIe 1513 TFLOPS sparse bf16",
    ),
    Accelerator(
        "H100 NVL", ("NVIDIA H100 NVL",), 835e12, 94 * GIB, 1,
        "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): NVL 1671 TFLOPS sparse bf16",
    ),
    # The H200 NVL (835 TFLOPS dense) reports the same device kind; the SXM figure is used.
    Accelerator(
        "H200 SXM", ("NVIDIA H200",), 989e12, 141 * GIB, 1,
        "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 1979 TFLOPS sparse bf16",
    ),
    Accelerator(
        "B200", ("NVIDIA B200",), 2250e12, 180 * GIB, 1,
        "NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): 4.5 PFLOPS sparse bf16 per GPU",
    ),
)  # fmt: skip

_BY_DEVICE_KIND = {kind: acc for acc in ACCELERATORS for kind in acc.device_kinds}
TPU_GENERATIONS: dict[str, Accelerator] = {acc.tpu_generation: acc for acc in ACCELERATORS if acc.tpu_generation}


def accelerator(device_kind: str) -> Accelerator | None:
    """The table entry for a jax `device.device_kind`, or None (CPU, unknown chips: MFU not reported)."""
    return _BY_DEVICE_KIND.get(device_kind.strip())


def peak_flops_per_device(device_kind: str) -> float | None:
    acc = accelerator(device_kind)
    return None if acc is None else acc.peak_flops_per_device


def hbm_bytes_per_device(device_kind: str) -> int | None:
    acc = accelerator(device_kind)
    return None if acc is None else acc.hbm_bytes_per_device
