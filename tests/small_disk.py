"""A small filesystem to fill, for the disk-full tests: a size-limited tmpfs mounted in a private mount
namespace by `unshare -rm` (a user namespace in which the process is root: no real root needed, nothing
mounted on the machine, and the mount goes away with the process).

A job runs in a child process that sees the tmpfs on a directory; `grow` (called inside it) gives the
tmpfs more room, as freeing space would, so the same child reruns the job and copies the result out
before the namespace, and the tmpfs with it, is gone (tests/disk_full_jobs.py).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from processes import REPO

MOUNT_THEN_EXEC = 'mount -t tmpfs -o size="$1"k tmpfs "$2" && shift 2 && exec "$@"'


@functools.cache
def unavailable() -> str | None:
    """Why no small disk can be made here (for pytest.skip), or None when `unshare -rm` can mount a tmpfs."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux) to mount a small tmpfs in a private namespace"
    with tempfile.TemporaryDirectory() as directory:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", MOUNT_THEN_EXEC, "sh", "64", directory, "true"],
            capture_output=True,
            text=True,
        )
    if probe.returncode != 0:
        return f"unshare -rm cannot mount a tmpfs here (user namespaces off?): {probe.stderr.strip()}"
    return None


def run_on_small_disk(
    mount: Path, kib: int, args: list[str], *, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python ARGS` (in the repository root) with a `kib` KiB tmpfs on the directory `mount`, which only
    it and its children see; stdout and stderr together in .stdout."""
    mount.mkdir(parents=True, exist_ok=True)
    command = ["unshare", "-rm", "sh", "-c", MOUNT_THEN_EXEC, "sh", str(kib), str(mount), sys.executable, *args]
    return subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def grow(mount: Path, kib: int) -> None:
    """Inside the namespace: resize the tmpfs on `mount` to `kib` KiB (space back)."""
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mount)], check=True)


def disk_usage_kib(path: Path) -> int:
    """What `path` takes on a tmpfs: every file rounded up to 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in path.rglob("*") if p.is_file())
