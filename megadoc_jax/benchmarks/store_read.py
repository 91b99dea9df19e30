"""Random 4,097-token window reads: token store vs a raw numpy memmap of the same tokens.

    python -m megadoc_jax.benchmarks.store_read                  # 32M tokens, default layout
    python -m megadoc_jax.benchmarks.store_read --sweep --tokens 16000000   # chunk size x codec table
    python -m megadoc_jax.benchmarks.store_read --checksum-cost             # the crc32c's read cost
    python -m megadoc_jax.benchmarks.store_read --read-unit                 # resident first pass, page cache cold

Builds a store of random tokens (documents of random length) in a temporary directory, writes the same
flat token array as a raw file, then reads the same random windows in batches from each, in this
process. Every figure is the median of --repeats round-robin passes.
The comparison runs every pass twice per round, with the page cache cold (every file of the store and
the memmap fsynced, then dropped with posix_fadvise(POSIX_FADV_DONTNEED): what a store larger than
memory sees) and warm, and prints each reader's speed and its paired ratio to the memmap:
  streaming direct, 1st    a fresh streaming reader (cache_bytes=0) of the default layout: each window is
                           os.preadv of its bytes, once tensorstore has checked its chunk whole
                           (store_direct.py); the first pass checks every chunk it touches
  streaming direct, 2nd    the same reader again: its chunks are checked, every read is direct
  streaming tensorstore    direct_reads=False: every window is a tensorstore read, a batch issued together
  resident, 1st            a fresh reader whose cache holds the store: each chunk is read once, then kept
  resident, 2nd            the same reader again: every window is a numpy slice of a cached chunk
The sweep prints, per layout (the last row is StoreLayout.levanter()): files, write speed, size on
disk, and the streaming (no cache; direct reads for the uncompressed layouts) and resident (warm) read
speeds against the same memmap.
--checksum-cost builds the default layout with and without the crc32c codec on every chunk and reads
both round-robin: streaming windows through tensorstore (direct_reads=False), a resident reader's first
pass (every chunk decoded once) and verify() (every chunk of every array); it prints each speed and
the ratio with/without.
--read-unit measures a resident reader's first pass with blocks of 1, 4, 16 and 64 chunks
(store_reader.RESIDENT_READ_CHUNKS) against the memmap, with the page cache cold for both (every file
fsynced, then posix_fadvise(POSIX_FADV_DONTNEED): `fincore` shows 0 pages resident after it) and warm.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megadoc_jax.data import store_reader
from megadoc_jax.data.store import Document, StoreLayout, StoreReader, StoreWriter, TokenizerInfo
from megadoc_jax.data.store_reader import DEFAULT_CACHE_BYTES

TOKENIZER = TokenizerInfo(name="benchmark", hash="sha256:benchmark", vocab_size=128_256, eos_id=128_001)


def random_documents(num_tokens: int, seed: int) -> tuple[list[Document], np.ndarray]:
    """Documents of about 1,243 tokens on average (the paper's DCLM mean), and their concatenation."""
    rng = np.random.default_rng(seed)
    tokens_T = rng.integers(0, TOKENIZER.vocab_size, num_tokens, dtype=np.int32)
    lengths = np.maximum(1, rng.exponential(1243, size=num_tokens // 600 + 2).astype(np.int64))
    ends = np.cumsum(lengths)
    ends = np.append(ends[ends < num_tokens], num_tokens)
    starts = np.concatenate([[0], ends[:-1]])
    documents = [Document(tokens_T[s:e], {"source_id": f"doc-{i}"}) for i, (s, e) in enumerate(zip(starts, ends))]
    return documents, tokens_T


def warm_page_cache(root: Path) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def drop_page_cache(root: Path) -> None:
    """Evict every file under root from the page cache (needs no root: the kernel drops clean pages)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def tokens_per_second(
    read_batch: Callable[[np.ndarray], np.ndarray], starts_W: np.ndarray, batch: int, length: int
) -> float:
    begin = time.perf_counter()
    for i in range(0, starts_W.size, batch):
        read_batch(starts_W[i : i + batch])
    return starts_W.size * length / (time.perf_counter() - begin)


def memmap_reader(path: Path, length: int) -> Callable[[np.ndarray], np.ndarray]:
    tokens = np.memmap(path, dtype=np.int32, mode="r")

    def read(starts_N: np.ndarray) -> np.ndarray:
        out_NxL = np.empty((starts_N.size, length), np.int32)
        for row, start in enumerate(starts_N.tolist()):
            out_NxL[row] = tokens[start : start + length]
        return out_NxL

    return read


def build(root: Path, documents: list[Document], layout: StoreLayout) -> tuple[Path, float]:
    name = f"store-{layout.tokens_chunk}-{layout.tokens_shard}-{layout.tokens_codec}-{layout.codec_level}"
    path = root / (name if layout.checksum else f"{name}-no-checksum")
    begin = time.perf_counter()
    writer = StoreWriter(path, TOKENIZER, layout=layout)
    writer.append(documents)
    manifest = writer.finish()
    return path, manifest["num_tokens"] / (time.perf_counter() - begin)


def compare(args: argparse.Namespace, root: Path, documents: list[Document], tokens_T: np.ndarray) -> None:
    """Every way StoreReader reads windows against the memmap, page cache cold and warm, paired by round."""
    store_path, write_speed = build(root, documents, StoreLayout())
    raw_path = root / "tokens.bin"
    tokens_T.tofile(raw_path)
    rng = np.random.default_rng(args.seed + 1)
    starts_W = rng.integers(0, tokens_T.size - args.length + 1, args.windows)
    resident_bytes = max(args.cache_mib << 20, tokens_T.nbytes)
    check = starts_W[: args.batch]
    direct = StoreReader.open(store_path, TOKENIZER, cache_bytes=0)
    assert direct.window_reads == "direct", direct.window_reads
    np.testing.assert_array_equal(direct.read_windows(check, args.length), memmap_reader(raw_path, args.length)(check))

    # (name, a fresh reader per round or None: the reader of the row before it, read again)
    rows: list[tuple[str, Callable[[], StoreReader] | None]] = [
        ("streaming direct, 1st", lambda: StoreReader.open(store_path, TOKENIZER, cache_bytes=0)),
        ("streaming direct, 2nd", None),
        ("streaming tensorstore", lambda: StoreReader.open(store_path, TOKENIZER, cache_bytes=0, direct_reads=False)),
        ("resident, 1st", lambda: StoreReader.open(store_path, TOKENIZER, cache_bytes=resident_bytes)),
        ("resident, 2nd", None),
    ]
    speeds: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):  # round-robin, so that load from other processes hits all alike
        for cold in (True, False):
            reader = None
            for name, fresh in [("memmap", None), *rows]:
                (drop_page_cache if cold else warm_page_cache)(root)
                if name == "memmap":
                    read = memmap_reader(raw_path, args.length)
                else:
                    reader = fresh() if fresh is not None else reader
                    read = functools.partial(reader.read_windows, length=args.length)
                speeds.setdefault((name, cold), []).append(tokens_per_second(read, starts_W, args.batch, args.length))

    print(f"store: {tokens_T.size:,} tokens, {len(documents):,} documents, layout {StoreLayout().to_dict()}")
    print(
        f"write: {write_speed / 1e6:.1f} M tokens/s; {args.windows} windows of {args.length} tokens in batches of "
        f"{args.batch}; median of {args.repeats} rounds; paired: the median of each round's ratio to the memmap"
    )
    print("cold: every file fsynced and dropped (POSIX_FADV_DONTNEED) before each pass; warm: read whole before it")
    print("1st: a fresh reader's pass (direct: every chunk checked whole once); 2nd: the same reader again")
    for cold in (True, False):
        memmap = speeds[("memmap", cold)]
        print(f"  page cache {'cold' if cold else 'warm'}: memmap {statistics.median(memmap) / 1e6:.1f} M tokens/s")
        for name, _ in rows:
            speed = speeds[(name, cold)]
            paired = statistics.median(f / m for f, m in zip(speed, memmap))
            print(f"    {name:<22} {statistics.median(speed) / 1e6:8.1f} M tokens/s  {paired:5.2f}x memmap")


def sweep(args: argparse.Namespace, root: Path, documents: list[Document], tokens_T: np.ndarray) -> None:
    """Build every layout first, then measure them round-robin, so that changing load hits all alike."""
    rng = np.random.default_rng(args.seed + 1)
    starts_W = rng.integers(0, tokens_T.size - args.length + 1, args.windows)
    layouts = [
        StoreLayout(tokens_chunk=chunk, tokens_shard=shard and max(shard, chunk), tokens_codec=codec)
        for chunk in args.chunks
        for shard in args.shards
        for codec in args.codecs
    ]
    layouts.append(StoreLayout.levanter())
    built = [build(root, documents, layout) for layout in layouts]
    raw_path = root / "tokens.bin"
    tokens_T.tofile(raw_path)
    warm_page_cache(root)
    readers = []
    for path, _ in built:
        resident = StoreReader.open(path, TOKENIZER, cache_bytes=DEFAULT_CACHE_BYTES)
        resident.read_windows(starts_W, args.length)
        readers.append((StoreReader.open(path, TOKENIZER, cache_bytes=0), resident))
        assert resident.resident, "the reader cache must hold the store: use fewer --tokens"
    memmap_read = memmap_reader(raw_path, args.length)

    def measure(read: Callable[[np.ndarray], np.ndarray]) -> float:
        return tokens_per_second(read, starts_W, args.batch, args.length)

    memmap_speeds: list[float] = []
    stream_speeds: list[list[float]] = [[] for _ in layouts]
    resident_speeds: list[list[float]] = [[] for _ in layouts]
    for _ in range(args.repeats):
        memmap_speeds.append(measure(memmap_read))
        for i, (streaming, resident) in enumerate(readers):
            stream_speeds[i].append(measure(lambda s: streaming.read_windows(s, args.length)))
            resident_speeds[i].append(measure(lambda s: resident.read_windows(s, args.length)))

    memmap_speed = statistics.median(memmap_speeds)
    print(
        f"{tokens_T.size:,} tokens; {args.windows} windows of {args.length}, batches of {args.batch}; "
        f"median of {args.repeats} round-robin rounds; page cache warm; memmap {memmap_speed / 1e6:.1f} M tokens/s"
    )
    print(
        "streaming: cache_bytes=0 (direct reads of uncompressed layouts, once each chunk is checked; a tensorstore "
        "read per window otherwise); resident: windows sliced from cached chunks"
    )
    print(
        f"{'chunk':>8} {'shard':>9} {'codec':>6} {'files':>6} {'write Mtok/s':>13} {'MiB':>6} "
        f"{'stream Mtok/s':>13} {'ratio':>6} {'resident Mtok/s':>15} {'ratio':>6}"
    )
    for layout, (path, write_speed), streamed, residents in zip(layouts, built, stream_speeds, resident_speeds):
        token_files = path / "input_ids" / "data"
        stream_speed, resident_speed = statistics.median(streamed), statistics.median(residents)
        print(
            f"{layout.tokens_chunk:>8} {layout.tokens_shard:>9} {layout.tokens_codec:>6} "
            f"{sum(1 for _ in (token_files / 'c').iterdir()):>6} {write_speed / 1e6:13.1f} "
            f"{directory_bytes(token_files) / 2**20:6.1f} "
            f"{stream_speed / 1e6:13.1f} {stream_speed / memmap_speed:6.3f} "
            f"{resident_speed / 1e6:15.1f} {resident_speed / memmap_speed:6.2f}"
        )


def checksum_cost(args: argparse.Namespace, root: Path, documents: list[Document], tokens_T: np.ndarray) -> None:
    """The default layout with and without crc32c on every chunk, measured round-robin in one run."""
    layouts = {"without crc32c": StoreLayout(checksum=False), "with crc32c": StoreLayout()}
    built = {name: build(root, documents, layout) for name, layout in layouts.items()}
    warm_page_cache(root)
    rng = np.random.default_rng(args.seed + 1)
    starts_W = rng.integers(0, tokens_T.size - args.length + 1, args.windows)
    resident_bytes = max(args.cache_mib << 20, tokens_T.nbytes)
    speeds: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.repeats):
        names = list(built) if round_index % 2 == 0 else list(built)[::-1]  # alternate who goes first
        for name in names:
            path = built[name][0]
            # Tensorstore reads, which check the crc32c at every read (direct reads check each chunk once).
            streaming = StoreReader.open(path, TOKENIZER, cache_bytes=0, direct_reads=False)
            resident = StoreReader.open(path, TOKENIZER, cache_bytes=resident_bytes)
            for mode, reader in (("streaming, no cache", streaming), ("resident, first pass", resident)):
                speed = tokens_per_second(
                    lambda s: reader.read_windows(s, args.length), starts_W, args.batch, args.length
                )
                speeds.setdefault((mode, name), []).append(speed)
            begin = time.perf_counter()
            streaming.verify()
            speeds.setdefault(("verify (all arrays)", name), []).append(tokens_T.size / (time.perf_counter() - begin))

    print(f"store: {tokens_T.size:,} tokens, {len(documents):,} documents, default layout with and without crc32c")
    print(
        f"{args.windows} windows of {args.length} tokens in batches of {args.batch}; median of {args.repeats} "
        "round-robin rounds; page cache warm; verify: M tokens/s of the whole store"
    )
    for name, (path, write_speed) in built.items():
        print(f"  {name:<15} write {write_speed / 1e6:5.1f} M tokens/s, {directory_bytes(path) / 2**20:7.2f} MiB")
    print("  ratio: with/without of the medians; paired: the median of each round's with/without (load drifts less")
    print("  within a round)")
    print(f"  {'':<22} {'without M tok/s':>15} {'with M tok/s':>13} {'ratio':>6} {'paired':>7}")
    for mode in ("streaming, no cache", "resident, first pass", "verify (all arrays)"):
        without, with_crc = speeds[(mode, "without crc32c")], speeds[(mode, "with crc32c")]
        paired = statistics.median(w / o for w, o in zip(with_crc, without))
        ratio = statistics.median(with_crc) / statistics.median(without)
        print(
            f"  {mode:<22} {statistics.median(without) / 1e6:15.1f} {statistics.median(with_crc) / 1e6:13.1f} "
            f"{ratio:6.2f} {paired:7.2f}"
        )


def read_unit(args: argparse.Namespace, root: Path, documents: list[Document], tokens_T: np.ndarray) -> None:
    """A resident reader's first pass by read unit (chunks per block), page cache cold and warm."""
    store_path, _ = build(root, documents, StoreLayout())
    raw_path = root / "tokens.bin"
    tokens_T.tofile(raw_path)
    rng = np.random.default_rng(args.seed + 1)
    starts_W = rng.integers(0, tokens_T.size - args.length + 1, args.windows)
    units = [1, 4, 16, 64]
    speeds: dict[tuple[str, bool], list[float]] = {}
    default_unit = store_reader.RESIDENT_READ_CHUNKS
    for round_index in range(args.repeats):
        for cold in (True, False):
            for name in ["memmap", *(units if round_index % 2 == 0 else units[::-1])]:
                if cold:
                    drop_page_cache(root)
                else:
                    warm_page_cache(root)
                if name == "memmap":
                    read = memmap_reader(raw_path, args.length)
                else:
                    store_reader.RESIDENT_READ_CHUNKS = name  # read by the reader's constructor
                    reader = StoreReader.open(
                        store_path, TOKENIZER, cache_bytes=max(args.cache_mib << 20, tokens_T.nbytes)
                    )
                    store_reader.RESIDENT_READ_CHUNKS = default_unit
                    read = functools.partial(reader.read_windows, length=args.length)
                speeds.setdefault((str(name), cold), []).append(
                    tokens_per_second(read, starts_W, args.batch, args.length)
                )

    chunk = StoreLayout().tokens_chunk
    print(f"store: {tokens_T.size:,} tokens, default layout (chunks of {chunk}); a fresh resident reader per pass")
    print(
        f"{args.windows} windows of {args.length} tokens in batches of {args.batch}; median of {args.repeats} rounds; "
        f"paired: the median of each round's ratio to the memmap; the default unit is {default_unit} chunks"
    )
    for cold in (True, False):
        memmap = speeds[("memmap", cold)]
        print(f"  page cache {'cold' if cold else 'warm'}: memmap {statistics.median(memmap) / 1e6:.1f} M tokens/s")
        for unit in units:
            first = speeds[(str(unit), cold)]
            paired = statistics.median(f / m for f, m in zip(first, memmap))
            print(
                f"    read unit {unit:>3} chunks ({unit * chunk:>9,} tokens): "
                f"{statistics.median(first) / 1e6:7.1f} M tokens/s  {paired:5.2f}x memmap"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32_000_000, help="store size in tokens")
    parser.add_argument("--windows", type=int, default=8192, help="random windows per pass")
    parser.add_argument("--length", type=int, default=4097, help="window length (seq_len + 1)")
    parser.add_argument("--batch", type=int, default=64, help="windows per read_windows call")
    parser.add_argument("--cache-mib", type=int, default=DEFAULT_CACHE_BYTES >> 20, help="resident reader cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to build the stores (a temporary directory inside it)")
    parser.add_argument("--sweep", action="store_true", help="chunk size x codec table instead of the comparison")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1 << 12, 1 << 14, 1 << 16, 1 << 18])
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1 << 22], help="0: one file per chunk")
    parser.add_argument("--codecs", nargs="+", default=["none", "zstd"])
    parser.add_argument("--checksum-cost", action="store_true", help="read speed with/without crc32c on every chunk")
    parser.add_argument("--read-unit", action="store_true", help="resident first pass by read unit, cache cold/warm")
    args = parser.parse_args()

    documents, tokens_T = random_documents(args.tokens, args.seed)
    run = checksum_cost if args.checksum_cost else read_unit if args.read_unit else sweep if args.sweep else compare
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="store_read-") as tmp:
        run(args, Path(tmp), documents, tokens_T)
    print(f"(cores available to this process: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
