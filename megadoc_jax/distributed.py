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
"""

from __future__ import annotations

import logging
import os

import jax

from megadoc_jax import cluster_env

log = logging.getLogger(__name__)

MODES = ("auto", "slurm")


def _on_cpu() -> bool:
    return os.environ.get("JAX_PLATFORMS", "") == "cpu"


def _join(coordinator: str, num_processes: int, process_id: int, local_device_ids=None) -> None:
    if _on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
    )
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
