"""Evaluation throughput against the training step's forward pass, on the same mesh, shapes and parameters.

    python -m megadoc_jax.benchmarks.evaluation [--batches 20] [--documents 4000] [--rounds 3] [overrides ...]

The forward side is the train step's loss (step.loss_sums: forward pass and chunked loss, no gradient),
jitted like the train step, timed over --batches batches after a compiled warm-up, twice: fed global
batches already on the devices, and placing each batch from the host inside the loop (as the training
loop and the evaluation both do). The evaluation side is the evaluate command's own path on a store of random
documents: the concat recipe's windows read from the store (prefetch thread), placed on the mesh, per-token
scores (evaluation.jit_ensemble_token_scores), read back and summed in float64 on the host with the
position and segment figures, two batches in flight. All count B x L positions per batch. The three are
interleaved for --rounds rounds; prints their medians and the ratios (goal: evaluation within 10% of the
forward pass, ratio >= 0.9).

Defaults: the demo model size (float32) at data.seq_len=128, train.batch_size=16, random parameters; any
config override applies to both sides (mesh.*, model.*, data.seq_len, train.batch_size).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from megadoc_jax import config as config_lib
from megadoc_jax import sharding
from megadoc_jax import step as step_lib
from megadoc_jax.data import pipeline
from megadoc_jax.data.store import Document, StoreReader, StoreWriter, TokenizerInfo
from megadoc_jax.evaluation import loss_windows
from megadoc_jax.evaluation.losses import LossSums, RowScorer, score_batches

DEFAULTS = ["model.size=demo", "model.compute_dtype=float32", "data.seq_len=128", "train.batch_size=16"]


def random_store(path: Path, vocab: int, documents: int, seed: int = 0) -> StoreReader:
    rng = np.random.default_rng(seed)
    info = TokenizerInfo(name="random", hash="sha256:random", vocab_size=vocab, eos_id=0)
    with StoreWriter(path, info) as writer:
        writer.append(
            Document(np.append(rng.integers(1, vocab, size=rng.integers(10, 400)), 0).astype(np.int32), {})
            for _ in range(documents)
        )
        writer.finish()
    return StoreReader.open(path)


def forward_tokens_per_s(config, mesh, setup, params, rows: list[dict], batches: int, *, placed: bool) -> float:
    """The train step's forward pass over `batches` batches; placed: each batch goes from the host to the
    devices inside the timed loop, as the training loop places every step's batch (and the evaluation its
    own); otherwise all batches are on the devices before the clock starts."""
    layout = step_lib.batch_sharding(mesh, config)
    loss = jax.jit(
        lambda p, b: step_lib.loss_sums(setup.graphdef, p, b, config)["loss_sum"],
        in_shardings=(setup.state_shardings["params"], layout),
    )
    place = lambda r: step_lib.global_batch(r.batch, layout)
    resident = [] if placed else [place(r) for r in rows[1 : batches + 1]]
    with jax.set_mesh(mesh):
        jax.block_until_ready(loss(params, place(rows[0])))  # compile
        start = time.perf_counter()
        if placed:
            jax.block_until_ready([loss(params, place(r)) for r in rows[1 : batches + 1]])
        else:
            jax.block_until_ready([loss(params, b) for b in resident])
        seconds = time.perf_counter() - start
    return batches * config.train.batch_size * config.data.seq_len / seconds


def evaluation_tokens_per_s(config, mesh, setup, params, store, plan, batches: int) -> float:
    scorer = RowScorer((setup.graphdef,), (setup.state_shardings["params"],), mesh, config)
    batch_size = config.train.batch_size
    read = lambda b: plan.read_batch(store, b, batch_size)
    score_batches(scorer, (params,), [read(0)], LossSums(config.data.seq_len))  # compile
    rows = (r for _, r in pipeline.prefetched(read, range(1, batches + 1), 2))
    start = time.perf_counter()
    score_batches(scorer, (params,), rows, LossSums(config.data.seq_len))
    seconds = time.perf_counter() - start
    return batches * batch_size * config.data.seq_len / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.benchmarks.evaluation", description=__doc__)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = config_lib.load(None, [*DEFAULTS, *args.overrides, "data.document_masking=true"])
    devices = jax.devices()
    mesh = sharding.make_mesh(config_lib.validate_for_devices(config, len(devices)), devices)
    setup = step_lib.train_setup(config, mesh, 1)
    params = step_lib.initial_state(setup, config, mesh)["params"]
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(Path(tmp) / "store", config.model.vocab_size, args.documents)
        plan = loss_windows.concat_plan(store, config.data.seq_len)
        if plan.num_batches(config.train.batch_size) < args.batches + 1:
            parser.error(f"--documents {args.documents}: too few windows for {args.batches + 1} batches")
        rows = [plan.read_batch(store, b, config.train.batch_size) for b in range(args.batches + 1)]
        figures: dict[str, list[float]] = {"resident": [], "placed": [], "evaluation": []}
        for _ in range(args.rounds):  # interleaved, so that the machine's load falls on all three alike
            figures["resident"].append(
                forward_tokens_per_s(config, mesh, setup, params, rows, args.batches, placed=False)
            )
            figures["placed"].append(forward_tokens_per_s(config, mesh, setup, params, rows, args.batches, placed=True))
            figures["evaluation"].append(
                evaluation_tokens_per_s(config, mesh, setup, params, store, plan, args.batches)
            )
    shape = f"{config.train.batch_size} x {config.data.seq_len}"
    median = {k: float(np.median(v)) for k, v in figures.items()}
    print(f"model {config.model.size}, batch {shape}, mesh {dict(mesh.shape)} on {devices[0].device_kind}")
    print(f"medians of {args.rounds} interleaved rounds of {args.batches} batches, tokens/s:")
    print(f"  train step forward pass, batches already on the devices: {median['resident']:,.0f}")
    print(f"  train step forward pass, each batch placed from the host: {median['placed']:,.0f}")
    print(f"  evaluation (reads, placement, scores back, host sums):    {median['evaluation']:,.0f}")
    for name, what in (("resident", "batches on the devices"), ("placed", "batches placed")):
        print(f"ratio evaluation / forward ({what}): {median['evaluation'] / median[name]:.3f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
