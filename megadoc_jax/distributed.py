"""Multi-process start-up: `jax.distributed.initialize` when, and only when, the run spans processes.

Four ways a run learns that it spans processes:
- explicit environment: MEGADOC_COORDINATOR=host:port, MEGADOC_NUM_PROCESSES=N, MEGADOC_PROCESS_ID=i
  (used by the tests and by anyone launching processes by hand);
- MEGADOC_DISTRIBUTED=slurm: the task of an `srun` step; cluster_env.py reads SLURM's variables into the
  coordinator, the process count and id, and this process's own GPUs (local_device_ids), one process per
  node or per GPU (docs/gpu.md). Chosen explicitly rather than detected from SLURM_JOB_ID, because a
  plain `python` inside an allocation (salloc, the batch script itself) also sees SLURM variables and
  would wait forever for tasks that were never started;
- MEGADOC_DISTRIBUTED=auto: let JAX detect the cluster (TPU pod slices, ...);
- none of these: a single process, nothing to initialise.
On CPU the processes talk through gloo collectives, so a 2-process test runs on one machine.

A lost process. JAX's coordination service (in process 0) ends every process once one has sent no
heartbeat for MEGADOC_HEARTBEAT_TIMEOUT seconds (jax.distributed.initialize's heartbeat_timeout_seconds,
default 100), so a survivor never hangs longer than that. Sooner, a collective with the dead peer fails in
the survivor; `lost_processes` then says which process is gone from our own beats in the service's
key-value store (each process bumps its counter every second), for the message the command prints.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

import jax

from megadoc_jax import cluster_env

log = logging.getLogger(__name__)

MODES = ("auto", "slurm")
HEARTBEAT_TIMEOUT = "MEGADOC_HEARTBEAT_TIMEOUT"  # seconds without a heartbeat before the job is ended
BEAT_PREFIX = "megadoc/beat/"  # + process id: a counter each process bumps every BEAT_SECONDS
BEAT_SECONDS = 1.0

_beats: threading.Event | None = None  # set to stop the beating thread


class LostProcess(RuntimeError):
    """Another process of the job is gone; the message names it."""


def heartbeat_timeout() -> int | None:
    """MEGADOC_HEARTBEAT_TIMEOUT as a positive integer, or None (JAX's default) when unset."""
    value = os.environ.get(HEARTBEAT_TIMEOUT, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{HEARTBEAT_TIMEOUT}={value!r}: expected a whole number of seconds >= 1")
    return int(value)


def _client():
    from jax._src import distributed as jax_distributed  # the coordination client; no public accessor

    return jax_distributed.global_state.client


def _start_beats(process_id: int) -> None:
    """A daemon thread bumping this process's counter in the coordination service's key-value store.

    Stopped and joined at exit (`_stop_beats`). atexit runs its handlers last registered first, so this one
    runs before JAX's own (registered when jax is imported), which shuts the coordination client down. Left
    running, the thread could be inside key_value_set (a C++ call without the GIL) when the interpreter
    finalises; it is then ended by a forced unwind that the C++ side swallows, and the process aborts
    ("FATAL: exception not rethrown", exit -6) after its work is done.
    """
    global _beats
    client, stop = _client(), threading.Event()

    def beat() -> None:
        count = 0
        while not stop.is_set():
            try:
                client.key_value_set(f"{BEAT_PREFIX}{process_id}", str(count), allow_overwrite=True)
            except Exception:  # the service is gone: lost_processes reports it
                return
            count += 1
            stop.wait(BEAT_SECONDS)

    thread = threading.Thread(target=beat, name="megadoc-beat", daemon=True)
    thread.start()
    _beats = stop
    atexit.register(_stop_beats, stop, thread)


def _stop_beats(stop: threading.Event, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Ends the beating thread and waits for it; a call into a coordinator that no longer answers is given
    `timeout` seconds (the process exits anyway, with a warning, rather than hang)."""
    stop.set()
    thread.join(timeout)
    if thread.is_alive():
        log.warning("the heartbeat thread did not stop within %.0f s (the coordinator does not answer)", timeout)


def lost_processes(wait: float = 3 * BEAT_SECONDS) -> str | None:
    """After a failed collective: which process is gone, as a sentence, or None in a single-process run or
    when every process still beats. Compares every process's counter over `wait` seconds; a key-value
    store that cannot be reached means process 0 (the coordinator, which hosts it) is gone."""
    if _beats is None or jax.process_count() < 2:
        return None
    me, count, client = jax.process_index(), jax.process_count(), _client()
    try:
        before = dict(client.key_value_dir_get(BEAT_PREFIX))
        time.sleep(wait)
        after = dict(client.key_value_dir_get(BEAT_PREFIX))
    except Exception:
        return f"process 0 of {count} (the coordinator) is gone: its coordination service does not answer process {me}"
    lost = [i for i in range(count) if i != me and before.get(f"{BEAT_PREFIX}{i}") == after.get(f"{BEAT_PREFIX}{i}")]
    if not lost:
        return None
    names = ", ".join(str(i) for i in lost)
    return f"process {names} of {count} is gone (no heartbeat for {wait:.0f} s); process {me} stops"


def _on_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "") == "cpu"


def _join(coordinator: str, num_processes: int, process_id: int, local_device_ids=None) -> None:
    if _on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = heartbeat_timeout()
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        **({} if timeout is None else {"heartbeat_timeout_seconds": timeout}),
    )
    _start_beats(process_id)
    log.info(
        "joined: process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def initialize_from_environment() -> None:
    coordinator = os.environ.get("MEGADOC_COORDINATOR")
    mode = os.environ.get("MEGADOC_DISTRIBUTED", "")
    if mode and mode not in MODES:
        raise SystemExit(f"MEGADOC_DISTRIBUTED={mode!r}: expected one of {', '.join(MODES)} (or unset)")
    if coordinator:
        try:
            num_processes = int(os.environ["MEGADOC_NUM_PROCESSES"])
            process_id = int(os.environ["MEGADOC_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise SystemExit(
                "MEGADOC_COORDINATOR is set, so MEGADOC_NUM_PROCESSES and MEGADOC_PROCESS_ID must be "
                f"integers too ({e})"
            ) from None
        _join(coordinator, num_processes, process_id)
    elif mode == "slurm":
        try:
            placement = cluster_env.slurm_placement(os.environ, gpus=not _on_cpu())
        except cluster_env.ClusterEnvError as e:
            raise SystemExit(f"MEGADOC_DISTRIBUTED=slurm: {e}") from None
        log.info("SLURM: %s", placement.describe())
        _join(placement.coordinator_address, placement.num_processes, placement.process_id, placement.local_device_ids)
    elif mode == "auto":
        jax.distributed.initialize()
