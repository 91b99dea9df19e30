"""The report's numbers from loaded runs: best runs, the reference data law, data efficiency, asymptote fits.
No JAX import; the fits are megadoc_jax.scaling's.

    best = best_runs(runs.runs)                                   # {(method, G, size, D): Best}
    laws = reference_laws(best, level=0.95, bootstrap=1000)       # {size: FitOutcome} over method "real"
    rows = efficiencies(best, laws, level=0.95)                   # each method's D(L_method) / D

A configuration is what the sweep does not tune, (method, G, model size, D = real store tokens); its
best run (lowest objective loss) is the paper's point for it. docs/study.md has the definitions.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from megadoc_jax import scaling
from megadoc_jax.study.runs import Ensemble, Run, parameter_count

REFERENCE_METHOD = "real"
Configuration = tuple[str, int, str, int]  # (method, G, size, D)


@dataclasses.dataclass(frozen=True)
class Best:
    run: Run
    swept: int  # runs of the configuration that have a loss

    @property
    def loss(self) -> float:
        return self.run.objective.loss


def best_runs(runs: Sequence[Run]) -> dict[Configuration, Best]:
    """The lowest-loss run of each configuration (ties: the first by path), over runs with an objective loss."""
    groups: dict[Configuration, list[Run]] = defaultdict(list)
    for run in runs:
        if run.objective is not None:
            groups[run.configuration].append(run)
    return {
        key: Best(min(group, key=lambda r: (r.objective.loss, r.relative)), len(group))
        for key, group in sorted(groups.items())
    }


def configuration_dict(key: Configuration) -> dict[str, Any]:
    method, generations, size, real_tokens = key
    return {"method": method, "generations": generations, "size": size, "real_tokens": real_tokens}


@dataclasses.dataclass(frozen=True)
class FitOutcome:
    """A fit over points, or why there is none (too few points, a refused point, no convergence)."""

    what: str  # e.g. "reference data law, size 300m"
    x_N: list[float]
    y_N: list[float]
    labels: list[str]  # the run (or evaluation) behind each point
    fit: scaling.PowerLawFit | None
    message: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "points": [{"x": x, "loss": y, "label": label} for x, y, label in zip(self.x_N, self.y_N, self.labels)],
            "fit": self.fit.to_dict() if self.fit else None,
            "message": self.message,
        }


def fit_points(
    what: str, x_N: Sequence[float], y_N: Sequence[float], labels: Sequence[str], *, level: float, bootstrap: int
) -> FitOutcome:
    """fit_power_law over the points; a FitError (too few points, a bad x) becomes the outcome's message."""
    order = sorted(range(len(x_N)), key=lambda i: x_N[i])
    x_N, y_N, labels = [float(x_N[i]) for i in order], [float(y_N[i]) for i in order], [labels[i] for i in order]
    try:
        fit = scaling.fit_power_law(x_N, y_N, labels=labels, level=level, bootstrap=bootstrap, seed=0)
    except scaling.FitError as e:
        return FitOutcome(what, x_N, y_N, labels, None, f"{what}: no fit ({e})")
    return FitOutcome(what, x_N, y_N, labels, fit, None)


def reference_laws(best: dict[Configuration, Best], *, level: float, bootstrap: int) -> dict[str, FitOutcome]:
    """Per model size: L(D) = A / D^B + C over the reference method's best loss at each real-data size D."""
    points: dict[str, list[Best]] = defaultdict(list)
    for (method, _, size, _), b in best.items():
        if method == REFERENCE_METHOD:
            points[size].append(b)
    return {
        size: fit_points(
            f"reference data law ({REFERENCE_METHOD}), size {size}",
            [b.run.real_tokens for b in group],
            [b.loss for b in group],
            [b.run.relative for b in group],
            level=level,
            bootstrap=bootstrap,
        )
        for size, group in sorted(points.items())
    }


@dataclasses.dataclass(frozen=True)
class Efficiency:
    key: Configuration
    best: Best
    value: scaling.DataEfficiency | None
    message: str | None  # no reference law for the size, or the law's failure

    def to_dict(self) -> dict[str, Any]:
        return {
            **configuration_dict(self.key),
            "run": self.best.run.relative,
            "loss": self.best.loss,
            "efficiency": self.value.to_dict() if self.value else None,
            "message": self.message,
        }


def efficiencies(best: dict[Configuration, Best], laws: dict[str, FitOutcome], *, level: float) -> list[Efficiency]:
    """Each non-reference configuration's data efficiency D(L_method) / D under its size's reference law."""
    rows = []
    for key, b in best.items():
        method, _, size, real_tokens = key
        if method == REFERENCE_METHOD:
            continue
        law = laws.get(size)
        if law is None or law.fit is None:
            why = law.message if law else f"no {REFERENCE_METHOD} runs of size {size}"
            rows.append(Efficiency(key, b, None, f"no data efficiency: {why}"))
            continue
        value = scaling.data_efficiency(law.fit, b.loss, real_tokens, level=level)
        rows.append(Efficiency(key, b, value, value.note))
    return rows


def model_size_fits(best: dict[Configuration, Best], *, level: float, bootstrap: int) -> list[FitOutcome]:
    """Per (method, G, D) with runs of two or more model sizes: L(N) = A / N^B + C, N in billions of parameters."""
    groups: dict[tuple[str, int, int], list[Best]] = defaultdict(list)
    for (method, generations, _, real_tokens), b in best.items():
        groups[(method, generations, real_tokens)].append(b)
    return [
        fit_points(
            f"model-size law, {describe(method, generations)}, D = {real_tokens:,}",
            [parameter_count(b.run.config.model) / 1e9 for b in group],
            [b.loss for b in group],
            [b.run.relative for b in group],
            level=level,
            bootstrap=bootstrap,
        )
        for (method, generations, real_tokens), group in sorted(groups.items())
        if len(group) >= 2
    ]


def ensemble_fits(
    ensembles: Sequence[Ensemble], best: dict[Configuration, Best], *, level: float, bootstrap: int
) -> list[FitOutcome]:
    """Per configuration of the first member: L(K) = A / K^B + C over the lowest loss of each ensemble size K;
    K = 1 is the configuration's best run unless an ensemble of one was evaluated."""
    groups: dict[Configuration, dict[int, tuple[float, str]]] = defaultdict(dict)
    for e in ensembles:
        points = groups[e.first_member.configuration]
        if e.members not in points or e.loss < points[e.members][0]:
            points[e.members] = (e.loss, e.path.name)
    outcomes = []
    for key, points in sorted(groups.items()):
        if 1 not in points and key in best:
            points[1] = (best[key].loss, best[key].run.relative)
        ks = sorted(points)
        method, generations, size, real_tokens = key
        outcomes.append(
            fit_points(
                f"ensemble law, {describe(method, generations)}, size {size}, D = {real_tokens:,}",
                ks,
                [points[k][0] for k in ks],
                [points[k][1] for k in ks],
                level=level,
                bootstrap=bootstrap,
            )
        )
    return outcomes


def describe(method: str, generations: int) -> str:
    return method if method == REFERENCE_METHOD else f"{method} G={generations}"


def best_by_epochs(runs: Sequence[Run]) -> dict[Configuration, dict[float, Best]]:
    """Per configuration, the lowest-loss run at each real-epoch count E (data.real_epochs)."""
    groups: dict[Configuration, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.objective is not None:
            groups[run.configuration][run.config.data.real_epochs].append(run)
    return {
        key: {e: Best(min(g, key=lambda r: (r.objective.loss, r.relative)), len(g)) for e, g in sorted(by_e.items())}
        for key, by_e in sorted(groups.items())
    }
