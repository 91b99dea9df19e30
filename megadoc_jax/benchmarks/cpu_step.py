"""Our training step at the shape of the MaxText comparison, against this machine's own matmul rate.

    python -m megadoc_jax.benchmarks.cpu_step [--rounds 3] [--steps 3] [--variants f32/none,f32/none/unrolled]

The shape is the one MaxText 0.2.5 was run at on this machine (issue 13): hidden 256, MLP 1024, 4 layers,
4 heads (and 4 KV heads) of 64, vocabulary 32,000, sequence 512, batch 4, one device, random tokens.
Each variant (compute dtype / model.remat [/ unrolled: model.scan_layers off]) is compiled once; then,
in `--rounds` rounds, every variant runs `--steps` timed steps and the f32 and bf16 rates of a
2048-square matmul are measured, all interleaved, so that the ratios hold on a machine whose load
moves. Prints per variant the median s/step, the model FLOP/s (metrics.train_flops_per_token: 6 x
matmul weights + causal attention, the count MaxText's 0.16 TFLOP a step also comes from) and that rate
as a fraction of the f32 (and, for bf16, the bf16) matmul rate. Goal (issue 13): at least 0.5 of the
f32 rate in f32 with remat off.
`--phases` also times the forward pass, the loss's gradient alone and the optimizer update of the first
variant, to show where a step's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from megadoc_jax import config as config_lib
from megadoc_jax import metrics, sharding
from megadoc_jax import step as step_lib
from megadoc_jax.benchmarks.matmul_rate import measure_matmul_gflops, versions_line

MAXTEXT_SHAPE = dict(size="custom", hidden=256, mlp=1024, layers=4, heads=4, kv_heads=4, head_dim=64, vocab_size=32_000)
SEQ_LEN, BATCH = 512, 4


def step_config(compute_dtype: str, remat: str, scan_layers: bool = True) -> config_lib.Config:
    model = dict(
        MAXTEXT_SHAPE, compute_dtype=compute_dtype, param_dtype="float32", remat=remat, scan_layers=scan_layers
    )
    return config_lib.from_dict(
        dict(model=model, data=dict(seq_len=SEQ_LEN), train=dict(batch_size=BATCH, checkpoints=False))
    )


def random_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MAXTEXT_SHAPE["vocab_size"], (BATCH, SEQ_LEN + 1), dtype=np.int32)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)).copy(),
        "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32),
        "loss_mask": np.ones((BATCH, SEQ_LEN), np.float32),
    }


class Variant:
    """One compiled train step and its state; `run(steps)` returns the seconds of each step.

    name: DTYPE/REMAT[/unrolled], e.g. f32/none or bf16/full/unrolled (layers unrolled, not scanned)."""

    def __init__(self, name: str) -> None:
        compute_dtype, remat, *layers = name.split("/")
        if layers not in ([], ["unrolled"]):
            raise SystemExit(f"--variants: {name!r}: the third field, if any, must be 'unrolled'")
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(compute_dtype)
        if dtype is None:
            raise SystemExit(f"--variants: {name!r}: the dtype must be f32 or bf16")
        if remat not in ("none", *step_lib.model_lib.REMAT_POLICIES):
            raise SystemExit(f"--variants: {name!r}: remat must be one of none, full, dots")
        self.name = name
        self.config = step_config(dtype, remat, scan_layers=not layers)
        device = jax.devices()[0]
        self.mesh = sharding.make_mesh(config_lib.validate_for_devices(self.config, 1), [device])
        self.setup = step_lib.train_setup(self.config, self.mesh, total_steps=10_000)
        self.layout = step_lib.batch_sharding(self.mesh, self.config)
        self.state = step_lib.initial_state(self.setup, self.config, self.mesh)
        self.batches = [step_lib.global_batch(random_batch(seed), self.layout) for seed in range(2)]
        with jax.set_mesh(self.mesh):
            self.step = step_lib.jit_train_step(self.setup, self.config, self.layout)
            start = time.perf_counter()
            self.state, out = self.step(self.state, self.batches[0])
            jax.block_until_ready(out)
        self.compile_seconds = time.perf_counter() - start

    def run(self, steps: int) -> list[float]:
        seconds = []
        with jax.set_mesh(self.mesh):
            for i in range(steps):
                start = time.perf_counter()
                self.state, out = self.step(self.state, self.batches[i % 2])
                jax.block_until_ready(out)
                seconds.append(time.perf_counter() - start)
        return seconds


def phase_seconds(variant: Variant, repeats: int) -> dict[str, float]:
    """Median seconds of the forward loss, the loss's gradient and the optimizer update, each jitted alone."""
    setup, config, batch = variant.setup, variant.config, variant.batches[0]
    params = variant.state["params"]
    loss = lambda p: step_lib.loss_sums(setup.graphdef, p, batch, config)["loss_sum"]
    forward, backward = jax.jit(loss), jax.jit(jax.grad(loss))
    update = jax.jit(lambda g, s, p: setup.tx.update(g, s, p))
    grads = backward(params)
    phases: dict[str, Callable[[], object]] = {
        "forward (loss)": lambda: forward(params),
        "forward + backward": lambda: backward(params),
        "optimizer update": lambda: update(grads, variant.state["opt_state"], params),
    }
    out = {}
    with jax.set_mesh(variant.mesh):
        for name, run in phases.items():
            jax.block_until_ready(run())
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--variants", default="f32/none,f32/full,f32/dots,bf16/none,bf16/full")
    parser.add_argument("--phases", action="store_true", help="also time forward, backward, update alone")
    args = parser.parse_args(argv)
    if jax.device_count() != 1 or jax.devices()[0].platform != "cpu":
        print(f"note: measuring on {jax.devices()[0].device_kind} ({jax.device_count()} devices: the first is used)")

    variants = [Variant(name) for name in args.variants.split(",")]
    flops_per_step = metrics.train_flops_per_token(variants[0].config.model, SEQ_LEN) * BATCH * SEQ_LEN
    print(f"{versions_line()}; device {jax.devices()[0].device_kind}")
    print(
        f"shape: hidden 256, MLP 1024, 4 layers, 4 heads x 64, vocab 32,000, batch {BATCH} x {SEQ_LEN}; "
        f"{flops_per_step / 1e12:.3f} TFLOP a step (model FLOPs)"
    )
    print("compile + first step: " + ", ".join(f"{v.name} {v.compile_seconds:.1f} s" for v in variants))
    step_times: dict[str, list[float]] = {v.name: [] for v in variants}
    rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(args.rounds):
        for dtype in rates:
            rates[dtype].append(measure_matmul_gflops(dtype, size=2048, repeats=5))
        for variant in variants:
            step_times[variant.name] += variant.run(args.steps)
    f32_rate, bf16_rate = (statistics.median(rates[d]) for d in ("float32", "bfloat16"))
    print(f"matmul 2048^2 (median of {args.rounds} rounds): f32 {f32_rate:.0f} GFLOP/s, bf16 {bf16_rate:.0f} GFLOP/s")
    print(f"{'variant':<10} {'s/step':>8} {'min':>7} {'GFLOP/s':>8} {'/f32 rate':>10} {'/bf16 rate':>11}")
    for name, times in step_times.items():
        seconds = statistics.median(times)
        gflops = flops_per_step / seconds / 1e9
        bf16 = f"{gflops / bf16_rate:11.2f}" if name.startswith("bf16") else f"{'':11}"
        print(f"{name:<10} {seconds:8.3f} {min(times):7.3f} {gflops:8.1f} {gflops / f32_rate:10.2f} {bf16}")
    print("goal: f32/none at least 0.50 of the f32 matmul rate")
    if args.phases:
        for phase, seconds in phase_seconds(variants[0], repeats=args.rounds * args.steps).items():
            print(f"{variants[0].name} {phase:<20} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
