"""megadoc_jax/files.py: atomic small files, JSON objects with clear errors, and the one exclusive lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megadoc_jax import files


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    files.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert files.read_json(path) == {"a": [1, 2], "b": 1}
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'  # sorted keys, indent 1
    files.write_bytes_atomic(path, b'{"c": 3}')
    assert files.read_json(path) == {"c": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


class RecordError(RuntimeError):
    pass


def test_read_json_names_the_file_and_raises_the_callers_error(tmp_path):
    with pytest.raises(RecordError, match=rf"{tmp_path}/absent.json: progress does not exist"):
        files.read_json(tmp_path / "absent.json", "progress", RecordError)
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=rf"{tmp_path}/torn.json: torn.json is not valid JSON"):
        files.read_json(tmp_path / "torn.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(RecordError, match="list.json: list.json must be a JSON object"):
        files.read_json(tmp_path / "list.json", error=RecordError)


HOLD = """
import sys, time
from megadoc_jax import files
lock = files.lock_exclusive(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_lock_is_exclusive_across_processes_and_never_waits(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RecordError, match=rf"^{tmp_path}: another writer holds .lock$"):
            files.lock_exclusive(path, holder="another writer", error=RecordError)
        with pytest.raises(files.LockHeldError, match="another process holds .lock"):
            files.lock_exclusive(path)
    finally:
        holder.kill()
        holder.wait()
    with files.lock_exclusive(path) as lock:  # the kernel released the killed holder's lock
        assert lock.held
    assert not lock.held


def test_a_released_lock_can_be_taken_again_in_the_same_process(tmp_path):
    first = files.lock_exclusive(tmp_path / ".lock")
    with pytest.raises(files.LockHeldError):
        files.lock_exclusive(tmp_path / ".lock")  # flock: a second open file of one process is refused too
    first.release()
    first.release()  # a second release does nothing
    files.lock_exclusive(tmp_path / ".lock").release()
