"""Ahead-of-time compile checks: TPU programs compiled on a CPU machine, and per-device memory reports.

With libtpu installed (`pip install "megadoc-jax[tpu]"`), `tpu_topology_devices("v5e:16x16")` gives
abstract devices of a TPU slice that exists nowhere near this machine; a jitted step lowered with
NamedShardings over a mesh of those devices compiles to the real TPU program, and the compiled
program reports its per-device memory and FLOPs. This works with JAX_PLATFORMS=cpu: the TPU plugin
is loaded only for its compiler. The same `compile_report` works on the devices at hand (CPU, GPU).

Without a compile, `state_bytes_per_device` sums the per-device shards of an abstract training state
(params + optimizer state as sharded ShapeDtypeStructs): the floor of what each device must hold.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from megadoc_jax import hardware

_HOST_BOUNDS = (2, 2, 1)  # chips per host in x, y, z for every TPU generation of hardware.ACCELERATORS
_TOPOLOGY_NAME = re.compile(r"^(?P<generation>[a-z0-9]+):(?P<dims>\d+(?:x\d+){1,2})$")


class AotError(RuntimeError):
    """An ahead-of-time compile check could not run; the message says why and what to do."""


def _require_libtpu() -> None:
    if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        return  # an explicit libtpu.so, which jax loads before looking for the package
    try:
        import libtpu  # noqa: F401  (the package that carries the TPU compiler)
    except ImportError:
        raise AotError(
            "TPU ahead-of-time compilation needs libtpu, which is not installed: "
            f'pip install "megadoc-jax[tpu]" (or "jax[tpu]=={jax.__version__}")'
        ) from None


def tpu_topology_devices(name: str, num_slices: int = 1) -> list[jax.Device]:
    """Abstract (compile-only) devices of the TPU slice `name`, e.g. 'v5e:2x2', 'v5p:4x4x4', 'v4:2x2x2', or of
    `num_slices` such slices joined over the data-centre network (multislice: devices carry `slice_index`).

    Device order follows the slice's chip coordinates; build a Mesh over them as over real devices.
    One device per chip, except v2, v3 and TPU7x, whose two TensorCores are separate devices.
    """
    if num_slices < 1:
        raise AotError(f"TPU topology {name!r}: num_slices must be 1 or more, got {num_slices}")
    match = _TOPOLOGY_NAME.match(name.strip().lower())
    if match is None or match["generation"] not in hardware.TPU_GENERATIONS:
        raise AotError(
            f"TPU topology {name!r} is not of the form GENERATION:AxB[xC] with GENERATION in "
            f"{sorted(hardware.TPU_GENERATIONS)} (e.g. 'v5e:2x2', 'v5p:4x4x4')"
        )
    _require_libtpu()
    # Compile-only use never touches a chip: let several processes (parallel tests, a dry run beside a
    # job) load libtpu at once instead of failing on /tmp/libtpu_lockfile. Read when libtpu loads.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    dims = [int(d) for d in match["dims"].split("x")]
    dims3 = (dims + [1])[:3]
    kwargs: dict[str, Any] = {"chip_config_name": hardware.TPU_GENERATIONS[match["generation"]].tpu_chip_config}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    if any(d < b for d, b in zip(dims3, _HOST_BOUNDS)):
        # A slice smaller than one host (e.g. v5e:1x1) is one host with fewer chips.
        kwargs["chips_per_host_bounds"] = tuple(min(d, b) for d, b in zip(dims3, _HOST_BOUNDS))
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{match['generation']}:{match['dims']}", **kwargs
        )
    except Exception as e:  # libtpu reports bad shapes as JaxRuntimeError INVALID_ARGUMENT
        raise AotError(f"TPU topology {name!r}: libtpu refused it: {e}") from e
    return list(topology.devices)


# --------------------------------------------------------------------------------------------------
# Compile reports
# --------------------------------------------------------------------------------------------------

_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
}


def _program_devices(abstract_args: Any, compiled: jax.stages.Compiled | None) -> list[jax.Device]:
    """The devices the program runs on: from the arguments' shardings, else the compiled program's."""
    candidates = [jax.tree.leaves(abstract_args, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))]
    if compiled is not None:
        candidates += [jax.tree.leaves(compiled.input_shardings), jax.tree.leaves(compiled.output_shardings)]
    for leaves in candidates:
        for leaf in leaves:
            sharding = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
            if isinstance(sharding, jax.sharding.Sharding):
                return sorted(sharding.device_set, key=lambda d: d.id)
    return [jax.devices()[0]]


def _device_memory_bytes(device: jax.Device) -> tuple[int | None, str]:
    """Memory one device may use: the runtime's limit on a live device, else the vendor table."""
    try:
        stats = device.memory_stats()
    except Exception:  # compile-only TPU devices and some backends have no stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "runtime limit"
    hbm = hardware.hbm_bytes_per_device(device.device_kind)
    return hbm, ("vendor HBM figure" if hbm else "unknown")


