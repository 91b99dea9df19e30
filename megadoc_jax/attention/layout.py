"""The mesh's context axis and the load-balanced (zig-zag) token layout of context-parallel attention.

Under causal masking, device d of a contiguous split of the sequence over C devices would do d+1 blocks
of work and idle otherwise. Instead the sequence of L tokens is cut into 2C chunks of c = L / (2C) tokens
and device d holds chunks d and 2C-1-d (`zigzag_order`). A backend that declares `zigzag_layout` gets
every [B, L] input permuted with that order (step.py does it via registry.token_order).
"""

from __future__ import annotations

import jax
import numpy as np

CONTEXT_AXIS = "context"


def context_size() -> int:
    """Size of the 'context' axis of the mesh set with jax.set_mesh (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(CONTEXT_AXIS, 1)


def zigzag_order(length: int, context: int) -> np.ndarray:
    """int32 [length]: original token index at each position of the load-balanced layout."""
    if length % (2 * context):
        raise ValueError(
            f"zig-zag layout: sequence length {length} (data.seq_len) must be divisible by 2 x context = {2 * context}"
        )
    chunk = length // (2 * context)
    chunks = [(d, 2 * context - 1 - d) for d in range(context)]
    return np.concatenate([np.arange(i * chunk, (i + 1) * chunk) for pair in chunks for i in pair]).astype(np.int32)
