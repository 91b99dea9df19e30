"""Train a decoder on token stores: `python -m megadoc_jax.train [--config FILE] [key=value ...]`.

With no arguments it runs configs/demo.yaml: a tiny model on the embedded demo stores (built once by
`python -m generation demo-data`; `make demo` runs both), on CPU, in a few minutes; the loss falls and an
evaluation loss is printed at the end.

    python -m generation demo-data && python -m megadoc_jax.train   # the demo
    python -m megadoc_jax.train --config configs/300m.yaml train.steps=100
    python -m megadoc_jax.train --config configs/300m.yaml --dry-run --topology v5e:4x4

The file reads top to bottom: config, distributed start-up, data, mesh and state, checkpoint restore,
compiled steps, the loop, the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from pathlib import Path

import jax

from megadoc_jax import checkpoint, distributed, evaluation, files, metrics, sharding, storage, xla_env
from megadoc_jax import config as config_lib
from megadoc_jax import step as step_lib
from megadoc_jax.data import demo, pipeline
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.count_models import heldout_baselines

log = logging.getLogger("megadoc_jax.train")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"YAML config (default: {DEMO_CONFIG.name}, the demo)")
    parser.add_argument("--dry-run", action="store_true", help="validate, build abstractly, report, exit")
    parser.add_argument("--topology", help="with --dry-run: compile the train step for this TPU topology")
    parser.add_argument("overrides", nargs="*", help="config overrides such as model.hidden=512")
    return parser.parse_args(argv)


RUN_LOCK = "train.lock"  # in the run directory, held by process 0 while it trains


class RunDirInUse(RuntimeError):
    """Another training run holds the run directory's lock."""


class Preemption:
    """SIGTERM (TPU preemption, scheduler stop) asks the loop to save and exit after the current step.

    One process only. Across processes, jax.distributed's preemption notifier already listens for SIGTERM
    and makes every process reach the sync point at one step (checkpointer.reached_preemption); a Python
    handler would replace its handler (no sync point ever comes) and stop only the signalled process, at
    a step of its own, leaving the others waiting in a collective (tests/test_train.py)."""

    def __init__(self, listen: bool) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle) if listen else None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def log_to_console() -> None:
    """Our progress lines on stdout, whatever handlers absl (imported by JAX and orbax) installed."""
    package_log = logging.getLogger("megadoc_jax")
    if not package_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
        package_log.propagate = False


