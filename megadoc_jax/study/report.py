"""The study report: runs -> tables -> figures -> report.json, report.md and one PNG per figure. No JAX import.

    value = build(runs, runs_dir=Path("runs"), objective=None, level=0.95, bootstrap=1000)
    write(value, out_dir, plots=True)          # report.json, report.md, <figure name>.png

The JSON holds every number of the Markdown and every plotted series (docs/study.md, "Output").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from megadoc_jax import files
from megadoc_jax.study import figures, tables
from megadoc_jax.study.runs import Runs
from megadoc_jax.study.tables import configuration_dict

FORMAT = "megadoc-study-report"
FORMAT_VERSION = 1
JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"


def build(runs: Runs, *, runs_dir: Path, objective: str | None, level: float, bootstrap: int) -> dict[str, Any]:
    """Everything the report says, as one JSON-ready dict (figures included, not yet drawn)."""
    best = tables.best_runs(runs.runs)
    laws = tables.reference_laws(best, level=level, bootstrap=bootstrap)
    efficiency_rows = tables.efficiencies(best, laws, level=level)
    size_fits = tables.model_size_fits(best, level=level, bootstrap=bootstrap)
    ensemble_fits = tables.ensemble_fits(runs.ensembles, best, level=level, bootstrap=bootstrap)
    stores = sorted({r.objective_store for r in runs.runs}) or [objective or ""]
    store = stores[0] if len(stores) == 1 else "the i.i.d. store"
    loss_label = figures.LOSS_LABEL.format(store=store)
    drawn = {
        "loss_vs_generations": figures.loss_vs_generations(best, store),
        "loss_vs_epochs": figures.loss_vs_epochs(tables.best_by_epochs(runs.runs), store),
        "loss_by_position": figures.loss_by_position(best, store),
        "loss_by_segment": figures.loss_by_segment(best),
        "fit_data": figures.fits(
            "fit_data", "Reference data scaling law", list(laws.values()), "real-data tokens D", loss_label
        ),
        "fit_model_size": figures.fits(
            "fit_model_size", "Model-size scaling law", size_fits, "parameters N (billions)", loss_label
        ),
        "fit_ensemble": figures.fits(
            "fit_ensemble", "Ensemble scaling law", ensemble_fits, "ensemble members K", loss_label
        ),
        "benchmarks_vs_generations": figures.benchmarks_vs_generations(best),
        "data_efficiency_vs_generations": figures.efficiency_vs_generations(efficiency_rows),
    }
    messages = [o.message for o in [*laws.values(), *size_fits, *ensemble_fits] if o.message]
    messages += [
        f"{tables.describe(e.key[0], e.key[1])}, size {e.key[2]}: {e.message}" for e in efficiency_rows if e.message
    ]
    if not laws:
        messages.append(f"no data efficiency: no runs of the reference method {tables.REFERENCE_METHOD!r}")
    if not size_fits:
        messages.append("no model-size fit: no configuration has best runs at two or more model sizes")
    if not ensemble_fits:
        messages.append("no ensemble fit: no ensemble evaluations (evaluation JSONs with an ensemble)")
    return json_ready(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs_dir": str(runs_dir),
            "objective_store": objective or "each run's first data.eval_stores name",
            "objective_stores": stores,
            "level": level,
            "bootstrap": bootstrap,
            "counts": {
                "runs": len(runs.runs),
                "unstated_runs": len(runs.unstated),
                "broken_configs": len(runs.broken),
                "ensemble_evaluations": len(runs.ensembles),
                "runs_with_loss": sum(r.objective is not None for r in runs.runs),
            },
            "best": [
                {
                    **configuration_dict(key),
                    "run": b.run.relative,
                    "loss": b.loss,
                    "swept_runs": b.swept,
                    "row": b.run.row(),
                }
                for key, b in best.items()
            ],
            "reference_laws": {size: o.to_dict() for size, o in laws.items()},
            "data_efficiency": [e.to_dict() for e in efficiency_rows],
            "model_size_fits": [o.to_dict() for o in size_fits],
            "ensemble_fits": [o.to_dict() for o in ensemble_fits],
            "figures": {name: f for name, f in drawn.items() if f is not None},
            "figures_not_drawn": {name: "no data for it among the runs" for name, f in drawn.items() if f is None},
            "messages": messages,
            "runs": [r.row() for r in runs.runs],
            "unstated_runs": [r.row() for r in runs.unstated],
            "broken_configs": [{"file": str(path), "error": error} for path, error in runs.broken],
        }
    )


def json_ready(value: Any) -> Any:
    """Non-finite floats as "inf" / "-inf" / None (JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write(value: dict[str, Any], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with plots) the PNGs, each written atomically; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        from megadoc_jax.study import plots as plots_lib  # matplotlib: only when drawing

        for name, spec in value["figures"].items():
            path = out_dir / f"{name}.png"
            plots_lib.draw(spec, path)
            spec["file"] = path.name
            written.append(path)
    files.write_json_atomic(out_dir / JSON_NAME, value)
    files.write_bytes_atomic(out_dir / MARKDOWN_NAME, markdown(value, plots=plots).encode())
    return [out_dir / JSON_NAME, out_dir / MARKDOWN_NAME, *written]


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(number(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]


def fit_line(outcome: dict[str, Any]) -> str:
    fit = outcome["fit"]
    if fit is None:
        return f"- {outcome['message']}"
    law, iv, level = fit["law"], fit["intervals"], int(round(fit["level"] * 100))
    parts = [f"{p} = {number(law[p])} [{number(iv[p][0])}, {number(iv[p][1])}]" for p in ("A", "B", "C")]
    notes = f"; {'; '.join(fit['notes'])}" if fit["notes"] else ""
    return (
        f"- {outcome['what']}: L(x) = A / x^B + C, {', '.join(parts)} ({level}% bootstrap intervals, "
        f"{len(outcome['points'])} points, asymptote C = {number(law['C'])}){notes}"
    )


def run_cells(row: dict[str, Any]) -> list[str]:
    """E, r, lr, wd, seed as short text."""
    keys = ("real_epochs", "synthetic_weight", "lr", "weight_decay", "seed")
    return ["-" if row[k] is None else f"{row[k]:g}" for k in keys]


def markdown(value: dict[str, Any], *, plots: bool) -> str:
    c = value["counts"]
    lines = [
        "# Study report",
        "",
        f"Runs under `{value['runs_dir']}`: {c['runs']} with an experiment method ({c['runs_with_loss']} with a loss), "
        f"{c['unstated_runs']} without, {c['broken_configs']} unreadable configs skipped, "
        f"{c['ensemble_evaluations']} ensemble evaluations. Objective (i.i.d.) loss: concat-recipe loss on "
        f"{', '.join(f'`{s}`' for s in value['objective_stores'])} (nats/token). Intervals: "
        f"{int(round(value['level'] * 100))}%, {value['bootstrap']} bootstrap refits. Created {value['created_at']}.",
        "",
        "## Best runs",
        "",
        "The lowest-loss run of each configuration (method, G, model size, D = unique real tokens) over its sweep.",
        "",
    ]
    lines += table(
        ["method", "G", "size", "D (tokens)", "loss", "loss from", "E", "r", "lr", "wd", "seed", "runs", "run"],
        [
            [
                b["method"],
                b["generations"],
                b["size"],
                b["real_tokens"],
                b["loss"],
                b["row"]["loss_source"]["source"],
                *run_cells(b["row"]),
                b["swept_runs"],
                f"`{b['run']}`",
            ]
            for b in value["best"]
        ],
    )
    lines += ["", "## Reference data scaling law", ""]
    lines += [fit_line(o) for o in value["reference_laws"].values()] or ["- no runs of the reference method `real`"]
    lines += ["", "## Data efficiency", "", "D(L_method) / D under the reference law of the same model size.", ""]
    lines += table(
        ["method", "G", "size", "D (tokens)", "loss", "efficiency", "interval", "note"],
        [
            [
                e["method"],
                e["generations"],
                e["size"],
                e["real_tokens"],
                e["loss"],
                number(e["efficiency"]["value"], 3) if e["efficiency"] else "-",
                (
                    f"[{number(e['efficiency']['interval'][0], 3)}, {number(e['efficiency']['interval'][1], 3)}]"
                    if e["efficiency"]
                    else "-"
                ),
                e["message"] or "",
            ]
            for e in value["data_efficiency"]
        ],
    )
    lines += ["", "## Asymptotes", ""]
    lines += [fit_line(o) for o in [*value["model_size_fits"], *value["ensemble_fits"]]]
    lines += [f"- {m}" for m in value["messages"] if m.startswith(("no model-size", "no ensemble"))]
    lines += ["", "## Benchmarks", ""]
    scored = [b for b in value["best"] if b["row"]["paper_average"] is not None]
    lines += (
        table(
            ["method", "G", "size", "D (tokens)", "paper average acc", "stderr", "tasks (acc)"],
            [
                [
                    b["method"],
                    b["generations"],
                    b["size"],
                    b["real_tokens"],
                    b["row"]["paper_average"],
                    b["row"]["paper_average_stderr"],
                    ", ".join(f"{t} {m.get('acc', math.nan):.3f}" for t, m in b["row"]["benchmarks"].items()),
                ]
                for b in scored
            ],
        )
        if scored
        else ["No benchmark results among the best runs."]
    )
    lines += ["", "## Figures", ""]
    for name, spec in value["figures"].items():
        lines.append(
            f"![{spec['title']}]({name}.png)" if plots else f"- {name}: {spec['title']} (not drawn: --no-plots)"
        )
    lines += [f"- {name}: not drawn ({why})" for name, why in value["figures_not_drawn"].items()]
    if value["messages"]:
        lines += ["", "## Notes", ""] + [f"- {m}" for m in value["messages"]]
    if value["unstated_runs"]:
        lines += ["", "## Runs without experiment.method", ""]
        lines += table(
            ["run", "size", "D (tokens)", "loss"],
            [[f"`{r['path']}`", r["size"], r["real_tokens"], r["loss"]] for r in value["unstated_runs"]],
        )
    if value["broken_configs"]:
        lines += ["", "## Unreadable configs (skipped)", ""] + [
            f"- `{b['file']}`: {b['error']}" for b in value["broken_configs"]
        ]
    lines += ["", "## All runs", ""]
    lines += table(
        ["run", "method", "G", "size", "D (tokens)", "E", "r", "lr", "wd", "seed", "loss", "loss from", "notes"],
        [
            [
                f"`{r['path']}`",
                r["method"],
                r["generations"],
                r["size"],
                r["real_tokens"],
                *run_cells(r),
                r["loss"],
                r["loss_source"]["source"] if r["loss_source"] else "no loss",
                "; ".join(r["notes"]),
            ]
            for r in value["runs"]
        ],
    )
    return "\n".join(lines) + "\n"
