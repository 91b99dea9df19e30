"""Finding runs under a directory and reading what the report needs of each. No JAX import.

    found = discover(Path("runs"))                    # every directory holding a config.yaml, recursively
    runs = load_runs(found, objective=None, real_tokens={})
    runs.runs[0].row()                                # method, G, E, r, lr, wd, size, D, i.i.d. loss, ...

A run is a directory with a `config.yaml` (the resolved config that training writes); what it is comes
from that config (`config.experiment` and the rest), never from the directory's name. Its figures come
from its evaluation JSONs (`RUN_DIR/eval/*.json`, format "megadoc-evaluation") and, where those lack a
store, from the training log's final `eval/<store>/loss`. Ensemble evaluations (JSONs whose `ensemble`
is set) are collected apart. docs/study.md defines every figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from megadoc_jax import config as config_lib
from megadoc_jax import metrics_log, run_names, scaling
from megadoc_jax.config import Config, ModelConfig
from megadoc_jax.data import mixture
from megadoc_jax.data import store_format as fmt
from megadoc_jax.data.store import SegmentKind, StoreError, finished_manifest

CONFIG_FILE = "config.yaml"
EVAL_DIR = "eval"
# megadoc_jax.evaluation.report.FORMAT; that module imports JAX (a test checks that the two agree).
EVALUATION_FORMAT = "megadoc-evaluation"
OBJECTIVE_RECIPE = "concat"  # the paper's window recipe


class StudyError(ValueError):
    """Bad input to the report; the message names the run, file or option."""


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Discovered:
    path: Path
    config: Config


@dataclasses.dataclass(frozen=True)
class Discovery:
    runs: list[Discovered]
    broken: list[tuple[Path, str]]  # (config file, why it was not read): only with skip_broken


def discover(runs_dir: Path, *, skip_broken: bool = False) -> Discovery:
    """Every directory under `runs_dir` (itself included) that holds a config.yaml, sorted by path.

    Directories without one are walked through and otherwise ignored; a run's own subdirectories
    (checkpoints, eval, tensorboard) are not searched. A config.yaml that does not load is a StudyError
    naming the file, or with skip_broken a (file, reason) entry of `broken`."""
    if not runs_dir.is_dir():
        raise StudyError(f"{runs_dir}: not a directory")
    runs, broken = [], []
    for here, subdirs, names in os.walk(runs_dir):
        subdirs.sort()
        if CONFIG_FILE not in names:
            continue
        subdirs.clear()  # runs do not nest
        path = Path(here) / CONFIG_FILE
        try:
            runs.append(Discovered(Path(here), read_config(path)))
        except config_lib.ConfigError as e:
            if not skip_broken:
                raise StudyError(f"{path}: not a readable run config: {e}") from None
            broken.append((path, str(e)))
    return Discovery(sorted(runs, key=lambda r: str(r.path)), broken)


def read_config(path: Path) -> Config:
    """A run's resolved config.yaml (what training writes: no `base:`), validated by config.from_dict; a
    file that has bases goes through config.load. ConfigError naming the file."""
    raw = config_lib.read_yaml_mapping(path)
    if not raw:
        raise config_lib.ConfigError(f"config file {path} is empty, not a resolved config")
    if config_lib.BASE_KEY in raw:
        return config_lib.load(path)
    try:
        return config_lib.from_dict(raw)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"config file {path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Evaluation JSONs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    path: Path
    step: int | None  # the first model's checkpoint step
    created_at: str
    ensemble: dict[str, Any] | None  # {"mode", "members"} or None
    model_paths: list[str]
    results: dict[tuple[str, str], dict[str, Any]]  # (store, recipe) -> result
    benchmarks: dict[str, Any] | None

    @property
    def order(self) -> tuple[int, str]:
        """Newest last: by checkpoint step, then by creation time."""
        return (-1 if self.step is None else self.step, self.created_at)


def read_evaluation(path: Path) -> Evaluation | None:
    """The evaluation in `path`, or None for a JSON file of another format. StudyError naming the file for
    an unreadable file or a megadoc-evaluation record without the fields the report reads."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict) or value.get("format") != EVALUATION_FORMAT:
        return None
    try:
        models = value["models"]
        results = {(r["store"], r["recipe"]): r for r in value["results"]}
        for r in results.values():
            float(r["loss"])
        return Evaluation(
            path=path,
            step=models[0]["step"] if models else None,
            created_at=str(value.get("created_at", "")),
            ensemble=value["ensemble"],
            model_paths=[str(m.get("path", "")) for m in models],
            results=results,
            benchmarks=value.get("benchmarks"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StudyError(f"{path}: a {EVALUATION_FORMAT} record without a readable field ({e!r})") from None


def read_evaluations(run_dir: Path) -> list[Evaluation]:
    """The run's evaluation JSONs (RUN_DIR/eval/*.json), oldest first; files of other formats are skipped."""
    directory = run_dir / EVAL_DIR
    if not directory.is_dir():
        return []
    found = [read_evaluation(p) for p in sorted(directory.glob("*.json"))]
    return sorted((e for e in found if e is not None), key=lambda e: e.order)


# --------------------------------------------------------------------------------------------------
# What the config implies: parameters, streams, run length
# --------------------------------------------------------------------------------------------------


def parameter_count(model: ModelConfig) -> int:
    """Parameters of the decoder (embeddings, both norms per layer, final norm, untied unembedding)."""
    d, q_width, kv_width = model.hidden, model.heads * model.head_size, model.kv_heads * model.head_size
    per_layer = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * model.mlp + 2 * d
    return 2 * model.vocab_size * d + model.layers * per_layer + d


class StoreSizes:
    """Token counts of stores, from their manifests (read once per path) or given by the user."""

    def __init__(self, given: Mapping[str, int]):
        self.given = dict(given)
        self._manifests: dict[str, dict[str, Any] | None] = {}
        self._originals: dict[str, int | None] = {}

    def manifest(self, path: str) -> dict[str, Any] | None:
        if path not in self._manifests:
            try:
                self._manifests[path] = finished_manifest(path)
            except StoreError:
                self._manifests[path] = None
        return self._manifests[path]

    def tokens(self, path: str) -> tuple[int, str] | None:
        """(tokens, where the number comes from: "manifest" or "--real-tokens") or None if unknown."""
        if path in self.given:
            return self.given[path], "--real-tokens"
        manifest = self.manifest(path)
        return (int(manifest["num_tokens"]), "manifest") if manifest else None

    def original_tokens(self, path: str) -> int | None:
        """Tokens of the store's `original` segments (the copy of each real document a synthetic stream
        carries), from its segment runs; None if the store is not reachable."""
        if path not in self._originals:
            self._originals[path] = None
            if self.manifest(path) is not None:
                context = ts.Context()
                kind_R = fmt.open_array_for_read(Path(path), "segments/kind", context).read().result()
                length_R = fmt.open_array_for_read(Path(path), "segments/length", context).read().result()
                self._originals[path] = int(np.sum(length_R[kind_R == SegmentKind.ORIGINAL], dtype=np.int64))
        return self._originals[path]


@dataclasses.dataclass(frozen=True)
class Accounting:
    """The run's length and the real data it saw, as the data pipeline plans them (data/mixture.py)."""

    total_steps: int
    training_tokens: int  # steps x batch x seq_len: token positions trained on (the compute axis)
    real_epochs: float  # passes over the real stream
    synthetic_passes: float | None  # passes over the synthetic stream; None without one or its size
    real_tokens_seen: float | None  # scaling.real_tokens_seen: real epochs x D + passes x synthetic originals
    exact: bool  # False for 'document' windows, whose window counts need the packing plan (tokens/seq_len used)


def stream_windows(tokens: int, seq_len: int) -> int:
    """Windows of a stream in one epoch: exact for 'concat' windows (data/windows.ConcatWindows)."""
    return max(tokens - 1, 0) // seq_len


def accounting(
    config: Config, real_tokens: int, synthetic_tokens: int | None, synthetic_originals: int | None
) -> Accounting:
    """The plan's figures (data/mixture.py: T = ceil(S_epoch x E / w_real) unless train.steps, each stream's
    examples exactly as the block mixture assigns them); synthetic_* are the synthetic store's tokens and
    original-segment tokens (None: unknown)."""
    d, t = config.data, config.train
    names = [s.name for s in d.streams]
    real_index = names.index(d.real_stream)
    real_windows = max(stream_windows(real_tokens, d.seq_len), 1)
    steps = t.steps or mixture.steps_for_epochs(real_windows, t.batch_size, d.real_epochs, d.streams[real_index].weight)
    examples = mixture.BlockMixture([s.weight for s in d.streams], d.seed).examples_per_stream(steps * t.batch_size)
    real_epochs = float(examples[real_index]) / real_windows
    synthetic_passes, seen = None, None
    if config.experiment.synthetic_stream not in names:
        seen = scaling.real_tokens_seen(real_tokens, real_epochs, 0, 0)
    elif synthetic_tokens:
        k = names.index(config.experiment.synthetic_stream)
        synthetic_passes = float(examples[k]) / max(stream_windows(synthetic_tokens, d.seq_len), 1)
        if synthetic_originals is not None:
            seen = scaling.real_tokens_seen(real_tokens, real_epochs, synthetic_originals, synthetic_passes)
    return Accounting(
        total_steps=steps,
        training_tokens=steps * t.batch_size * d.seq_len,
        real_epochs=real_epochs,
        synthetic_passes=synthetic_passes,
        real_tokens_seen=seen,
        exact=d.windows == "concat",
    )


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss:
    loss: float
    source: str  # "evaluation" or "training"
    step: int | None
    file: str | None  # the evaluation JSON, or metrics.jsonl
    bpb: float | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    relative: str  # the path under RUNS_DIR, for tables
    config: Config
    objective_store: str
    losses: dict[str, Loss]  # store -> concat-recipe loss
    evaluation: Evaluation | None  # the newest single-model evaluation with the objective store
    benchmarks: dict[str, Any] | None  # the newest evaluation's benchmarks
    real_tokens: int  # D: unique tokens of the real store
    real_tokens_source: str
    accounting: Accounting
    notes: tuple[str, ...]

    @property
    def method(self) -> str:
        return self.config.experiment.method

    @property
    def generations(self) -> int:
        return self.config.experiment.generations

    @property
    def size(self) -> str:
        m = self.config.model
        return f"d{m.hidden}l{m.layers}" if m.size == config_lib.CUSTOM_SIZE else m.size

    @property
    def synthetic_weight(self) -> float | None:
        weights = {s.name: s.weight for s in self.config.data.streams}
        return weights.get(self.config.experiment.synthetic_stream)

    @property
    def objective(self) -> Loss | None:
        return self.losses.get(self.objective_store)

    @property
    def configuration(self) -> tuple[str, int, str, int]:
        """What the sweep does not tune: (method, G, model size, D). The best run of each is the paper's point."""
        return (self.method, self.generations, self.size, self.real_tokens)

    def result(self, store: str) -> dict[str, Any] | None:
        """The newest evaluation's concat result on `store` (by_position, by_segment), if any."""
        return self.evaluation.results.get((store, OBJECTIVE_RECIPE)) if self.evaluation else None

    def row(self) -> dict[str, Any]:
        """The run as the JSON report lists it."""
        c, objective = self.config, self.objective
        average = (self.benchmarks or {}).get("paper_average")
        return {
            "path": self.relative,
            "run_name": run_names.run_name(c),
            "experiment": c.experiment.name,
            "data": c.experiment.data,
            "method": self.method,
            "generations": self.generations,
            "size": self.size,
            "parameters": parameter_count(c.model),
            "real_epochs": c.data.real_epochs,
            "synthetic_weight": self.synthetic_weight,
            "lr": c.optim.lr,
            "weight_decay": c.optim.weight_decay,
            "seed": c.train.seed,
            "real_store": real_store(c),
            "real_tokens": self.real_tokens,
            "real_tokens_source": self.real_tokens_source,
            "total_steps": self.accounting.total_steps,
            "training_tokens": self.accounting.training_tokens,
            "real_epochs_planned": self.accounting.real_epochs,
            "synthetic_passes": self.accounting.synthetic_passes,
            "real_tokens_seen": self.accounting.real_tokens_seen,
            "accounting_exact": self.accounting.exact,
            "objective_store": self.objective_store,
            "loss": objective.loss if objective else None,
            "loss_source": dataclasses.asdict(objective) if objective else None,
            "losses": {store: loss.loss for store, loss in sorted(self.losses.items())},
            "paper_average": average["acc"] if average else None,
            "paper_average_stderr": average["acc_stderr"] if average else None,
            "benchmarks": {t: r["metrics"] for t, r in (self.benchmarks or {}).get("tasks", {}).items()},
            "notes": list(self.notes),
        }


def real_store(config: Config) -> str:
    streams = {s.name: s.store for s in config.data.streams}
    return streams.get(config.data.real_stream, "")


def training_losses(run_dir: Path) -> dict[str, tuple[int, float]]:
    """store -> (step, loss) of the last `eval/<store>/loss` record at the log's final step."""
    path = run_dir / metrics_log.JSONL_NAME
    if not path.is_file():
        return {}
    records = metrics_log.read_metrics(path).records
    if not records:
        return {}
    final = max(r["step"] for r in records)
    found: dict[str, tuple[int, float]] = {}
    for record in records:
        if record["step"] != final:
            continue
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "loss" and parts[1] != "benchmarks":
                found[parts[1]] = (final, float(value))
    return found


def load_run(
    found: Discovered, runs_dir: Path, sizes: StoreSizes, objective: str | None, evaluations: list[Evaluation]
) -> Run:
    """The run's figures; StudyError naming the run for a real store whose size is unknown."""
    config, notes = found.config, []
    objective_store = objective or next(iter(config.data.eval_stores), "")
    store = real_store(config)
    if not store:
        raise StudyError(f"{found.path}: the config has no real stream {config.data.real_stream!r} (data.streams)")
    real = sizes.tokens(store)
    if real is None:
        raise StudyError(
            f"{found.path}: its real store {store} (data.streams, stream {config.data.real_stream!r}) is not a "
            f"finished token store reachable from here; give its size with --real-tokens {store}=TOKENS"
        )
    synthetic = next((s.store for s in config.data.streams if s.name == config.experiment.synthetic_stream), None)
    synthetic_tokens = sizes.tokens(synthetic) if synthetic else None
    if synthetic and synthetic_tokens is None:
        notes.append(f"synthetic store {synthetic} not reachable: synthetic passes unknown")
    plan = accounting(
        config,
        real[0],
        synthetic_tokens[0] if synthetic_tokens else None,
        sizes.original_tokens(synthetic) if synthetic_tokens and synthetic not in sizes.given else None,
    )

    singles = [e for e in evaluations if e.ensemble is None]
    losses: dict[str, Loss] = {}
    for evaluation in singles:  # oldest first: newer evaluations replace older ones
        for (store_name, recipe), result in evaluation.results.items():
            if recipe == OBJECTIVE_RECIPE and math.isfinite(result["loss"]):
                losses[store_name] = Loss(
                    result["loss"], "evaluation", evaluation.step, evaluation.path.name, result.get("bpb")
                )
    for store_name, (step, loss) in training_losses(found.path).items():
        if store_name not in losses:
            losses[store_name] = Loss(loss, "training", step, metrics_log.JSONL_NAME)
        elif (losses[store_name].step or 0) < step and store_name == objective_store:
            notes.append(f"evaluation at step {losses[store_name].step} is older than the training log's step {step}")
    with_objective = [e for e in singles if (objective_store, OBJECTIVE_RECIPE) in e.results]
    with_benchmarks = [e for e in singles if e.benchmarks]
    return Run(
        path=found.path,
        relative=str(found.path.relative_to(runs_dir)) if found.path != runs_dir else ".",
        config=config,
        objective_store=objective_store,
        losses=losses,
        evaluation=with_objective[-1] if with_objective else None,
        benchmarks=with_benchmarks[-1].benchmarks if with_benchmarks else None,
        real_tokens=scaling.unique_real_tokens(real[0]),
        real_tokens_source=real[1],
        accounting=plan,
        notes=tuple(notes),
    )


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """One ensemble evaluation, with the run of its first member."""

    path: Path
    members: int
    mode: str
    first_member: Run
    loss: float  # on the first member's objective store, concat recipe


@dataclasses.dataclass(frozen=True)
class Runs:
    runs: list[Run]  # runs with experiment.method
    unstated: list[Run]  # runs without experiment.method: listed apart
    ensembles: list[Ensemble]
    broken: list[tuple[Path, str]]


def load_runs(discovery: Discovery, runs_dir: Path, *, objective: str | None, real_tokens: Mapping[str, int]) -> Runs:
    sizes = StoreSizes(real_tokens)
    loaded, pending_ensembles = [], []
    for found in discovery.runs:
        evaluations = read_evaluations(found.path)
        run = load_run(found, runs_dir, sizes, objective, evaluations)
        loaded.append(run)
        pending_ensembles += [(e, run) for e in evaluations if e.ensemble is not None]
    ensembles = []
    for evaluation, run in pending_ensembles:
        result = evaluation.results.get((run.objective_store, OBJECTIVE_RECIPE))
        if result is not None and math.isfinite(result["loss"]):
            members = int(evaluation.ensemble["members"])
            ensembles.append(Ensemble(evaluation.path, members, str(evaluation.ensemble["mode"]), run, result["loss"]))
    return Runs(
        runs=[r for r in loaded if r.method],
        unstated=[r for r in loaded if not r.method],
        ensembles=ensembles,
        broken=discovery.broken,
    )
