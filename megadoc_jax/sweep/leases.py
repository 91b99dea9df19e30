"""Claiming runs in a directory shared by workers: lease files, heartbeats, expiry, attempts, done markers.

    leases = Leases(sweep_dir, lease_seconds=600)
    lease = leases.claim("run-name", {"worker": "host:pid"}, max_attempts=2)  # None: done, held or spent
    with lease.heartbeat(every=150):     # a thread touches the lease file; lease.lost is set if taken over
        ...                              # train the run
    lease.finish({"objective": 3.2})     # the done marker, once the run's results are final
    lease.fail({"reason": "exit code 1"})  # or: attempt failed, another attempt may follow
    leases.record("run-name")            # RunRecord: attempts, the live holder, failures, the done marker

Files under the sweep directory:

    claims/<run>/<k>.lease    attempt k = 1, 2, ...: the claimer's JSON; its mtime is the last heartbeat
    claims/<run>/<k>.failed   why attempt k failed (written by its worker, or by the one that took over)
    done/<run>.json           the done marker: the run's results, final

Protocol. A run's current attempt is its highest-numbered lease. To claim, a worker reads the run's
files: if a done marker exists, or the current lease is live (no .failed, heartbeat at most lease_seconds
old by the reader's clock), or max_attempts attempts were made, it does not claim. Otherwise it creates
lease k+1 with create_json_exclusive (write a temporary file, hard-link it to the name: atomic, and of
two claimers of one name exactly one succeeds, on local filesystems and NFS). A lease that expired
without a .failed counts as a failed attempt ("lease expired"). The holder's heartbeat thread sets
the lease's mtime every `every` seconds, and sets `lost` if lease k+1 exists (it was presumed dead and
taken over): its worker then stops the run and writes nothing. The done marker is created exclusively
too, so at most one attempt's results ever count, and a run with a marker is never claimed again.

Guarantees: two live claimers never hold one run; a run is done at most once; a killed worker's run is
taken over lease_seconds after its last heartbeat; attempts are counted on disk, so a restart changes
nothing. Assumptions: the workers' clocks agree to well within lease_seconds, and a holder that stalls
(no heartbeat) for lease_seconds while alive may overlap its successor until its next heartbeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megadoc_jax import files

CLAIMS_DIR, DONE_DIR = "claims", "done"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the files say about one run."""

    name: str
    attempts: int  # leases created (attempts started)
    done: dict[str, Any] | None  # the done marker
    holder: dict[str, Any] | None  # the live lease's JSON, if one is live
    heartbeat_age: float | None  # seconds since the current lease's last heartbeat
    failures: tuple[dict[str, Any], ...]  # one per failed attempt ({"attempt": k, "reason": ...}), in order

    def status(self, max_attempts: int) -> str:
        """done, running (a live lease), failed (attempts spent, none live) or queued (to run)."""
        if self.done is not None:
            return "done"
        if self.holder is not None:
            return "running"
        return "failed" if self.attempts >= max_attempts else "queued"


class Leases:
    def __init__(self, sweep_dir: str | Path, lease_seconds: float, *, clock: Callable[[], float] = time.time):
        self.root = Path(sweep_dir)
        self.lease_seconds = lease_seconds
        self.clock = clock
        (self.root / CLAIMS_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / DONE_DIR).mkdir(parents=True, exist_ok=True)

    def done_path(self, name: str) -> Path:
        return self.root / DONE_DIR / f"{name}.json"

    def claims_dir(self, name: str) -> Path:
        return self.root / CLAIMS_DIR / name

    def record(self, name: str) -> RunRecord:
        done_path = self.done_path(name)
        done = files.read_json(done_path) if done_path.exists() else None
        try:
            entries = set(os.listdir(self.claims_dir(name)))
        except FileNotFoundError:
            entries = set()
        attempts = max((int(e.split(".")[0]) for e in entries if e.endswith(".lease")), default=0)
        failures, holder, age = [], None, None
        for k in range(1, attempts + 1):
            if f"{k}.failed" in entries:
                failures.append(files.read_json(self.claims_dir(name) / f"{k}.failed"))
            elif k < attempts:
                failures.append({"attempt": k, "reason": "lease expired (taken over)"})
        if attempts and f"{attempts}.failed" not in entries and done is None:  # done: its lease may lapse
            lease_path = self.claims_dir(name) / f"{attempts}.lease"
            try:
                age = self.clock() - lease_path.stat().st_mtime
            except FileNotFoundError:  # withdrawn just now by a claimer that found the run done: look again
                return self.record(name)
            if age <= self.lease_seconds:
                holder = files.read_json(lease_path)
            else:
                failures.append({"attempt": attempts, "reason": f"lease expired (no heartbeat for {age:.0f} s)"})
        return RunRecord(name, attempts, done, holder, age, tuple(failures))

    def claim(self, name: str, info: dict[str, Any], max_attempts: int) -> Lease | None:
        """Lease the run's next attempt, or None if it is done, held by a live lease, or out of attempts."""
        record = self.record(name)
        if record.done is not None or record.holder is not None or record.attempts >= max_attempts:
            return None
        attempt = record.attempts + 1
        directory = self.claims_dir(name)
        directory.mkdir(exist_ok=True)
        if attempt > 1 and not (directory / f"{attempt - 1}.failed").exists():  # say why, for the table
            files.write_json_atomic(directory / f"{attempt - 1}.failed", record.failures[-1])
        path = directory / f"{attempt}.lease"
        now = self.clock()
        if not files.create_json_exclusive(path, {**info, "attempt": attempt, "claimed": now}):
            return None  # another worker claimed this attempt first
        os.utime(path, (now, now))
        if self.done_path(name).exists():  # finished by a holder that was slow, not dead: let it stand
            path.unlink()
            return None
        return Lease(self, name, attempt)


class Lease:
    """One claimed attempt of one run."""

    def __init__(self, leases: Leases, name: str, attempt: int):
        self.leases, self.name, self.attempt = leases, name, attempt
        self.path = leases.claims_dir(name) / f"{attempt}.lease"
        self.lost = threading.Event()

    def beat(self) -> None:
        """Touch the lease (mtime = now), or set `lost` if a later attempt took the run over."""
        if (self.leases.claims_dir(self.name) / f"{self.attempt + 1}.lease").exists() or not self.path.exists():
            self.lost.set()
            return
        now = self.leases.clock()
        os.utime(self.path, (now, now))

    @contextlib.contextmanager
    def heartbeat(self, every: float) -> Iterator[Lease]:
        """A daemon thread beats every `every` seconds while the block runs."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every) and not self.lost.is_set():
                self.beat()

        thread = threading.Thread(target=loop, name=f"heartbeat {self.name}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def finish(self, marker: dict[str, Any]) -> bool:
        """Create the run's done marker; False if the run was lost or another attempt's marker exists."""
        self.beat()
        if self.lost.is_set():
            return False
        return files.create_json_exclusive(self.leases.done_path(self.name), {**marker, "attempt": self.attempt})

    def fail(self, record: dict[str, Any]) -> None:
        """Record that this attempt failed (the next claim makes attempt k+1, if attempts are left)."""
        files.write_json_atomic(self.path.with_suffix(".failed"), {**record, "attempt": self.attempt})
