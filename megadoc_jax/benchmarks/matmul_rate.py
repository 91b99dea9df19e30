"""The machine's dense matmul rate: GFLOP/s of one jitted square matmul, per dtype, on one device.

    python -m megadoc_jax.benchmarks.matmul_rate [--size 2048] [--repeats 10] [--dtypes float32,bfloat16]

Prints the Python, jax and jaxlib versions, the device, and GFLOP/s for each dtype (2 * size**3 FLOPs a
matmul over the median time of --repeats calls, after one compile-and-run call that is not timed). The
step benchmark divides its model FLOP/s by `measure_matmul_gflops(jnp.float32)` measured in the same run,
so that the fraction holds on a machine whose load moves between runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from time import perf_counter

import jax
import jax.numpy as jnp
import jaxlib


def _floating_dtype(dtype) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype: {dtype!r} is not a dtype name (e.g. float32, bfloat16)") from err
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype: {dtype!r} is not a floating-point dtype")
    return resolved


def measure_matmul_gflops(dtype, size: int = 2048, repeats: int = 10, device: jax.Device | None = None) -> float:
    """GFLOP/s of `a @ b` for two `size` x `size` arrays of `dtype` (name or dtype) on `device` (default:
    the first device), from the median of `repeats` timed calls after an untimed first call (the compile)."""
    dtype = _floating_dtype(dtype)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: {size!r} must be a positive integer")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats: {repeats!r} must be a positive integer")
    device = device if device is not None else jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = perf_counter()
        matmul(a, b).block_until_ready()
        seconds.append(perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def versions_line() -> str:
    return f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square matrices")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per dtype (the median is reported)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtype names")
    args = parser.parse_args(argv)
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    if not dtypes:
        parser.error("--dtypes: name at least one dtype")
    device = jax.devices()[0]
    print(f"{versions_line()}; device {device.device_kind} ({device.platform})")
    print(f"{args.size} x {args.size} matmul, median of {args.repeats} calls")
    for name in dtypes:
        try:
            gflops = measure_matmul_gflops(name, size=args.size, repeats=args.repeats, device=device)
        except ValueError as err:
            parser.error(f"--dtypes: {err}")
        print(f"{name}: {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
