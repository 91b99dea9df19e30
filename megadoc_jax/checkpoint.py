"""Orbax checkpoints of the train state: asynchronous saves, retention, restore onto any mesh; and loading
a trained run's parameters (load_run), for the jax generation backend and hf export.

Safety comes from orbax's commit protocol. On a local path a step is written into a temporary directory
and renamed to its final name only once every file (and every host) is done; on a URL (gs://, or file://
standing in for it: object stores cannot rename) the step is written under its final name and
`commit_success.txt` is put into it last, orbax's protocol on GCS. Either way a checkpoint that was being
written when the process died is never listed, never restored, and its leftovers are removed on the next
start. The run directory may be any path of megadoc_jax/storage.py but memory:// (orbax reaches storage
through etils.epath, which has no in-memory backend; gs:// needs gcsfs, the `gcs` extra).

The data position is not saved: the batch of step s is a pure function of (seed, s), so the step alone
resumes the input pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from megadoc_jax import config as config_lib
from megadoc_jax import files, sharding, storage
from megadoc_jax import model as model_lib
from megadoc_jax.config import Config, ModelConfig, TrainConfig

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every `checkpoint_every` steps and at the end; keeps the last K plus every M-th step."""

    def __init__(self, directory: str | Path | storage.Location, train: TrainConfig):
        keep = [policies.LatestN(n=train.keep_last)]
        if train.keep_every:
            keep.append(policies.EveryNSteps(interval_steps=train.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
            atomicity_options=_atomicity(storage.location(directory)),
        )
        self.directory = orbax_path(directory)
        self._every = train.checkpoint_every
        self._saving: int | None = None  # the step of the last save started
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def is_due(self, step: int) -> bool:
        return bool(self._every) and step % self._every == 0

    def save(self, step: int, state: Any) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the devices. A full disk met
        by this save or by the previous one (its error surfaces here) raises files.DiskFullError."""
        if step in self._manager.all_steps():
            return
        with self._on_disk_full():
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._saving = step

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs), whatever mesh
        or device count wrote it."""
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state: Any, *, fallback_on_damage: bool) -> tuple[int, Any] | None:
        """(step, state) of the newest committed step, or None when there is none.

        A committed step that does not restore (a file of it removed or truncated after orbax finalized
        it) raises CheckpointDamaged naming the step. With fallback_on_damage the next older step is tried
        instead, each damaged step named in a warning and, once an older one has restored (so the damage
        is not a model that fits no step), deleted: the run then writes those steps afresh."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # orbax and tensorstore raise ValueError, OSError, KeyError, ... for damage
                problem = f"{self.directory}/{step}: the checkpoint of step {step} is damaged: {_first_line(e)}"
                if not fallback_on_damage:
                    raise CheckpointDamaged(
                        f"{problem}. Set train.fallback_on_damage=true to resume from the newest step that "
                        f"restores (the damaged steps are then deleted), or restore this one from a copy"
                    ) from e
                log.warning("%s; trying the previous step (train.fallback_on_damage)", problem)
                damaged.append((step, problem))
                continue
            for bad, _ in damaged:
                self._manager.delete(bad)
                log.warning("deleted the damaged checkpoint of step %d; resuming from step %d", bad, step)
            return step, state
        if damaged:
            raise CheckpointDamaged(
                f"no checkpoint in {self.directory} restores: " + "; ".join(problem for _, problem in damaged)
            )
        return None

    def reached_preemption(self, step: int) -> bool:
        """True on every host once JAX's preemption notice (multi-host TPU slices) reached this step."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    def close(self) -> None:
        with self._on_disk_full():
            self._manager.wait_until_finished()
        self._manager.close()

    def _on_disk_full(self):
        """A full disk as files.DiskFullError naming the step being saved and the last complete one, which
        is kept (orbax finalizes a step only once all of it is written, and deletes old steps after that)."""
        saving = f"the checkpoint of step {self._saving}" if self._saving is not None else "a checkpoint"

        def kept() -> str:
            complete = committed_steps(storage.location(str(self.directory)))
            return (
                f"the last complete checkpoint (step {complete[-1] if complete else 'none'}) is kept: free space "
                "and rerun, which resumes from it"
            )

        return files.on_disk_full(self.directory, f"saving {saving}", kept)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def orbax_path(directory: str | Path | storage.Location) -> Path | Any:
    """What orbax is given for a directory: the absolute local path of a plain path or a file:// URL, the
    epath of a gs:// URL. memory:// is refused (orbax has no in-memory backend), naming the directory."""
    loc = storage.location(directory, "checkpoint directory")
    if isinstance(loc, Path):
        return loc.absolute()
    if loc.scheme == "file":
        return loc.local_path()
    if loc.scheme == "gs":
        from etils import epath

        return epath.Path(str(loc))
    raise CheckpointError(f"{loc}: orbax cannot write checkpoints to {loc.scheme}:// (use a path, file:// or gs://)")


