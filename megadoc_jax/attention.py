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


@register_backend("xla")
def xla_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    *,
    segment_ids_BxL: jax.Array | None,
    causal: bool,
) -> jax.Array:
    """The reference: full [L, L] scores per head, fp32 softmax. GQA by grouping the query heads
    ([B, L, G, H/G, K]) so K/V are never repeated in memory."""
    b, length, heads, size = q_BxLxHxK.shape
    kv_heads = k_BxLxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, kv_heads, heads // kv_heads, size)
    scores_BxGxRxLxS = jnp.einsum(
        "blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxLxGxK, preferred_element_type=jnp.float32
    ) * (size**-0.5)
    mask_BxLxS = attention_mask(length, segment_ids_BxL, causal)
    if mask_BxLxS is not None:
        # A finite minimum instead of -inf: a fully masked row (impossible here) would give a uniform
        # distribution rather than NaN.
        mask_Bx1x1xLxS = mask_BxLxS[:, None, None]
        scores_BxGxRxLxS = jnp.where(mask_Bx1x1xLxS, scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxS = jax.nn.softmax(scores_BxGxRxLxS, axis=-1)
    out_BxLxGxRxK = jnp.einsum(
        "bgrls,bsgk->blgrk",
        probs_BxGxRxLxS.astype(v_BxLxGxK.dtype),
        v_BxLxGxK,
        preferred_element_type=jnp.float32,
    )
    return out_BxLxGxRxK.reshape(b, length, heads, size).astype(q_BxLxHxK.dtype)


# Backends in their own modules register themselves on import (they import this module first).
from megadoc_jax import attention_ring  # noqa: E402,F401  (ring, all_gather)
from megadoc_jax import attention_kernels  # noqa: E402,F401  (splash, cudnn)
