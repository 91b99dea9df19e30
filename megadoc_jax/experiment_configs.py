"""The paper's experiments as a table, and the config files under configs/experiments/ written from it.

    from megadoc_jax import experiment_configs as ec
    ec.EXPERIMENTS                     # one Experiment per config file: method, G, E, r, lr, wd, provenance
    ec.render(ec.EXPERIMENTS[0])       # the text of its file: a header (how to run it, what the paper
                                       # reports) and a few lines over shared bases
    ec.write_all("configs")            # (re)writes configs/experiments/**.yaml (`... experiments write`)

The files are committed; tests/test_experiments.py checks that they equal what this module renders, so edit
the table here and rewrite them, never the files by hand. Each file composes (config `base:`) the paper's
recipe (configs/recipe/paper.yaml, or 300m_32k.yaml / 300m_64k.yaml for long context), a model size
(configs/model/), the data (configs/data/dclm.yaml: the data root's layout) and a hardware target
(configs/hardware/tpu-v4-16.yaml), and states its own streams, epochs, lr, weight decay and run directory.

Hyper-parameters come from ../shared/paper-notes.md; a value it does not state is marked "(inferred: ...)"
in the file's header and in docs/experiments.md. No JAX import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megadoc_jax import config as config_lib
from megadoc_jax import files
from megadoc_jax.run_names import number, run_name

EXPERIMENTS_DIR = "experiments"  # under configs/
GENERATIONS = (2, 4, 8, 16, 32)  # the paper's G grid
SYNTHETIC_METHODS = ("simple", "stitched-back", "stitched-front", "stitched-nodoc", "stretched")
MAIN_SIZE = "300m"  # the paper's main model: the synthetic-data runs

# The data root's layout (relative to the directory the commands run from; configs/data/dclm.yaml's header).
TOKENIZER = "data/llama3-tokenizer"
SOURCES = "data/dclm/train.jsonl"
REAL_STORE = "data/dclm/real"
GENERATOR = "data/models/Llama-3.1-8B-Instruct"
GENERATIONS_DIR = "data/dclm/generations"
MEGADOCS_DIR = "data/dclm/megadocs"
EVAL_STORES = {
    "iid": "data/dclm/heldout/iid",
    "short": "data/dclm/heldout/short",
    "long": "data/dclm/heldout/long",
    "arxiv": "data/ood/arxiv",
    "wikipedia": "data/ood/wikipedia",
    "github": "data/ood/github",
}
BENCHMARKS = "data/benchmarks"
ENSEMBLE_MEMBERS = 8  # seeds 0..7; evaluated as ensembles of the first K


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One config file: what it trains, where its values come from and what the paper reports for it."""

    path: str  # under configs/experiments/
    name: str  # experiment.name
    title: str  # the header's first line
    size: str
    method: str  # config.EXPERIMENT_METHODS
    generations: int  # G; 0 for "real"
    epochs: float  # real epochs E
    r: float | None  # the synthetic stream's weight; None: real data only
    lr: float
    wd: float
    provenance: str  # where (E, r, lr, wd) come from
    reports: str  # what the paper reports (only paper-notes.md's figures)
    recipe: str = "recipe/paper.yaml"  # under configs/: the recipe (context length, attention, batch)
    seq_len: int = 4096  # the recipe's (a test checks it against the composed config)
    seed: int = 0
    ensemble: bool = False

    @property
    def inferred(self) -> bool:
        """Whether any of its values is not stated by paper-notes.md."""
        return "inferred" in self.provenance

    @property
    def store(self) -> str:
        """The synthetic stream's token store (what `python -m generation megadocs` writes)."""
        return f"{MEGADOCS_DIR}/{self.method}-G{self.generations}"

    @property
    def run_name(self) -> str:
        """run_names.run_name of the file's composed config (a test checks that they agree)."""
        raw = {
            "model": {"size": self.size},
            "data": {"seq_len": self.seq_len, "real_epochs": self.epochs, "streams": self.streams()},
            "optim": {"lr": self.lr, "weight_decay": self.wd},
            "train": {"seed": self.seed},
            "experiment": {"data": "dclm", "method": self.method, "generations": self.generations},
        }
        return run_name(config_lib.from_dict(raw))

    def streams(self) -> list[dict]:
        if self.r is None:
            return [{"name": "real", "store": REAL_STORE, "weight": 1.0}]
        return [
            {"name": "real", "store": REAL_STORE, "weight": round(1 - self.r, 6)},
            {"name": "synthetic", "store": self.store, "weight": self.r},
        ]


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

# paper-notes.md, "Real-data-only regularized baselines (epochs, lr, wd)".
BASELINES = {"150m": (16, 3e-3, 0.8), "300m": (16, 3e-3, 1.6), "600m": (8, 1e-3, 3.2), "1.5b": (8, 1e-3, 3.2)}

