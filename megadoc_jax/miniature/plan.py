"""The miniature's stages: every command of the study in order, and the files they share. No JAX import.

    plan = Plan(Settings(work_dir=Path("runs/miniature")))
    plan.stages()   # [Stage("data", ...), Stage("subsets", ...), Stage("generator", ...), ...]

The work directory (everything the miniature makes, nothing outside it):

    demo/                         the real data: `python -m generation demo-data --out` (corpus, tokenizer,
                                  train and held-out stores)
    data/real-1of8.jsonl, ...     nested subsets of the train split and their stores (the baselines' D)
    generator/                    the generator run, trained on the whole train split, then prepared
    generations/, merged/         the generator's rephrases (G_max per document), checked and merged
    streams/<method>-G<G>/        the megadoc stores
    configs/<run>.yaml            one config per run (extends configs/miniature/*.yaml), sweep.yaml
    runs/<run>/, runs/sweep/      the training runs (the report's RUNS_DIR); the sweep's runs under sweep/
    report/                       `python -m megadoc_jax.evaluate report` of runs/
    stages/<stage>.json, logs/    a done marker per finished stage; each stage's output

Every path written into a config is absolute, so a run's config.yaml names its stores from anywhere.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from megadoc_jax import config as config_lib
from megadoc_jax import files

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "miniature"
BENCHMARKS = REPO / "tests" / "data" / "benchmarks"  # the small item files the tests and the demo use
BENCHMARK_TASKS = ("arc_easy", "piqa", "sciq")  # the paper's three-task average
METHODS = ("simple", "stitched-back")
SWEEP_DIR = "sweep"  # runs/sweep: the sweep's directory inside RUNS_DIR
Command = list[str]


@dataclasses.dataclass(frozen=True)
class Settings:
    work_dir: Path
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # the baselines' D, as fractions of the train split
    generations: tuple[int, ...] = (2, 4)  # G of every megadoc stream
    methods: tuple[str, ...] = METHODS
    sweep_r: tuple[float, ...] = (0.25, 0.5, 0.75)  # r grid of the sweep (method methods[-1], G the smallest)
    r: float = 0.5  # the synthetic stream's weight in the runs that are not swept; the sweep's centre
    # The baselines' real epochs: study.yaml's 2 real epochs at weight 1 - r = 0.5 make the megadoc runs
    # 4 x S_epoch steps long, so 4 epochs give the full-data baseline the same compute (docs/miniature.md).
    baseline_epochs: float = 4.0
    max_new_tokens: int = 64  # per rephrase
    jobs: int = 2  # stages (processes) at once
    benchmarks: Path | None = BENCHMARKS if BENCHMARKS.is_dir() else None
    overrides: tuple[str, ...] = ()  # key=value for every training run (the tests' small profile)
    python: str = sys.executable

    def __post_init__(self) -> None:
        checks = [
            (len(self.fractions) >= 3, "fractions: a data law has 3 parameters and needs 3 or more data sizes"),
            (all(0 < f <= 1 for f in self.fractions), "fractions: each must be in (0, 1]"),
            (len(set(self.fractions)) == len(self.fractions), "fractions: must be distinct"),
            (len(self.generations) >= 1 and all(g >= 1 for g in self.generations), "generations: 1 or more, each >= 1"),
            (all(m in METHODS for m in self.methods) and self.methods, f"methods: a non-empty subset of {METHODS}"),
            (self.r in self.sweep_r and all(0 < r < 1 for r in self.sweep_r), "sweep_r: values in (0, 1) holding r"),
            (self.jobs >= 1, "jobs: must be >= 1"),
            (self.baseline_epochs > 0, "baseline_epochs: must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"miniature settings: {message}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named step: an optional in-process action (writing small files), then commands, in order.

    `commands` may be a function, called when the stage starts: the evaluation of the sweep's runs can
    only be listed once the sweep has finished. `slots` is how many CPU-bound processes it runs at once.
    `fingerprint`, when given, digests what the commands read besides their arguments (a run's resolved
    config): the done marker records it, and a rerun with another one is refused (runner.py)."""

    name: str
    commands: Sequence[Command] | Callable[[], Sequence[Command]] = ()
    after: tuple[str, ...] = ()
    action: Callable[[], None] | None = None
    slots: int = 1
    fingerprint: Callable[[], str] | None = None

    def command_list(self) -> list[Command]:
        return list(self.commands() if callable(self.commands) else self.commands)


