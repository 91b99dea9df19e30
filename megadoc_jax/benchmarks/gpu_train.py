"""Training throughput and MFU of the paper's models on the local accelerator (one GPU or TPU host).

    python -m megadoc_jax.benchmarks.gpu_train                       # 300m and 1.5b, 30 steps each
    python -m megadoc_jax.benchmarks.gpu_train --sizes 300m --steps 50 --batch 32 model.remat=dots

Writes a store of random tokens (the Llama 3 vocabulary, enough for the run) to a temporary directory,
trains each size with the full loop (`megadoc_jax.train.run`; checkpoints off) at 4,096 tokens, and prints
tokens/s, model TFLOP/s per device and MFU of the last logged interval (compile excluded). Goals on one
H100: 40% MFU at 300m, 55% at 1.5b. On a CPU it runs too, slowly, and reports no MFU (no peak FLOP/s is
known for a CPU).

MFU = tokens/s x model FLOPs per token / devices / peak FLOP/s per device. Model FLOPs per token are
metrics.train_flops_per_token (6 x matmul weights + 6 x layers x seq_len x heads x head_dim; no remat
recomputation); the peak is the dense bf16 figure of megadoc_jax.hardware's table for the device kind
(H100 SXM and H200 SXM: 989 TFLOP/s, half the "with sparsity" 1,979 TFLOPS of NVIDIA's datasheets). Both
are printed with the figures.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

from megadoc_jax import config as config_lib
from megadoc_jax import hardware, metrics, train
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


def peak_line(device_kind: str) -> str:
    """Which peak MFU divides by, and where the figure comes from."""
    acc = hardware.accelerator(device_kind)
    if acc is None:
        return f"peak: none known for {device_kind!r} (megadoc_jax/hardware.py): MFU not reported"
    return f"peak: {acc.peak_flops_per_device / 1e12:,.0f} TFLOP/s dense bf16 per device ({acc.name}; {acc.source})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["300m", "1.5b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="global batch in sequences (default: the config's 64)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every size")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step's interval holds the compilation)")
    device = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {device.device_kind} ({device.platform})")
    print(peak_line(device.device_kind))
    print("MFU = tokens/s x model FLOPs per token / devices / peak (megadoc_jax/metrics.py)")
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
                    f"train.log_every={min(10, args.steps)}",
                    "train.checkpoints=false",
                    "train.eval_every=0",
                    f"train.run_dir={Path(tmp) / size}",
                    *args.overrides,
                ],
            )
            result = train.run(config)
            last = [h for h in result.history if "tokens_per_s" in h][-1]
            mfu = f"{100 * last['mfu']:.1f}%" if "mfu" in last else "n/a (no peak FLOP/s known for this device)"
            flops = metrics.train_flops_per_token(config.model, config.data.seq_len)
            print(
                f"{size}: {last['tokens_per_s']:,.0f} tokens/s, {last['tflops_per_device']:.1f} TFLOP/s per "
                f"device, MFU {mfu}, step {1e3 * last['step_time_s']:.0f} ms, loss {last['loss']:.3f} "
                f"(model FLOPs per token {flops / 1e9:.2f} G at {config.data.seq_len} tokens, batch "
                f"{config.train.batch_size}, {jax.device_count()} device(s), steps {last['step']} of {args.steps})"
            )


if __name__ == "__main__":
    main()
