"""Paths that may be remote: plain local paths, and file://, gs:// and memory:// URLs (docs/cloud.md).

    loc = storage.location("gs://bucket/stores/real")   # a Location; a plain path stays a pathlib.Path
    storage.write_json_atomic(loc / "manifest.json", {...})
    storage.kvstore_spec(loc / "input_ids/data")        # {"driver": "gcs", "bucket": "bucket", "path": ...}

Two families, each with its own safety protocol:

* plain local paths (str or os.PathLike without a scheme) keep POSIX semantics, exactly as before this
  module existed: megadoc_jax/files.py's temporary file + fsync + rename, hard-link exclusive creation and
  fcntl locks.
* URLs go through tensorstore's key-value store API (the `gcs`, `file` and `memory` kvstore drivers), with
  object-store semantics: a write is one put of the whole object (atomic on GCS: readers see the old
  object or the new one, never a part), exclusive creation and lock take-over are conditional writes on
  the object's generation, "directories" are key prefixes, and a lock is a lease object (`Lease`)
  renewed by a heartbeat. file:// is that protocol on a local disk (the faithful stand-in for gs:// that
  can run here, across processes); memory:// lives in this process only (tests).

Imports no JAX; tensorstore only when a URL is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megadoc_jax import files

log = logging.getLogger(__name__)

SCHEMES = ("file", "gs", "memory")
_DRIVERS = {"file": "file", "gs": "gcs", "memory": "memory"}
# GCS bucket names: 3-63 characters of lowercase letters, digits, '-', '_' and '.', starting and ending
# with a letter or digit (Google Cloud's bucket naming rules).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", re.DOTALL)


class StorageError(ValueError):
    """A bad URL or a failed storage operation; the message names the path."""


@dataclasses.dataclass(frozen=True)
class Location:
    """A URL: scheme, bucket (gs only) and the key path inside it ('/'-separated, no leading '/' except
    for file://, whose path is the absolute local path). Joins with `/` like a pathlib.Path."""

    scheme: str
    bucket: str
    path: str

    def __truediv__(self, name: str | os.PathLike) -> Location:
        joined = "/".join(p for p in (self.path.rstrip("/"), str(name).strip("/")) if p)
        if self.scheme == "file" and not joined.startswith("/"):
            joined = "/" + joined
        return Location(self.scheme, self.bucket, _clean_key(joined, str(self), self.scheme))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> Location:
        head = self.path.rstrip("/").rpartition("/")[0]
        return Location(self.scheme, self.bucket, head or ("/" if self.scheme == "file" else ""))

    @property
    def is_local_disk(self) -> bool:
        return self.scheme == "file"

    def local_path(self) -> Path:
        """The local path of a file:// URL (what orbax and tensorboard are given for it)."""
        if self.scheme != "file":
            raise StorageError(f"{self}: not on the local disk")
        return Path(self.path)

    def __str__(self) -> str:
        if self.scheme == "gs":
            return f"gs://{self.bucket}/{self.path}".rstrip("/")
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"memory://{self.path}"

    def __fspath__(self) -> str:  # refused: a URL handed to open() or os.* would be a local relative path
        raise TypeError(f"{self} is a URL, not a local path: use megadoc_jax.storage")


AnyPath = Path | Location


def location(value: str | os.PathLike | Location, what: str = "path") -> AnyPath:
    """`value` as a Location (a URL of SCHEMES) or a pathlib.Path (anything without a scheme).

    StorageError naming `what` and the value for an unknown scheme, a URL without its '//', a gs:// URL
    without a valid bucket, a file:// URL that is not absolute, or '.', '..' or empty path components."""
    if isinstance(value, (Location, Path)):
        return value
    text = os.fspath(value)
    match = _SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # no scheme (a one-letter one would be a drive)
        return Path(text)
    scheme, slashes, rest = match.group(1).lower(), match.group(2), match.group(3)
    if scheme not in SCHEMES and len(slashes) < 2:  # "run:2000", "demo:real": a name with a colon, no URL
        return Path(text)
    if scheme not in SCHEMES:
        raise StorageError(f"{what} {text!r}: unknown URL scheme {scheme}:// (supported: {', '.join(SCHEMES)})")
    if len(slashes) < 2 and not (scheme == "file" and slashes == "/"):
        raise StorageError(f"{what} {text!r}: expected {scheme}://..., the '//' is missing")
    if scheme == "gs":
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise StorageError(
                f"{what} {text!r}: {bucket!r} is not a GCS bucket name (3-63 of a-z 0-9 . _ -, "
                "starting and ending with a letter or digit): expected gs://BUCKET/PATH"
            )
        return Location("gs", bucket, _clean_key(key, text, scheme, what))
    if scheme == "file":
        if len(slashes) not in (1, 3):
            raise StorageError(f"{what} {text!r}: file:// URLs take an absolute path (file:///abs/path), no host")
        return Location("file", "", _clean_key("/" + rest, text, scheme, what))
    return Location("memory", "", _clean_key(rest, text, scheme, what))


def _clean_key(key: str, text: str, scheme: str, what: str = "path") -> str:
    parts = key.strip("/").split("/") if key.strip("/") else []
    for part in parts:
        if part in ("", ".", ".."):
            raise StorageError(f"{what} {text!r}: path component {part!r} in a {scheme}:// URL (keys are literal)")
    joined = "/".join(parts)
    return "/" + joined if scheme == "file" else joined


def is_url(value: str | os.PathLike | Location) -> bool:
    return isinstance(location(value), Location)


def local_path(value: str | os.PathLike, what: str) -> Path:
    """`value` as a local Path, for the inputs that only work on a local filesystem (docs/cloud.md lists
    them); a URL is refused naming `what`, rather than becoming a local directory named 'gs:'."""
    if isinstance(location(value, what), Location):
        raise StorageError(f"{what} {os.fspath(value)!r}: must be a local path here, not a URL (docs/cloud.md)")
    return Path(value)


def local_path_argument(what: str) -> Callable[[str], Path]:
    """An argparse `type=` for a local-only path (local_path): argparse prints the message and exits 2."""

    def parse(value: str) -> Path:
        try:
            return local_path(value, what)
        except StorageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def display(value: AnyPath) -> str:
    """How a path is named in records and messages: a local path absolute, a URL as written."""
    return str(value.absolute()) if isinstance(value, Path) else str(value)


# --------------------------------------------------------------------------------------------------
# tensorstore: kvstore specs and contexts
# --------------------------------------------------------------------------------------------------


def kvstore_spec(value: AnyPath) -> dict[str, Any]:
    """The tensorstore kvstore spec of a path: the `file` driver for a local path (the path as given,
    as the store always wrote it), `file`, `gcs` or `memory` for a URL."""
    if isinstance(value, Path):
        return {"driver": "file", "path": str(value)}
    spec = {"driver": _DRIVERS[value.scheme], "path": value.path}
    if value.scheme == "gs":
        spec["bucket"] = value.bucket
    return spec


_root_context = None


def tensorstore_context(value: AnyPath, spec: dict[str, Any] | None = None):
    """A ts.Context of `spec` for arrays at `value`. For URLs its parent is one context of this process,
    so that every open of a memory:// URL sees the same in-memory store (tensorstore keeps one per context)."""
    import tensorstore as ts

    global _root_context
    if isinstance(value, Path):
        return ts.Context(spec or {})
    if _root_context is None:
        _root_context = ts.Context()
    return ts.Context(spec or {}, parent=_root_context)


_kvstores: dict[tuple[str, str], Any] = {}
_kvstores_lock = threading.Lock()


def _kvstore(loc: Location):
    """(the open kvstore at the root of loc's bucket or disk, loc's key in it)."""
    import tensorstore as ts

    root = (loc.scheme, loc.bucket)
    with _kvstores_lock:
        if root not in _kvstores:
            spec: dict[str, Any] = {"driver": _DRIVERS[loc.scheme]}
            if loc.scheme == "gs":
                spec["bucket"] = loc.bucket
            if loc.scheme == "file":
                spec["path"] = "/"
            _kvstores[root] = ts.KvStore.open(spec, context=tensorstore_context(loc)).result()
    return _kvstores[root], loc.path.lstrip("/")


def _prefix_range(key: str):
    """Keys strictly under `key/` ("key0" is the first string after every "key/...")."""
    import tensorstore as ts

    prefix = f"{key}/" if key else ""
    return ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=f"{key}0" if key else "")


