"""The `xla` backend, the reference: full [L, L] scores per head from XLA ops, fp32 softmax.

`masked_attention` (T queries over S keys under any boolean mask) is shared with the KV-cache decoder
(megadoc_jax/decode.py). Plain XLA ops, so under a mesh with context > 1 XLA's partitioner splits it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from megadoc_jax.attention.registry import register_backend


def attention_mask(length: int, segment_ids_BxL: jax.Array | None, causal: bool) -> jax.Array | None:
    """Boolean mask [B or 1, L, L] (True = may attend), or None when nothing is masked."""
    mask_BxLxL = None
    if causal:
        positions_L = jnp.arange(length)
        mask_BxLxL = (positions_L[:, None] >= positions_L[None, :])[None]
    if segment_ids_BxL is not None:
        same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        mask_BxLxL = same_segment_BxLxL if mask_BxLxL is None else mask_BxLxL & same_segment_BxLxL
    return mask_BxLxL


def masked_attention(
    q_BxTxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    mask_BxTxS: jax.Array | None,
    *,
    kv_layout: str = "bsgk",
) -> jax.Array:
    """GQA attention of T queries over S keys under a boolean mask, fp32 scores and softmax. The query
    heads are grouped ([B, T, G, H/G, K]) so K/V are never repeated in memory. Shared by the xla
    backend and the KV-cache decoder (megadoc_jax/decode.py), whose cache is laid out [B, G, S, K]
    (kv_layout "bgsk": the heads next to the batch, as batched matmuls read them, so no transpose)."""
    if kv_layout not in ("bsgk", "bgsk"):
        raise ValueError(f"masked_attention: kv_layout must be 'bsgk' or 'bgsk', got {kv_layout!r}")
    b, t, heads, size = q_BxTxHxK.shape
    kv_heads = k_BxSxGxK.shape[kv_layout.index("g")]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, kv_heads, heads // kv_heads, size)
    scores_BxGxRxTxS = jnp.einsum(
        f"btgrk,{kv_layout}->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32
    ) * (size**-0.5)
    if mask_BxTxS is not None:
        # A finite minimum instead of -inf: a fully masked row gives a uniform distribution, not NaN.
        scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
    probs_BxGxRxTxS = probs_BxGxRxTxS.astype(v_BxSxGxK.dtype)
    if kv_layout == "bsgk":  # training's layout: its product order, so its numerics stay as they were
        out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxSxGxK, preferred_element_type=jnp.float32)
    else:  # the decoder's cache: a plain batched matmul over (b, g), then the heads back beside the tokens
        out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxS, v_BxSxGxK, preferred_element_type=jnp.float32)
        out_BxTxGxRxK = jnp.transpose(out_BxGxRxTxK, (0, 3, 1, 2, 4))
    return out_BxTxGxRxK.reshape(b, t, heads, size).astype(q_BxTxHxK.dtype)


@register_backend("xla", context_parallel=True, zigzag_layout=False)
def xla_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None,
    causal: bool,
) -> jax.Array:
    """The reference: full [L, L] scores per head, fp32 softmax."""
    mask_BxLxL = attention_mask(q_BxLxHxK.shape[1], segment_ids_BxL, causal)
    return masked_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL)
