"""A command run twice on a full disk, inside small_disk.run_on_small_disk: once on the small tmpfs (it
must fail), then again once the tmpfs has room (`grow`, and the filler file removed); the tmpfs is then
copied out before the namespace goes. Prints one line: RESULT, then JSON [[exit code, stderr] of the first
run, [exit code, stderr] of the second].

    python tests/disk_full_jobs.py generation|train MOUNT GROW_KIB COPY_TO FILL_AFTER LEAVE_KIB ARGS...

FILL_AFTER: "-", or a path (its name may be a glob pattern) whose appearance makes a thread fill the disk
with a filler file, all but LEAVE_KIB KiB: the disk fills up while the command runs, not before it starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from small_disk import grow

RESULT = "disk_full_jobs result:"
FILLER = ".filler"


def command_main(kind: str):
    if kind == "generation":
        from generation.__main__ import main
    elif kind == "train":
        from megadoc_jax.train import main
    else:
        raise SystemExit(f"unknown command {kind!r}: expected generation or train")
    return main


def fill_after(trigger: Path, filler: Path, leave_kib: int) -> threading.Thread:
    """A thread that waits for `trigger`, then writes `filler` until the disk is full and gives back
    `leave_kib` KiB."""

    def fill() -> None:
        while not any(trigger.parent.glob(trigger.name)):
            time.sleep(0.01)
        with open(filler, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            size = f.tell()
        os.truncate(filler, max(0, size - leave_kib * 1024))

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def run_once(main, args: list[str]) -> list:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(args)
    return [code, stderr.getvalue()]


def main() -> None:
    kind, mount, grow_kib, copy_to, trigger, leave_kib, *args = sys.argv[1:]
    mount = Path(mount)
    command = command_main(kind)
    if trigger != "-":
        fill_after(Path(trigger), mount / FILLER, int(leave_kib))
    full = run_once(command, args)
    (mount / FILLER).unlink(missing_ok=True)
    grow(mount, int(grow_kib))
    again = run_once(command, args)
    shutil.copytree(mount, copy_to, symlinks=True)
    print(RESULT, json.dumps([full, again]), flush=True)


if __name__ == "__main__":
    main()
