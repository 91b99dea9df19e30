"""The Pallas splash attention kernel, called as one multi-query kernel per kv head, vmapped over kv
heads and batch rows (K/V are never repeated): for the `splash` backend (fused.py) and for the blocks of
ring attention (ring_blocks.py).

The kernel is compiled for TPU programs (also ahead of time from a CPU machine) and run in Pallas
interpret mode on other platforms, chosen at lowering time with `lax.platform_dependent`, so tests on CPU
exercise the very same kernel code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

SPLASH_BLOCK = 512  # tokens per kernel block (forward and backward), at most
MIN_SPLASH_BLOCK = 128  # longer sequences are cut into blocks of 512, 256 or 128 tokens


def _block(n: int) -> int | None:
    """The block length for a sequence of n tokens: n itself up to SPLASH_BLOCK, else the largest of
    512, 256, 128 that divides n; None if none does."""
    if n <= SPLASH_BLOCK:
        return n
    return next((b for b in (512, 256, 128) if n % b == 0), None)


def block_sizes(q_len: int, kv_len: int | None = None) -> splash_kernel.BlockSizes:
    kv_len = q_len if kv_len is None else kv_len
    block_q, block_kv = _block(q_len), _block(kv_len)
    if block_q is None or block_kv is None:
        raise ValueError(
            f"splash attention: sequence lengths {q_len} (queries) and {kv_len} (keys) must be at most "
            f"{SPLASH_BLOCK} or multiples of {MIN_SPLASH_BLOCK}"
        )
    return splash_kernel.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )


def _splash_kernel(
    q_len: int, group: int, causal: bool, interpret: bool, kv_len: int | None = None, save_residuals: bool = False
):
    """Multi-query kernel for `group` query heads sharing one kv head (the mask is static). Built per
    trace, not cached: it holds arrays that would leak from one trace into another."""
    shape = (q_len, q_len if kv_len is None else kv_len)
    head_mask = splash_mask.CausalMask(shape) if causal else splash_mask.FullMask(shape)
    return splash_kernel.make_splash_mqa(
        splash_mask.MultiHeadMask([head_mask] * group),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=block_sizes(*shape),
        save_residuals=save_residuals,
        interpret=interpret,
    )


def _head_major(q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK):
    """The kernel's layout: q [B, G, R, Q, K] (scaled by 1/sqrt(K): the kernel does not scale), k and v
    [B, G, S, K]."""
    size = q_BxQxGxRxK.shape[-1]
    q = (q_BxQxGxRxK * size**-0.5).transpose(0, 2, 3, 1, 4)
    return q, k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)


def _segments(q_seg_BxQ, k_seg_BxS) -> tuple:
    """The rows' segment ids to vmap over with the other inputs: none without document masking."""
    return () if q_seg_BxQ is None else (q_seg_BxQ, k_seg_BxS)


def _ids(*seg) -> splash_kernel.SegmentIds | None:
    return splash_kernel.SegmentIds(q=seg[0], kv=seg[1]) if seg else None


def _on_platform(run, interpret: bool | None):
    """run(interpret) compiled for TPU, in Pallas interpret mode elsewhere (or as forced)."""
    if interpret is not None:
        return run(interpret)
    return jax.lax.platform_dependent(tpu=lambda: run(False), default=lambda: run(True))


def _splash_mqa(
    q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK, q_seg_BxQ, k_seg_BxS, causal: bool, interpret: bool | None, save_residuals: bool
):
    """The multi-query kernel over every batch row and kv head: out [B, G, R, Q, K] in q's dtype, plus the
    logsumexp [B, G, R, Q] when save_residuals (then not differentiable; otherwise autodiff uses the
    kernel's own backward)."""
    q_len, group = q_BxQxGxRxK.shape[1], q_BxQxGxRxK.shape[3]
    q, k, v = _head_major(q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK)

    def run(interpret: bool):
        kernel = _splash_kernel(q_len, group, causal, interpret, kv_len=k.shape[2], save_residuals=save_residuals)

        def one_row(q_GxRxQxK, k_GxSxK, v_GxSxK, *seg):
            ids = _ids(*seg)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GxRxQxK, k_GxSxK, v_GxSxK)

        return jax.vmap(one_row)(q, k, v, *_segments(q_seg_BxQ, k_seg_BxS))

    return _on_platform(run, interpret)


def local_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal: bool) -> jax.Array:
    """Splash attention [B, L, H, K] on one device's arrays (no mesh or inside shard_map)."""
    b, length, heads, size = q_BxLxHxK.shape
    kv_heads = k_BxLxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, kv_heads, heads // kv_heads, size)
    out_BxGxRxLxK = _splash_mqa(
        q_BxLxGxRxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, segment_ids_BxL, causal, None, save_residuals=False
    )
    return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, length, heads, size).astype(q_BxLxHxK.dtype)


