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
    """GQA attention of T queries over S keys under a boolean mask, fp32 scores and softmax. Shared by the
    xla backend and the KV-cache decoder (megadoc_jax/decode.py), whose cache is laid out [B, G, S, K]
    (kv_layout "bgsk"; training's K/V are [B, S, G, K], "bsgk").

    The R = H/G query heads that share a KV head are stacked as rows, [B, G, R*T, K], and K/V are laid
    out [B, G, S, K], so both products are 4-D batched matmuls and K/V are never repeated in memory. On
    XLA:CPU that form ran the forward 2-3x and forward + backward 1.2-1.6x faster than 5-D products over
    [B, T, G, R, K] (docs/attention.md)."""
    if kv_layout not in ("bsgk", "bgsk"):
        raise ValueError(f"masked_attention: kv_layout must be 'bsgk' or 'bgsk', got {kv_layout!r}")
    if kv_layout == "bsgk":
        k_BxGxSxK, v_BxGxSxK = jnp.transpose(k_BxSxGxK, (0, 2, 1, 3)), jnp.transpose(v_BxSxGxK, (0, 2, 1, 3))
    else:
        k_BxGxSxK, v_BxGxSxK = k_BxSxGxK, v_BxSxGxK
    b, t, heads, size = q_BxTxHxK.shape
    kv_heads = k_BxGxSxK.shape[1]
    r = heads // kv_heads
    q_BxGxRxTxK = jnp.transpose(q_BxTxHxK.reshape(b, t, kv_heads, r, size), (0, 2, 3, 1, 4))
    q_BxGxQxK = q_BxGxRxTxK.reshape(b, kv_heads, r * t, size)  # query row q = r * T + t
    mask_BxQxS = mask_BxTxS if mask_BxTxS is None or r == 1 else jnp.tile(mask_BxTxS, (1, r, 1))
    out_BxGxQxK = _attention(q_BxGxQxK, k_BxGxSxK, v_BxGxSxK, mask_BxQxS)
    out_BxTxGxRxK = jnp.transpose(out_BxGxQxK.reshape(b, kv_heads, r, t, size), (0, 3, 1, 2, 4))
    return out_BxTxGxRxK.reshape(b, t, heads, size).astype(q_BxTxHxK.dtype)


def _probabilities(q_BxGxQxK: jax.Array, k_BxGxSxK: jax.Array, mask_BxQxS: jax.Array | None) -> jax.Array:
    """fp32 softmax of the scaled scores [B, G, Q, S]; masked keys get a finite minimum instead of -inf, so
    that a fully masked row gives a uniform distribution, not NaN."""
    scores_BxGxQxS = jnp.einsum("bgqk,bgsk->bgqs", q_BxGxQxK, k_BxGxSxK, preferred_element_type=jnp.float32)
    scores_BxGxQxS = scores_BxGxQxS * (q_BxGxQxK.shape[-1] ** -0.5)
    if mask_BxQxS is not None:
        scores_BxGxQxS = jnp.where(mask_BxQxS[:, None], scores_BxGxQxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BxGxQxS, axis=-1)


def _weighted_values(probs_BxGxQxS: jax.Array, v_BxGxSxK: jax.Array) -> jax.Array:
    probs_BxGxQxS = probs_BxGxQxS.astype(v_BxGxSxK.dtype)
    return jnp.einsum("bgqs,bgsk->bgqk", probs_BxGxQxS, v_BxGxSxK, preferred_element_type=jnp.float32)


# The backward pass written out (the softmax's gradient from the saved probabilities and output), as XLA
# compiles it from autodiff in more passes over the [Q, S] arrays: at 2,048 tokens on CPU the forward +
# backward took 0.56 of the autodiff version's time (docs/attention.md).
@jax.custom_vjp
def _attention(q_BxGxQxK, k_BxGxSxK, v_BxGxSxK, mask_BxQxS):
    return _weighted_values(_probabilities(q_BxGxQxK, k_BxGxSxK, mask_BxQxS), v_BxGxSxK)


def _attention_forward(q_BxGxQxK, k_BxGxSxK, v_BxGxSxK, mask_BxQxS):
    probs_BxGxQxS = _probabilities(q_BxGxQxK, k_BxGxSxK, mask_BxQxS)
    out_BxGxQxK = _weighted_values(probs_BxGxQxS, v_BxGxSxK)
    return out_BxGxQxK, (q_BxGxQxK, k_BxGxSxK, v_BxGxSxK, mask_BxQxS, probs_BxGxQxS, out_BxGxQxK)


def _attention_backward(residuals, dout_BxGxQxK):
    q_BxGxQxK, k_BxGxSxK, v_BxGxSxK, mask_BxQxS, probs_BxGxQxS, out_BxGxQxK = residuals
    f32 = jnp.float32
    dout_in_v_BxGxQxK = dout_BxGxQxK.astype(v_BxGxSxK.dtype)  # the products in the values' dtype, as forward
    dv_BxGxSxK = jnp.einsum(
        "bgqs,bgqk->bgsk", probs_BxGxQxS.astype(v_BxGxSxK.dtype), dout_in_v_BxGxQxK, preferred_element_type=f32
    )
    dprobs_BxGxQxS = jnp.einsum("bgqk,bgsk->bgqs", dout_in_v_BxGxQxK, v_BxGxSxK, preferred_element_type=f32)
    # softmax: dscores = p * (dp - sum_s p dp), and sum_s p dp = sum_k dout * out
    row_BxGxQx1 = jnp.sum(dout_BxGxQxK.astype(f32) * out_BxGxQxK, axis=-1, keepdims=True)
    dscores_BxGxQxS = probs_BxGxQxS * (dprobs_BxGxQxS - row_BxGxQx1) * (q_BxGxQxK.shape[-1] ** -0.5)
    if mask_BxQxS is not None:  # masked scores were constants: no gradient (a fully masked row has p > 0)
        dscores_BxGxQxS = jnp.where(mask_BxQxS[:, None], dscores_BxGxQxS, 0.0)
    dscores_BxGxQxS = dscores_BxGxQxS.astype(q_BxGxQxK.dtype)
    dq_BxGxQxK = jnp.einsum("bgqs,bgsk->bgqk", dscores_BxGxQxS, k_BxGxSxK, preferred_element_type=f32)
    dk_BxGxSxK = jnp.einsum("bgqs,bgqk->bgsk", dscores_BxGxQxS, q_BxGxQxK, preferred_element_type=f32)
    return (
        dq_BxGxQxK.astype(q_BxGxQxK.dtype),
        dk_BxGxSxK.astype(k_BxGxSxK.dtype),
        dv_BxGxSxK.astype(v_BxGxSxK.dtype),
        None,
    )


_attention.defvjp(_attention_forward, _attention_backward)


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
