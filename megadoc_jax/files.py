"""Small files written safely: atomic replacement, exclusive creation, JSON objects, and an exclusive lock.

The store (megadoc_jax/data), the generation stage's outputs and the exporters all keep their records
(manifests, commit and progress records, summaries) as small files that a kill must never leave half
written, and guard a directory against a second writer with a lock. Sweeps (megadoc_jax/sweep) claim
runs by creating lease files exclusively. A full disk is reported as DiskFullError naming the file
(`on_disk_full`), whatever layer (os, tensorstore, orbax) met it. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class LockHeldError(RuntimeError):
    """Another process holds the lock (the default error of `lock_exclusive`)."""


class DiskFullError(OSError):
    """A write failed for lack of space (ENOSPC, or a quota); the message names the path and what was
    being written, and says what a rerun does once space is back."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")  # strerror text, as tensorstore reports it


def _chain(error: BaseException | None):
    """`error` and the exceptions it was raised from or during, newest first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
    """True when `error` or an exception it was raised from is a full disk: an OSError with errno ENOSPC or
    EDQUOT, or an error whose text carries that errno's message (tensorstore and orbax re-raise OS errors
    as ValueError or RuntimeError with the message inside)."""
    return any(
        (isinstance(e, OSError) and e.errno in _NO_SPACE) or any(text in str(e).lower() for text in _NO_SPACE_TEXT)
        for e in _chain(error)
    )


def disk_full_report(error: BaseException) -> DiskFullError | None:
    """The DiskFullError (the one that names what was being written) among `error` and its causes: cleanup
    after a full disk often fails on the same disk, and that later error must not hide the first."""
    return next((e for e in _chain(error) if isinstance(e, DiskFullError)), None)


@contextlib.contextmanager
def on_disk_full(path: object, writing: str, advice: str | Callable[[], str]):
    """Re-raise a full disk met inside the block as DiskFullError("PATH: no space left on device while
    WRITING; ADVICE"); any other error passes unchanged. `advice` may be a function, called only then
    (when saying what is kept needs a look at the disk)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        text = advice() if callable(advice) else advice
        raise DiskFullError(f"{path}: no space left on device while {writing}; {text}") from e


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new file inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer uses: host, process and thread, for directories shared
    between hosts (a sweep directory) as much as between threads."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")


def _write_temporary(path: Path, data: bytes) -> Path:
    """`data` in a temporary file beside `path`, fsynced; a failed write (a full disk) leaves no file behind."""
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """tmp file + fsync + rename + fsync of the directory: readers see the old or the new file."""
    path = Path(path)
    os.replace(_write_temporary(path, data), path)
    fsync_directory(path.parent)


def create_bytes_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` holding `data` if no file has that name, atomically: False if one exists already.

    The content is written to a temporary file first and hard-linked to `path` (link fails if the name
    exists, on local filesystems and NFS alike), so a reader never sees a half-written file and of two
    writers racing for one name exactly one wins."""
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_directory(path.parent)
    return True


def write_json_atomic(path: str | os.PathLike, value: dict[str, Any]) -> None:
    """`value` as indented JSON with sorted keys, written by write_bytes_atomic."""
    write_bytes_atomic(path, json_bytes(value))


def json_bytes(value: dict[str, Any]) -> bytes:
    """`value` as indented JSON with sorted keys and a final newline: how every record file is written."""
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def create_json_exclusive(path: str | os.PathLike, value: dict[str, Any]) -> bool:
    """`value` as JSON (as write_json_atomic writes it) by create_bytes_exclusive: False if `path` exists."""
    return create_bytes_exclusive(path, json_bytes(value))


def read_json(path: str | os.PathLike, what: str | None = None, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`; `error` (naming the path and `what`, default the file name) if the file
    is missing, is not valid JSON or holds something other than an object."""
    path = Path(path)
    what = what or path.name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path}: {what} does not exist") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None
    return json_object(text, path, what, error)


def json_object(text: str, where: object, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `text` (read from `where`); `error` naming `where` and `what` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: {what} must be a JSON object")
    return value


class FileLock:
    """An exclusive lock held on an open file until `release` (or the end of a `with` block)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closing the file releases it); a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_exclusive(
    path: str | os.PathLike, *, holder: str = "another process", error: type[Exception] = LockHeldError
) -> FileLock:
    """A non-blocking exclusive flock on `path` (a lock file inside the directory it guards, created if
    absent). If another process holds it: `error("<directory>: <holder> holds <lock file>")` at once,
    never a wait. The kernel releases the lock when its holder exits, however it exits."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(f"{path.parent}: {holder} holds {path.name}") from None
    return FileLock(path, fd)