def _atomicity(loc: storage.AnyPath) -> ocp.options.AtomicityOptions | None:
    """Orbax's default (rename) for a local path; its commit-file protocol, the one it uses on GCS, for a URL."""
    if isinstance(loc, Path):
        return None
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


# --------------------------------------------------------------------------------------------------
# Loading a trained run: config.yaml + checkpoints/STEP, parameters only
# --------------------------------------------------------------------------------------------------

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
ITEM = "default"  # the directory of the train state inside a step directory (orbax's default item name)


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be loaded; the message names the path."""


class CheckpointDamaged(CheckpointError):
    """A committed checkpoint step that cannot be restored; the message names the step directory."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class Run(NamedTuple):
    model: nnx.Module  # the Decoder, its parameters on the mesh's shardings
    config: Config  # the run's config.yaml (model.compute_dtype replaced when asked)
    step: int


class RunParams(NamedTuple):
    params: dict[str, Any]  # the Decoder's parameters as a pure dict of host numpy arrays
    config: Config
    step: int


COMMIT_SUCCESS = "commit_success.txt"  # orbax's completion marker of a step on GCS (commit-file protocol)


def absolute(path: str | Path | storage.Location) -> storage.AnyPath:
    """A local path made absolute, a URL as it is."""
    loc = storage.location(path, "run directory")
    return loc.absolute() if isinstance(loc, Path) else loc


def find_run_config(path: str | Path | storage.Location) -> storage.AnyPath | None:
    """config.yaml of a run directory, of a run's checkpoints/ or of one of its step directories."""
    path = absolute(path)
    for candidate in (path, path.parent, path.parent.parent):
        if storage.is_file(candidate / RUN_CONFIG) and storage.is_dir(candidate / CHECKPOINTS):
            return candidate / RUN_CONFIG
    return None


def committed_steps(checkpoints: storage.AnyPath) -> list[int]:
    """The complete steps in a checkpoints/ directory. Locally orbax renames a step directory to its number
    only once it is complete, so unfinished ones never match; on a URL the step is complete once orbax has
    put commit_success.txt into it (the commit-file protocol, Checkpointer's on URLs)."""
    names = [name for name in storage.list_names(checkpoints) if name.isdigit()]
    if isinstance(checkpoints, Path):
        return sorted(int(name) for name in names if (checkpoints / name).is_dir())
    return sorted(int(name) for name in names if storage.is_file(checkpoints / name / COMMIT_SUCCESS))


def step_dir(path: str | Path | storage.Location, step: int | None = None) -> storage.AnyPath:
    """The step directory to read: `path` itself if it is one, else the newest committed step (or `step`)
    of the run directory or checkpoints/ directory `path`."""
    path = absolute(path)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS:
        if step is not None and int(path.name) != step:
            raise CheckpointError(f"{path} is the checkpoint of step {path.name}, not of the asked step {step}")
        if not isinstance(path, Path) and not storage.is_file(path / COMMIT_SUCCESS):
            raise CheckpointError(f"{path}: not a committed checkpoint (no {COMMIT_SUCCESS}: its save did not finish)")
        return path
    checkpoints = path if path.name == CHECKPOINTS else path / CHECKPOINTS
    if not storage.is_dir(checkpoints):
        raise CheckpointError(f"no checkpoints directory {checkpoints}")
    steps = committed_steps(checkpoints)
    if not steps:
        raise CheckpointError(f"no committed checkpoint in {checkpoints}")
    if step is not None and step not in steps:
        raise CheckpointError(f"no committed checkpoint of step {step} in {checkpoints} (committed steps: {steps})")
    return checkpoints / str(steps[-1] if step is None else step)


