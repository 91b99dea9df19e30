"""Next-token cross-entropy over a large vocabulary without materialising all the logits.

The hidden states [B, L, D] are cut into chunks of `chunk_tokens` sequence positions; a `lax.scan` walks
the chunks and computes each chunk's logits [B, chunk, V] = x_chunk @ W in fp32, its log-sum-exp and the
target logit, keeping only running sums. The chunk body is wrapped in `jax.checkpoint`, so the backward
pass recomputes a chunk's logits instead of storing them: at most one chunk of logits (and its gradient)
is alive at a time, never the full [B, L, V].

Chunks are strided (chunk j holds positions j, j + n, j + 2n, ... for n chunks): when the sequence axis
is split over the 'context' mesh axis in contiguous blocks, every chunk then takes its positions from
each block, and the scan never moves data between devices.

The result is sums, not means, so that gradient accumulation can add microbatches and divide once:
    loss_sum   = sum_t mask_t * (logsumexp(logits_t) - logits_t[target_t])
    z_loss_sum = z_loss * sum_t mask_t * logsumexp(logits_t)^2
    weight_sum = sum_t mask_t
The training objective is (loss_sum + z_loss_sum) / weight_sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megadoc_jax.sharding import constrain

DEFAULT_CHUNK_TOKENS = 256  # sequence positions per chunk: live logits are B_local x 256 x V fp32


def _chunk_sums(
    unembed_DxV: jax.Array, x_BxCxD: jax.Array, targets_BxC: jax.Array, mask_BxC: jax.Array
) -> jax.Array:
    """[ce_sum, lse_squared_sum, weight_sum] (fp32 [3]) of one chunk."""
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", x_BxCxD.astype(jnp.float32), unembed_DxV.astype(jnp.float32))
    logits_BxCxV = constrain(logits_BxCxV, ("batch", "seq", "vocab"))
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return jnp.stack(
        [
            jnp.sum(mask_BxC * (lse_BxC - target_logit_BxC)),
            jnp.sum(mask_BxC * jnp.square(lse_BxC)),
            jnp.sum(mask_BxC),
        ]
    )


def _to_chunks(a_BxL: jax.Array, chunks: int) -> jax.Array:
    """[B, L, ...] -> [chunks, B, L / chunks, ...], chunk j holding positions j, j + chunks, ..."""
    b, length = a_BxL.shape[:2]
    a_BxCxNx = a_BxL.reshape(b, length // chunks, chunks, *a_BxL.shape[2:])
    return jnp.moveaxis(a_BxCxNx, 2, 0)


def next_token_loss(
    x_BxLxD: jax.Array,
    unembed_DxV: jax.Array,
    targets_BxL: jax.Array,
    loss_mask_BxL: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, jax.Array]:
    """Summed cross-entropy, z-loss and weight (fp32 scalars); see the module docstring.

    targets must lie in [0, V). loss_mask (default: all ones) may hold any non-negative weights.
    """
    if x_BxLxD.ndim != 3:
        raise ValueError(f"next_token_loss: x must be [B, L, D], got {x_BxLxD.shape}")
    b, length, d = x_BxLxD.shape
    if unembed_DxV.ndim != 2 or unembed_DxV.shape[0] != d:
        raise ValueError(f"next_token_loss: unembed {unembed_DxV.shape} must be [D={d}, V]")
    if targets_BxL.shape != (b, length):
        raise ValueError(f"next_token_loss: targets {targets_BxL.shape} must be [B, L] = {(b, length)}")
    if loss_mask_BxL is not None and loss_mask_BxL.shape != (b, length):
        raise ValueError(f"next_token_loss: loss_mask {loss_mask_BxL.shape} must be [B, L] = {(b, length)}")
    if chunk_tokens < 1:
        raise ValueError(f"next_token_loss: chunk_tokens must be positive, got {chunk_tokens}")

    if loss_mask_BxL is None:
        mask_BxL = jnp.ones((b, length), jnp.float32)
    else:
        mask_BxL = loss_mask_BxL.astype(jnp.float32)
    chunk = min(chunk_tokens, length)
    chunks = -(-length // chunk)
    padding = chunks * chunk - length
    if padding:  # padded positions carry mask 0 and add nothing
        pad = lambda a: jnp.pad(a, [(0, 0), (0, padding)] + [(0, 0)] * (a.ndim - 2))
        x_BxLxD, targets_BxL, mask_BxL = pad(x_BxLxD), pad(targets_BxL), pad(mask_BxL)

    chunk_sums = jax.checkpoint(_chunk_sums)

    def add_chunk(total_3: jax.Array, chunk_inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total_3 + chunk_sums(unembed_DxV, *chunk_inputs), None

    inputs = (_to_chunks(x_BxLxD, chunks), _to_chunks(targets_BxL, chunks), _to_chunks(mask_BxL, chunks))
    total_3, _ = jax.lax.scan(add_chunk, jnp.zeros((3,), jnp.float32), inputs)
    return {"loss_sum": total_3[0], "z_loss_sum": z_loss * total_3[1], "weight_sum": total_3[2]}