def _keys_under(loc: Location) -> list[str]:
    kv, key = _kvstore(loc)
    strip = len(key) + 1 if key else 0
    try:
        keys = kv.list(_prefix_range(key), strip_prefix_length=strip).result()
    except ValueError as e:  # the file driver, listing under a regular file: nothing is under it
        if "NOT_FOUND" in str(e) and "non-directory" in str(e):
            return []
        raise
    return [k.decode() for k in keys]


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------


def is_file(value: str | os.PathLike | Location) -> bool:
    loc = location(value)
    if isinstance(loc, Path):
        return loc.is_file()
    import tensorstore as ts

    kv, key = _kvstore(loc)
    found = kv.list(ts.KvStore.KeyRange(inclusive_min=key, exclusive_max=key + "\x00")).result()
    return bool(found)


def is_dir(value: str | os.PathLike | Location) -> bool:
    """A local directory; for a URL: some object lies under `value/` (object stores have no empty folders)."""
    loc = location(value)
    if isinstance(loc, Path):
        return loc.is_dir()
    return bool(_keys_under(loc))


def exists(value: str | os.PathLike | Location) -> bool:
    return is_file(value) or is_dir(value)


def list_names(value: str | os.PathLike | Location) -> list[str]:
    """The names directly inside a directory (for a URL: the first key component under `value/`), sorted."""
    loc = location(value)
    if isinstance(loc, Path):
        return sorted(p.name for p in loc.iterdir())
    return sorted({key.partition("/")[0] for key in _keys_under(loc)})


