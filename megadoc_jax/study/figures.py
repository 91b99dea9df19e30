"""The report's figures as data: each figure is a dict that plots.py draws and the JSON report holds as is,
so that every plotted number is in the JSON. No JAX import, no matplotlib.

    figure = {"name", "title", "panels": [panel]}
    panel = {"title", "x_label", "y_label", "x_scale": "linear"|"log"|"log2"|"category", "categories",
             "series": [{"label", "kind": "line"|"points"|"curve"|"bars", "x", "y", "y_lo", "y_hi"}],
             "hlines": [{"label", "y", "lo", "hi"}]}

y_lo / y_hi (error bars or bands) and lo / hi are None where there is no interval. Category panels give
x as category labels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from megadoc_jax.study.tables import REFERENCE_METHOD, Best, Configuration, Efficiency, FitOutcome, describe

LOSS_LABEL = "loss on {store} (nats/token)"


def series(label: str, kind: str, x: Sequence, y: Sequence, y_lo=None, y_hi=None) -> dict[str, Any]:
    return {
        "label": label,
        "kind": kind,
        "x": list(x),
        "y": [float(v) for v in y],
        "y_lo": None if y_lo is None else [float(v) for v in y_lo],
        "y_hi": None if y_hi is None else [float(v) for v in y_hi],
    }


def panel(title: str, x_label: str, y_label: str, x_scale: str, lines: list, hlines: list | None = None, **extra):
    return {
        "title": title,
        "x_label": x_label,
        "y_label": y_label,
        "x_scale": x_scale,
        "categories": extra.get("categories"),
        "series": lines,
        "hlines": hlines or [],
    }


def figure(name: str, title: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "title": title, "panels": panels}


def tokens_text(tokens: int) -> str:
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= factor:
            return f"{tokens / factor:.3g}{suffix}"
    return str(tokens)


def setting_labels(keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Label suffixes for (size, D) settings: empty when there is only one, so single-setting legends stay short."""
    settings = sorted(set(keys))
    if len(settings) <= 1:
        return {s: "" for s in settings}
    return {(size, d): f" ({size}, D={tokens_text(d)})" for size, d in settings}


def by_setting(best: dict[Configuration, Best]) -> dict[tuple[str, str, int], list[Best]]:
    """(method, size, D) -> its best runs in order of G."""
    groups: dict[tuple[str, str, int], list[Best]] = defaultdict(list)
    for (method, _, size, d), b in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])):
        groups[(method, size, d)].append(b)
    return groups


def loss_vs_generations(best: dict[Configuration, Best], store: str) -> dict[str, Any] | None:
    groups = by_setting(best)
    synthetic = {k: v for k, v in groups.items() if k[0] != REFERENCE_METHOD}
    if not synthetic:
        return None
    labels = setting_labels([(size, d) for _, size, d in synthetic])  # the settings drawn
    lines = [
        series(f"{method}{labels[(size, d)]}", "line", [b.run.generations for b in g], [b.loss for b in g])
        for (method, size, d), g in synthetic.items()
    ]
    hlines = [
        {"label": f"{REFERENCE_METHOD}{labels[(size, d)]}", "y": g[0].loss, "lo": None, "hi": None}
        for (method, size, d), g in groups.items()
        if method == REFERENCE_METHOD and any(k[1:] == (size, d) for k in synthetic)
    ]
    title = "Best loss vs generations per document"
    return figure(
        "loss_vs_generations",
        title,
        [panel(title, "generations per document G", LOSS_LABEL.format(store=store), "log2", lines, hlines)],
    )


def loss_vs_epochs(best_by_epochs: dict[Configuration, dict[float, Best]], store: str) -> dict[str, Any] | None:
    """Per configuration, the best run at each real-epoch count E: loss vs E and vs training tokens."""
    if not best_by_epochs:
        return None
    labels = setting_labels([(size, d) for (_, _, size, d) in best_by_epochs])
    by_e, by_tokens = [], []
    for key, points in best_by_epochs.items():
        label = describe(key[0], key[1]) + labels[(key[2], key[3])]
        ordered = [points[e] for e in sorted(points)]
        by_e.append(series(label, "line", sorted(points), [b.loss for b in ordered]))
        tokens = [b.run.accounting.training_tokens for b in ordered]
        by_tokens.append(series(label, "line", tokens, [b.loss for b in ordered]))
    y = LOSS_LABEL.format(store=store)
    return figure(
        "loss_vs_epochs",
        "Best loss vs real epochs and vs training compute",
        [
            panel("vs real epochs", "real-data epochs E", y, "log2", by_e),
            panel("vs compute", "training tokens (steps x batch x window)", y, "log", by_tokens),
        ],
    )


def loss_by_position(best: dict[Configuration, Best], store: str) -> dict[str, Any] | None:
    """One panel per method, one line per G: the best runs' loss by position bucket (evaluation JSONs)."""
    panels: dict[tuple[str, str, int], list] = defaultdict(list)
    categories: list[str] = []
    for key, b in best.items():
        result = b.run.result(store)
        if not result or not result.get("by_position"):
            continue
        buckets = [f"[{p['from']},{'inf' if p['to'] is None else p['to']})" for p in result["by_position"]]
        categories = buckets if len(buckets) > len(categories) else categories
        panels[(key[0], key[2], key[3])].append(
            series(describe(key[0], key[1]), "line", buckets, [p["loss"] for p in result["by_position"]])
        )
    if not panels:
        return None
    labels = setting_labels([(size, d) for _, size, d in panels])
    y = LOSS_LABEL.format(store=store)
    return figure(
        "loss_by_position",
        f"Loss by position within the document ({store}, best runs)",
        [
            panel(
                f"{method}{labels[(size, d)]}",
                "target position in document (bucket)",
                y,
                "category",
                lines,
                categories=categories,
            )
            for (method, size, d), lines in sorted(panels.items())
        ],
    )


