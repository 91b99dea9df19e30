"""The report's main figures, for the console and miniature.json. No JAX import.

    lines, figures = report_summary(Path("runs/miniature/report/report.json"))

The lines: each configuration's best loss, the reference data law with its intervals, and each method's
data efficiency with its interval (or the reason there is none). `figures` holds the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megadoc_jax import files
from megadoc_jax.study.report import fit_line, number


def _configuration(row: dict[str, Any]) -> str:
    generations = f" G={row['generations']}" if row["generations"] else ""  # real runs: G = 0
    return f"{row['method']}{generations} D={number(row['real_tokens'])}"


def _efficiency_text(row: dict[str, Any]) -> str:
    value = row["efficiency"]
    if value is None:
        return row["message"] or "no data efficiency"
    low, high = value["interval"]
    note = f" ({row['message']})" if row["message"] else ""
    return f"{number(value['value'], 3)} [{number(low, 3)}, {number(high, 3)}]{note}"


def report_summary(path: Path) -> tuple[list[str], dict[str, Any]]:
    report = files.read_json(path, "the study report")
    best = [{"configuration": _configuration(b), "loss": b["loss"], "run": b["run"]} for b in report["best"]]
    efficiency = [
        {"configuration": _configuration(e), "loss": e["loss"], "efficiency": e["efficiency"], "message": e["message"]}
        for e in report["data_efficiency"]
    ]
    laws = {size: outcome["fit"] and outcome["fit"]["law"] for size, outcome in report["reference_laws"].items()}
    lines = ["best loss per configuration (eval/heldout/loss, nats/token):"]
    lines += [f"  {b['configuration']}: {number(b['loss'])}  ({b['run']})" for b in best]
    lines += ["reference data law (method real):"]
    lines += [f"  {fit_line(o)[2:]}" for o in report["reference_laws"].values()] or ["  no runs of method real"]
    lines += ["data efficiency D(L_method) / D, with its interval:"]
    lines += [f"  {e['configuration']}: {_efficiency_text(e)}" for e in efficiency]
    figures = {"counts": report["counts"], "best": best, "reference_laws": laws, "data_efficiency": efficiency}
    return lines, figures
