"""The checks of a finished token store, one function each (StoreReader.verify and the verify command).

    manifest   manifest.json's fields: format, version, finished, tokenizer, counts, hash, layout, arrays
    arrays     every array's shape and dtype against the manifest; the chunk checksums its layout promises
    offsets    each group's row ends: the row count in cell 0, increasing, ending at the group's size
    segments   the runs: valid kinds and indices, lengths >= 1, each document's runs cover its tokens
    content    the content hash against the manifest (reads every chunk of every array)
    token ids  every id in [0, vocab_size) (from the same pass as the content hash)

Each check returns a one-line detail or raises StoreError naming the store and what is wrong. Later
checks rely on earlier ones (`CHECKS[i].needs`): they are skipped when one they need failed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts
import tqdm

from megadoc_jax import storage
from megadoc_jax.data import store_format as fmt
from megadoc_jax.data.store_format import FORMAT_VERSION, StoreError, StoreLayout
from megadoc_jax.data.store_types import MAX_SEGMENT_INDEX, SegmentKind, TokenizerInfo

COUNT_FIELDS = ("num_documents", "num_tokens", "num_segments", "num_metadata_bytes", "flushes")
HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


@dataclasses.dataclass
class StoreView:
    """What the checks read: the store's path, its manifest and its opened arrays (key -> array)."""

    path: storage.AnyPath
    manifest: dict[str, Any]
    arrays: dict[str, ts.TensorStore]
    progress: bool = False  # a progress bar over the blocks the content pass reads
    _scan: tuple[str, int, int] | StoreError | None = None  # (content hash, min id, max id), read once

    @classmethod
    def open(cls, path: str | Any, progress: bool = False) -> StoreView:
        """The manifest and the arrays as they are on disk; no check is made here (see CHECKS)."""
        root = storage.location(path, "token store")
        manifest_path = root / fmt.MANIFEST_FILE
        if not storage.is_file(manifest_path):
            raise StoreError(f"{root}: not a token store (no {fmt.MANIFEST_FILE})")
        manifest = storage.read_json(manifest_path, fmt.MANIFEST_FILE, StoreError)
        return cls(root, manifest, {}, progress)

    def open_arrays(self) -> None:
        if self.arrays:  # a StoreReader's view comes with its arrays
            return
        context = storage.tensorstore_context(self.path, {"cache_pool": {"total_bytes_limit": 0}})
        for key, _ in fmt.array_keys():
            try:
                self.arrays[key] = fmt.open_array_for_read(self.path, key, context)
            except fmt.READ_ERRORS as e:
                raise StoreError(f"{self.path}: array {key} cannot be opened ({e})") from e

    def read(self, key: str) -> np.ndarray:
        array = self.arrays[key]
        return fmt.read_elements(self.path, key, array, 0, array.shape[0])

    def lengths(self) -> dict[str, int]:
        sizes = {
            fmt.TOKENS.name: self.manifest["num_tokens"],
            fmt.SEGMENTS.name: self.manifest["num_segments"],
            fmt.METADATA.name: self.manifest["num_metadata_bytes"],
        }
        return fmt.array_lengths(self.manifest["num_documents"], sizes)

    def scan(self) -> tuple[str, int, int]:
        """One pass over every array: the content hash and the token ids' range."""
        if self._scan is None:
            lengths = {key: int(array.shape[0]) for key, array in self.arrays.items()}
            blocks = sum(-(-length // fmt.HASH_BLOCK_ELEMENTS) for length in lengths.values())
            low, high = [np.iinfo(np.int64).max], [np.iinfo(np.int64).min]
            with tqdm.tqdm(total=blocks, unit="block", desc=f"reading {self.path}", disable=not self.progress) as bar:

                def on_block(key: str, values: np.ndarray) -> None:
                    if key == "input_ids/data" and values.size:
                        low[0], high[0] = min(low[0], int(values.min())), max(high[0], int(values.max()))
                    bar.update(1)

                try:
                    self._scan = (fmt.content_hash(self.path, self.arrays, lengths, on_block), low[0], high[0])
                except StoreError as e:  # a damaged chunk: the checks that need the pass all report it
                    self._scan = e
        if isinstance(self._scan, StoreError):
            raise self._scan
        return self._scan


def check_manifest(view: StoreView) -> str:
    manifest, where = view.manifest, f"{view.path}: manifest.json"
    if manifest.get("format") != fmt.FORMAT_NAME:
        raise StoreError(f"{where} format is {manifest.get('format')!r}, not {fmt.FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in range(1, FORMAT_VERSION + 1):
        raise StoreError(f"{where} format_version {version!r} is not one of 1..{FORMAT_VERSION} (this code's)")
    if manifest.get("finished") is not True:
        raise StoreError(f"{where} finished is {manifest.get('finished')!r}: the store is unfinished")
    for field in COUNT_FIELDS:
        value = manifest.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StoreError(f"{where} {field} is {value!r}, not a count")
    try:
        tokenizer = TokenizerInfo.from_dict(manifest["tokenizer"])
        layout = StoreLayout.from_dict(manifest["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where} tokenizer or layout is malformed ({type(e).__name__}: {e})") from None
    if (manifest.get("vocab_size"), manifest.get("eos_id")) != (tokenizer.vocab_size, tokenizer.eos_id):
        raise StoreError(
            f"{where} vocab_size {manifest.get('vocab_size')!r} / eos_id {manifest.get('eos_id')!r} differ from its "
            f"tokenizer's ({tokenizer.vocab_size} / {tokenizer.eos_id})"
        )
    if not isinstance(manifest.get("content_hash"), str) or not HASH_PATTERN.fullmatch(manifest["content_hash"]):
        raise StoreError(f"{where} content_hash {manifest.get('content_hash')!r} is not 'sha256:' and 64 hex digits")
    if manifest.get("arrays") != dict(fmt.array_keys()):
        raise StoreError(f"{where} arrays {manifest.get('arrays')} differ from the format's {dict(fmt.array_keys())}")
    if version == 1 and layout.checksum:
        raise StoreError(f"{where} layout says checksum, but format 1 stores have no chunk checksums")
    documents, tokens = manifest["num_documents"], manifest["num_tokens"]
    if tokens < documents or manifest["num_segments"] < documents:
        raise StoreError(
            f"{where} num_tokens {tokens} or num_segments {manifest['num_segments']} is below num_documents "
            f"{documents} (every document has a token and a run at least)"
        )
    return f"format {version}, {documents:,} documents, {tokens:,} tokens, tokenizer {tokenizer.name!r}"


def check_arrays(view: StoreView) -> str:
    view.open_arrays()
    layout = StoreLayout.from_dict(view.manifest["layout"])
    for key, length in view.lengths().items():
        array, dtype = view.arrays[key], dict(fmt.array_keys())[key]
        if array.rank != 1 or array.shape[0] != length:
            raise StoreError(f"{view.path}: array {key} has shape {list(array.shape)}, manifest.json says [{length}]")
        if array.dtype.name != dtype:
            raise StoreError(f"{view.path}: array {key} has dtype {array.dtype.name}, the format's is {dtype}")
        if fmt.has_chunk_checksums(array) != layout.checksum:
            raise StoreError(
                f"{view.path}: array {key}: chunk checksums {'missing' if layout.checksum else 'present'}, "
                f"but manifest.json layout checksum is {layout.checksum}"
            )
    checksums = (
        "a crc32c on every chunk"
        if layout.checksum
        else "no chunk checksums (damage inside a chunk is found only by the content hash)"
    )
    return f"{len(view.arrays)} arrays, shapes and dtypes as in the manifest; {checksums}"


def group_ends(view: StoreView, group: str) -> np.ndarray:
    """Row ends of a group with a 0 in front (cell 0 of the stored array holds the row count)."""
    ends = view.read(f"{group}/offsets")
    ends[0] = 0
    return ends


def check_offsets(view: StoreView) -> str:
    documents = view.manifest["num_documents"]
    sizes = {
        fmt.TOKENS.name: view.manifest["num_tokens"],
        fmt.SEGMENTS.name: view.manifest["num_segments"],
        fmt.METADATA.name: view.manifest["num_metadata_bytes"],
    }
    for group, size in sizes.items():
        key = f"{group}/offsets"
        rows = int(view.read(key)[0])
        if rows != documents:
            raise StoreError(
                f"{view.path}: {key}[0] (the row count) is {rows}, manifest.json num_documents {documents}"
            )
        ends = group_ends(view, group)
        # Rows are never empty: a document has a token and a run at least, and its metadata is a JSON object.
        bad = np.flatnonzero(np.diff(ends) < 1)
        if bad.size:
            i = int(bad[0])
            raise StoreError(
                f"{view.path}: {key}: row {i} ends at {int(ends[i + 1])}, not after its start {int(ends[i])} "
                "(offsets must increase)"
            )
        if int(ends[-1]) != size:
            raise StoreError(f"{view.path}: {key}: the last row ends at {int(ends[-1])}, the group holds {size}")
    return f"{len(sizes)} groups of {documents:,} rows: increasing, ending at each group's size"


def check_segments(view: StoreView) -> str:
    kinds, indices = view.read("segments/kind"), view.read("segments/index")
    lengths = view.read("segments/length")
    valid = np.isin(kinds, [int(k) for k in SegmentKind])
    for name, bad in (
        ("kind", ~valid),
        ("index", (indices < 0) | (indices > MAX_SEGMENT_INDEX)),
        ("length", lengths < 1),
    ):
        if bad.any():
            run = int(np.flatnonzero(bad)[0])
            value = {"kind": kinds, "index": indices, "length": lengths}[name][run]
            raise StoreError(f"{view.path}: segments/{name}[{run}] is {int(value)}, not a valid run {name}")
    run_ends = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    document_ends = run_ends[group_ends(view, fmt.SEGMENTS.name)]  # where each document's runs end
    token_ends = group_ends(view, fmt.TOKENS.name)
    bad = np.flatnonzero(document_ends != token_ends)
    if bad.size:
        i = int(bad[0]) - 1
        raise StoreError(
            f"{view.path}: document {i}'s segment runs end at token {int(document_ends[i + 1])}, its tokens at "
            f"{int(token_ends[i + 1])}"
        )
    return f"{lengths.size:,} runs of valid kinds cover every document's tokens"


def check_content(view: StoreView) -> str:
    digest = view.scan()[0]
    if digest != view.manifest["content_hash"]:
        raise StoreError(
            f"{view.path}: content hash {digest} differs from manifest.json content_hash "
            f"{view.manifest['content_hash']}: the store was modified or damaged"
        )
    return digest


def check_token_ids(view: StoreView) -> str:
    _, low, high = view.scan()
    vocab_size = view.manifest["vocab_size"]
    if view.manifest["num_tokens"] and (low < 0 or high >= vocab_size):
        bad = low if low < 0 else high
        raise StoreError(f"{view.path}: input_ids/data holds token id {bad}, outside [0, vocab_size={vocab_size})")
    return f"every id in [0, {vocab_size:,})"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[StoreView], str]
    needs: tuple[str, ...]


CHECKS = (
    Check("manifest", check_manifest, ()),
    Check("arrays", check_arrays, ("manifest",)),
    Check("offsets", check_offsets, ("manifest", "arrays")),
    Check("segments", check_segments, ("manifest", "arrays", "offsets")),
    Check("content hash", check_content, ("manifest", "arrays")),
    Check("token ids", check_token_ids, ("manifest", "arrays")),
)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "ok", "FAIL" or "skipped"
    detail: str


def run_checks(view: StoreView, checks: tuple[Check, ...] = CHECKS) -> list[CheckResult]:
    """Every check on the store, in order; a check whose prerequisite failed is skipped."""
    results: dict[str, CheckResult] = {}
    for check in checks:
        failed = [name for name in check.needs if results.get(name) and results[name].status != "ok"]
        if failed:
            results[check.name] = CheckResult(check.name, "skipped", f"needs {', '.join(failed)}")
            continue
        try:
            results[check.name] = CheckResult(check.name, "ok", check.run(view))
        except StoreError as e:
            results[check.name] = CheckResult(check.name, "FAIL", str(e))
    return list(results.values())
