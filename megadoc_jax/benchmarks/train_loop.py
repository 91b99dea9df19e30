"""The full training loop against the bare jitted step on the same batches: is the host hidden?

    python -m megadoc_jax.benchmarks.train_loop [--steps 60] [--log-every 10] [--rounds 3] [overrides ...]

Both sides run the same config (default: the demo model and data, checkpoints off), the same compiled
step and the same batches. The bare side feeds batches that are already on the device and only waits at
the end; the full side is `megadoc_jax.train.run` (input pipeline with prefetch, global batch assembly,
metric read-back one step behind, logging, TensorBoard and JSONL writers). Step time of the loop comes
from the JSONL timestamps between the first and last logged step, so start-up and compilation are not
counted. The two sides alternate in `--rounds` rounds (loop then bare, then bare then loop, ...), each
round's ratio taken between neighbours, so that a change of the machine's load between the halves shows
as a spread of the ratios instead of a false one (one run of each once gave 0.76, the loop "faster" than
the bare step). Prints every round and the median ratio (goal: 1.05 or better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

from megadoc_jax import config as config_lib
from megadoc_jax import sharding, train
from megadoc_jax import step as step_lib
from megadoc_jax.data import demo, pipeline
from megadoc_jax.data.store import TokenizerInfo

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def bare_step_seconds(config: config_lib.Config, steps: int) -> float:
    """Seconds per step of the jitted step alone, batches pre-assembled on the devices."""
    devices = jax.devices()
    mesh = sharding.make_mesh(config_lib.validate_for_devices(config, len(devices)), devices)
    setup = step_lib.train_setup(config, mesh, steps)
    state = step_lib.initial_state(setup, config, mesh)
    data = pipeline.TrainData(config, tokenizer=TokenizerInfo.from_directory(config.data.tokenizer))
    layout = step_lib.batch_sharding(mesh, config)
    batches = [step_lib.global_batch(data.batch(s), layout) for s in range(steps)]
    with jax.set_mesh(mesh):
        train_step = step_lib.jit_train_step(setup, config, layout)
        state, metrics = train_step(state, batches[0])  # compile and warm up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = train_step(state, batch)
        jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / (steps - 1)


def loop_step_seconds(config: config_lib.Config) -> float:
    """Seconds per step of the whole training loop, from the JSONL log's timestamps."""
    result = train.run(config)
    assert result.exit_code == 0
    times = {}
    for line in (Path(config.train.run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            times[record["step"]] = record["time"]
    first, last = min(times), max(times)
    return (times[last] - times[first]) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ratios = []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as run_dir:
            config = config_lib.load(
                DEMO_CONFIG,
                [
                    f"train.steps={args.steps}",
                    f"train.log_every={args.log_every}",
                    "train.checkpoints=false",
                    "train.eval_every=0",
                    f"train.run_dir={run_dir}",
                    "data.eval_stores={}",
                    *args.overrides,
                ],
            )
            config = demo.resolve_demo_paths(config)
            if round_index == 0:
                print(
                    f"config: model {config.model.size}, batch {config.train.batch_size} x {config.data.seq_len}, "
                    f"{args.steps} steps on {jax.device_count()} x {jax.devices()[0].device_kind}"
                )
            if round_index % 2 == 0:
                loop, bare = loop_step_seconds(config), bare_step_seconds(config, args.steps)
            else:
                bare, loop = bare_step_seconds(config, args.steps), loop_step_seconds(config)
        ratios.append(loop / bare)
        order = "loop, bare" if round_index % 2 == 0 else "bare, loop"
        print(
            f"round {round_index + 1} ({order}): bare {bare * 1e3:.1f} ms/step, loop {loop * 1e3:.1f} ms/step, "
            f"ratio {loop / bare:.3f}"
        )
    print(
        f"ratio loop/bare: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f} "
        "(goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
