"""Draws the report's figures (figures.py's dicts) as PNG files with matplotlib's Agg backend. No JAX import.

    draw(figure, out_dir / "loss_vs_generations.png")

Panels sit side by side (at most three a row); every panel has its axis labels, a legend and a title, so
that a figure can go into a paper as it is.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from megadoc_jax import files  # noqa: E402

COLUMNS = 3
PANEL_INCHES = (5.2, 3.8)
DPI = 150
LEGEND_INSIDE = 6  # legend entries that fit over a panel


def draw(figure: dict[str, Any], path: Path) -> None:
    """Writes the figure to `path` (atomically: a kill leaves the old file or the new one)."""
    panels = figure["panels"]
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), squeeze=False)
    try:
        for ax, spec in zip(axes.flat, panels):
            draw_panel(ax, spec)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        if len(panels) > 1:
            fig.suptitle(figure["title"])
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=DPI, format="png")
        files.write_bytes_atomic(path, png.getvalue())
    finally:
        plt.close(fig)


def draw_panel(ax: Any, spec: dict[str, Any]) -> None:
    categories = spec["categories"]
    bars = [s for s in spec["series"] if s["kind"] == "bars"]
    for i, s in enumerate(spec["series"]):
        x = [categories.index(v) for v in s["x"]] if categories else s["x"]
        if s["kind"] == "bars":
            width = 0.8 / len(bars)
            ax.bar(np.asarray(x) + (bars.index(s) - (len(bars) - 1) / 2) * width, s["y"], width, label=s["label"])
            continue
        errors = None
        if s["y_lo"] is not None:
            errors = [np.subtract(s["y"], s["y_lo"]), np.subtract(s["y_hi"], s["y"])]
        style = {"line": "o-", "points": "o", "curve": "-"}[s["kind"]]
        color = f"C{i % 10}"
        if errors is not None:
            ax.errorbar(x, s["y"], yerr=errors, fmt=style, color=color, capsize=3, label=s["label"])
        else:
            ax.plot(x, s["y"], style, color=color, label=s["label"])
    for j, h in enumerate(spec["hlines"]):
        color = f"C{(len(spec['series']) + j) % 10}"
        ax.axhline(h["y"], linestyle="--", color=color, label=h["label"])
        if h["lo"] is not None:
            ax.axhspan(h["lo"], h["hi"], color=color, alpha=0.15)
    if categories:
        ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    elif spec["x_scale"] == "log2":  # G and epochs: ticks at the values themselves, as plain numbers
        ax.set_xscale("log", base=2)
        ticks = sorted({v for s in spec["series"] for v in s["x"]})
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    elif spec["x_scale"] == "log":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(spec["x_label"])
    ax.set_ylabel(spec["y_label"])
    ax.set_title(spec["title"], fontsize=10)
    ax.grid(True, alpha=0.3)
    entries = len(spec["series"]) + len(spec["hlines"])
    if entries > LEGEND_INSIDE:  # a long legend beside the axes, not over the data
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
