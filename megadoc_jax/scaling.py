"""Power-law fits L(x) = A / x^B + C with their uncertainty, and the paper's data efficiency. No JAX import.

    fit = fit_power_law(tokens_N, best_loss_N, labels=names, level=0.95, bootstrap=1000, seed=0)
    fit.law                      # PowerLaw(A, B, C); fit.law(x) predicts, fit.law.inverse(loss) = D(L)
    fit.intervals["C"]           # the asymptote's interval: bootstrap percentiles over resampled points
    fit.covariance_intervals     # value -+ t stderr from the fit's covariance, for comparison
    fit.residuals_N              # y - law(x), one per point
    eff = data_efficiency(fit, method_loss=3.21, actual_tokens=real_tokens)
    eff.value, eff.interval      # D(L_method) / D_actual and its interval; math.inf (with eff.note) when
                                 # L_method is at or below the law's asymptote C
    real_tokens_seen(real_store_tokens, real_epochs, synthetic_original_tokens, synthetic_passes)

The fit is a least-squares problem with A, B, C >= 0 (what scipy's curve_fit with non-negative bounds
solves), solved by variable projection: for a fixed exponent B the model is linear in (A, C), so the best
non-negative (A, C) has a closed form and the sum of squares becomes a function of B alone. That one
dimension is searched on a grid and refined by golden section. Why not curve_fit itself: the grid makes
the search global (a local optimiser's answer depends on its starting point, and a bad start for one of a
thousand bootstrap refits goes unnoticed), and the refits of all bootstrap samples run at once as arrays
(0.2 s for 1,000 against 7 s for a loop of 1,000 curve_fit calls,
python -m megadoc_jax.benchmarks.scaling_fit). tests/test_scaling.py checks that
the optimum and the covariance are curve_fit's. The covariance is curve_fit's formula (absolute_sigma
False): s^2 (J^T J)^-1 with s^2 = SSE / (n - 3), J the model's Jacobian at the optimum.

The bootstrap resamples the points with replacement (a multinomial count per point) and refits each
sample; a sample with fewer than 3 distinct x values cannot determine A, B, C and counts as failed.
Intervals are percentiles of the successful refits. docs/scaling.md says which x the data scaling law
uses (unique real tokens) and how real tokens are counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

PARAMETERS = ("A", "B", "C")
# The exponent's search range. B = 0 is left out: there the law is the constant A + C and A, C are not
# separately determined. Above 10 a law is a step, not a power law, for any data a fit here sees.
B_RANGE = (1e-3, 10.0)
_B_GRID_POINTS = 61  # 15 a decade: neighbouring exponents differ by 17%
_GOLDEN_STEPS = 45  # the bracket (two grid steps, 0.31 in log B) shrinks by 0.618^45: B to about 1e-10 relative


class FitError(ValueError):
    """Data that cannot be fitted; the message names the offending point."""


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = A / x^B + C."""

    A: float
    B: float
    C: float

    def __call__(self, x: Any) -> Any:
        return self.A / np.asarray(x, dtype=np.float64) ** self.B + self.C

    def inverse(self, loss: float) -> float:
        """D(L) = (A / (L - C))^(1/B): the x at which the law reaches `loss`; math.inf for L <= C."""
        if self.B <= 0:
            raise ValueError(f"the inverse of a power law needs B > 0, got B={self.B}")
        return float(_inverse(np.float64(self.A), np.float64(self.B), np.float64(self.C), float(loss)))

    def to_dict(self) -> dict[str, Any]:
        return {name: _json_number(getattr(self, name)) for name in PARAMETERS}


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """A fitted law with its uncertainty. Arrays are float64; `bootstrap` holds the successful refits.

    labels: one per point, the given labels or the points' indices as strings.
    intervals: bootstrap percentiles at `level`; (nan, nan) without successful refits.
    covariance_intervals: value -+ t stderr (Student t, n - 3 degrees of freedom; may leave the bounds
    A, B, C >= 0; infinite with 3 points).
    notes: what a reader should know (a parameter at a bound or at the end of B's search range, no
    residual degrees of freedom, failed refits).
    """

    law: PowerLaw
    x_N: np.ndarray
    y_N: np.ndarray
    labels: tuple[str, ...]
    covariance: np.ndarray  # [3, 3] over (A, B, C); inf with only 3 points (no residual degrees of freedom)
    stderr: dict[str, float]
    bootstrap: np.ndarray  # [K, 3] successful refits over resampled points
    intervals: dict[str, tuple[float, float]]
    covariance_intervals: dict[str, tuple[float, float]]
    residuals_N: np.ndarray
    level: float
    failed_bootstrap: int
    notes: tuple[str, ...] = ()

    def band(self, x: Any, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap laws' predictions at x (for plots): (low_M, high_M)."""
        x_M = np.atleast_1d(np.asarray(x, dtype=np.float64))
        if not len(self.bootstrap):
            return np.full(x_M.shape, np.nan), np.full(x_M.shape, np.nan)
        A_K, B_K, C_K = (self.bootstrap[:, i : i + 1] for i in range(3))
        pred_KxM = A_K / x_M[None, :] ** B_K + C_K
        bounds = [percentile_interval(pred_KxM[:, m], self.level if level is None else level) for m in range(x_M.size)]
        return np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])

    def to_dict(self, include_bootstrap: bool = False) -> dict[str, Any]:
        """JSON-ready: Python floats only; +-inf as the strings "inf" / "-inf", NaN as None."""
        out = {
            "law": self.law.to_dict(),
            "points": [
                {"label": label, "x": _json_number(x), "y": _json_number(y), "residual": _json_number(r)}
                for label, x, y, r in zip(self.labels, self.x_N, self.y_N, self.residuals_N)
            ],
            "level": self.level,
            "covariance": [[_json_number(v) for v in row] for row in self.covariance],
            "stderr": {k: _json_number(v) for k, v in self.stderr.items()},
            "intervals": {k: [_json_number(v) for v in iv] for k, iv in self.intervals.items()},
            "covariance_intervals": {k: [_json_number(v) for v in iv] for k, iv in self.covariance_intervals.items()},
            "bootstrap_successful": len(self.bootstrap),
            "failed_bootstrap": self.failed_bootstrap,
            "notes": list(self.notes),
        }
        if include_bootstrap:
            out["bootstrap"] = [[_json_number(v) for v in row] for row in self.bootstrap]
        return out