def main(argv: list[str] | None = None) -> int:
    log_to_console()
    args = parse_args(argv)
    run_dir = "train.run_dir"  # named in a disk-full message
    try:
        config = config_lib.load(args.config or DEMO_CONFIG, args.overrides)
        run_dir = config.train.run_dir
        xla_env.apply_and_report(config.hardware)  # before anything starts a JAX backend (xla_env.py)
        if args.dry_run:
            from megadoc_jax import dry_run

            return dry_run.main(config, args.topology)
        distributed.initialize_from_environment()
        return run(config).exit_code
    except (config_lib.ConfigError, storage.StorageError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RunDirInUse as e:
        print(f"train: {e}; wait for it to finish or choose another train.run_dir", file=sys.stderr)
        return 2
    except checkpoint.CheckpointDamaged as e:
        print(f"train: {e}", file=sys.stderr)
        return 4
    except distributed.LostProcess as e:
        print(f"train: {e}: restart every process; the run resumes from its last checkpoint", file=sys.stderr)
        return 5
    except Exception as e:
        if files.is_disk_full(e):  # met by a checkpoint save or by any other file of the run
            named = files.disk_full_report(e)
            print(f"train: {named or f'{run_dir}: no space left on device ({e})'}", file=sys.stderr)
            return 4
        raise


@dataclasses.dataclass
class RunResult:
    # 0 done or preempted and saved, 3 stopped on a non-finite step (main: 2 config, 4 storage, 5 lost process)
    exit_code: int
    step: int  # steps completed
    history: list[dict[str, float]]  # the logged metrics, one dict per log step (with "step")


def run(config: config_lib.Config, devices: list[jax.Device] | None = None) -> RunResult:
    """Trains as the config says on `devices` (default: all), resuming from the run directory.

    However it ends (done, preempted, non-finite, an exception), pending checkpoint writes finish and
    the metric files are closed before it returns.
    """
    with contextlib.ExitStack() as cleanup:
        try:
            return _run(config, devices or jax.devices(), cleanup)
        except Exception as e:
            # A collective that failed because another process died: said now, before the cleanup, which
            # may wait on that process until the coordination service ends this one (distributed.py).
            lost = None if files.is_disk_full(e) else distributed.lost_processes()
            if lost is None:
                raise
            log.error("%s", lost)
            raise distributed.LostProcess(lost) from e


def _run(config: config_lib.Config, devices: list[jax.Device], cleanup: contextlib.ExitStack) -> RunResult:
    # ============================================================================================
    # Config against this machine: every error is raised here, before any compilation.
    # ============================================================================================
    config = demo.resolve_demo_paths(config)
    mesh_sizes = config_lib.validate_for_devices(config, len(devices))
    is_main = jax.process_index() == 0
    run_dir = storage.location(config.train.run_dir, "train.run_dir")  # a path or a URL (docs/cloud.md)
    if is_main:
        storage.makedirs(run_dir)
        # One run per directory: a second would interleave checkpoints and metrics with this one's.
        lock = storage.lock_exclusive(run_dir / RUN_LOCK, holder="another training run", error=RunDirInUse)
        cleanup.enter_context(lock)
        config_lib.dump(config, run_dir / "config.yaml")

    # ============================================================================================
    # Data: the batch of step s is a pure function of (seed, s); this process reads only its rows.
    # ============================================================================================
    tokenizer = TokenizerInfo.from_directory(config.data.tokenizer) if config.data.tokenizer else None
    data = pipeline.TrainData(
        config, process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tokenizer
    )
    total_steps = data.plan.total_steps
    log.info("%s", data.plan)

    # ============================================================================================
    # Mesh and sharded state: parameters are created already sharded by the rule table.
    # ============================================================================================
    mesh = sharding.make_mesh(mesh_sizes, devices, config.mesh.dcn_data)
    log.info("mesh: %s over %d devices (%s)", mesh_sizes, len(devices), devices[0].device_kind)
    setup = step_lib.train_setup(config, mesh, total_steps)
    log.info("parameters: %d", setup.num_parameters)
    # Reads and checks the eval stores now, before any compilation or restore.
    heldout = evaluation.HeldOutLoss(config, setup.graphdef, setup.state_shardings["params"], mesh, tokenizer=tokenizer)

    # ============================================================================================
    # Resume: the newest complete checkpoint in the run directory, restored onto this mesh.
    # ============================================================================================
    checkpointer = cleanup.enter_context(checkpoint.Checkpointer(run_dir / "checkpoints", config.train))
    restored = checkpointer.restore_latest(setup.abstract_state, fallback_on_damage=config.train.fallback_on_damage)
    if restored:
        start_step, state = restored
        log.info("resumed from step %d", start_step)
    else:
        start_step, state = 0, step_lib.initial_state(setup, config, mesh)

    # ============================================================================================
    # Compiled steps.
    # ============================================================================================
    # Under the mesh, activations follow the rule table through `sharding.constrain`. (Set after the
    # model is built: NNX initialisers would read the logical axis names as mesh axes.)
    cleanup.enter_context(jax.set_mesh(mesh))
    batch_sharding = step_lib.batch_sharding(mesh, config)
    train_step = step_lib.jit_train_step(setup, config, batch_sharding)

    # ============================================================================================
    # The loop. Metrics of step s are read while step s+1 runs, so the host never stalls the device.
    # ============================================================================================
    writer = cleanup.enter_context(metrics.MetricsWriter(run_dir, start_step=start_step, enabled=is_main))
    throughput = metrics.Throughput(config.model, config.data.seq_len, config.train.batch_size, devices)
    preemption = cleanup.enter_context(Preemption(listen=jax.process_count() == 1))
    history: list[dict[str, float]] = []
    log.info("training steps %d..%d", start_step, total_steps)

    def finish_step(step: int, step_metrics: dict) -> bool:
        """Reads back one step's metrics and logs them; False when the step was not finite."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not values.pop("finite"):
            log.error(
                "step %d: non-finite loss %.4g or gradient norm %.4g; stopping. The state was not "
                "updated and the last good checkpoint is kept (step %s).",
                step + 1,
                values["loss"],
                values["grad_norm"],
                checkpointer.latest_step(),
            )
            return False
        throughput.add(values.pop("tokens"))
        if (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
            values.update(throughput.report())
            writer.write(step + 1, values)
            history.append({"step": step + 1, **values})
            log.info(metrics.progress_line(step + 1, total_steps, values))
        return True

    pending: tuple[int, dict] | None = None  # the last dispatched step, metrics not yet read
    finite, preempted = True, False
    for step, local_batch in data.iterate(start_step):
        if step >= total_steps:
            break
        state, step_metrics = train_step(state, step_lib.global_batch(local_batch, batch_sharding))
        if pending is not None and not (finite := finish_step(*pending)):
            break
        pending, done = (step, step_metrics), step + 1
        preempted = preemption.requested or checkpointer.reached_preemption(done)
        save_now = config.train.checkpoints and (checkpointer.is_due(done) or preempted)
        eval_now = bool(config.train.eval_every) and done % config.train.eval_every == 0 and done < total_steps
        if save_now or eval_now:  # never save or evaluate a state that is not known to be finite
            finite, pending = finish_step(*pending), None
            if not finite:
                break
        if save_now:
            checkpointer.save(done, state)
        if eval_now:
            writer.write(done, heldout(state["params"]))
        if preempted:
            log.warning("preemption requested: saved step %d, exiting", done)
            break
    if pending is not None:
        finite = finish_step(*pending)

    # ============================================================================================
    # The end: final checkpoint and evaluation.
    # ============================================================================================
    final_step = int(jax.device_get(state["step"]))
    if finite and not preempted:
        if config.train.checkpoints:
            checkpointer.save(final_step, state)
        if config.data.eval_stores:
            losses = heldout(state["params"])
            if config.train.baselines:  # what counting alone scores on the same targets, printed below
                losses |= heldout_baselines(config, tokenizer)
            writer.write(final_step, losses)
            history.append({"step": final_step, **losses})
    return RunResult(exit_code=0 if finite else 3, step=final_step, history=history)


if __name__ == "__main__":
    sys.exit(main())
