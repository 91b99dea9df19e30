"""`python -m megadoc_jax.study RUNS_DIR ...`: the report command without the evaluate module's JAX import."""

import sys

from megadoc_jax.study.cli import main

sys.exit(main())
