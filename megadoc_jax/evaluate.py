"""Evaluate checkpoints: held-out losses on token stores, of one model or of an ensemble.

    python -m megadoc_jax.evaluate --model runs/demo                       # its data.eval_stores, both recipes
    python -m megadoc_jax.evaluate --model runs/a:2000 --store iid=STORE --store arxiv=STORE2 --recipe concat
    python -m megadoc_jax.evaluate --model runs/s0 --model runs/s1 --model HF_DIR --ensemble   # mean_logits
    python -m megadoc_jax.evaluate --model runs/a train.batch_size=32 mesh.context=4 model.attention=ring
    python -m megadoc_jax.evaluate --model runs/a --benchmarks BENCH_DIR model.compute_dtype=float32

Several --model without --ensemble are evaluated one by one. Overrides set the evaluation's mesh, batch
(train.batch_size rows of data.seq_len), window length (data.seq_len, default: the shortest member's
context) and model.attention / model.compute_dtype; the rest of the config is the first model's run.
Each evaluation writes one JSON file (--out, default RUN_DIR/eval/) and prints a summary; a single run
also gets its figures appended to the run's metrics at the checkpoint's step. docs/evaluation.md
("Losses") has the recipes, the figures and the JSON format. --benchmarks DIR adds the zero-shot (or
--num-fewshot k) multiple-choice benchmarks whose item files DIR holds (DIR/<task>/<split>.jsonl|.parquet),
scored as lm-evaluation-harness scores them, and the paper's three-task average ("Downstream benchmarks").

The file reads top to bottom: arguments, the evaluation's config and mesh, models, stores, the losses,
the output. Exit status 2 for bad input (the message names the path or key).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from megadoc_jax import attention, checkpoint, distributed, files, hf, sharding, storage, xla_env
from megadoc_jax import config as config_lib
from megadoc_jax.data import demo, pipeline
from megadoc_jax.data.store import StoreError, TokenizerInfo
from megadoc_jax.evaluation import benchmark_scoring, benchmark_tasks, loss_windows, models, report
from megadoc_jax.evaluation.losses import LossSums, RowScorer, score_batches
from megadoc_jax.evaluation.token_bytes import TokenBytesError, token_byte_lengths

log = logging.getLogger("megadoc_jax.evaluate")

BAD_INPUT = (
    config_lib.ConfigError,
    storage.StorageError,
    checkpoint.CheckpointError,
    hf.HFError,
    StoreError,
    models.ModelError,
    loss_windows.WindowError,
    TokenBytesError,
    benchmark_tasks.BenchmarkDataError,
)
MODEL_OVERRIDES = ("attention", "compute_dtype")  # the rest of model.* is the checkpoint's


@dataclasses.dataclass
class Options:
    models: list[str]
    ensemble: str | None = None  # None: each model on its own
    stores: dict[str, str] = dataclasses.field(default_factory=dict)  # empty: the first run's data.eval_stores
    recipes: tuple[str, ...] = loss_windows.RECIPES
    stride: int | None = None  # document recipe; None: half the window
    tokenizer: str | None = None
    out: str | None = None
    run_metrics: bool = True
    progress: bool = True
    overrides: list[str] = dataclasses.field(default_factory=list)
    benchmarks: str | None = None  # directory of benchmark item files; None: no benchmarks
    tasks: tuple[str, ...] = ()  # empty: every task with a directory in `benchmarks`
    num_fewshot: int = 0

    def given(self) -> dict[str, Any]:
        """The key=value overrides as a nested dict (what was set on the command line)."""
        return config_lib.apply_overrides({}, list(self.overrides))


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="RUN_DIR[:STEP] or a Llama directory")
    parser.add_argument(
        "--ensemble",
        nargs="?",
        const="mean_logits",
        choices=models.ENSEMBLE_MODES,
        help="score the models as one ensemble (alone: mean_logits, the paper's)",
    )
    parser.add_argument("--store", action="append", default=[], help="NAME=PATH of a token store (repeatable)")
    parser.add_argument("--recipe", choices=[*loss_windows.RECIPES, "all"], default="all")
    parser.add_argument("--stride", type=int, help="document recipe: window stride (default: half the window)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's), for bpb and checks")
    parser.add_argument("--out", help="directory of the JSON file (default: RUN_DIR/eval, or ./eval)")
    parser.add_argument("--no-run-metrics", action="store_true", help="do not append to the run's metrics")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--benchmarks", help="directory of multiple-choice item files, DIR/<task>/<split>.jsonl")
    parser.add_argument("--tasks", help="comma-separated benchmark tasks (default: those in --benchmarks)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="benchmark examples in each context")
    parser.add_argument("overrides", nargs="*", help="config overrides: mesh.*, train.batch_size, data.seq_len, ...")
    args = parser.parse_args(argv)
    stores = {}
    for text in args.store:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            parser.error(f"--store {text!r}: expected NAME=PATH")
        stores[name] = path
    return Options(
        models=args.model,
        ensemble=args.ensemble,
        stores=stores,
        recipes=loss_windows.RECIPES if args.recipe == "all" else (args.recipe,),
        stride=args.stride,
        tokenizer=args.tokenizer,
        out=args.out,
        run_metrics=not args.no_run_metrics,
        progress=not args.no_progress,
        overrides=args.overrides,
        benchmarks=args.benchmarks,
        tasks=tuple(t for t in (args.tasks or "").split(",") if t),
        num_fewshot=args.num_fewshot,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # the study report (megadoc_jax/study), JAX-free
        from megadoc_jax.study import cli

        return cli.main(argv[1:])
    from megadoc_jax.train import log_to_console

    log_to_console()
    options = parse_args(argv)
    try:
        # The first model's run config carries its hardware section (overrides: hardware.*): applied before
        # anything starts a JAX backend, once per process, so it holds for every evaluation below.
        xla_env.apply_and_report(evaluation_config(options).hardware)
        distributed.initialize_from_environment()
        groups = [options.models] if options.ensemble else [[spec] for spec in options.models]
        for specs in groups:
            evaluate(dataclasses.replace(options, models=specs))
    except BAD_INPUT as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(options: Options, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """One evaluation (one model, or the ensemble of options.models): returns the JSON record it writes."""
    devices = devices or jax.devices()
    is_main = jax.process_index() == 0
    if len(options.models) > 1 and options.ensemble is None:
        raise models.ModelError(f"{len(options.models)} models and no --ensemble mode: evaluate them one by one")

    # ============================================================================================
    # The evaluation's config and mesh: the first model's run config, the overrides on top.
    # ============================================================================================
    config = evaluation_config(options)
    mesh = sharding.make_mesh(config_lib.validate_for_devices(config, len(devices)), devices, config.mesh.dcn_data)

    # ============================================================================================
    # Models, rebuilt with the evaluation's attention backend; one tokenizer for all.
    # ============================================================================================
    members = [
        models.load_member(spec, mesh, attention=config.model.attention, compute_dtype=compute_dtype(options))
        for spec in options.models
    ]
    tokenizer = models.check_ensemble(members)
    config = fit_context(config, members, options, len(devices))
    tokenizer_dir, tokenizer = chosen_tokenizer(options, members, tokenizer)

    # ============================================================================================
    # Stores: each checked against the tokenizer and the vocabulary before anything compiles.
    # ============================================================================================
    store_paths = {  # demo:NAME names the demo data (python -m generation demo-data)
        name: demo.resolve_demo_path(path, f"--store {name}")
        for name, path in (options.stores or dict(config.data.eval_stores)).items()
    }
    if not store_paths and not options.benchmarks:
        raise config_lib.ConfigError("--store: no stores given and the run has no data.eval_stores")
    stores = {
        name: pipeline.open_store(path, f"--store {name}", config, tokenizer) for name, path in store_paths.items()
    }
    if tokenizer is None:
        pipeline.check_same_tokenizer(stores)
    byte_lengths, bpb_note = None, "no tokenizer directory (give --tokenizer): bits per byte not computed"
    if tokenizer_dir is not None:
        byte_lengths, bpb_note = token_byte_lengths(tokenizer_dir, config.model.vocab_size), None
    plans = {
        (name, recipe): loss_windows.make_plan(recipe, store, config.data.seq_len, options.stride)
        for name, store in stores.items()
        for recipe in options.recipes
    }

    # ============================================================================================
    # The losses: every (store, recipe), batch by batch, two batches in flight.
    # ============================================================================================
    scorer = RowScorer(
        [m.graphdef for m in members],
        [m.param_shardings for m in members],
        mesh,
        config,
        ensemble=options.ensemble or "mean_logits",
    )
    params = [m.params for m in members]
    batch_size = config.train.batch_size
    results = []
    for (name, recipe), plan in plans.items():
        store = stores[name]
        read = lambda b, plan=plan, store=store: plan.read_batch(store, b, batch_size)
        batches = (rows for _, rows in pipeline.prefetched(read, range(plan.num_batches(batch_size)), 2))
        with tqdm(
            total=plan.scored_tokens,
            unit="tok",
            unit_scale=True,
            desc=f"{name} {recipe}",
            disable=not (is_main and options.progress),
            file=sys.stderr,
            mininterval=1.0,
        ) as bar:
            sums = score_batches(
                scorer, params, batches, LossSums(config.data.seq_len, byte_lengths), progress=bar.update
            )
        results.append(
            {
                "store": name,
                "recipe": recipe,
                "seq_len": plan.seq_len,
                "stride": plan.stride,
                "windows": plan.num_windows,
                "rows": plan.num_rows,
                **sums.figures(),
            }
        )
    benchmarks = run_benchmarks(options, members, config, mesh, tokenizer_dir) if options.benchmarks else None

    # ============================================================================================
    # Output: the JSON record, the console summary, the run's metrics.
    # ============================================================================================
    value = report.record(
        config=config_lib.to_dict(config),
        models=[m.describe() for m in members],
        ensemble=options.ensemble,
        stores={name: store_identity(store) for name, store in stores.items()},
        results=results,
        bpb_note=bpb_note,
        devices={"count": len(devices), "kind": devices[0].device_kind, "mesh": dict(mesh.shape)},
        benchmarks=benchmarks,
    )
    path = output_path(options, members)
    if is_main:
        report.write(path, value)
        for line in report.summary_lines(value):
            log.info("%s", line)
        log.info("wrote %s", path)
        if options.run_metrics and len(members) == 1 and members[0].kind == "run":
            scalars = {k: v for r in results for k, v in report.metric_scalars(r).items()}
            scalars |= report.benchmark_scalars(benchmarks)
            written = report.append_to_run_metrics(members[0].path, members[0].step, scalars)
            log.info(
                "run metrics: %d figures appended at step %d (%d already logged with these values)",
                len(written),
                members[0].step,
                len(scalars) - len(written),
            )
    return value


# --------------------------------------------------------------------------------------------------
# The pieces, in the order used above
# --------------------------------------------------------------------------------------------------


def compute_dtype(options: Options) -> str | None:
    return (options.given().get("model") or {}).get("compute_dtype")


def evaluation_config(options: Options) -> config_lib.Config:
    """The first model's run config (a Llama directory: the defaults with its model), overrides applied;
    overrides of model.* other than MODEL_OVERRIDES are refused (the model is the checkpoint's)."""
    path, _ = models.parse_model_spec(options.models[0])
    run_config = checkpoint.find_run_config(path) if storage.exists(path) else None
    if run_config is not None:
        raw = config_lib.to_dict(checkpoint.read_run_config(run_config))
    elif isinstance(path, Path) and (path / hf.CONFIG_JSON).is_file():
        config_json = files.read_json(path / hf.CONFIG_JSON, error=hf.HFError)
        llama = hf.llama_model_config(config_json, path / hf.CONFIG_JSON)
        raw = config_lib.to_dict(config_lib.Config(model=llama))
        raw["data"]["seq_len"] = int(config_json.get("max_position_embeddings") or 2048)
    else:
        raise models.not_a_model(options.models[0], path)
    given = options.given()
    for key in given.get("model") or {}:
        if key not in MODEL_OVERRIDES:
            raise config_lib.ConfigError(
                f"model.{key}: the model is the checkpoint's; only model.{' and model.'.join(MODEL_OVERRIDES)} "
                "may be set for an evaluation"
            )
    raw = config_lib.apply_overrides(raw, list(options.overrides))
    raw["train"]["microbatches"] = 1
    raw["data"]["document_masking"] = True  # rows carry their windows as segments (loss_windows.py)
    return config_lib.from_dict(raw)


def fit_context(config: config_lib.Config, members: list[models.Member], options: Options, devices: int):
    """data.seq_len: as given (refused if longer than any member's context), else the shortest context;
    the first member's model (with the evaluation's backend) as config.model; the mesh checked for both."""
    given = options.given()
    shortest = min(m.context_length for m in members)
    seq_len = config.data.seq_len if "seq_len" in (given.get("data") or {}) else shortest
    for member in members:
        if seq_len > member.context_length:
            raise config_lib.ConfigError(
                f"data.seq_len: a window of {seq_len} tokens is longer than the context of --model {member.spec} "
                f"({member.context_length}: its run's data.seq_len or config.json max_position_embeddings)"
            )
    config = dataclasses.replace(
        config,
        model=members[0].model_config,
        data=dataclasses.replace(config.data, seq_len=seq_len),
    )
    sizes = config_lib.validate_for_devices(config, devices)
    for member in members:
        config_lib.validate_for_devices(dataclasses.replace(config, model=member.model_config), devices)
    attention.check_mesh(config.model.attention, seq_len, sizes)
    return config


def chosen_tokenizer(
    options: Options, members: list[models.Member], tokenizer: TokenizerInfo | None
) -> tuple[Path | None, TokenizerInfo | None]:
    """--tokenizer (which must be the members' if they name one), else the first member's that has one."""
    if options.tokenizer is None:
        found = next((m for m in members if m.tokenizer_dir is not None), None)
        return (found.tokenizer_dir if found else None), tokenizer
    given = TokenizerInfo.from_directory(options.tokenizer)
    if tokenizer is not None and given.hash != tokenizer.hash:
        raise models.ModelError(
            f"--tokenizer {options.tokenizer}: hash {given.hash} differs from the models' tokenizer ({tokenizer.hash})"
        )
    return Path(options.tokenizer), given


def run_benchmarks(
    options: Options, members: list[models.Member], config: config_lib.Config, mesh, tokenizer_dir: Path | None
) -> dict[str, Any]:
    """The multiple-choice benchmarks of --benchmarks with the evaluated model or ensemble, in windows of
    data.seq_len tokens (lm-eval's max_length); every process scores its share, all get the figures."""
    if tokenizer_dir is None:
        raise config_lib.ConfigError("--benchmarks: the requests are text: give --tokenizer DIR")
    directory = Path(options.benchmarks)
    tasks = options.tasks or tuple(t for t in benchmark_tasks.TASKS if (directory / t).is_dir())
    unknown = [t for t in tasks if t not in benchmark_tasks.TASKS]
    if not tasks or unknown:
        raise config_lib.ConfigError(
            f"--benchmarks {directory}: {'unknown tasks ' + str(unknown) if unknown else 'no task directory'}; "
            f"known tasks: {', '.join(benchmark_tasks.TASKS)}"
        )
    scorer = benchmark_scoring.ensemble_batch_scorer(
        [m.graphdef for m in members],
        [m.param_shardings for m in members],
        [m.params for m in members],
        config.model,
        mesh,
        ensemble=options.ensemble or "mean_logits",
    )
    try:
        return benchmark_scoring.run_benchmarks(
            scorer,
            hf.load_tokenizer(tokenizer_dir),
            directory,
            tasks,
            max_length=config.data.seq_len,
            mesh=mesh,
            num_fewshot=options.num_fewshot,
            batch_size=config.train.batch_size,
        )
    except FileNotFoundError as e:
        raise config_lib.ConfigError(f"--benchmarks: {e}") from None


def store_identity(store) -> dict[str, Any]:
    manifest = store.manifest
    return {
        "path": storage.display(store.path),
        "documents": store.num_documents,
        "tokens": store.num_tokens,
        "content_hash": manifest.get("content_hash"),
        "tokenizer": manifest.get("tokenizer"),
    }


def output_path(options: Options, members: list[models.Member]) -> storage.AnyPath:
    """RUN_DIR/eval/<run>_step_<n>.json; in a shared directory (--out, or ./eval/ for a Llama directory)
    the name also carries a hash of the model's absolute path, so that two models of the same directory
    name (runs/a/seed0 and runs/b/seed0) do not write the same file."""
    first = members[0]
    if options.out:
        directory = storage.location(options.out, "--out")
    else:
        directory = first.path / "eval" if first.kind == "run" else Path("eval")
    name = f"{first.path.name}_step_{first.step}" if first.kind == "run" else first.path.name
    if options.out or first.kind != "run":
        name += "_" + hashlib.sha256(storage.display(first.path).encode()).hexdigest()[:8]
    if len(members) > 1 or options.ensemble:
        name = f"ensemble_{options.ensemble}_{len(members)}_{name}"
    return directory / f"{name}.json"


if __name__ == "__main__":
    sys.exit(main())
