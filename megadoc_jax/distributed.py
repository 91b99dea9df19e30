"""Multi-process start-up: `jax.distributed.initialize` when, and only when, the run spans processes.

Three ways a run learns that it spans processes:
- explicit environment: MEGADOC_COORDINATOR=host:port, MEGADOC_NUM_PROCESSES=N, MEGADOC_PROCESS_ID=i
  (used by the tests, by SLURM scripts, and by anyone launching processes by hand);
- MEGADOC_DISTRIBUTED=auto: let JAX detect the cluster (TPU pod slices, SLURM, ...);
- neither: a single process, nothing to initialise.
On CPU the processes talk through gloo collectives, so a 2-process test runs on one machine.
"""

from __future__ import annotations

import os

import jax


def initialize_from_environment() -> None:
    coordinator = os.environ.get("MEGADOC_COORDINATOR")
    if coordinator:
        try:
            num_processes = int(os.environ["MEGADOC_NUM_PROCESSES"])
            process_id = int(os.environ["MEGADOC_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise SystemExit(
                "MEGADOC_COORDINATOR is set, so MEGADOC_NUM_PROCESSES and MEGADOC_PROCESS_ID must be "
                f"integers too ({e})"
            ) from None
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif os.environ.get("MEGADOC_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
