"""Scaling-law fits for 1,000 runs, and the coverage of their intervals (megadoc_jax/scaling.py).

    python -m megadoc_jax.benchmarks.scaling_fit               # timing: 1,000 runs in 40 laws, bootstrap 1000
    python -m megadoc_jax.benchmarks.scaling_fit --coverage    # + coverage of the 95% intervals, 200 data sets

Timing: 1,000 synthetic runs, 40 groups (say method x G) of 25 runs (5 data sizes x 5 seeds), each group's
final losses drawn from its own known law with seed noise. Each group gets a fit with --bootstrap refits,
and every run a data efficiency against the first group's law (the reference). Prints the seconds for the
fits and for the efficiencies, then, for one group, the same bootstrap refitted by a loop of scipy
curve_fit calls (the alternative scaling.py's docstring weighs), and the ratio.

Coverage: for 8 sizes x 1 seed, 8 x 3 and 24 x 1, 200 noisy data sets from one law, 200 refits each:
how often each interval (bootstrap percentiles; covariance with Student t; the efficiency's both) holds
the truth. A correct 95% interval lands in [0.905, 0.99] with probability 99.8% (Binomial(200, 0.95)).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np
from scipy import optimize

from megadoc_jax.scaling import PowerLaw, data_efficiency, fit_power_law

SIZES_N = np.geomspace(1e7, 2e9, 5)
REFERENCE = PowerLaw(A=3e3, B=0.45, C=2.1)
SIGMA = 0.01


def synthetic_groups(groups: int, seeds: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens_N, loss_N) per group: the reference law for group 0, then laws with other exponents and
    asymptotes (a method that learns more from the same tokens)."""
    out = []
    for g in range(groups):
        law = REFERENCE if g == 0 else PowerLaw(REFERENCE.A, rng.uniform(0.35, 0.6), rng.uniform(1.9, 2.1))
        x_N = np.repeat(SIZES_N, seeds)
        out.append((x_N, law(x_N) + rng.normal(0, SIGMA, x_N.size)))
    return out


def timing(groups: int, seeds: int, bootstrap: int) -> None:
    data = synthetic_groups(groups, seeds, np.random.default_rng(0))
    runs = sum(x_N.size for x_N, _ in data)
    begin = time.perf_counter()
    fits = [fit_power_law(x_N, y_N, bootstrap=bootstrap, seed=g) for g, (x_N, y_N) in enumerate(data)]
    fit_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    efficiencies = [data_efficiency(fits[0], y, x) for x_N, y_N in data for x, y in zip(x_N, y_N)]
    efficiency_seconds = time.perf_counter() - begin
    print(f"{runs} runs in {groups} laws of {runs // groups} points, bootstrap {bootstrap}")
    print(f"  fits (with bootstrap):      {fit_seconds:7.2f} s   ({fit_seconds / groups * 1e3:.1f} ms a law)")
    print(f"  data efficiency per run:    {efficiency_seconds:7.2f} s   ({len(efficiencies)} efficiencies)")
    print(f"  total:                      {fit_seconds + efficiency_seconds:7.2f} s")

    # The same bootstrap of group 0 by curve_fit, one call per resample, started at the point fit.
    x_N, y_N = data[0]
    law = fits[0].law
    counts_KxN = np.random.default_rng(0).multinomial(x_N.size, np.full(x_N.size, 1 / x_N.size), size=bootstrap)
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)  # degenerate resamples: no covariance
        for counts_N in counts_KxN:
            take = np.repeat(np.arange(x_N.size), counts_N)
            with contextlib.suppress(RuntimeError, ValueError):  # a refit that does not converge still counts
                optimize.curve_fit(
                    lambda x, A, B, C: A / x**B + C, x_N[take], y_N[take], p0=[law.A, law.B, law.C], bounds=(0, np.inf)
                )
    loop_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    fit_power_law(x_N, y_N, bootstrap=bootstrap, seed=0)
    ours_seconds = time.perf_counter() - begin
    print(f"one law's {bootstrap} refits: curve_fit loop {loop_seconds:.2f} s, fit_power_law {ours_seconds:.3f} s")
    print(f"  ratio (curve_fit loop / fit_power_law): {loop_seconds / ours_seconds:.1f}x")


def coverage(trials: int, bootstrap: int) -> None:
    loss, actual = 2.4, 1e8
    truth = {"A": REFERENCE.A, "B": REFERENCE.B, "C": REFERENCE.C, "eff": REFERENCE.inverse(loss) / actual}
    print(f"coverage of 95% intervals over {trials} noisy data sets (sigma {SIGMA}), bootstrap {bootstrap}")
    print("  design          boot A  boot B  boot C  boot eff | cov A   cov B   cov C   delta eff")
    for sizes, seeds in ((8, 1), (8, 3), (24, 1)):
        x_N = np.repeat(np.geomspace(1e7, 2e9, sizes), seeds)
        hits = np.zeros(8)
        for trial in range(trials):
            y_N = REFERENCE(x_N) + np.random.default_rng(1000 + trial).normal(0, SIGMA, x_N.size)
            fit = fit_power_law(x_N, y_N, bootstrap=bootstrap, seed=trial)
            efficiency = data_efficiency(fit, loss, actual)
            intervals = [fit.intervals[k] for k in "ABC"] + [efficiency.interval]
            intervals += [fit.covariance_intervals[k] for k in "ABC"] + [efficiency.covariance_interval]
            values = [truth[k] for k in ("A", "B", "C", "eff")] * 2
            hits += [low <= value <= high for (low, high), value in zip(intervals, values)]
        rates = hits / trials
        print(f"  {sizes:2d} sizes x {seeds} seed  " + "  ".join(f"{r:6.3f}" for r in rates[:4]) + "  | ", end="")
        print("  ".join(f"{r:6.3f}" for r in rates[4:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5, help="runs per data size in each group")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--coverage", action="store_true", help="also measure the intervals' coverage")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    timing(args.groups, args.seeds, args.bootstrap)
    if args.coverage:
        coverage(args.trials, bootstrap=200)


if __name__ == "__main__":
    main()
