"""The data layer: token stores (no JAX needed) and the Grain input pipeline."""
