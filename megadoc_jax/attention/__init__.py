"""Scaled dot-product attention behind one function, with backends chosen by name (model.attention).

`attention(q, k, v, segment_ids_BxL=..., causal=..., impl=...)` is the only entry point the model uses.
Backends register under a name with what they need (`@register_backend("xla", context_parallel=True,
zigzag_layout=False)`, registry.py) and receive the same arguments, already checked.

Conventions shared by every backend:
- q is [B, L, H, K]; k and v are [B, L, G, K] with G dividing H (grouped-query attention: query head h
  reads kv head h // (H / G)). Rotary positions are already applied to q and k.
- Scores are scaled by 1/sqrt(K); the softmax runs in fp32; the output has q's dtype.
- segment_ids_BxL (optional) restricts each token to keys of the same segment id (document masking).
  Id 0 marks padding; padding tokens attend among themselves, so no row is ever fully masked (no NaN),
  and real tokens never see padding because their ids differ.

Modules: registry.py (registry, declarations, checks), layout.py (context axis, zig-zag layout),
xla.py (the reference), splash.py (the Pallas splash kernel), fused.py (splash and cudnn backends),
context_parallel.py (ring and all_gather), ring_blocks.py (the ring's block kernels).
"""

from megadoc_jax.attention import context_parallel, fused  # noqa: F401  (the other built-in backends register)
from megadoc_jax.attention.layout import CONTEXT_AXIS, context_size, zigzag_order
from megadoc_jax.attention.registry import (
    AttentionBackend,
    BackendSpec,
    attention,
    backends,
    check_mesh,
    get_backend,
    inverse_token_order,
    register_backend,
    token_order,
)
from megadoc_jax.attention.xla import attention_mask, masked_attention, xla_attention

__all__ = [
    "CONTEXT_AXIS",
    "AttentionBackend",
    "BackendSpec",
    "attention",
    "attention_mask",
    "backends",
    "check_mesh",
    "context_size",
    "get_backend",
    "inverse_token_order",
    "masked_attention",
    "register_backend",
    "token_order",
    "xla_attention",
    "zigzag_order",
]