# paper-notes.md, "Tuned centres (E, r, lr, wd)": stated for these three (stitched = stitched-back, the
# paper's stitching; front and nodoc are its ablations).
STATED_CENTRES = {
    ("simple", 32): (16, 0.75, 3e-3, 0.4),
    ("stitched-back", 32): (32, 0.9, 1e-3, 0.4),
    ("stretched", 32): (32, 0.9, 1e-3, 0.4),
}
# "most others E 4-16, r .75, lr 3e-3, wd .4-.8": E grows and wd falls with G (more synthetic data per
# real document needs more passes and less regularisation), within the stated ranges.
TYPICAL_BY_G = {2: (4, 0.75, 3e-3, 0.8), 4: (8, 0.75, 3e-3, 0.8), 8: (8, 0.75, 3e-3, 0.4), 16: (16, 0.75, 3e-3, 0.4)}
TYPICAL_RULE = (
    "paper-notes.md gives 'most others E 4-16, r .75, lr 3e-3, wd .4-.8'; E and wd by G here: "
    "G 2: (4, .8), 4: (8, .8), 8: (8, .4), 16: (16, .4)"
)

EFFICIENCY_SIMPLE = "simple rephrasing's data efficiency plateaus near 1.48x at G = 32"
EFFICIENCY_MEGADOCS = "megadocs (stitching, stretching): 1.80x data efficiency at G = 32"


def _centre(method: str, g: int) -> tuple[tuple[float, float, float, float], str]:
    if (method, g) in STATED_CENTRES:
        return STATED_CENTRES[method, g], "stated by the paper (paper-notes.md, tuned centres)"
    if g == 32 and method in ("stitched-front", "stitched-nodoc"):
        return STATED_CENTRES["stitched-back", 32], "(inferred: stitched-back's stated G = 32 centre, for its ablation)"
    return TYPICAL_BY_G[g], f"(inferred: {TYPICAL_RULE})"


def _synthetic_reports(method: str, g: int) -> str:
    if method == "simple":
        figure = EFFICIENCY_SIMPLE + (" (this run)" if g == 32 else "; gains grow with G")
        return f"i.i.d. loss vs G in the paper's figures; {figure}"
    if method in ("stitched-back", "stretched"):
        at_g = "" if g == 32 else "; the gap over simple rephrasing widens as G grows, this G in the paper's figures"
        return (
            "better i.i.d. loss, downstream accuracy and especially long-context loss than simple rephrasing; "
            f"{EFFICIENCY_MEGADOCS} (paper-notes.md does not say for which of the two){at_g}"
        )
    where = "before the original" if method == "stitched-front" else "without the original"
    return f"an ablation of stitching (rephrases {where}); reported in the paper's figures, no figure in paper-notes.md"


