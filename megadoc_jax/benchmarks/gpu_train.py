"""Training throughput and MFU of the paper's models on the local accelerator (one GPU or TPU host).

    python -m megadoc_jax.benchmarks.gpu_train                       # 300m and 1.5b, 30 steps each
    python -m megadoc_jax.benchmarks.gpu_train --sizes 300m --steps 50 --batch 32 model.remat=dots

Writes a store of random tokens (the Llama 3 vocabulary, enough for the run) to a temporary directory,
trains each size with the full loop (`megadoc_jax.train.run`; checkpoints off) at 4,096 tokens, and prints
tokens/s and MFU of the last logged interval (compile excluded). Goals on one H100: 40% MFU at 300m, 55%
at 1.5b. On a CPU it runs too, slowly, and reports no MFU (no peak FLOP/s is known for a CPU).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

from megadoc_jax import config as config_lib
from megadoc_jax import train
from megadoc_jax.data.store import Document, StoreWriter, TokenizerInfo

VOCAB = 128_256


def random_store(path: Path, num_tokens: int, seed: int = 0) -> None:
    """Documents of random tokens, about the paper's mean length (1243 tokens)."""
    rng = np.random.default_rng(seed)
    tokenizer = TokenizerInfo(name="random", hash="random", vocab_size=VOCAB, eos_id=VOCAB - 1)
    with StoreWriter(path, tokenizer) as writer:
        written = 0
        while written < num_tokens:
            lengths = rng.integers(200, 2300, 256)
            writer.append(
                Document(tokens=rng.integers(0, VOCAB - 1, n).astype(np.int32), metadata={"source_id": str(i)})
                for i, n in enumerate(lengths)
            )
            written += int(lengths.sum())
        writer.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["300m", "1.5b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="global batch in sequences (default: the config's 64)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every size")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {device.device_kind} ({device.platform})")
    with tempfile.TemporaryDirectory() as tmp:
        base = config_lib.load(Path(__file__).resolve().parents[2] / "configs" / f"{args.sizes[0]}.yaml")
        batch = args.batch or base.train.batch_size
        store = Path(tmp) / "random"
        random_store(store, num_tokens=batch * 4097 * (args.steps + 2))
        for size in args.sizes:
            config = config_lib.load(
                Path(__file__).resolve().parents[2] / "configs" / f"{size}.yaml",
                [
                    f"data.streams=[{{name: real, store: {store}, weight: 1.0}}]",
                    f"train.steps={args.steps}",
                    f"train.batch_size={batch}",
                    "train.log_every=10",
                    "train.checkpoints=false",
                    "train.eval_every=0",
                    f"train.run_dir={Path(tmp) / size}",
                    *args.overrides,
                ],
            )
            result = train.run(config)
            last = [h for h in result.history if "loss" in h][-1]
            mfu = f"{100 * last['mfu']:.1f}%" if "mfu" in last else "n/a (no peak FLOP/s known for this device)"
            print(
                f"{size}: {last['tokens_per_s']:,.0f} tokens/s, {last['tflops_per_device']:.1f} TFLOP/s per "
                f"device, MFU {mfu}, step {1e3 * last['step_time_s']:.0f} ms, loss {last['loss']:.3f}"
            )


if __name__ == "__main__":
    main()
