"""cuDNN fused attention against the xla reference on one NVIDIA GPU, and the longest 300m window.

Not run in CI (it needs a CUDA GPU and `jax[cuda]`); written to be run as is on one H100:

    python -m megadoc_jax.benchmarks.attention_gpu                # both parts
    python -m megadoc_jax.benchmarks.attention_gpu --part compare --lengths 4096 16384 32768

Part 1 (compare): for each length, forward+backward time (median of --repeats after a warm-up) of one
attention call with the 300m model's heads (12 x 64), bf16, causal, for `xla` and `cudnn`, the speed-up,
and the agreement of outputs and gradients (max |difference| relative to max |xla|). `xla` at 32k
materialises 12 x 32k x 32k fp32 scores (48 GiB): it is reported as out of memory if it does not fit.
Part 2 (longest): the longest window (doubling from 8192, then bisecting in steps of 4096) at which a
whole 300m train step (batch 1, remat full, cudnn) compiles within the GPU's memory and runs one step;
the goal is 65,536. --max-length caps the search (each length compiles a 300m step, about a minute):
a window that runs at the cap is reported as "at least".
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from megadoc_jax import attention as attention_lib
from megadoc_jax import config as config_lib
from megadoc_jax import step as step_lib
from megadoc_jax.model import Decoder


def _timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(lengths: list[int], repeats: int, heads: int = 12, head_size: int = 64) -> None:
    print(f"{'L':>7} {'xla ms':>9} {'cudnn ms':>9} {'speed-up':>9} {'out err':>9} {'grad err':>9}")
    for length in lengths:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, length, heads, head_size), jnp.bfloat16) for key in keys)
        results, times = {}, {}
        for impl in ("xla", "cudnn"):

            def loss(q, k, v, impl=impl):
                out = attention_lib.attention(q, k, v, causal=True, impl=impl)
                return out.astype(jnp.float32).sum(), out

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            try:
                times[impl] = _timed(fn, (q, k, v), repeats)
                (_, out), grads = fn(q, k, v)
                results[impl] = (np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads])
            except Exception as e:  # xla's full score matrix runs out of memory at long lengths
                print(f"{length:>7} {impl}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        if len(results) < 2:
            continue
        rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
        out_err = rel(results["cudnn"][0], results["xla"][0])
        grad_err = max(rel(a, b) for a, b in zip(results["cudnn"][1], results["xla"][1]))
        print(
            f"{length:>7} {times['xla'] * 1e3:9.2f} {times['cudnn'] * 1e3:9.2f} "
            f"{times['xla'] / times['cudnn']:9.2f} {out_err:9.2e} {grad_err:9.2e}"
        )


def _step_runs(length: int) -> bool:
    cfg = config_lib.load(
        None,
        [
            "model.size=300m",
            "model.attention=cudnn",
            "model.remat=full",
            f"data.seq_len={length}",
            "train.batch_size=1",
            "mesh.data=1",
        ],
    )
    graphdef, params = nnx.split(Decoder(cfg.model, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-3), cfg), donate_argnums=(0,))
    tokens = jnp.zeros((1, length), jnp.int32)
    batch = {
        "inputs": tokens,
        "targets": tokens,
        "positions": jnp.arange(length)[None],
        "segment_ids": tokens + 1,
        "loss_mask": jnp.ones((1, length), jnp.float32),
    }
    try:
        state, metrics = step(step_lib.init_state(params, tx), batch)
        ok = bool(np.isfinite(float(metrics["loss"])))
    except Exception as e:  # RESOURCE_EXHAUSTED at compile or run time
        print(f"  {length}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return False
    print(
        f"  {length}: one step ran, loss {float(metrics['loss']):.3f}, peak "
        f"{jax.devices()[0].memory_stats().get('peak_bytes_in_use', 0) / 2**30:.1f} GiB"
    )
    return ok


def longest(max_length: int) -> None:
    print(f"longest 300m window with cudnn (batch 1, remat full), searched up to {max_length}:")
    good, length = 0, 8192
    while length <= max_length and _step_runs(length):
        good, length = length, length * 2
    if length > max_length:
        kind = jax.devices()[0].device_kind
        print(f"longest window: at least {good} tokens (the --max-length cap; goal 65,536) on {kind}")
        return
    bad = length
    while bad - good > 4096:
        mid = (good + bad) // 2 // 4096 * 4096
        good, bad = (mid, bad) if _step_runs(mid) else (good, mid)
    print(f"longest window: {good} tokens (goal 65,536) on {jax.devices()[0].device_kind}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("compare", "longest", "all"), default="all")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=131_072, help="longest window the search tries")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_length < 8192:
        parser.error("--max-length must be at least 8192 (the search starts there)")
    if jax.default_backend() != "gpu":
        raise SystemExit(f"attention_gpu needs a CUDA GPU (jax[cuda]); this machine runs {jax.default_backend()!r}")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.part in ("compare", "all"):
        compare(args.lengths, args.repeats)
    if args.part in ("longest", "all"):
        longest(args.max_length)


if __name__ == "__main__":
    main()
