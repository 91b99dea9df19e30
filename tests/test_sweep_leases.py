"""megadoc_jax/sweep/leases.py: one holder per run, expiry and takeover, heartbeats, attempts, done markers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from megadoc_jax import files
from megadoc_jax.sweep.leases import Leases


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_racing_threads_get_one_lease(tmp_path):
    leases = Leases(tmp_path, lease_seconds=60)
    barrier, won = threading.Barrier(8), []

    def claim(i: int) -> None:
        barrier.wait()
        if leases.claim("run-a", {"worker": f"w{i}"}, max_attempts=3) is not None:
            won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    record = leases.record("run-a")
    assert record.attempts == 1 and record.holder["worker"] == f"w{won[0]}" and record.status(3) == "running"


CLAIMER = """
import json, random, sys
from megadoc_jax.sweep.leases import Leases
leases = Leases(sys.argv[1], lease_seconds=60)
names = [f"run-{i}" for i in range(40)]
random.Random(int(sys.argv[2])).shuffle(names)
print(json.dumps([n for n in names if leases.claim(n, {"worker": sys.argv[2]}, max_attempts=2) is not None]))
"""


def test_two_processes_claim_disjoint_runs_that_cover_all(tmp_path):
    processes = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path), str(seed)], stdout=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    claimed = [set(json.loads(p.communicate(timeout=60)[0])) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert not claimed[0] & claimed[1]
    assert claimed[0] | claimed[1] == {f"run-{i}" for i in range(40)}


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost(tmp_path):
    clock = Clock()
    leases = Leases(tmp_path, lease_seconds=10, clock=clock)
    first = leases.claim("run-a", {"worker": "w1"}, max_attempts=3)
    clock.now += 9.5
    assert leases.claim("run-a", {"worker": "w2"}, max_attempts=3) is None  # still live
    first.beat()  # a heartbeat at t=9.5 moves the expiry to 19.5
    clock.now += 9.5
    assert leases.claim("run-a", {"worker": "w2"}, max_attempts=3) is None
    clock.now += 1.0  # 10.5 s since the last heartbeat
    record = leases.record("run-a")
    assert record.status(3) == "queued" and record.holder is None
    assert "lease expired" in record.failures[-1]["reason"]
    second = leases.claim("run-a", {"worker": "w2"}, max_attempts=3)
    assert second is not None and second.attempt == 2
    assert not first.lost.is_set()
    first.beat()
    assert first.lost.is_set()  # the old holder sees attempt 2 and stops
    assert not first.finish({"objective": 1.0})  # and cannot mark the run done
    record = leases.record("run-a")
    assert record.attempts == 2 and record.holder["worker"] == "w2"
    assert [f["attempt"] for f in record.failures] == [1]  # the expired attempt counts as failed


def test_a_heartbeat_thread_keeps_a_lease_alive(tmp_path):
    leases = Leases(tmp_path, lease_seconds=0.6)
    lease = leases.claim("run-a", {"worker": "w1"}, max_attempts=2)
    with lease.heartbeat(every=0.1):
        time.sleep(1.5)  # well past lease_seconds
        assert leases.claim("run-a", {"worker": "w2"}, max_attempts=2) is None
        assert leases.record("run-a").heartbeat_age < 0.6
    time.sleep(0.9)  # no heartbeat any more
    taken = leases.claim("run-a", {"worker": "w2"}, max_attempts=2)
    assert taken is not None and taken.attempt == 2


def test_failed_attempts_are_counted_and_the_limit_holds(tmp_path):
    leases = Leases(tmp_path, lease_seconds=60)
    for attempt in (1, 2):
        lease = leases.claim("run-a", {"worker": "w"}, max_attempts=2)
        assert lease.attempt == attempt
        lease.fail({"reason": f"exit code {attempt}"})
    assert leases.claim("run-a", {"worker": "w"}, max_attempts=2) is None
    record = leases.record("run-a")
    assert record.status(2) == "failed" and record.attempts == 2
    assert [f["reason"] for f in record.failures] == ["exit code 1", "exit code 2"]
    assert record.status(3) == "queued"  # a larger limit would retry it
    assert leases.claim("run-a", {"worker": "w"}, max_attempts=3).attempt == 3


def test_a_done_run_is_never_claimed_again(tmp_path):
    clock = Clock()
    leases = Leases(tmp_path, lease_seconds=10, clock=clock)
    lease = leases.claim("run-a", {"worker": "w1"}, max_attempts=2)
    assert lease.finish({"objective": 2.5})
    clock.now += 100  # its lease expired long ago, but the run is done
    assert leases.claim("run-a", {"worker": "w2"}, max_attempts=2) is None
    record = leases.record("run-a")
    assert record.status(2) == "done" and record.done == {"objective": 2.5, "attempt": 1}
    assert record.failures == () and record.holder is None  # a done run's lapsed lease is no failure
    assert files.read_json(tmp_path / "done" / "run-a.json")["objective"] == 2.5


def test_exclusive_creation_keeps_the_first_content(tmp_path):
    path = tmp_path / "marker.json"
    assert files.create_json_exclusive(path, {"who": 1})
    assert not files.create_json_exclusive(path, {"who": 2})
    assert files.read_json(path) == {"who": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]  # no temporary left