def _build() -> tuple[Experiment, ...]:
    out: list[Experiment] = []
    for size, (epochs, lr, wd) in BASELINES.items():
        out.append(
            Experiment(
                path=f"baselines/{size}.yaml",
                name=f"baseline-{size}",
                title=f"The paper's real-data-only regularised baseline at {size}",
                size=size,
                method="real",
                generations=0,
                epochs=epochs,
                r=None,
                lr=lr,
                wd=wd,
                provenance="stated by the paper (paper-notes.md, real-data-only regularized baselines)",
                reports=(
                    "the reference recipe: its best losses at several real-data sizes give the data scaling law of "
                    "the efficiency figures, and over sizes the model-size asymptote; losses in the paper's "
                    "figures (none in paper-notes.md)"
                ),
            )
        )
    for method in SYNTHETIC_METHODS:
        for g in GENERATIONS:
            (epochs, r, lr, wd), provenance = _centre(method, g)
            out.append(
                Experiment(
                    path=f"{method}/g{g}.yaml",
                    name=f"{method}-g{g}",
                    title=f"{MAIN_SIZE}, {method} synthetic stream, G = {g}, at its tuned centre",
                    size=MAIN_SIZE,
                    method=method,
                    generations=g,
                    epochs=epochs,
                    r=r,
                    lr=lr,
                    wd=wd,
                    provenance=provenance,
                    reports=_synthetic_reports(method, g),
                )
            )
    stated = "stated by the paper for G = 32 at 4096 tokens (paper-notes.md); kept for longer windows (inferred)"
    long_reports = (
        "not a run of paper-notes.md: the paper's long-context figure is the loss on held-out long documents "
        "(evaluated here too, --store long=...); these runs train on windows that hold a whole G = 32 "
        "megadoc (about 22k tokens) instead of cutting it into 4096-token windows"
    )
    for method, k in (("simple", 32), ("stitched-back", 32), ("stretched", 32), ("stitched-back", 64)):
        (epochs, r, lr, wd) = STATED_CENTRES[method, 32]
        out.append(
            Experiment(
                path=f"long-context/{method}-g32-{k}k.yaml",
                name=f"{method}-g32-{k}k",
                title=f"{MAIN_SIZE}, {method} synthetic stream, G = 32, on {k * 1024}-token windows",
                size=MAIN_SIZE,
                method=method,
                generations=32,
                epochs=epochs,
                r=r,
                lr=lr,
                wd=wd,
                provenance=stated,
                reports=long_reports,
                recipe=f"300m_{k}k.yaml",
                seq_len=k * 1024,
            )
        )
    for label, base in (("real", BASELINES[MAIN_SIZE]), ("stitched-back-g32", STATED_CENTRES["stitched-back", 32])):
        synthetic = label != "real"
        epochs, r, lr, wd = base if synthetic else (base[0], None, base[1], base[2])
        out.append(
            Experiment(
                path=f"ensembles/{label}-{MAIN_SIZE}.yaml",
                name=f"ensemble-{label}-{MAIN_SIZE}",
                title=f"Ensemble members: {MAIN_SIZE} {'stitched-back G = 32' if synthetic else 'real-data baseline'}, "
                "independently seeded",
                size=MAIN_SIZE,
                method="stitched-back" if synthetic else "real",
                generations=32 if synthetic else 0,
                epochs=epochs,
                r=r,
                lr=lr,
                wd=wd,
                provenance=(
                    "stated: the members' recipe is "
                    + ("stitched-back G = 32's stated centre" if synthetic else "the 300m baseline's stated values")
                    + f"; {ENSEMBLE_MEMBERS} members (inferred: paper-notes.md does not state the ensemble sizes)"
                ),
                reports=(
                    "ensembles average the logits of independently seeded models; the asymptote of L(K) = A / K^alpha"
                    " + E over ensemble size K (paper-notes.md, asymptotes), in the paper's figures"
                ),
                seed=1,
                ensemble=True,
            )
        )
    return tuple(out)


EXPERIMENTS: tuple[Experiment, ...] = _build()


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _yaml_number(x: float) -> str:
    """A YAML float that PyYAML reads as one (3.0e-3, not 3e-3, which YAML 1.1 reads as a string)."""
    text = number(x)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def config_path(experiment: Experiment) -> str:
    return f"configs/{EXPERIMENTS_DIR}/{experiment.path}"


def _wrap(prefix: str, text: str, width: int = 110) -> list[str]:
    lines, line = [], prefix
    for word in text.split():
        if len(line) + 1 + len(word) > width and line.strip() != "#":
            lines.append(line)
            line = "#  "
        line += ("" if line.endswith(" ") else " ") + word
    return [*lines, line]


def _data_commands(e: Experiment) -> list[str]:
    """Generation and megadoc commands of the experiment's synthetic stream (none for real data)."""
    if e.method == "real":
        return []
    task = "rationale" if e.method == "stretched" else "rephrase"
    g = 32 if task == "rephrase" else e.generations  # one G = 32 rephrase job serves every G (samples 1..G)
    job = f"{GENERATIONS_DIR}/{task}-G{g}"
    why = "one G = 32 rephrase job serves every G" if task == "rephrase" else f"rationales are made for G = {g}"
    return [
        f"# generation ({why}), then the megadoc store:",
        f"python -m generation generate --input {SOURCES} --model {GENERATOR} \\",
        f"    --output {job} --backend vllm --task {task} -G {g}",
        f"python -m generation merge {job} --merged {job}-merged",
        f"python -m generation megadocs --sources {SOURCES} --tokenizer {TOKENIZER} \\",
        f"    --generations {job}-merged --out {MEGADOCS_DIR} --methods {e.method} --G {e.generations}",
    ]


def _evaluate_command(models: list[str], ensemble: bool) -> list[str]:
    words = [f"--model {m}" for m in models] + (["--ensemble mean_logits"] if ensemble else [])
    words += [f"--store {name}={path}" for name, path in EVAL_STORES.items()]
    words += [f"--benchmarks {BENCHMARKS} --tasks arc_easy,piqa,sciq"]
    lines, line = [], "python -m megadoc_jax.evaluate"
    for word in words:
        if len(line) + 1 + len(word) > 108:
            lines.append(line + " \\")
            line = "   "
        line += " " + word
    return [*lines, line]