def makedirs(value: str | os.PathLike | Location) -> None:
    """mkdir -p for a local path; nothing for a URL (an object's key makes its folders)."""
    loc = location(value)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Reading and writing whole files
# --------------------------------------------------------------------------------------------------


def read_bytes(value: str | os.PathLike | Location) -> bytes:
    """The file's bytes; FileNotFoundError naming it when absent."""
    loc = location(value)
    if isinstance(loc, Path):
        return loc.read_bytes()
    kv, key = _kvstore(loc)
    result = kv.read(key).result()
    if result.state != "value":
        raise FileNotFoundError(f"{loc}: no such object")
    return result.value


def read_text(value: str | os.PathLike | Location) -> str:
    return read_bytes(value).decode("utf-8")


def write_bytes(value: str | os.PathLike | Location, data: bytes) -> None:
    """A plain write (local: open/write, as Path.write_bytes; URL: one put, atomic on GCS)."""
    loc = location(value)
    if isinstance(loc, Path):
        loc.write_bytes(data)
    else:
        _put(loc, data)


def write_text(value: str | os.PathLike | Location, text: str) -> None:
    write_bytes(value, text.encode("utf-8"))


def write_bytes_atomic(value: str | os.PathLike | Location, data: bytes) -> None:
    """Readers see the old or the new content: local, files.write_bytes_atomic (tmp + fsync + rename);
    URL, a single put of the whole object, which the object store makes visible at once (GCS) and the
    file driver writes to a temporary file renamed into place."""
    loc = location(value)
    if isinstance(loc, Path):
        files.write_bytes_atomic(loc, data)
    else:
        _put(loc, data)


def _put(loc: Location, data: bytes, if_equal: bytes | None = None) -> bytes:
    """One put; returns the new generation, b'' when the condition `if_equal` did not hold."""
    kv, key = _kvstore(loc)
    return kv.write(key, data, if_equal=if_equal).result().generation


