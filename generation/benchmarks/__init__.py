"""Runnable benchmarks of the generation stage: `python -m generation.benchmarks.<name>`. Each prints its figures
and ratios (docs/benchmarks.md)."""