def fraction_label(fraction: float) -> str:
    """0.125 -> '1of8', 1.0 -> '1of1': a name part for a share of the train split."""
    f = fractions.Fraction(fraction).limit_denominator(1000)
    return f"{f.numerator}of{f.denominator}"


def nested_subsets(documents: list[dict], shares: Sequence[float]) -> dict[float, list[dict]]:
    """For each share, the first round(share x N) documents of one fixed order (by a hash of the id), so
    every smaller set is part of every larger one and the sets mix the corpus's kinds of documents."""
    order = sorted(documents, key=lambda d: hashlib.sha256(str(d["id"]).encode()).hexdigest())
    return {share: order[: max(1, round(share * len(order)))] for share in shares}


class Plan:
    def __init__(self, settings: Settings):
        self.s = settings
        self.work = settings.work_dir.absolute()
        self.demo = self.work / "demo"
        self.runs = self.work / "runs"

    # -- paths ------------------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def _write(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes_atomic(path, text.encode())

    @property
    def tokenizer(self) -> Path:
        return self.demo / "tokenizer"

    def real_store(self, fraction: float) -> Path:
        return self.demo / "train" if fraction == 1 else self.path("data", f"real-{fraction_label(fraction)}")

    def stream_store(self, method: str, generations: int) -> Path:
        return self.path("streams", f"{method}-G{generations}")  # generation/megadoc_export.py's stream_name

    @property
    def swept(self) -> tuple[str, int]:
        """The configuration the sweep tunes: the last method at the smallest G."""
        return self.s.methods[-1], min(self.s.generations)

    def run_names(self) -> list[str]:
        """The runs outside the sweep, in the order they are started."""
        names = [f"real-{fraction_label(f)}" for f in sorted(self.s.fractions)]
        names += [f"{m}-g{g}" for g in sorted(self.s.generations) for m in self.s.methods if (m, g) != self.swept]
        return names

    # -- config files -----------------------------------------------------------------------------

    @staticmethod
    def _config_text(base: Path, values: dict) -> str:
        text = f"# written by python -m megadoc_jax.miniature (docs/miniature.md)\nbase: {base}\n"
        return text + yaml.safe_dump(values, sort_keys=False)

    def _data(self, streams: list[dict]) -> dict:
        return {
            "tokenizer": str(self.tokenizer),
            "streams": streams,
            "eval_stores": {"heldout": str(self.demo / "heldout")},
        }

    def write_configs(self) -> None:
        """Every run's config file and the sweep file into WORK/configs/: small and deterministic, written
        on every invocation once the done markers are known to match them (__main__.py)."""
        for name, text in self.config_files().items():
            self._write(self.path("configs", name), text)

    def config_files(self) -> dict[str, str]:
        """{file name: text} of every run's config and of the sweep file, as write_configs writes them."""
        out: dict[str, str] = {}
        real = {"name": "real", "store": str(self.real_store(1.0)), "weight": 1.0}
        out["generator.yaml"] = self._config_text(CONFIGS / "generator.yaml", {"data": self._data([real])})
        for f in self.s.fractions:
            store = {"name": "real", "store": str(self.real_store(f)), "weight": 1.0}
            data = self._data([store]) | {"real_epochs": self.s.baseline_epochs}
            out[f"real-{fraction_label(f)}.yaml"] = self._config_text(
                CONFIGS / "study.yaml", {"data": data, "experiment": {"method": "real", "name": "baseline"}}
            )
        for m in self.s.methods:
            for g in self.s.generations:
                streams = [
                    {**real, "weight": 1 - self.s.r},
                    {"name": "synthetic", "store": str(self.stream_store(m, g)), "weight": self.s.r},
                ]
                experiment = {"method": m, "generations": g, "name": f"{m}-g{g}"}
                out[f"{m}-g{g}.yaml"] = self._config_text(
                    CONFIGS / "study.yaml", {"data": self._data(streams), "experiment": experiment}
                )
        method, g = self.swept
        sweep = {
            "config": f"{method}-g{g}.yaml",  # relative to the sweep file
            "sweep_dir": str(self.runs / SWEEP_DIR),
            "objective": "eval/heldout/loss",
            "centre": {"r": self.s.r},
            "grids": {"r": list(self.s.sweep_r)},
            "overrides": list(self.s.overrides),
            "max_attempts": 2,
            "lease_seconds": 300,
        }
        out["sweep.yaml"] = yaml.safe_dump(sweep, sort_keys=False)
        return out

    def write_subsets(self) -> None:
        """The baselines' JSONL inputs: nested subsets of the demo's train split (not the whole split)."""
        documents = [json.loads(line) for line in (self.demo / "train.jsonl").read_text().splitlines() if line]
        for share, subset in nested_subsets(documents, [f for f in self.s.fractions if f < 1]).items():
            text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in subset)
            self._write(self.path("data", f"real-{fraction_label(share)}.jsonl"), text)

    # -- commands ---------------------------------------------------------------------------------

    def _module(self, module: str, *args: object) -> Command:
        return [self.s.python, "-m", module, *map(str, args)]

    def train(self, name: str, run_dir: Path, extra: Sequence[str] = ()) -> Command:
        config = self.path("configs", f"{name}.yaml")
        return self._module("megadoc_jax.train", "--config", config, *extra, f"train.run_dir={run_dir}")

    def evaluate(self, run_dirs: Sequence[Path]) -> Command:
        models = [arg for run in run_dirs for arg in ("--model", run)]
        stores = ["--store", f"heldout={self.demo / 'heldout'}"]
        method, g = max(self.s.methods), max(self.s.generations)  # a store with every segment kind
        stores += ["--store", f"{method}-g{g}={self.stream_store(method, g)}"]
        benchmarks = []
        if self.s.benchmarks is not None:
            benchmarks = ["--benchmarks", self.s.benchmarks, "--tasks", ",".join(BENCHMARK_TASKS)]
        return self._module("megadoc_jax.evaluate", *models, *stores, *benchmarks, "--no-progress")

    def config_digest(self, name: str) -> str:
        """sha256 of run config <name>.yaml resolved (bases, the miniature's overrides), from the text
        write_configs would write (its base is an absolute path), so nothing in WORK is read or written."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"{name}.yaml"
            path.write_text(self.config_files()[path.name])
            resolved = config_lib.load(path, list(self.s.overrides))
        return hashlib.sha256(json.dumps(config_lib.to_dict(resolved), sort_keys=True).encode()).hexdigest()

    def sweep_digest(self) -> str:
        """sha256 of the sweep file and of the resolved config it sweeps."""
        method, g = self.swept
        text = self.config_files()["sweep.yaml"] + self.config_digest(f"{method}-g{g}")
        return hashlib.sha256(text.encode()).hexdigest()

    def generator_context(self) -> int:
        return int(yaml.safe_load((CONFIGS / "generator.yaml").read_text())["data"]["seq_len"])

    def sweep_run_dirs(self) -> list[Path]:
        return sorted(p.parent for p in (self.runs / SWEEP_DIR / "runs").glob("*/config.yaml"))

    def stages(self) -> list[Stage]:
        s = self.s
        generator_dir = self.path("generator")
        real_fractions = [f for f in s.fractions if f < 1]
        stages = [
            Stage("data", [self._module("generation", "demo-data", "--out", self.demo)]),
            Stage(
                "subsets",
                [
                    self._module(
                        "generation",
                        "export",
                        "--input",
                        self.path("data", f"real-{fraction_label(f)}.jsonl"),
                        "--tokenizer",
                        self.tokenizer,
                        "--out",
                        self.real_store(f),
                        "--workers",
                        0,
                        "--no-progress",
                    )
                    for f in real_fractions
                ],
                after=("data",),
                action=self.write_subsets,
            ),
            Stage(
                "generator",
                [
                    self.train("generator", generator_dir, s.overrides),
                    self._module("megadoc_jax.hf", "prepare", generator_dir),
                ],
                after=("data",),
                fingerprint=lambda: self.config_digest("generator"),
            ),
            Stage(
                "generate",
                [
                    self._module(
                        "generation",
                        "generate",
                        "--backend",
                        "jax",
                        "--model",
                        generator_dir,
                        "--input",
                        self.demo / "train.jsonl",
                        "--output",
                        self.path("generations"),
                        "--samples",
                        max(s.generations),
                        "--max-new-tokens",
                        s.max_new_tokens,
                        "--overlong",
                        "cut",
                        "--chat-template",
                        CONFIGS / "chat_template.jinja",
                        "--no-progress",
                        *("--backend-option", "devices=1", "--backend-option", "batch_size=32"),
                        # one prompt width: every prompt is cut to fit beside the new tokens (one compile)
                        *("--backend-option", f"prompt_bucket={self.generator_context() - s.max_new_tokens}"),
                    ),
                    self._module("generation", "merge", self.path("generations"), "--merged", self.path("merged")),
                ],
                after=("generator",),
            ),
            Stage(
                "megadocs",
                [
                    self._module(
                        "generation",
                        "megadocs",
                        "--sources",
                        self.demo / "train.jsonl",
                        "--generations",
                        self.path("merged"),
                        "--tokenizer",
                        self.tokenizer,
                        "--out",
                        self.path("streams"),
                        "--methods",
                        ",".join(s.methods),
                        "--G",
                        ",".join(map(str, s.generations)),
                        "--workers",
                        0,
                        "--no-progress",
                    )
                ],
                after=("generate",),
            ),
        ]
        # The sweep first among the megadoc runs: it is the longest stage (its rounds run one after another).
        sweep_workers = min(s.jobs, len(s.sweep_r))
        sweep = self._module("megadoc_jax.sweep", "run", self.path("configs", "sweep.yaml"), "--workers", sweep_workers)
        stages.append(Stage("sweep", [sweep], after=("megadocs",), slots=sweep_workers, fingerprint=self.sweep_digest))
        for name in self.run_names():
            after = ("subsets",) if name.startswith("real-") else ("megadocs",)
            command = self.train(name, self.runs / name, s.overrides)
            digest = functools.partial(self.config_digest, name)
            stages.append(Stage(f"train {name}", [command], after=after, fingerprint=digest))
        baselines = [n for n in self.run_names() if n.startswith("real-")]
        others = [n for n in self.run_names() if not n.startswith("real-")]
        stages.append(
            Stage(
                "evaluate baselines",
                [self.evaluate([self.runs / n for n in baselines])],
                after=tuple(f"train {n}" for n in baselines) + ("megadocs",),  # the megadoc store is scored too
            )
        )
        if others:
            stages.append(
                Stage(
                    "evaluate megadocs",
                    [self.evaluate([self.runs / n for n in others])],
                    after=tuple(f"train {n}" for n in others),
                )
            )
        stages.append(Stage("evaluate sweep", lambda: [self.evaluate(self.sweep_run_dirs())], after=("sweep",)))
        report = self._module("megadoc_jax.evaluate", "report", self.runs, "--out", self.path("report"))
        stages.append(
            Stage("report", [report], after=tuple(st.name for st in stages if st.name.startswith("evaluate")))
        )
        return stages
