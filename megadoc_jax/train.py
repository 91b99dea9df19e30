"""Train a decoder on token stores: `python -m megadoc_jax.train [--config FILE] [key=value ...]`.

With no arguments it runs configs/demo.yaml: a tiny model on the embedded demo store (built on first
use), on CPU, in a few minutes; the loss falls and an evaluation loss is printed at the end.

    python -m megadoc_jax.train                                   # the demo
    python -m megadoc_jax.train --config configs/300m.yaml train.steps=100
    python -m megadoc_jax.train --config configs/300m.yaml --dry-run --topology v5e:4x4

The file reads top to bottom: config, distributed start-up, data, mesh and state, checkpoint restore,
compiled steps, the loop, the end.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from megadoc_jax import checkpoint, distributed, metrics, optim, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import step as step_lib
from megadoc_jax.data import demo, pipeline
from megadoc_jax.data.store import TokenizerInfo

log = logging.getLogger("megadoc_jax.train")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"YAML config (default: {DEMO_CONFIG.name}, the demo)")
    parser.add_argument("--dry-run", action="store_true", help="validate, build abstractly, report, exit")
    parser.add_argument("--topology", help="with --dry-run: compile the train step for this TPU topology")
    parser.add_argument("overrides", nargs="*", help="config overrides such as model.hidden=512")
    return parser.parse_args(argv)


class Preemption:
    """SIGTERM (TPU preemption, scheduler stop) asks the loop to save and exit at the next step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)

    # ============================================================================================
    # Config and distributed start-up: every config error is raised here, before any compilation.
    # ============================================================================================
    try:
        config = config_lib.load(args.config or DEMO_CONFIG, args.overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megadoc_jax import dry_run

        return dry_run.main(config, args.topology)
    distributed.initialize_from_environment()
    config = demo.resolve_demo_paths(config)
    try:
        mesh_sizes = config_lib.validate_for_devices(config, jax.device_count())
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    is_main = jax.process_index() == 0
    run_dir = Path(config.train.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    mesh = sharding.make_mesh(mesh_sizes)
    log.info("mesh: %s over %d devices (%s)", mesh_sizes, jax.device_count(), jax.devices()[0].device_kind)
    model = sharding.create_sharded_model(config.model, mesh, config.train.seed)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    del model
    log.info("parameters: %d", sum(x.size for x in jax.tree.leaves(params)))
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    state_shardings = step_lib.state_shardings(params, tx)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_shardings)(params)
    del params

    # ============================================================================================
    # Resume: the newest complete checkpoint in the run directory, restored onto this mesh.
    # ============================================================================================
    checkpointer = checkpoint.Checkpointer(run_dir / "checkpoints", config.train)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, checkpoint.abstract_like(state))
        log.info("resumed from step %d", start_step)

    # ============================================================================================
    # Compiled steps: explicit shardings in and out, the old state's buffers donated.
    # ============================================================================================
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        step_lib.make_train_step(graphdef, tx, schedule, config),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        step_lib.make_eval_step(graphdef, config), in_shardings=(state_shardings["params"], batch_sharding)
    )

    def evaluate() -> dict[str, float]:
        losses = {}
        for name, store in config.data.eval_stores.items():
            sums = [
                eval_step(state["params"], step_lib.global_batch(b, batch_sharding))
                for b in pipeline.eval_batches(
                    store, config, config.train.eval_batches, process_index=jax.process_index(),
                    process_count=jax.process_count(), tokenizer=tokenizer,
                )
            ]
            loss_sum, weight_sum = np.sum(jax.device_get([(s["loss_sum"], s["weight_sum"]) for s in sums]), 0)
            losses[f"eval/{name}/loss"] = float(loss_sum / max(weight_sum, 1.0))
        return losses

    # ============================================================================================
    # The loop. Metrics of step s are read while step s+1 runs, so the host never stalls the device.
    # ============================================================================================
    writer = metrics.MetricsWriter(run_dir, enabled=is_main)
    throughput = metrics.Throughput(config.model, config.data.seq_len, config.train.batch_size, jax.devices())
    preemption = Preemption()
    pending: tuple[int, dict] | None = None
    exit_code = 0
    log.info("training steps %d..%d", start_step, total_steps)

    def finish_step(step: int, step_metrics: dict) -> bool:
        """Reads back one step's metrics, logs them; False when the step was not finite."""
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not values.pop("finite"):
            log.error(
                "step %d: non-finite loss %.4g or gradient norm %.4g; stopping. The state was not "
                "updated and the last good checkpoint is kept (step %s).",
                step, values["loss"], values["grad_norm"], checkpointer.latest_step(),
            )
            return False
        throughput.add(values.pop("tokens"))
        if (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
            values.update(throughput.report())
            writer.write(step + 1, values)
            log.info(metrics.progress_line(step + 1, total_steps, values))
        return True

    for step, local_batch in data.iterate(start_step):
        if step >= total_steps:
            break
        state, step_metrics = train_step(state, step_lib.global_batch(local_batch, batch_sharding))
        if pending is not None and not finish_step(*pending):
            exit_code = 3
            pending = None
            break
        pending = (step, step_metrics)
        done = step + 1
        if checkpointer.is_due(done) and config.train.checkpoints:
            checkpointer.save(done, state)
        if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
            writer.write(done, evaluate_and_log(evaluate))
        if preemption.requested or checkpointer.reached_preemption(done):
            log.warning("preemption requested: saving step %d and exiting", done)
            if not finish_step(*pending):
                exit_code = 3
            elif config.train.checkpoints:
                checkpointer.save(done, state)
            pending = None
            checkpointer.close()
            writer.close()
            return exit_code
    if pending is not None and not finish_step(*pending):
        exit_code = 3

    # ============================================================================================
    # The end: final checkpoint and evaluation.
    # ============================================================================================
    if exit_code == 0:
        final_step = int(jax.device_get(state["step"]))
        if config.train.checkpoints:
            checkpointer.save(final_step, state)
        if config.data.eval_stores:
            writer.write(final_step, evaluate_and_log(evaluate))
    checkpointer.close()
    writer.close()
    return exit_code


def evaluate_and_log(evaluate) -> dict[str, float]:
    losses = evaluate()
    for name, value in losses.items():
        log.info("%s: %.4f", name, value)
    return losses


if __name__ == "__main__":
    sys.exit(main())
