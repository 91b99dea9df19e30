"""Scaled dot-product attention behind one function, with backends chosen by name.

`attention(q, k, v, segment_ids_BxL=..., causal=..., impl=...)` is the only entry point the model uses.
Backends register under a name (`@register_backend("xla")`) and receive the same arguments, already
checked, so that faster kernels (cudnn, splash, ring, all_gather) can be added without touching the model.

Conventions shared by every backend:
- q is [B, L, H, K]; k and v are [B, L, G, K] with G dividing H (grouped-query attention: query head h
  reads kv head h // (H / G)). Rotary positions are already applied to q and k.
- Scores are scaled by 1/sqrt(K); the softmax runs in fp32; the output has q's dtype.
- segment_ids_BxL (optional) restricts each token to keys of the same segment id (document masking).
  Id 0 marks padding; padding tokens attend among themselves, so no row is ever fully masked (no NaN),
  and real tokens never see padding because their ids differ.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp


class AttentionBackend(Protocol):
    def __call__(
        self,
        q_BxLxHxK: jax.Array,
        k_BxLxGxK: jax.Array,
        v_BxLxGxK: jax.Array,
        *,
        segment_ids_BxL: jax.Array | None,
        causal: bool,
    ) -> jax.Array: ...


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(name: str) -> Callable[[AttentionBackend], AttentionBackend]:
    """Decorator: make `fn` available as attention(..., impl=name)."""

    def register(fn: AttentionBackend) -> AttentionBackend:
        if name in _BACKENDS:
            raise ValueError(f"attention backend {name!r} is already registered")
        _BACKENDS[name] = fn
        return fn

    return register


def backends() -> tuple[str, ...]:
    """Names of the registered backends, sorted."""
    return tuple(sorted(_BACKENDS))


def get_backend(impl: str) -> AttentionBackend:
    """The backend registered as `impl`, or ValueError listing the known names (model.attention)."""
    try:
        return _BACKENDS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {impl!r} (model.attention); registered backends: {list(backends())}"
        ) from None


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention: q and k must be [B, L, heads, K], got q {q.shape}, k {k.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} differ")
    (b, length, heads, size), (kb, klength, kv_heads, ksize) = q.shape, k.shape
    if (b, length, size) != (kb, klength, ksize):
        raise ValueError(f"attention: q {q.shape} and k {k.shape} differ in batch, length or head size")
    if heads % kv_heads:
        raise ValueError(f"attention: {kv_heads} kv heads do not divide {heads} query heads")
    if segment_ids is not None and segment_ids.shape != (b, length):
        raise ValueError(f"attention: segment_ids {segment_ids.shape} must be [B, L] = {(b, length)}")


def attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None = None,
    causal: bool = True,
    impl: str = "xla",
) -> jax.Array:
    """Self-attention output [B, L, H, K] with the backend `impl` (see module docstring)."""
    backend = get_backend(impl)
    _check_shapes(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    return backend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=segment_ids_BxL, causal=causal)


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
    q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_BxTxS: jax.Array | None
) -> jax.Array:
    """GQA attention of T queries over S keys under a boolean mask, fp32 scores and softmax. The query
    heads are grouped ([B, T, G, H/G, K]) so K/V are never repeated in memory. Shared by the xla
    backend and the KV-cache decoder (megadoc_jax/decode.py)."""
    b, t, heads, size = q_BxTxHxK.shape
    kv_heads = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, kv_heads, heads // kv_heads, size)
    scores_BxGxRxTxS = jnp.einsum(
        "btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32
    ) * (size**-0.5)
    if mask_BxTxS is not None:
        # A finite minimum instead of -inf: a fully masked row gives a uniform distribution, not NaN.
        scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1)
    out_BxTxGxRxK = jnp.einsum(
        "bgrts,bsgk->btgrk", probs_BxGxRxTxS.astype(v_BxSxGxK.dtype), v_BxSxGxK, preferred_element_type=jnp.float32
    )
    return out_BxTxGxRxK.reshape(b, t, heads, size).astype(q_BxTxHxK.dtype)


@register_backend("xla")
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


# Backends in their own modules register themselves on import (they import this module first).
from megadoc_jax import attention_ring  # noqa: E402,F401  (ring, all_gather)
from megadoc_jax import attention_kernels  # noqa: E402,F401  (splash, cudnn)