def _run_commands(e: Experiment) -> list[str]:
    path = config_path(e)
    check = f"python -m megadoc_jax.experiments check {path} --compile"
    if not e.ensemble:
        return [
            "# the TPU step compiled here (no training), then training and evaluation:",
            check,
            f"python -m megadoc_jax.train --config {path}",
            *_evaluate_command([f"runs/{e.run_name}"], False),
        ]
    stem = e.run_name.rsplit("-s", 1)[0]  # the members' name without the seed
    first = next(x for x in EXPERIMENTS if not x.ensemble and x.run_name == f"{stem}-s0")
    return [
        "# the TPU step compiled here (no training):",
        check,
        f"# member 0 is the run of {config_path(first)}",
        f"# (the same config at seed 0); this file is seed 1, and the loop trains seeds 1..{ENSEMBLE_MEMBERS - 1}:",
        f"for s in $(seq 1 {ENSEMBLE_MEMBERS - 1}); do python -m megadoc_jax.train \\",
        f"    --config {path} \\",
        f"    train.seed=$s data.seed=$s train.run_dir=runs/{stem}-s$s; done",
        f"# all {ENSEMBLE_MEMBERS} as one model (for the fit over K, also the first K = 1, 2, 4: fewer --model):",
        *_evaluate_command([f"runs/{stem}-s{s}" for s in range(ENSEMBLE_MEMBERS)], True),
    ]


def render(e: Experiment) -> str:
    """The full text of the experiment's config file."""
    r_text = "real data only" if e.r is None else f"r {e.r:g}"
    values = f"E {e.epochs:g}, {r_text}, lr {number(e.lr)}, wd {e.wd:g}"
    header = [
        f"# {e.title}: {values}.",
        *_wrap("# Values:", e.provenance + "."),
        *_wrap("# The paper reports:", e.reports + "."),
        "# Written by `python -m megadoc_jax.experiments write` from megadoc_jax/experiment_configs.py: edit the",
        "# table there, not this file. data/... paths: the data root, prepared once (configs/data/dclm.yaml).",
        "#",
        "# Run, in order, from the directory that holds data/:",
        *[f"#   {line}" for line in [*_data_commands(e), *_run_commands(e)]],
    ]
    depth = "../" * (1 + e.path.count("/"))
    bases = [e.recipe, f"model/{e.size}.yaml", "data/dclm.yaml", "hardware/tpu-v4-16.yaml"]
    body = [
        "base: [" + ", ".join(depth + b for b in bases) + "]",
        f"experiment: {{name: {e.name}, data: dclm, method: {e.method}, generations: {e.generations}}}",
        "data:",
        f"  real_epochs: {e.epochs:g}",
    ]
    if e.r is not None:  # dclm.yaml's stream list is the real-data-only one
        body.append("  streams:")
        for s in e.streams():
            body.append(f"    - {{name: {s['name']}, store: {s['store']}, weight: {s['weight']:g}}}")
    if e.ensemble:
        body.append(f"  seed: {e.seed}")
    body.append(f"optim: {{lr: {_yaml_number(e.lr)}, weight_decay: {e.wd:g}}}")
    train = f"run_dir: runs/{e.run_name}" + (f", seed: {e.seed}" if e.seed else "")
    body.append(f"train: {{{train}}}")
    return "\n".join([*header, *body]) + "\n"


def write_all(configs_dir: str | Path = "configs") -> list[Path]:
    """Write every experiment's file under configs_dir/experiments/ (atomically) and remove YAML files there
    that the table no longer has. Returns the paths written."""
    root = Path(configs_dir) / EXPERIMENTS_DIR
    written = []
    for e in EXPERIMENTS:
        path = root / e.path
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes_atomic(path, render(e).encode())
        written.append(path)
    for stale in set(root.rglob("*.yaml")) - set(written):
        stale.unlink()
    return written


def stale_files(configs_dir: str | Path = "configs") -> list[str]:
    """Experiment files that differ from what the table renders, are missing, or are not in the table."""
    root = Path(configs_dir) / EXPERIMENTS_DIR
    expected = {root / e.path: render(e) for e in EXPERIMENTS}
    problems = [str(p) for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    problems += [str(p) for p in sorted(set(root.rglob("*.yaml")) - set(expected))]
    return problems


def markdown_table() -> str:
    """docs/experiments.md's table of every experiment."""
    rows = [
        "| file | method | G | E | r | lr | wd | values | the paper reports |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in EXPERIMENTS:
        r = "-" if e.r is None else f"{e.r:g}"
        g = "-" if e.generations == 0 else str(e.generations)
        values = (
            "stated" if not e.inferred else "inferred" if e.provenance.startswith("(inferred") else "stated + inferred"
        )
        cells = [f"`{e.path}`", e.method, g, f"{e.epochs:g}", r, number(e.lr), f"{e.wd:g}", values, e.reports]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