_NO_VALUE = b"\x02"  # tensorstore's StorageGeneration::NoValue(): "the key must not exist"


def create_bytes_exclusive(value: str | os.PathLike | Location, data: bytes) -> bool:
    """Create the file with `data` if absent, atomically; False if it exists. Local: files.create_bytes_exclusive
    (hard link); URL: a put conditional on the object not existing (if-generation-match 0 on GCS)."""
    loc = location(value)
    if isinstance(loc, Path):
        return files.create_bytes_exclusive(loc, data)
    return _put(loc, data, if_equal=_NO_VALUE) != b""


def delete(value: str | os.PathLike | Location) -> None:
    """Remove a file if it exists."""
    loc = location(value)
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
    else:
        kv, key = _kvstore(loc)
        kv.write(key, None).result()


def read_json(
    value: str | os.PathLike | Location, what: str | None = None, error: type[Exception] = ValueError
) -> dict[str, Any]:
    """files.read_json for any path: `error` naming the path and `what` when missing, invalid or not an object."""
    loc = location(value)
    if isinstance(loc, Path):
        return files.read_json(loc, what, error)
    try:
        text = read_text(loc)
    except FileNotFoundError:
        raise error(f"{loc}: {what or loc.name} does not exist") from None
    except UnicodeDecodeError as e:
        raise error(f"{loc}: {what or loc.name} is not valid JSON ({e})") from None
    return files.json_object(text, loc, what or loc.name, error)


def write_json_atomic(value: str | os.PathLike | Location, record: dict[str, Any]) -> None:
    write_bytes_atomic(value, files.json_bytes(record))


def create_json_exclusive(value: str | os.PathLike | Location, record: dict[str, Any]) -> bool:
    return create_bytes_exclusive(value, files.json_bytes(record))


# --------------------------------------------------------------------------------------------------
# Locks: fcntl on a local path, a lease object on a URL
# --------------------------------------------------------------------------------------------------

LEASE_SECONDS = 120.0  # a lease not renewed for this long is stale and may be taken over
RENEW_SECONDS = 30.0  # the holder's heartbeat


class Lease:
    """An exclusive lock on an object store: an object created only if absent, renewed by a heartbeat
    thread (a conditional put on its own generation), deleted on release.

    A holder that dies stops renewing; once `expires` (the holder's clock, plus LEASE_SECONDS) has passed,
    the next writer takes the lease over with a put conditional on the stale generation, so of two
    writers racing for it one wins. If the heartbeat finds the lease taken (its generation changed),
    `held` turns False and the guarded writer refuses to go on. Hosts need clocks within a fraction of
    LEASE_SECONDS of each other (NTP, as on GCE VMs)."""

    def __init__(self, loc: Location, holder: str, error: type[Exception], *, seconds: float, renew: float):
        self.path, self._seconds, self._renew = loc, seconds, renew
        self._stop = threading.Event()
        self._generation = self._acquire(holder, error)
        self._renewed = time.time()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {loc}", daemon=True)
        self._thread.start()

    def _record(self) -> bytes:
        now = time.time()
        identity = {"host": socket.gethostname(), "pid": os.getpid(), "renewed": now, "expires": now + self._seconds}
        return files.json_bytes(identity)

    def _acquire(self, holder: str, error: type[Exception]) -> bytes:
        generation = _put(self.path, self._record(), if_equal=_NO_VALUE)
        if generation:
            return generation
        kv, key = _kvstore(self.path)
        current = kv.read(key).result()
        try:
            record = json.loads(current.value)
            expires = float(record["expires"])
        except (ValueError, KeyError, TypeError):
            record, expires = {}, 0.0  # unreadable: a lease cut short by nothing we know; treat as stale
        if current.state == "value" and expires > time.time():
            who = f"{record.get('host')} pid {record.get('pid')}"
            raise error(
                f"{self.path.parent}: {holder} holds {self.path.name} ({who}, lease valid until "
                f"{time.strftime('%H:%M:%S', time.gmtime(expires))} UTC)"
            )
        previous = current.stamp.generation if current.state == "value" else _NO_VALUE
        generation = _put(self.path, self._record(), if_equal=previous)
        if not generation:
            raise error(f"{self.path.parent}: {holder} took over the stale {self.path.name} at the same time")
        return generation

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._renew):
            try:
                generation = _put(self.path, self._record(), if_equal=self._generation)
            except (ValueError, OSError) as e:  # a failed request: retried next beat while the lease lasts
                if time.time() > self._renewed + self._seconds:
                    log.error("%s: lease not renewed for %.0f s (%s): given up", self.path, self._seconds, e)
                    self._generation = b""
                    return
                log.warning("%s: lease renewal failed (%s); retrying", self.path, e)
                continue
            if not generation:
                log.error("%s: the lease was taken over by another writer", self.path)
                self._generation = b""  # we no longer hold it: the guarded writer refuses to go on
                return
            self._generation, self._renewed = generation, time.time()

    @property
    def held(self) -> bool:
        return bool(self._generation) and not self._stop.is_set()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._generation:
            kv, key = _kvstore(self.path)
            kv.write(key, None, if_equal=self._generation).result()
        self._generation = b""

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_exclusive(
    value: str | os.PathLike | Location,
    *,
    holder: str = "another process",
    error: type[Exception] = files.LockHeldError,
    lease_seconds: float | None = None,
    renew_seconds: float | None = None,
) -> files.FileLock | Lease:
    """An exclusive lock that fails at once, naming the holder, if another writer has it: files.lock_exclusive
    (fcntl, released by the kernel when the holder exits) on a local path, a Lease on a URL."""
    loc = location(value)
    if isinstance(loc, Path):
        return files.lock_exclusive(loc, holder=holder, error=error)
    seconds = LEASE_SECONDS if lease_seconds is None else lease_seconds
    return Lease(loc, holder, error, seconds=seconds, renew=RENEW_SECONDS if renew_seconds is None else renew_seconds)