def fit_power_law(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    level: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> PowerLawFit:
    """Least-squares fit of y = A / x^B + C (A, B, C >= 0) with covariance and a bootstrap over points.

    FitError (naming the point) for fewer than 3 points or 3 distinct x, a non-finite or non-positive x, or
    a non-finite y. The same inputs and seed give the same fit.
    """
    x_N = np.asarray(x, dtype=np.float64)
    y_N = np.asarray(y, dtype=np.float64)
    if x_N.ndim != 1 or y_N.shape != x_N.shape:
        raise FitError(f"x and y must be 1-D and of the same length, got shapes {x_N.shape} and {y_N.shape}")
    n = x_N.size
    if labels is not None and len(labels) != n:
        raise FitError(f"{len(labels)} labels for {n} points")
    names = tuple(str(label) for label in labels) if labels is not None else tuple(str(i) for i in range(n))
    point = (lambda i: f"point {names[i]!r}") if labels is not None else (lambda i: f"point {i}")
    if not 0 < level < 1:
        raise FitError(f"level must be in (0, 1), got {level}")
    if bootstrap < 0:
        raise FitError(f"bootstrap must be >= 0, got {bootstrap}")
    for i in range(n):
        if not (math.isfinite(x_N[i]) and x_N[i] > 0):
            raise FitError(f"{point(i)}: x={x_N[i]} must be finite and > 0")
        if not math.isfinite(y_N[i]):
            raise FitError(f"{point(i)}: y={y_N[i]} must be finite")
    if n < len(PARAMETERS):
        listed = ", ".join(point(i) for i in range(n)) or "none"
        raise FitError(f"a power law has 3 parameters (A, B, C) and needs at least 3 points; got {n} ({listed})")
    distinct_x, group_N = np.unique(x_N, return_inverse=True)
    if distinct_x.size < len(PARAMETERS):
        listed = ", ".join(f"{point(i)} (x={x_N[i]:g})" for i in range(n))
        raise FitError(f"the points have only {distinct_x.size} distinct x values, 3 are needed: {listed}")

    params_1x3, _ = _least_squares(x_N, y_N, np.ones((1, n)))
    law = PowerLaw(*(float(v) for v in params_1x3[0]))
    residuals_N = y_N - law(x_N)
    covariance = _covariance(x_N, residuals_N, law)
    stderr = {name: float(math.sqrt(covariance[i, i])) for i, name in enumerate(PARAMETERS)}
    # Student t with n - 3 degrees of freedom, not the normal: s^2 is estimated from few residuals.
    dof = n - len(PARAMETERS)
    t = float(stats.t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.inf
    covariance_intervals = {
        name: (getattr(law, name) - t * stderr[name], getattr(law, name) + t * stderr[name]) for name in PARAMETERS
    }

    # Resampling as counts: a sample is a weight per original point, so every refit shares x_N.
    rng = np.random.default_rng(seed)
    counts_KxN = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(np.float64)
    in_group_NxG = np.eye(distinct_x.size)[group_N]
    distinct_K = ((counts_KxN @ in_group_NxG) > 0).sum(axis=1)
    usable_K = distinct_K >= len(PARAMETERS)
    if usable_K.any():
        samples_Kx3, _ = _least_squares(x_N, y_N, counts_KxN[usable_K])
    else:
        samples_Kx3 = np.zeros((0, 3))
    failed = int(bootstrap - usable_K.sum())
    intervals = {name: percentile_interval(samples_Kx3[:, i], level) for i, name in enumerate(PARAMETERS)}

    notes = []
    if n == len(PARAMETERS):
        notes.append("3 points for 3 parameters: no residual degrees of freedom, the covariance is infinite")
    if law.A == 0:
        notes.append("A is at its bound 0: the data are flat, the law is the constant C")
    if law.C == 0:
        notes.append("C is at its bound 0: no asymptote above zero was found")
    for limit in B_RANGE:
        if math.isclose(law.B, limit, rel_tol=1e-6):
            notes.append(f"B is at the end of its search range {B_RANGE}: the data do not pin the exponent down")
    if failed:
        notes.append(f"{failed} of {bootstrap} bootstrap samples had fewer than 3 distinct x values and were left out")
    return PowerLawFit(
        law=law,
        x_N=x_N,
        y_N=y_N,
        labels=names,
        covariance=covariance,
        stderr=stderr,
        bootstrap=samples_Kx3,
        intervals=intervals,
        covariance_intervals=covariance_intervals,
        residuals_N=residuals_N,
        level=level,
        failed_bootstrap=failed,
        notes=tuple(notes),
    )


@dataclasses.dataclass(frozen=True)
class DataEfficiency:
    """value = D(loss) / actual_tokens, D the reference law's inverse; interval from the bootstrap laws.

    interval: percentiles of the bootstrap laws' efficiencies. infinite_bootstrap: how many bootstrap laws
    have their asymptote at or above `loss` (an infinite D); with enough of them the upper end is math.inf.
    covariance_interval: the delta method on log(value) with the fit's covariance and Student t (n - 3
    degrees of freedom); (nan, nan) when value is infinite or 0, (0, inf) with 3 points. On noisy data
    from a known law the bootstrap interval covers the truth less often than `level` (about 0.90 for 0.95
    with 24 points), the delta interval close to `level`: docs/scaling.md has the measurements.
    """

    loss: float
    actual_tokens: float
    effective_tokens: float
    value: float
    interval: tuple[float, float]
    level: float
    note: str | None
    infinite_bootstrap: int = 0
    covariance_interval: tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: +-inf as the strings "inf" / "-inf", NaN as None."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("interval", "covariance_interval"):
            out[key] = [_json_number(v) for v in out[key]]
        for key in ("loss", "actual_tokens", "effective_tokens", "value"):
            out[key] = _json_number(out[key])
        return out


def data_efficiency(
    fit: PowerLawFit, method_loss: float, actual_tokens: float, *, level: float | None = None
) -> DataEfficiency:
    """The paper's data efficiency of a run: the reference data the fitted law needs to reach the run's
    loss, D(method_loss), over the real tokens the run used (`actual_tokens`, in the law's x units).

    The paper writes the denominator as D(L_reference at the actual data size); read off the fitted law
    that is exactly actual_tokens, since D inverts L.
    """
    level = fit.level if level is None else level
    if not (math.isfinite(method_loss)):
        raise ValueError(f"method_loss={method_loss} must be finite")
    if not (math.isfinite(actual_tokens) and actual_tokens > 0):
        raise ValueError(f"actual_tokens={actual_tokens} must be finite and > 0")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    effective = fit.law.inverse(method_loss)
    A_K, B_K, C_K = fit.bootstrap.T
    values_K = _inverse(A_K, B_K, C_K, method_loss) / actual_tokens
    infinite = int(np.isinf(values_K).sum())
    interval = percentile_interval(values_K, level)
    notes = []
    if math.isinf(effective):
        notes.append(
            f"loss {method_loss:.6g} is at or below the reference law's asymptote C={fit.law.C:.6g}: "
            "no amount of reference data reaches it"
        )
    if infinite:
        notes.append(
            f"{infinite} of {len(values_K)} bootstrap laws have their asymptote at or above the loss (infinite D)"
        )
    if not len(values_K):
        notes.append("no successful bootstrap refits: no interval")
    return DataEfficiency(
        loss=float(method_loss),
        actual_tokens=float(actual_tokens),
        effective_tokens=effective,
        value=effective / actual_tokens,
        interval=interval,
        level=level,
        note="; ".join(notes) or None,
        infinite_bootstrap=infinite,
        covariance_interval=_delta_interval(fit, method_loss, effective / actual_tokens, level),
    )


def _delta_interval(fit: PowerLawFit, loss: float, value: float, level: float) -> tuple[float, float]:
    """exp(log value -+ t se), se^2 = g^T covariance g with g the gradient of log D(loss) over (A, B, C):
    log D = (log A - log(loss - C)) / B."""
    if not 0 < value < math.inf:
        return (math.nan, math.nan)
    dof = fit.x_N.size - len(PARAMETERS)
    if dof <= 0:
        return (0.0, math.inf)
    A, B, C = fit.law.A, fit.law.B, fit.law.C
    log_D = (math.log(A) - math.log(loss - C)) / B
    gradient_3 = np.array([1 / (A * B), -log_D / B, 1 / (B * (loss - C))])
    se = math.sqrt(max(float(gradient_3 @ fit.covariance @ gradient_3), 0.0))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return (value * math.exp(-half), value * math.exp(half) if half < 700 else math.inf)  # exp(710) overflows


def real_tokens_seen(
    real_store_tokens: float, real_epochs: float, synthetic_original_tokens: float, synthetic_passes: float
) -> float:
    """Real tokens a run trained on, counted as the paper does: every epoch of the real store, plus the
    one copy of each original document that the synthetic stream carries, once per synthetic pass.

    synthetic_original_tokens: the tokens of the synthetic store's original segments (0 for stitched-nodoc
    and for a run without synthetic data). Epochs and passes may be fractional (the data plan's figures).
    This is the x of loss-vs-epochs or -compute plots; the data scaling law's x is unique_real_tokens.
    """
    arguments = {
        "real_store_tokens": real_store_tokens,
        "real_epochs": real_epochs,
        "synthetic_original_tokens": synthetic_original_tokens,
        "synthetic_passes": synthetic_passes,
    }
    for name, value in arguments.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} must be finite and >= 0")
    return float(real_epochs * real_store_tokens + synthetic_passes * synthetic_original_tokens)


def unique_real_tokens(real_store_tokens: int) -> int:
    """The data scaling law's x (the paper's D): the size of the real data set in tokens, however many
    epochs a run makes over it and whatever copies a synthetic stream carries. It is the real store's
    token count; this function is that contract, checked."""
    if isinstance(real_store_tokens, bool) or int(real_store_tokens) != real_store_tokens or real_store_tokens <= 0:
        raise ValueError(f"real_store_tokens={real_store_tokens} must be a positive whole number")
    return int(real_store_tokens)


def percentile_interval(values_K: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of the values by linear interpolation between order statistics,
    inf-safe (numpy's interpolation gives NaN next to an infinite value); (nan, nan) for no values."""
    sorted_K = np.sort(np.asarray(values_K, dtype=np.float64))
    if not sorted_K.size:
        return (math.nan, math.nan)

    def at(q: float) -> float:
        position = q * (sorted_K.size - 1)
        low, high = math.floor(position), math.ceil(position)
        a, b = float(sorted_K[low]), float(sorted_K[high])
        if low == high or a == b:
            return a
        if math.isinf(b):  # the interval reaches into the infinite members
            return b
        return a + (b - a) * (position - low)

    return (at(0.5 - level / 2), at(0.5 + level / 2))


def _inverse(A: Any, B: Any, C: Any, loss: float) -> Any:
    """Vectorised D(L) = (A / (L - C))^(1/B); inf where L <= C."""
    gap = loss - np.asarray(C, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        value = (np.asarray(A) / np.where(gap > 0, gap, 1.0)) ** (1.0 / np.asarray(B))
    return np.where(gap > 0, value, np.inf)


def _least_squares(x_N: np.ndarray, y_N: np.ndarray, weights_KxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of weights, the (A, B, C) >= 0 minimising sum_n w_n (A x_n^-B + C - y_n)^2: [K, 3], SSE [K].

    x is scaled by its geometric mean g first, so that x^-B stays near 1 for any units (tokens or billions
    of parameters); the fitted A' of the scaled law becomes A = A' g^B.
    """
    scale = float(np.exp(np.mean(np.log(x_N))))
    xs_N = x_N / scale
    K = weights_KxN.shape[0]
    # No starting point to choose: (A, C) are exact for each B, and every B of the grid is tried, so a
    # guess (C just below min y, A and B from a log-log line) cannot leave a refit in a local minimum.
    grid_G = np.linspace(math.log(B_RANGE[0]), math.log(B_RANGE[1]), _B_GRID_POINTS)
    sse_KxG = np.stack([_profile(np.full(K, g), xs_N, y_N, weights_KxN)[0] for g in grid_G], axis=1)
    best_K = np.argmin(sse_KxG, axis=1)
    low_K = grid_G[np.maximum(best_K - 1, 0)]
    high_K = grid_G[np.minimum(best_K + 1, grid_G.size - 1)]
    # Golden section in log B inside the bracket around each row's best grid point.
    ratio = (math.sqrt(5) - 1) / 2
    c_K, d_K = high_K - ratio * (high_K - low_K), low_K + ratio * (high_K - low_K)
    fc_K = _profile(c_K, xs_N, y_N, weights_KxN)[0]
    fd_K = _profile(d_K, xs_N, y_N, weights_KxN)[0]
    for _ in range(_GOLDEN_STEPS):
        left_K = fc_K <= fd_K  # the minimum lies in [low, d]
        high_K = np.where(left_K, d_K, high_K)
        low_K = np.where(left_K, low_K, c_K)
        probe_K = np.where(left_K, high_K - ratio * (high_K - low_K), low_K + ratio * (high_K - low_K))
        f_probe_K = _profile(probe_K, xs_N, y_N, weights_KxN)[0]
        c_K, d_K = np.where(left_K, probe_K, d_K), np.where(left_K, c_K, probe_K)
        fc_K, fd_K = np.where(left_K, f_probe_K, fd_K), np.where(left_K, fc_K, f_probe_K)
    # The best point seen: the bracket's probes, and the grid point itself (a minimum at the range's end).
    candidates_Kx3 = np.stack([c_K, d_K, grid_G[best_K]], axis=1)
    f_Kx3 = np.stack([fc_K, fd_K, sse_KxG[np.arange(K), best_K]], axis=1)
    log_B_K = candidates_Kx3[np.arange(K), np.argmin(f_Kx3, axis=1)]
    sse_K, As_K, C_K = _profile(log_B_K, xs_N, y_N, weights_KxN)
    B_K = np.exp(log_B_K)
    return np.stack([As_K * scale**B_K, B_K, C_K], axis=1), sse_K


def _profile(
    log_B_K: np.ndarray, xs_N: np.ndarray, y_N: np.ndarray, w_KxN: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At B = exp(log_B) per row, the best (A, C) >= 0 of y = A f + C, f = x^-B, and its weighted SSE.

    A two-variable non-negative least squares: the optimum is the unconstrained one if feasible, else on
    an edge (A = 0: C = mean y; C = 0: A = <f, y> / <f, f>), each clipped at 0; the feasible one with the
    least SSE wins. Returns (SSE_K, A_K, C_K).
    """
    f_KxN = xs_N[None, :] ** -np.exp(log_B_K)[:, None]
    total_K = w_KxN.sum(axis=1)
    mean_f_K = (w_KxN * f_KxN).sum(axis=1) / total_K
    mean_y_K = (w_KxN * y_N).sum(axis=1) / total_K
    df_KxN = f_KxN - mean_f_K[:, None]
    var_f_K = (w_KxN * df_KxN**2).sum(axis=1)
    cov_fy_K = (w_KxN * df_KxN * (y_N - mean_y_K[:, None])).sum(axis=1)
    ff_K = (w_KxN * f_KxN**2).sum(axis=1)
    A_free_K = cov_fy_K / np.where(var_f_K > 0, var_f_K, 1.0)
    zero_K = np.zeros_like(mean_y_K)
    candidates = [
        (A_free_K, mean_y_K - A_free_K * mean_f_K),
        (zero_K, np.maximum(mean_y_K, 0.0)),
        (np.maximum((w_KxN * f_KxN * y_N).sum(axis=1) / ff_K, 0.0), zero_K),
    ]
    best_sse_K = np.full(mean_y_K.shape, np.inf)
    best_A_K, best_C_K = zero_K.copy(), zero_K.copy()
    for A_K, C_K in candidates:
        residual_KxN = A_K[:, None] * f_KxN + C_K[:, None] - y_N
        sse_K = np.where((A_K >= 0) & (C_K >= 0), (w_KxN * residual_KxN**2).sum(axis=1), np.inf)
        better_K = sse_K < best_sse_K
        best_sse_K = np.where(better_K, sse_K, best_sse_K)
        best_A_K = np.where(better_K, A_K, best_A_K)
        best_C_K = np.where(better_K, C_K, best_C_K)
    return best_sse_K, best_A_K, best_C_K


def _covariance(x_N: np.ndarray, residuals_N: np.ndarray, law: PowerLaw) -> np.ndarray:
    """curve_fit's covariance (absolute_sigma=False): s^2 pinv(J^T J), s^2 = SSE / (n - 3), through the SVD
    of J with its small singular values dropped; inf when there are no residual degrees of freedom."""
    n = x_N.size
    if n <= len(PARAMETERS):
        return np.full((3, 3), np.inf)
    power_N = x_N**-law.B
    jacobian_Nx3 = np.stack([power_N, -law.A * power_N * np.log(x_N), np.ones(n)], axis=1)
    _, s_3, vt_3x3 = np.linalg.svd(jacobian_Nx3, full_matrices=False)
    keep = s_3 > np.finfo(np.float64).eps * max(jacobian_Nx3.shape) * s_3[0]
    vt = vt_3x3[keep]
    pinv_3x3 = (vt.T / s_3[keep] ** 2) @ vt
    return pinv_3x3 * float(residuals_N @ residuals_N) / (n - len(PARAMETERS))


def _json_number(value: Any) -> float | str | None:
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