def loss_by_segment(best: dict[Configuration, Best]) -> dict[str, Any] | None:
    """Per store with megadoc segments, the best runs' loss per segment label (bars)."""
    panels: dict[str, list] = defaultdict(list)
    categories: dict[str, list[str]] = defaultdict(list)
    for key, b in best.items():
        if b.run.evaluation is None:
            continue
        for (store, recipe), result in sorted(b.run.evaluation.results.items()):
            segments = result.get("by_segment") or []
            if recipe != "concat" or not any(s["kind"] != "original" for s in segments):
                continue
            for s in segments:
                if s["segment"] not in categories[store]:
                    categories[store].append(s["segment"])
            label = describe(key[0], key[1]) + f" ({key[2]}, D={tokens_text(key[3])})"
            panels[store].append(series(label, "bars", [s["segment"] for s in segments], [s["loss"] for s in segments]))
    if not panels:
        return None
    return figure(
        "loss_by_segment",
        "Loss per megadoc segment (best runs)",
        [
            panel(f"store {store}", "segment", "loss (nats/token)", "category", lines, categories=categories[store])
            for store, lines in sorted(panels.items())
        ],
    )


def fit_panel(outcome: FitOutcome, x_label: str, y_label: str) -> dict[str, Any]:
    """Points, the fitted curve (dense, between the smallest and largest x) and the asymptote with its interval."""
    lines = [series("best runs", "points", outcome.x_N, outcome.y_N)]
    hlines = []
    if outcome.fit is not None:
        law, c_lo_hi = outcome.fit.law, outcome.fit.intervals["C"]
        x_dense = np.geomspace(min(outcome.x_N), max(outcome.x_N), 64)
        lines.append(
            series(f"L = {law.A:.3g} / x^{law.B:.3g} + {law.C:.3g}", "curve", x_dense.tolist(), law(x_dense).tolist())
        )
        level = int(round(outcome.fit.level * 100))
        hlines.append(
            {
                "label": f"asymptote C = {law.C:.3f} [{c_lo_hi[0]:.3f}, {c_lo_hi[1]:.3f}] ({level}%)",
                "y": float(law.C),
                "lo": float(c_lo_hi[0]),
                "hi": float(c_lo_hi[1]),
            }
        )
    return panel(outcome.what, x_label, y_label, "log", lines, hlines)


def fits(name: str, title: str, outcomes: Sequence[FitOutcome], x_label: str, y_label: str) -> dict[str, Any] | None:
    drawable = [o for o in outcomes if o.fit is not None]  # the others are a line of the report each
    if not drawable:
        return None
    return figure(name, title, [fit_panel(o, x_label, y_label) for o in drawable])


def benchmarks_vs_generations(best: dict[Configuration, Best]) -> dict[str, Any] | None:
    groups = {
        key: scored
        for key, g in by_setting(best).items()
        if (scored := [b for b in g if (b.run.benchmarks or {}).get("paper_average")])
    }
    labels = setting_labels([(size, d) for method, size, d in groups if method != REFERENCE_METHOD])
    lines, hlines = [], []
    for (method, size, d), scored in groups.items():
        if (size, d) not in labels:
            continue  # a reference run with no synthetic line to compare with
        acc = [b.run.benchmarks["paper_average"]["acc"] for b in scored]
        se = [b.run.benchmarks["paper_average"]["acc_stderr"] for b in scored]
        label = f"{method}{labels[(size, d)]}"
        if method == REFERENCE_METHOD:
            hlines.append({"label": label, "y": acc[0], "lo": acc[0] - se[0], "hi": acc[0] + se[0]})
        else:
            lo, hi = np.subtract(acc, se), np.add(acc, se)
            lines.append(series(label, "line", [b.run.generations for b in scored], acc, lo, hi))
    if not lines:
        return None
    title = "Benchmark average vs generations per document"
    y = "mean zero-shot accuracy, ARC-Easy / PIQA / SciQ (+- 1 s.e.)"
    return figure(
        "benchmarks_vs_generations", title, [panel(title, "generations per document G", y, "log2", lines, hlines)]
    )


def efficiency_vs_generations(rows: Sequence[Efficiency]) -> dict[str, Any] | None:
    groups: dict[tuple[str, str, int], list[Efficiency]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r.key[0], r.key[2], r.key[3], r.key[1])):
        if row.value is not None and np.isfinite(row.value.value):
            groups[(row.key[0], row.key[2], row.key[3])].append(row)
    if not groups:
        return None
    labels = setting_labels([(size, d) for _, size, d in groups])
    lines = []
    for (method, size, d), g in groups.items():
        lo = [r.value.interval[0] for r in g]
        hi = [r.value.interval[1] for r in g]
        values = [r.value.value for r in g]
        lines.append(series(f"{method}{labels[(size, d)]}", "line", [r.key[1] for r in g], values, lo, hi))
    level = int(round(next(iter(groups.values()))[0].value.level * 100))
    title = "Data efficiency vs generations per document"
    y = f"data efficiency D(L_method) / D (x, {level}% interval)"
    hlines = [{"label": f"{REFERENCE_METHOD} (1x)", "y": 1.0, "lo": None, "hi": None}]
    return figure(
        "data_efficiency_vs_generations", title, [panel(title, "generations per document G", y, "log2", lines, hlines)]
    )