# --------------------------------------------------------------------------------------------------
# splash as the block kernel of ring attention (ring_blocks.py)
# --------------------------------------------------------------------------------------------------
#
# A ring block is local queries [B, Q, G, R, K] against visiting keys [B, S, G, K] under a static mask:
# causal on the diagonal block, full on the visible part of an off-diagonal one. The forward runs the
# kernel with save_residuals=True for the block's normalised output and logsumexp, which the ring
# merges. The backward calls the kernel's own backward (dq and dK/dV Pallas kernels) with the FINAL
# output and logsumexp of the whole ring in place of the block's: probabilities exp(s - lse_final)
# and delta = rowsum(do * out_final) are then exactly this block's share of the gradient, so the
# ring adds up the blocks' gradients with no correction. The public kernel has no entry for that, so
# this uses splash's `_splash_attention_bwd` (`splash_blocks_available`; the tests run it in interpret
# mode, so a JAX version that changes it fails them).
#
# Precision: the kernel writes each block's output and gradients in the input dtype; they are merged and
# accumulated in fp32. In bf16 that rounds every block's share once more than XLA blocks do (the bf16
# bound in docs/attention.md is tested for both).


def splash_blocks_available() -> bool:
    """Whether this JAX's splash kernel has the backward entry point the ring's splash blocks call."""
    return hasattr(splash_kernel, "_splash_attention_bwd")


def splash_fits_block(chunk: int) -> bool:
    """Whether the splash kernel can take the ring's blocks for zig-zag chunks of `chunk` tokens: blocks
    of (2c, 2c), (2c, c) and (c, 2c) tokens."""
    return chunk % MIN_SPLASH_BLOCK == 0


def splash_block_forward(
    q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK, q_seg_BxQ, k_seg_BxS, causal: bool, interpret: bool | None = None
):
    """(out [B, Q, G, R, K], logsumexp [B, Q, G, R]) of one block, normalised within it; returned in fp32
    (the output as the kernel wrote it, in the input dtype)."""
    out_BxGxRxQxK, (lse_BxGxRxQ,) = _splash_mqa(
        q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK, q_seg_BxQ, k_seg_BxS, causal, interpret, save_residuals=True
    )
    return (
        out_BxGxRxQxK.transpose(0, 3, 1, 2, 4).astype(jnp.float32),
        lse_BxGxRxQ.transpose(0, 3, 1, 2).astype(jnp.float32),
    )


def _collapsed(mask_info):
    """Partial mask blocks flattened to [N, block_q, block_kv], as splash does before its kernels."""
    if mask_info is None or mask_info.partial_mask_blocks is None:
        return mask_info
    blocks = mask_info.partial_mask_blocks
    return mask_info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def splash_block_backward(
    q_BxQxGxRxK,
    k_BxSxGxK,
    v_BxSxGxK,
    q_seg_BxQ,
    k_seg_BxS,
    out_BxQxGxRxK,
    lse_BxQxGxR,
    do_BxQxGxRxK,
    causal: bool,
    interpret: bool | None = None,
):
    """(dq, dk, dv) of one block from the ring's final output and logsumexp (see above); returned in fp32
    (as the kernel wrote them, in the input dtypes)."""
    b, q_len, groups, group, size = q_BxQxGxRxK.shape
    q, k, v = _head_major(q_BxQxGxRxK, k_BxSxGxK, v_BxSxGxK)
    out = out_BxQxGxRxK.astype(q.dtype).transpose(0, 2, 3, 1, 4)
    do = do_BxQxGxRxK.astype(q.dtype).transpose(0, 2, 3, 1, 4)
    lse = lse_BxQxGxR.transpose(0, 2, 3, 1)

    def run(interpret: bool):
        kernel = _splash_kernel(q_len, group, causal, interpret, kv_len=k.shape[2], save_residuals=True)
        options = kernel.kwargs
        dq_info, dkv_info = _collapsed(kernel.dq_mask_info), _collapsed(kernel.dkv_mask_info)

        def one_kv_head(q_RxQxK, k_SxK, v_SxK, ids, out_RxQxK, lse_RxQ, do_RxQxK):
            residuals = (q_RxQxK, k_SxK, v_SxK, ids, None, out_RxQxK, lse_RxQ, dq_info, dkv_info)
            grads = splash_kernel._splash_attention_bwd(
                False,
                options["mask_value"],
                True,
                options["block_sizes"],
                None,
                options["mask_function"],
                None,
                interpret,
                residuals,
                do_RxQxK,
            )
            return grads[3:6]  # dq, dk, dv

        def one_row(q_GxRxQxK, k_GxSxK, v_GxSxK, out_GxRxQxK, lse_GxRxQ, do_GxRxQxK, *seg):
            ids = _ids(*seg)
            per_head = lambda q, k, v, o, l, d: one_kv_head(q, k, v, ids, o, l, d)
            return jax.vmap(per_head)(q_GxRxQxK, k_GxSxK, v_GxSxK, out_GxRxQxK, lse_GxRxQ, do_GxRxQxK)

        return jax.vmap(one_row)(q, k, v, out, lse, do, *_segments(q_seg_BxQ, k_seg_BxS))

    dq_BxGxRxQxK, dk_BxGxSxK, dv_BxGxSxK = _on_platform(run, interpret)
    # The kernel differentiated with respect to the scaled q.
    dq = dq_BxGxRxQxK.transpose(0, 3, 1, 2, 4).astype(jnp.float32) * size**-0.5
    kv_major = lambda x_BxGxSxK: x_BxGxSxK.transpose(0, 2, 1, 3).astype(jnp.float32)
    return dq, kv_major(dk_BxGxSxK), kv_major(dv_BxGxSxK)
