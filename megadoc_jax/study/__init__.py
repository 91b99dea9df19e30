"""The study report: from a directory of runs and their evaluations, the paper's tables, fits and figures.
No JAX import anywhere in the package, so that it runs on a laptop (docs/study.md).

    python -m megadoc_jax.evaluate report RUNS_DIR [--out DIR]       # or python -m megadoc_jax.study RUNS_DIR

runs.py finds and reads runs, tables.py computes the numbers (fits from megadoc_jax.scaling), figures.py
turns them into plot data, plots.py draws it (matplotlib), report.py writes report.json / report.md, cli.py
is the command.
"""
