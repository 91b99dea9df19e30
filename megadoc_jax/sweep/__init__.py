"""Self-recentring coordinate-search sweeps, resumable and safe with several workers (docs/sweeps.md).

    python -m megadoc_jax.sweep run configs/sweeps/demo.yaml [--workers N]
    python -m megadoc_jax.sweep status runs/sweeps/demo

Modules: search (the pure search: next runs from the results so far), spec (the sweep file and what a
grid point is as a training run), leases (claims, heartbeats, expiry, attempts, done markers in the shared
sweep directory), table (the table of runs on disk), worker (the loop a worker runs), __main__ (the CLI).
"""
