"""Products of token activations with weights: [B, L, *in] x [*in, *out] -> [B, L, *out].

Every weight matmul of the decoder and the loss goes through `token_matmul`. It merges the two token
axes (batch rows B, positions L) into one, and the weight's input and output axes into one each, so
that the product is a plain 2-D matmul [B*L, I] x [I, O]. XLA:CPU compiles the weight gradient of the
same product written with two token axes through transposing copies of the activations' gradients that
cost more than the matmuls themselves (on the CPU step benchmark's shape the MLP's backward took 2.3x
as long; docs/performance.md). TPU and GPU compilers merge the axes themselves; the merged form is the
same arithmetic.

The token axes stay apart when the mesh splits the sequence (context parallelism): rows of different
devices would interleave in the merged axis, which no sharding expresses, and XLA would move data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from megadoc_jax import sharding


def token_matmul(x_BxLxI: jax.Array, w_IxO: jax.Array, in_axes: int = 1) -> jax.Array:
    """x's last `in_axes` axes contracted with w's first `in_axes`: [B, L, *in] x [*in, *out] -> [B, L, *out]."""
    in_shape = x_BxLxI.shape[2:]
    if len(in_shape) != in_axes or w_IxO.shape[:in_axes] != in_shape:
        raise ValueError(f"token_matmul: x {x_BxLxI.shape} and w {w_IxO.shape} do not share {in_axes} input axes")
    if sharding.splits("seq"):
        return jnp.tensordot(x_BxLxI, w_IxO, axes=in_axes)
    b, length = x_BxLxI.shape[:2]
    out_shape = w_IxO.shape[in_axes:]
    x_TxI = x_BxLxI.reshape(b * length, math.prod(in_shape))
    y_TxO = x_TxI @ w_IxO.reshape(x_TxI.shape[1], math.prod(out_shape))
    return y_TxO.reshape(b, length, *out_shape)


def token_sum_outer(x_BxLxI: jax.Array, g_BxLxO: jax.Array) -> jax.Array:
    """sum over tokens of x_t g_t^T: [B, L, I] x [B, L, O] -> [I, O], the weight gradient of token_matmul
    (for a hand-written backward pass), in the same merged form."""
    if sharding.splits("seq"):
        return jnp.einsum("bli,blo->io", x_BxLxI, g_BxLxO)
    tokens = x_BxLxI.shape[0] * x_BxLxI.shape[1]
    return x_BxLxI.reshape(tokens, -1).T @ g_BxLxO.reshape(tokens, -1)