def compile_report(
    jitted_fn: Any,
    abstract_args: Sequence[Any],
    abstract_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Lower and compile `jitted_fn` for `abstract_args` (ShapeDtypeStructs with shardings) ahead of time.

    Returns per-device figures of the compiled SPMD program: memory from memory_analysis() (bytes;
    total = arguments + outputs - aliased (donated) + temporaries + generated code; `peak_bytes` is
    XLA's own peak where the backend reports one; `required_bytes` is the larger of the two) and
    FLOPs from cost_analysis(), with the device kind, its memory capacity and whether the step fits.
    A program the TPU compiler refuses for lack of HBM gives fits=False and its `compile_error`.
    """
    start = time.perf_counter()
    lowered = jitted_fn.lower(*abstract_args, **(abstract_kwargs or {}))
    lowered_s = time.perf_counter() - start
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        compiled, compile_error = None, str(e)  # the TPU compiler refuses a program that exceeds HBM
    compile_s = time.perf_counter() - lowered_s - start

    devices = _program_devices((abstract_args, abstract_kwargs), compiled)
    capacity, capacity_source = _device_memory_bytes(devices[0])
    report = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "lower_s": lowered_s,
        "compile_s": compile_s,
        "device_memory_bytes": capacity,
        "device_memory_source": capacity_source,
    }
    if compiled is None:
        return {
            **report,
            "memory": None,
            "flops_per_device": None,
            "flops_count_loops_once": None,
            "fits": False,
            "compile_error": compile_error,
        }

    stats = compiled.memory_analysis()
    if stats is None:
        raise AotError(f"the {devices[0].platform} backend reports no memory analysis for this program")
    memory = {key: int(getattr(stats, field)) for key, field in _MEMORY_FIELDS.items()}
    memory["total_bytes"] = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
        + memory["generated_code_bytes"]
    )
    memory["peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    memory["required_bytes"] = max(memory["total_bytes"], memory["peak_bytes"])

    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return {
        **report,
        "memory": memory,
        "flops_per_device": float((cost or {}).get("flops", 0.0)),
        # XLA's cost analysis counts a while loop's body once, whatever its trip count: with scanned
        # layers or a microbatch loop the FLOPs above are an undercount.
        "flops_count_loops_once": " while(" in compiled.as_text(),
        "fits": None if capacity is None else memory["required_bytes"] <= capacity,
        "compile_error": None,
    }


def temp_bytes_from_error(message: str) -> int | None:
    """The temporaries a refused program needs, from the TPU compiler's RESOURCE_EXHAUSTED message
    ("... memory required for HLO temporaries (74.28G) exceeds available HBM ..."), or None."""
    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if found is None:
        return None
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_fit(required_bytes: int, device_kind: str, capacity: int | None, source: str = "vendor HBM figure") -> str:
    """'12.00 GiB of 16.00 GiB per device (75.0%, vendor HBM figure): fits', or says plainly it does not."""
    if capacity is None:
        return (
            f"{format_bytes(required_bytes)} per device; memory of {device_kind!r} is unknown "
            "(not in megadoc_jax.hardware.ACCELERATORS): fit not checked"
        )
    share = required_bytes / capacity
    if share > 1:
        verdict = "DOES NOT FIT"
    elif share > 0.9:
        verdict = "fits, but with under 10% headroom"
    else:
        verdict = "fits"
    return (
        f"{format_bytes(required_bytes)} of {format_bytes(capacity)} per device "
        f"({100 * share:.1f}%, {source}): {verdict}"
    )


def format_compile_report(report: Mapping[str, Any]) -> str:
    """A few lines for the dry-run console: compile times, per-device memory, fit, FLOPs."""
    m = report["memory"]
    chip, acc = report["device_kind"], hardware.accelerator(report["device_kind"])
    if acc is not None and acc.name != chip:
        chip = f"{chip} ({acc.name})"  # e.g. "TPU v5 lite (TPU v5e)"
    header = (
        f"AOT compile for {report['num_devices']} x {chip}: "
        f"lowered in {report['lower_s']:.1f} s, compiled in {report['compile_s']:.1f} s"
    )
    if m is None:
        return f"{header}\nDOES NOT FIT: the compiler refused the program: {report['compile_error']}"
    lines = [
        header,
        "per-device memory: "
        + ", ".join(
            f"{label} {format_bytes(m[key])}"
            for label, key in (
                ("arguments", "argument_bytes"),
                ("outputs", "output_bytes"),
                ("aliased", "alias_bytes"),
                ("temporaries", "temp_bytes"),
                ("code", "generated_code_bytes"),
            )
        ),
        f"  total {format_bytes(m['total_bytes'])}, XLA peak {format_bytes(m['peak_bytes'])} -> "
        + format_fit(
            m["required_bytes"], report["device_kind"], report["device_memory_bytes"], report["device_memory_source"]
        ),
        f"FLOPs per device per call: {report['flops_per_device']:.4g}"
        + (
            " (XLA counts each loop body once: scanned layers and microbatch loops are undercounted)"
            if report["flops_count_loops_once"]
            else ""
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Estimate from abstract state alone
# --------------------------------------------------------------------------------------------------


def _leaf_bytes_per_device(leaf: Any, where: str) -> int:
    sharding = getattr(leaf, "sharding", None)
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"state_bytes_per_device: leaf {where} has no shape/dtype: {leaf!r}")
    if not isinstance(sharding, jax.sharding.Sharding):
        raise ValueError(
            f"state_bytes_per_device: leaf {where} ({shape}, {dtype}) has no sharding; give every "
            "ShapeDtypeStruct a sharding (a replicated one if it is not split)"
        )
    try:
        shard_shape = sharding.shard_shape(tuple(shape))
    except ValueError as e:  # jax refuses uneven splits, and so would the step that takes this state
        raise ValueError(f"state_bytes_per_device: leaf {where} cannot be split this way: {e}") from None
    return int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def state_bytes_per_device(abstract_state: Any) -> int:
    """Bytes each device holds for a pytree of sharded ShapeDtypeStructs (or arrays)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
    return sum(_leaf_bytes_per_device(leaf, jax.tree_util.keystr(path)) for path, leaf in leaves)