# --------------------------------------------------------------------------------------------------
# Append-only logs (metrics.jsonl, TensorBoard event files)
# --------------------------------------------------------------------------------------------------

APPEND_PUT_SECONDS = 5.0  # a URL log is put at most this often between flushes (GCS: ~1 write/s per object)


class AppendLog:
    """An append-only text file. Local: opened for append, every `write` flushed at once.
    URL (objects cannot be appended to): the whole content is kept in memory and put as one object at
    most every `put_seconds` and at every `flush`/`close`; a kill loses what was written since the last put.
    A last line cut by a kill gets its newline first, so that the next record starts on a line of its own."""

    def __init__(self, value: str | os.PathLike | Location, *, put_seconds: float = APPEND_PUT_SECONDS):
        self.path = location(value)
        self._put_seconds = put_seconds
        if isinstance(self.path, Path):
            _end_partial_line(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            return
        content = read_bytes(self.path) if is_file(self.path) else b""
        self._content = bytearray(content + (b"\n" if content and not content.endswith(b"\n") else b""))
        self._put_size, self._put_time, self._closed = -1, None, False

    @property
    def closed(self) -> bool:
        return self._file.closed if isinstance(self.path, Path) else self._closed

    def write(self, text: str) -> None:
        if isinstance(self.path, Path):
            self._file.write(text)
            self._file.flush()
            return
        self._content += text.encode("utf-8")
        if self._put_time is None or time.monotonic() - self._put_time >= self._put_seconds:
            self.flush()

    def flush(self) -> None:
        if isinstance(self.path, Path):
            self._file.flush()
        elif len(self._content) != self._put_size:
            write_bytes(self.path, bytes(self._content))
            self._put_size, self._put_time = len(self._content), time.monotonic()

    def close(self) -> None:
        if isinstance(self.path, Path):
            self._file.close()
        elif not self._closed:
            self.flush()
            self._closed = True


def _end_partial_line(path: Path) -> None:
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            last = f.read(1)
        if last != b"\n":
            with path.open("ab") as f:
                f.write(b"\n")