def model_target(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The Decoder's graph and abstract state (ShapeDtypeStructs with this mesh's shardings): what a
    restore or an import fills. The one place this module and hf.py build the abstract model."""
    return nnx.split(model_lib.abstract_model(cfg, mesh))


def place_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, params: dict[str, Any], source: str) -> nnx.Module:
    """The Decoder holding `params` (a pure dict of host arrays), each put on its shards in param dtype.
    A missing, extra or misshapen array is refused, naming its path and `source`."""
    graphdef, abstract_state = model_target(cfg, mesh)
    target = nnx.to_pure_dict(abstract_state)
    _check_tree(_flat(target), _flat(params), f"{source} does not hold the model's parameters")
    placed = jax.tree.map(
        lambda spec, w: jax.device_put(np.asarray(w).astype(spec.dtype), spec.sharding), target, params
    )
    nnx.replace_by_pure_dict(abstract_state, placed)
    return nnx.merge(graphdef, abstract_state)


def load_run(
    path: str | Path, mesh: jax.sharding.Mesh, *, step: int | None = None, compute_dtype: str | None = None
) -> Run:
    """The Decoder of a trained run with the parameters of its newest committed step (or `step`), restored
    onto `mesh`'s shardings: only `params` is read (orbax partial restore; no optimizer state).

    path: a run directory, its checkpoints/ or one step directory. compute_dtype: None keeps config.yaml's
    model.compute_dtype. A missing or partial checkpoint, or one whose parameters do not match config.yaml's
    model (names, shapes), raises CheckpointError naming both paths.
    """
    config, directory = _run_config_and_step(path, step, compute_dtype)
    graphdef, abstract_state = model_target(config.model, mesh)
    target = nnx.to_pure_dict(abstract_state)
    restored = _restore_params(directory, target, ocp.checkpoint_utils.construct_restore_args(target))
    nnx.replace_by_pure_dict(abstract_state, restored)
    return Run(nnx.merge(graphdef, abstract_state), config, int(directory.name))


def load_run_params(path: str | Path, *, step: int | None = None) -> RunParams:
    """As load_run, but the parameters come back as host numpy arrays (no device memory): for export."""
    config, directory = _run_config_and_step(path, step, None)
    _, abstract_state = model_target(config.model, sharding.make_mesh({}, jax.devices()[:1]))
    target = nnx.to_pure_dict(abstract_state)
    restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), target)
    return RunParams(_restore_params(directory, target, restore_args), config, int(directory.name))


def _run_config_and_step(
    path: str | Path, step: int | None, compute_dtype: str | None
) -> tuple[Config, storage.AnyPath]:
    config_yaml = find_run_config(path)
    if config_yaml is None:
        raise CheckpointError(
            f"{path} is not a megadoc_jax run: no {RUN_CONFIG} next to a {CHECKPOINTS}/ directory in it or above it"
        )
    try:
        config = read_run_config(config_yaml)
    except config_lib.ConfigError as e:
        raise CheckpointError(f"{config_yaml}: {e}") from None
    if compute_dtype is not None:
        if compute_dtype not in config_lib.DTYPES:
            raise CheckpointError(f"compute dtype {compute_dtype!r} for {path}: expected one of {config_lib.DTYPES}")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, compute_dtype=compute_dtype))
    return config, step_dir(path, step)


def read_run_config(config_yaml: storage.AnyPath) -> Config:
    """A run's resolved config.yaml (a local file through config.load; a URL read through storage)."""
    if isinstance(config_yaml, Path):
        return config_lib.load(config_yaml)
    try:
        raw = yaml.safe_load(storage.read_text(config_yaml)) or {}
    except yaml.YAMLError as e:
        raise config_lib.ConfigError(f"{config_yaml} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise config_lib.ConfigError(f"{config_yaml}: the top level must be a mapping")
    return config_lib.from_dict(raw)


def _restore_params(directory: storage.AnyPath, target: dict[str, Any], restore_args: Any) -> dict[str, Any]:
    """`params` of the train state in step directory `directory`, checked against `target` first."""
    item_dir = directory / ITEM
    if not storage.is_file(item_dir / "_METADATA"):
        raise CheckpointError(f"partial or foreign checkpoint: {item_dir / '_METADATA'} does not exist")
    orbax_item_dir = orbax_path(item_dir)
    # Each checkpointer is closed after use, so none of orbax's background threads outlives the restore (a
    # thread still calling into Python while the interpreter finalises aborts the process at exit).
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            saved = checkpointer.metadata(orbax_item_dir).item_metadata.tree
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the checkpoint metadata of {item_dir}: {e}") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{item_dir} holds no 'params' tree of a train state (it holds {keys})")
    config_yaml = find_run_config(directory)
    _check_tree(
        _flat({"params": target}),
        _flat({"params": saved["params"]}),
        f"checkpoint {item_dir} does not match the model of {config_yaml}",
    )
    args = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(orbax_item_dir, args=args)["params"]
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot restore params from {item_dir}: {e}") from e


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """Leaves by dotted path (params.layers.attention.wq); dicts are the only inner nodes."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not isinstance(x, dict))
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _check_tree(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    """Same names and shapes, else CheckpointError listing the differences (the first few of each kind)."""
    problems = [f"missing {name}" for name in expected if name not in got]
    problems += [f"unexpected {name}" for name in got if name not in expected]
    for name, spec in expected.items():
        if name in got and tuple(got[name].shape) != tuple(spec.shape):
            problems.append(f"{name}: shape {tuple(got[name].shape)} where the model has {tuple(spec.shape)}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise CheckpointError(f"{what}: {shown}")
