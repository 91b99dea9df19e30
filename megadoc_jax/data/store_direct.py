"""Direct window reads of a local, uncompressed token array: `os.preadv` of the window's own bytes.

Why: a tensorstore read of a window costs about the same whatever its size (about 85 microseconds here:
the whole 16Ki-token chunk is read, its crc32c checked and decoded, see docs/store.md), so a streaming
reader of random 4,097-token windows ran at 0.06x to 0.23x of a numpy memmap of the same tokens. The
tokens of an uncompressed chunk are stored as they are (little-endian int32, then the chunk's 4-byte
crc32c), at the offset its shard's index gives, so a window is one positional read per chunk it spans.

Integrity: a partial read cannot check a chunk's crc32c, so a chunk is read directly only once it has
been *checked* by this reader: tensorstore has read the whole chunk, checking its crc32c and its shard
index's (our offsets come from the same index bytes, and every entry's size is checked against the
layout). The first chunk checked in each file is also read directly whole and compared with
tensorstore's tokens, which checks our reading of the file's index and layout. A chunk is checked at
its first use, so each is read whole once per reader; after that its windows cost about what a
memmap's do (0.6-0.7x warm, 0.8-1.0x cold, docs/store.md). Without chunk checksums (a layout that has none)
tensorstore's read checks the shard index's crc32c only.
A file changed under a finished store after its chunks were checked is not noticed (a finished store
is immutable; `verify` checks everything).

Layouts read here: the local file driver, zarr3 with the `bytes` codec (little endian), with or without
`crc32c`, sharded (`sharding_indexed`, index at the end with bytes + crc32c) or one file per chunk, and
the default chunk key encoding (`c/<i>`). Any other array (compressed, on a URL) returns None from
`DirectReads.for_array`, and the reader keeps reading it through tensorstore.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megadoc_jax.data.store_format import StoreError
from megadoc_jax.data.windows import ragged_ranges

LITTLE_ENDIAN_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C = {"name": "crc32c"}
CRC32C_BYTES = 4
MISSING = np.uint64(2**64 - 1)  # a shard index entry of a chunk never written: read as the fill value
# Windows not in the page cache are found with a read that does not wait (RWF_NOWAIT, Linux), then all
# of a batch's are asked of the kernel at once (POSIX_FADV_WILLNEED) and read: one at a time, each would
# wait for the disk in turn (0.39x of the memmap cold, against 0.79x to 1.41x; docs/store.md). Neither exists on macOS.
NOWAIT = getattr(os, "RWF_NOWAIT", 0)
WILL_NEED = getattr(os, "POSIX_FADV_WILLNEED", None)
MAX_OPEN_FILES = 64  # shard files kept open (a store of 100B tokens has about 24,000)


def chunk_codecs(metadata: dict[str, Any]) -> tuple[int, int, bool] | None:
    """(elements per chunk, chunks per file, crc32c on each chunk) of an array's zarr.json when this module
    can read it directly, else None."""
    codecs = metadata.get("codecs", [])
    grid = metadata.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get("separator", "/")
    if len(grid) != 1 or encoding.get("name") != "default" or separator != "/":
        return None
    file_elements, chunks_per_file = int(grid[0]), 1
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        sharding = codecs[0].get("configuration", {})
        index_codecs, index_location = sharding.get("index_codecs"), sharding.get("index_location", "end")
        if index_codecs != [LITTLE_ENDIAN_BYTES, CRC32C] or index_location != "end":
            return None
        chunk = int(sharding.get("chunk_shape", [0])[0])
        if chunk <= 0 or file_elements % chunk:
            return None
        codecs, chunks_per_file = sharding.get("codecs", []), file_elements // chunk
    else:
        chunk = file_elements
    if codecs == [LITTLE_ENDIAN_BYTES] or codecs == [LITTLE_ENDIAN_BYTES, CRC32C]:
        return chunk, chunks_per_file, len(codecs) == 2
    return None


class DirectReads:
    """Direct reads of array `key` under store `root` (a local directory); build with `for_array`.

    `read_windows(starts_N, out_NxL, read_whole)` fills the rows of out_NxL; `read_whole(chunk_ids)`
    is the caller's tensorstore read of whole chunks, used to check each chunk at its first use.
    Reads may come from several threads.
    """

    def __init__(self, root: Path, key: str, chunk: int, chunks_per_file: int, checksum: bool, length: int) -> None:
        self.root, self.key, self.chunk, self.chunks_per_file, self.length = root, key, chunk, chunks_per_file, length
        self.directory = root / key / "c"
        self._chunk_bytes = chunk * 4 + (CRC32C_BYTES if checksum else 0)  # every chunk is stored full-size
        self._checked_C = np.zeros(-(-length // chunk), bool)  # chunks tensorstore has read whole (crc32c checked)
        self._files_compared: set[int] = set()  # files with one chunk read directly and compared to tensorstore's
        self._entries: dict[int, np.ndarray] = {}  # file -> its chunks' byte offsets, int64 (-1: not written)
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()  # file -> fd, LRU
        # Reads hold the fds they use (a count per fd). An fd evicted from the LRU, or closed by close(),
        # while a read holds it is closed when its last user lets go: closed earlier, its number could be
        # reused by the next open and that read would get another file's bytes.
        self._users: dict[int, int] = {}  # fd -> reads holding it
        self._retired: set[int] = set()  # fds out of the LRU, still held
        self._nowait = NOWAIT  # 0 once the file system refuses RWF_NOWAIT
        self._lock = threading.Lock()

    @classmethod
    def for_array(cls, root: Any, key: str, length: int, dtype: np.dtype) -> DirectReads | None:
        """Direct reads of a finished local array of `length` int32 elements, or None if it is not laid out
        as this module reads (docs at the top)."""
        if not isinstance(root, Path) or np.dtype(dtype) != np.int32 or sys.byteorder != "little":
            return None
        try:
            metadata = json.loads((root / key / "zarr.json").read_text())
        except (OSError, ValueError):
            return None  # tensorstore, which opened the array, reports what is wrong with it
        layout = chunk_codecs(metadata)
        if layout is None or metadata.get("data_type") != "int32" or metadata.get("fill_value", 0) != 0:
            return None
        return cls(root, key, *layout, length=length)

    def close(self) -> None:
        """Closes the files it holds open (reads in progress keep theirs until they finish; it reopens
        files if read again)."""
        with self._lock:
            for fd in self._files.values():
                self._retire(fd)
            self._files.clear()

    def __del__(self) -> None:
        self.close()

    # ---- reads --------------------------------------------------------------------------------

    def read_windows(
        self,
        starts_N: np.ndarray,
        out_NxL: np.ndarray,
        read_whole: Callable[[Sequence[int]], Sequence[np.ndarray]],
    ) -> None:
        """Row n of out_NxL (C-contiguous int32) = elements [starts_N[n], starts_N[n] + L)."""
        if not out_NxL.flags.c_contiguous:  # the reads go through a flat view of it
            raise ValueError("DirectReads.read_windows: out_NxL must be C-contiguous")
        pieces = self._pieces(starts_N, out_NxL.shape[1])
        chunk_P = pieces[0]
        self._check(np.unique(chunk_P[~self._checked_C[chunk_P]]), read_whole)
        self._read_pieces(*pieces, out_NxL)

    def _check(self, chunk_ids: np.ndarray, read_whole: Callable[[Sequence[int]], Sequence[np.ndarray]]) -> None:
        if not chunk_ids.size:
            return
        for chunk_id, checked_T in zip(chunk_ids.tolist(), read_whole(chunk_ids.tolist()), strict=True):
            if checked_T.size != min(self.chunk, self.length - chunk_id * self.chunk):
                raise StoreError(
                    f"{self.root}: array {self.key}, chunk {chunk_id}: the checked read has {checked_T.size} elements"
                )
            file = chunk_id // self.chunks_per_file
            if file in self._files_compared:  # the checked read is the check; the comparison is of our layout
                self._checked_C[chunk_id] = True
                continue
            direct_1xT = np.empty((1, checked_T.size), np.int32)
            self._read_pieces(*self._pieces(np.array([chunk_id * self.chunk]), checked_T.size), direct_1xT)
            offset = int(self._chunk_offsets(np.array([chunk_id]))[0])
            if not np.array_equal(direct_1xT[0], checked_T):
                raise StoreError(
                    f"{self.root}: array {self.key}, chunk {chunk_id}: a direct read of file "
                    f"{self.directory / str(file)} at byte {offset} differs from tensorstore's checked read of the "
                    "same chunk: the store is damaged or not laid out as its zarr.json says"
                )
            self._checked_C[chunk_id] = True
            if offset >= 0:  # bytes were compared, not two fill values
                self._files_compared.add(file)

    def _pieces(self, starts_N: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
        """One piece per (window, chunk it spans), in window order: (chunk, first and end element, the
        piece's byte offset in the flattened output), all int64 [P]."""
        first_N = starts_N // self.chunk
        row_P, k_P = ragged_ranges((starts_N + length - 1) // self.chunk - first_N + 1)  # k: chunk of its row
        chunk_P = first_N[row_P] + k_P
        begin_P = np.maximum(starts_N[row_P], chunk_P * self.chunk)
        end_P = np.minimum(starts_N[row_P] + length, (chunk_P + 1) * self.chunk)
        return chunk_P, begin_P, end_P, (row_P * length + begin_P - starts_N[row_P]) * 4

    def _read_pieces(
        self, chunk_P: np.ndarray, begin_P: np.ndarray, end_P: np.ndarray, out_byte_P: np.ndarray, out: np.ndarray
    ) -> None:
        out_bytes = memoryview(out.reshape(-1).view(np.uint8))
        file_P = chunk_P // self.chunks_per_file
        chunk_offset_P = self._chunk_offsets(chunk_P)
        stored_P = chunk_offset_P >= 0
        byte_P = np.where(stored_P, chunk_offset_P + (begin_P - chunk_P * self.chunk) * 4, -1)
        size_P = (end_P - begin_P) * 4
        fds = self._acquire(np.unique(file_P[stored_P]).tolist())  # the files of stored chunks
        try:
            pieces = zip(file_P.tolist(), byte_P.tolist(), size_P.tolist(), out_byte_P.tolist(), chunk_P.tolist())
            uncached = []  # (fd, byte, buffer, chunk) of what is not in the page cache yet
            for file, byte, size, at, chunk_id in pieces:
                if byte < 0:  # never written: the fill value, as tensorstore reads it
                    out_bytes[at : at + size] = bytes(size)
                elif (got := self._read_if_cached(fds[file], out_bytes[at : at + size], byte)) != size:
                    uncached.append((fds[file], byte + got, out_bytes[at + got : at + size], chunk_id))
            if WILL_NEED is not None and len(uncached) > 1:  # the kernel starts all of these reads at once
                for fd, byte, buffer, _ in uncached:
                    os.posix_fadvise(fd, byte, buffer.nbytes, WILL_NEED)
            for fd, byte, buffer, chunk_id in uncached:
                self._pread_rest(fd, buffer, byte, chunk_id)
        finally:
            self._release(fds.values())

    def _read_if_cached(self, fd: int, buffer: memoryview, offset: int) -> int:
        """Bytes read into buffer from offset without waiting for the disk (RWF_NOWAIT: what the page cache
        holds); 0 where the platform or file system cannot tell."""
        if not self._nowait:
            return 0
        try:
            return os.preadv(fd, [buffer], offset, self._nowait)
        except BlockingIOError:
            return 0
        except OSError as error:  # EOPNOTSUPP, EINVAL: this file system does not do RWF_NOWAIT
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = 0
            return 0

    def _pread_rest(self, fd: int, buffer: memoryview, offset: int, chunk_id: int) -> None:
        """Reads all of buffer from `offset` (a regular file reads short only at its end)."""
        done = 0
        while done < buffer.nbytes:
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got <= 0:
                path = self.directory / str(chunk_id // self.chunks_per_file)
                raise StoreError(
                    f"{self.root}: array {self.key}, chunk {chunk_id}: file {path} ends at byte "
                    f"{os.fstat(fd).st_size}, before bytes [{offset}, {offset + buffer.nbytes}) of the chunk: "
                    "the store is truncated"
                )
            done += got

    # ---- the shard index -----------------------------------------------------------------------

    def _chunk_offsets(self, chunk_P: np.ndarray) -> np.ndarray:
        """Byte offset of each chunk in its file, -1 for a chunk never written; int64 [P]."""
        file_P, slot_P = np.divmod(chunk_P, self.chunks_per_file)
        offset_P = np.empty(chunk_P.size, np.int64)
        for file in np.unique(file_P).tolist():
            offsets = self._entries.get(file)
            if offsets is None:
                offsets = self._read_index(file)
            here = file_P == file
            offset_P[here] = offsets[slot_P[here]]
        return offset_P

    def _read_index(self, file: int) -> np.ndarray:
        """The file's chunk offsets (int64 [chunks_per_file], -1: never written), sizes checked."""
        path = self.directory / str(file)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:  # a file never written: all its chunks are the fill value
            size = None
        if size is None:
            offsets = np.full(self.chunks_per_file, -1, np.int64)
        elif self.chunks_per_file == 1:  # one file per chunk: the whole file is the chunk
            offsets = np.zeros(1, np.int64)
        else:
            index_bytes = self.chunks_per_file * 16 + CRC32C_BYTES
            if size < index_bytes:
                raise StoreError(
                    f"{self.root}: array {self.key}: shard file {path} has {size} bytes, less than its "
                    f"{index_bytes}-byte index: the store is truncated"
                )
            entries = np.empty((self.chunks_per_file, 2), "<u8")
            first_chunk = file * self.chunks_per_file
            fds = self._acquire([file])
            try:
                self._pread_rest(
                    fds[file], memoryview(entries.reshape(-1).view(np.uint8)), size - index_bytes, first_chunk
                )
            finally:
                self._release(fds.values())
            stored = entries[:, 0] != MISSING
            wrong = np.flatnonzero(stored & (entries[:, 1] != self._chunk_bytes))
            if wrong.size:
                raise StoreError(
                    f"{self.root}: array {self.key}, chunk {first_chunk + wrong[0]}: {path} stores it in "
                    f"{int(entries[wrong[0], 1])} bytes, not {self._chunk_bytes}: the store is damaged or not laid "
                    "out as its zarr.json says"
                )
            offsets = np.where(stored, entries[:, 0].astype(np.int64), -1)
        with self._lock:
            self._entries[file] = offsets
        return offsets

    # ---- open files ---------------------------------------------------------------------------

    def _acquire(self, files: list[int]) -> dict[int, int]:
        """file -> an fd held for this read (the caller releases them), opening the files not open."""
        held = {}
        with self._lock:
            for file in files:
                fd = self._files.get(file)
                if fd is None:
                    fd = self._files[file] = os.open(self.directory / str(file), os.O_RDONLY)
                self._files.move_to_end(file)
                self._users[fd] = self._users.get(fd, 0) + 1
                held[file] = fd
            while len(self._files) > MAX_OPEN_FILES:
                self._retire(self._files.popitem(last=False)[1])
        return held

    def _release(self, fds: Iterable[int]) -> None:
        with self._lock:
            for fd in fds:
                self._users[fd] -= 1
                if not self._users[fd] and fd in self._retired:
                    self._retire(fd)

    def _retire(self, fd: int) -> None:
        """Closes an fd out of the LRU now, or when the last read holding it releases it (lock held)."""
        if self._users.get(fd, 0):
            self._retired.add(fd)
            return
        self._retired.discard(fd)
        self._users.pop(fd, None)
        os.close(fd)
