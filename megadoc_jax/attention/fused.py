"""Fused attention kernels behind attention(): `splash` (Pallas, TPU) and `cudnn` (NVIDIA GPUs).

splash: JAX's Pallas splash attention kernel (splash.py), with a causal (or full) mask and segment ids for
document masking. A Pallas kernel cannot be partitioned by XLA, so under a mesh it runs inside
`jax.shard_map` (batch over data/fsdp, heads over tensor); the sequence must not be split, so it
registers with context_parallel=False (use `ring` for context parallelism).

cudnn: `jax.nn.dot_product_attention(implementation='cudnn')`, fused flash attention with causal
masking and GQA. It has no segment ids (only per-row sequence lengths), so with document masking it
warns once and falls back to the xla reference. On a machine without a CUDA GPU it fails with a clear
error instead of silently running something else. cuDNN's partitioning refuses a split sequence, so it
registers with context_parallel=False too.
"""

from __future__ import annotations

import functools
import warnings

import jax
from jax.sharding import PartitionSpec

from megadoc_jax import sharding
from megadoc_jax.attention import splash
from megadoc_jax.attention.registry import register_backend
from megadoc_jax.attention.xla import xla_attention


@register_backend("splash", context_parallel=False, zigzag_layout=False)
def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """Pallas splash attention (TPU; interpret mode elsewhere)."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(splash.local_attention, causal=causal)
    if mesh.empty:
        return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    sizes = dict(mesh.shape)
    q_spec = sharding.logical_to_spec(("batch", "seq", "heads", "head_dim"), q_BxLxHxK.shape, sizes)
    k_spec = sharding.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k_BxLxGxK.shape, sizes)
    if q_spec[2] != k_spec[2]:  # kv heads not divisible by tensor: keep heads whole
        q_spec, k_spec = PartitionSpec(q_spec[0]), PartitionSpec(k_spec[0])
    args, specs = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK), (q_spec, k_spec, k_spec)
    if segment_ids_BxL is not None:
        args, specs = args + (segment_ids_BxL,), specs + (PartitionSpec(q_spec[0]),)
    per_device = lambda q, k, v, seg=None: local(q, k, v, seg)
    # check_vma=False: the Pallas kernel declares its outputs without varying-axis types.
    return jax.shard_map(per_device, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


@functools.lru_cache(maxsize=1)
def _warn_cudnn_fallback() -> None:
    warnings.warn(
        "attention backend 'cudnn' has no segment ids (document masking): using the 'xla' reference "
        "for masked batches (set data.document_masking=false to keep cuDNN)",
        stacklevel=3,
    )


@register_backend("cudnn", context_parallel=False, zigzag_layout=False)
def cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """cuDNN fused attention; document masking falls back to xla with a warning."""
    if segment_ids_BxL is not None:
        _warn_cudnn_fallback()
        return xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=segment_ids_BxL, causal=causal)
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention backend 'cudnn' (model.attention) needs an NVIDIA GPU; this process runs on "
            f"{jax.default_backend()!r}: use model.attention=xla (or splash on TPU)"
        )
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=causal, implementation="cudnn"
    ).astype(q_BxLxHxK.dtype)
