"""Fused attention kernels behind attention(): `splash` (Pallas, TPU) and `cudnn` (NVIDIA GPUs).

splash: JAX's Pallas splash attention kernel, with a causal (or full) mask and segment ids for document
masking. Query heads are grouped by kv head and each group runs the multi-query kernel, vmapped over kv
heads and batch rows, so K/V are never repeated. A Pallas kernel cannot be partitioned by XLA, so under a
mesh it runs inside `jax.shard_map` (batch over data/fsdp, heads over tensor); the sequence must not be
split (context 1: use `ring` for context parallelism). The kernel is compiled for TPU programs (also
ahead of time from a CPU machine) and run in Pallas interpret mode on other platforms, chosen at
lowering time with `lax.platform_dependent`, so tests on CPU exercise the very same kernel code.

cudnn: `jax.nn.dot_product_attention(implementation='cudnn')`, fused flash attention with causal
masking and GQA. It has no segment ids (only per-row sequence lengths), so with document masking it
warns once and falls back to the xla reference. On a machine without a CUDA GPU it fails with a clear
error instead of silently running something else.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from megadoc_jax import attention as attention_lib
from megadoc_jax import sharding

SPLASH_BLOCK = 512  # tokens per kernel block (forward and backward); clipped to the sequence length


def _block_sizes(length: int) -> splash_kernel.BlockSizes:
    block = min(SPLASH_BLOCK, length)
    if length % block:
        raise ValueError(f"splash attention: sequence length {length} must be a multiple of {block}")
    return splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip


def _splash_kernel(length: int, group: int, causal: bool, interpret: bool):
    """Multi-query kernel for `group` query heads sharing one kv head (the mask is static). Built per
    trace, not cached: it holds arrays that would leak from one trace into another."""
    shape = (length, length)
    head_mask = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    return splash_kernel.make_splash_mqa(
        splash_mask.MultiHeadMask([head_mask] * group),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=_block_sizes(length),
        interpret=interpret,
    )


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal: bool) -> jax.Array:
    b, length, heads, size = q_BxLxHxK.shape
    kv_heads = k_BxLxGxK.shape[2]
    group = heads // kv_heads
    # The kernel does not scale scores; 1/sqrt(K) goes on q.
    q_BxGxRxLxK = (q_BxLxHxK * size**-0.5).reshape(b, length, kv_heads, group, size).transpose(0, 2, 3, 1, 4)
    k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros((b, length), jnp.int32)  # one segment: the kernel's mask alone

    def run(interpret: bool):
        kernel = _splash_kernel(length, group, causal, interpret)

        def one_row(q_GxRxLxK, k_GxLxK, v_GxLxK, seg_L):
            ids = splash_kernel.SegmentIds(q=seg_L, kv=seg_L)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GxRxLxK, k_GxLxK, v_GxLxK)

        return jax.vmap(one_row)(q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL)

    # Both branches are traced; lowering keeps the one for the target platform.
    out_BxGxRxLxK = jax.lax.platform_dependent(tpu=lambda: run(False), default=lambda: run(True))
    return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, length, heads, size).astype(q_BxLxHxK.dtype)


@attention_lib.register_backend("splash")
def splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """Pallas splash attention (TPU; interpret mode elsewhere)."""
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, causal=causal)
    if mesh.empty:
        return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    sizes = dict(mesh.shape)
    if sizes.get("context", 1) > 1:
        raise ValueError(
            "attention backend 'splash' does not split the sequence; with mesh.context > 1 use "
            "model.attention=ring"
        )
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


@attention_lib.register_backend("cudnn")
def cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """cuDNN fused attention; document masking falls back to xla with a warning."""
    if segment_ids_BxL is not None:
        _warn_cudnn_fallback()
        return attention_lib.xla_attention(
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=segment_ids_BxL, causal=causal
        )
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention backend 'cudnn' (model.attention) needs an NVIDIA GPU; this process runs on "
            f"{jax.default_backend()!r}: use model.attention=xla (or splash on TPU)"
        )
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=causal, implementation="cudnn"
    ).astype(q_BxLxHxK.dtype)
