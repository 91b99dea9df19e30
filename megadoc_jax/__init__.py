"""megadoc-jax: data-efficient pre-training with synthetic megadocs, on JAX."""

__version__ = "0.1.0"
