"""Runnable benchmarks: `python -m megadoc_jax.benchmarks.<name>`. Each prints its figures and ratios."""
