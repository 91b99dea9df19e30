"""A miniature of the whole study on CPU: generation, megadocs, baselines, a sweep, evaluation, the report.

`python -m megadoc_jax.miniature` (make miniature). plan.py lists the stages and writes the configs,
runner.py runs them (parallel, resumable), summary.py prints the report's main figures. No JAX import:
every stage is a `python -m ...` command of the project, as a user would run it.
"""
