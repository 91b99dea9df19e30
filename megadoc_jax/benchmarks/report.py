"""Time of the study report (megadoc_jax/study) over 1,000 fabricated runs.

    python -m megadoc_jax.benchmarks.report [--runs 1000] [--bootstrap 1000]

Builds in a temporary directory six tiny real token stores and one megadoc store, then --runs run
directories as training and evaluation leave them (config.yaml from config.dump, metrics.jsonl with the
final eval/<store>/loss, an evaluation JSON from evaluation.report.record for half of them): the reference
method over the six data sizes and a sweep of lr and wd, and five methods x G in {2, 4, 8, 16, 32} over
epochs, r, lr and seeds, their losses from a planted law. Prints the seconds of each stage: discovery and
loading, the numbers (best runs, the fits with their bootstrap, the efficiencies), the figures (matplotlib)
and the writing of report.json / report.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from megadoc_jax import config as config_lib
from megadoc_jax import files, scaling
from megadoc_jax.data.store import Document, StoreWriter, TokenizerInfo
from megadoc_jax.evaluation import report as evaluation_report
from megadoc_jax.study import report, runs

TOKENIZER = TokenizerInfo(name="bench", hash="sha256:bench", vocab_size=100, eos_id=0)
LAW = scaling.PowerLaw(A=30.0, B=0.5, C=2.0)
METHODS = ("simple", "stitched-back", "stitched-front", "stitched-nodoc", "stretched")


def write_store(path: Path, documents: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with StoreWriter(path, TOKENIZER) as writer:
        writer.append(
            Document(np.append(rng.integers(1, 100, size=rng.integers(1, 40)), 0).astype(np.int32), {})
            for _ in range(documents)
        )
        writer.finish()
    return str(path)


def config_for(streams: dict, heldout: str, **experiment) -> dict:
    return {
        "model": {"size": "tiny", "vocab_size": 100},
        "data": {
            "streams": [{"name": n, "store": s, "weight": w} for n, (s, w) in streams.items()],
            "eval_stores": {"iid": heldout},
            "seq_len": 16,
        },
        "train": {"batch_size": 4},
        "experiment": {"data": "bench", **experiment},
    }


def write_run(path: Path, raw: dict, loss: float, evaluated: bool) -> None:
    path.mkdir(parents=True)
    config = config_lib.from_dict(raw)
    config_lib.dump(config, path / "config.yaml")
    lines = [{"event": "open", "step": 0, "time": 0.0}, {"step": 100, "time": 1.0, "loss": 4.0, "eval/iid/loss": loss}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if evaluated:
        buckets = [{"from": a, "to": b, "tokens": 10, "loss": loss} for a, b in ((0, 1), (1, 16), (16, None))]
        result = {
            "store": "iid",
            "recipe": "concat",
            "seq_len": 16,
            "stride": None,
            "windows": 1,
            "rows": 1,
            "tokens": 30,
            "bytes": None,
            "loss": loss,
            "bpb": None,
            "by_position": buckets,
            "by_segment": [{"segment": "original", "kind": "original", "index": 0, "tokens": 30, "loss": loss}],
        }
        model = {"spec": str(path), "kind": "run", "path": str(path), "step": 100}
        value = evaluation_report.record(
            config=raw, models=[model], ensemble=None, stores={}, results=[result], bpb_note=None, devices={"count": 1}
        )
        (path / "eval").mkdir()
        files.write_json_atomic(path / "eval" / "run_step_100.json", value)


def fabricate(root: Path, count: int) -> Path:
    stores = root / "stores"
    real = [write_store(stores / f"real{i}", 20 * 2**i, i) for i in range(6)]
    heldout = write_store(stores / "heldout", 10, 99)
    synthetic = write_store(stores / "synthetic", 100, 100)
    D = [runs.StoreSizes({}).tokens(p)[0] for p in real]
    rng = np.random.default_rng(0)
    plans = []
    for (i, store), lr, wd in itertools.product(enumerate(real), (1e-3, 3e-3, 1e-2), (0.1, 0.4, 0.8, 1.6)):
        raw = config_for({"real": (store, 1.0)}, heldout, method="real")
        raw["optim"] = {"lr": lr, "weight_decay": wd}
        plans.append((raw, float(LAW(D[i])) + (lr != 1e-3) * 0.1 + wd * 0.01))
    sweep = itertools.product(
        METHODS, (2, 4, 8, 16, 32), (4.0, 8.0, 16.0, 32.0), (0.5, 0.75, 0.9), (1e-3, 3e-3), (0, 1)
    )
    for method, g, epochs, r, lr, seed in sweep:
        raw = config_for({"real": (real[3], 1 - r), "synthetic": (synthetic, r)}, heldout, method=method, generations=g)
        raw["data"]["real_epochs"], raw["optim"], raw["train"]["seed"] = epochs, {"lr": lr}, seed
        efficiency = 1 + 0.1 * np.log2(g) * (1 + METHODS.index(method) / 4)
        plans.append((raw, float(LAW(efficiency * D[3])) + abs(np.log2(epochs / 16)) * 0.02 + rng.uniform(0, 0.01)))
    for n, (raw, loss) in enumerate(plans[:count]):
        write_run(root / "runs" / f"run-{n:04d}", raw, loss, evaluated=n % 2 == 0)
    return root / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        runs_dir = fabricate(Path(tmp), args.runs)
        print(f"fabricated {len(list(runs_dir.iterdir()))} runs in {time.perf_counter() - start:.1f}s")
        timings = {}
        start = time.perf_counter()
        loaded = runs.load_runs(runs.discover(runs_dir), runs_dir, objective=None, real_tokens={})
        timings["discovery and loading"] = time.perf_counter() - start
        start = time.perf_counter()
        value = report.build(loaded, runs_dir=runs_dir, objective=None, level=0.95, bootstrap=args.bootstrap)
        timings[f"numbers (fits with {args.bootstrap} bootstrap refits)"] = time.perf_counter() - start
        start = time.perf_counter()
        written = report.write(value, Path(tmp) / "report", plots=True)
        timings[f"figures ({len(value['figures'])} PNGs) and writing"] = time.perf_counter() - start
        for what, seconds in timings.items():
            print(f"  {what:<45} {seconds:7.2f} s")
        print(f"  {'total':<45} {sum(timings.values()):7.2f} s  ({len(loaded.runs)} runs, {len(written)} files)")
        efficiencies = [e["efficiency"]["value"] for e in value["data_efficiency"] if e["efficiency"]]
        print(
            f"  {len(value['best'])} best runs, {len(efficiencies)} efficiencies ({min(efficiencies):.2f}-"
            f"{max(efficiencies):.2f}x)"
        )


if __name__ == "__main__":
    main()
