"""megadoc_jax.distributed: which arguments reach jax.distributed.initialize, and which environments stop.

jax.distributed.initialize itself is replaced by a recorder here: the GPUs whose ids it would receive do
not exist on this machine (the real call runs in test_train.py's 2-process CPU runs).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from megadoc_jax import distributed

LAYOUTS = Path(__file__).parent / "data" / "slurm"


@pytest.fixture
def recorded_initialize(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in (
        "MEGADOC_COORDINATOR",
        "MEGADOC_DISTRIBUTED",
        "MEGADOC_HEARTBEAT_TIMEOUT",
        "JAX_PLATFORMS",
        "CUDA_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(name, raising=False)
    return calls


def set_layout_task(monkeypatch, layout: str, task: int) -> None:
    data = json.loads((LAYOUTS / layout).read_text())
    for name, value in {**data["job"], **data["tasks"][task]["task"]}.items():
        monkeypatch.setenv(name, value)


def test_slurm_mode_passes_the_tasks_own_gpu(monkeypatch, recorded_initialize):
    set_layout_task(monkeypatch, "2node-8gpu-per-gpu-shared.json", 3)  # process 13: node 1, local id 5
    monkeypatch.setenv("MEGADOC_DISTRIBUTED", "slurm")
    distributed.initialize_from_environment()
    assert recorded_initialize == [
        {"coordinator_address": "gpu007:62597", "num_processes": 16, "process_id": 13, "local_device_ids": [5]}
    ]


def test_slurm_mode_one_process_per_node_passes_every_gpu(monkeypatch, recorded_initialize):
    set_layout_task(monkeypatch, "2node-8gpu-per-node.json", 1)
    monkeypatch.setenv("MEGADOC_DISTRIBUTED", "slurm")
    distributed.initialize_from_environment()
    assert recorded_initialize[0]["local_device_ids"] == list(range(8))
    assert recorded_initialize[0]["process_id"] == 1


def test_a_bad_slurm_environment_stops_before_initialising(monkeypatch, recorded_initialize):
    set_layout_task(monkeypatch, "2node-8gpu-per-gpu-shared.json", 0)
    monkeypatch.setenv("MEGADOC_DISTRIBUTED", "slurm")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit, match="MEGADOC_DISTRIBUTED=slurm: 8 tasks on this node but CUDA_VISIBLE_DEVICES"):
        distributed.initialize_from_environment()
    assert recorded_initialize == []


def test_unknown_mode_is_refused(monkeypatch, recorded_initialize):
    monkeypatch.setenv("MEGADOC_DISTRIBUTED", "slrum")
    with pytest.raises(SystemExit, match="MEGADOC_DISTRIBUTED='slrum': expected one of auto, slurm"):
        distributed.initialize_from_environment()
    assert recorded_initialize == []


def test_no_variables_no_initialisation(recorded_initialize):
    distributed.initialize_from_environment()
    assert recorded_initialize == []


def test_heartbeat_timeout_reaches_initialize_and_a_bad_one_is_refused(monkeypatch, recorded_initialize):
    monkeypatch.setenv("MEGADOC_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("MEGADOC_NUM_PROCESSES", "2")
    monkeypatch.setenv("MEGADOC_PROCESS_ID", "1")
    monkeypatch.setattr(distributed, "_start_beats", lambda process_id: None)  # no coordination service here
    monkeypatch.setenv("MEGADOC_HEARTBEAT_TIMEOUT", "15")
    distributed.initialize_from_environment()
    assert recorded_initialize[-1]["heartbeat_timeout_seconds"] == 15
    monkeypatch.delenv("MEGADOC_HEARTBEAT_TIMEOUT")
    distributed.initialize_from_environment()
    assert "heartbeat_timeout_seconds" not in recorded_initialize[-1]  # JAX's default (100 s)
    monkeypatch.setenv("MEGADOC_HEARTBEAT_TIMEOUT", "0")
    with pytest.raises(SystemExit, match=r"MEGADOC_HEARTBEAT_TIMEOUT='0': expected a whole number of seconds >= 1"):
        distributed.initialize_from_environment()
    assert len(recorded_initialize) == 2


def test_no_lost_process_is_named_in_a_single_process_run():
    assert distributed.lost_processes(wait=0) is None


def test_the_heartbeat_thread_is_stopped_and_joined_at_exit(monkeypatch):
    """A beat still inside key_value_set when the interpreter finalises aborts the process (exit -6, seen
    with jax 0.12 after evaluate had written its JSON); the exit handler must wait for the call to end."""

    class SlowClient:  # the coordination client's key-value store, each write taking a while
        def __init__(self):
            self.in_call = threading.Event()
            self.calls_done = 0

        def key_value_set(self, key, value, allow_overwrite):
            self.in_call.set()
            time.sleep(0.3)
            self.calls_done += 1
            self.in_call.clear()

    client, handlers = SlowClient(), []
    monkeypatch.setattr(distributed, "_client", lambda: client)
    monkeypatch.setattr(distributed, "_beats", None)
    monkeypatch.setattr(distributed.atexit, "register", lambda *handler: handlers.append(handler))
    distributed._start_beats(process_id=0)
    assert client.in_call.wait(5)  # the thread is inside a write
    ((stop_beats, *args),) = handlers
    stop_beats(*args)
    thread = args[1]
    assert not thread.is_alive() and not client.in_call.is_set() and client.calls_done >= 1
