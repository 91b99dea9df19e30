"""Orbax checkpoints of the train state: asynchronous saves, retention, restore onto any mesh.

Safety comes from orbax's commit protocol: a step is written into a temporary directory and renamed to
its final name only once every file (and every host) is done, so a checkpoint that was being written when
the process died is never listed, never restored, and its leftovers are removed on the next start.

The data position is not saved: the batch of step s is a pure function of (seed, s), so the step alone
resumes the input pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from megadoc_jax.config import TrainConfig

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every `checkpoint_every` steps and at the end; keeps the last K plus every M-th step."""

    def __init__(self, directory: str | Path, train: TrainConfig):
        keep = [policies.LatestN(n=train.keep_last)]
        if train.keep_every:
            keep.append(policies.EveryNSteps(interval_steps=train.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.directory = Path(directory).absolute()
        self._every = train.checkpoint_every
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def is_due(self, step: int) -> bool:
        return bool(self._every) and step % self._every == 0

    def save(self, step: int, state: Any) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the devices."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs), whatever mesh
        or device count wrote it."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def reached_preemption(self, step: int) -> bool:
        """True on every host once JAX's preemption notice (multi-host TPU slices) reached this step."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a (possibly abstract) state, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
