"""Block computations of context-parallel attention: one block of local queries against one block of
visiting keys, in the online-softmax forward and the recomputing backward (context_parallel.py).

Two block kernels compute them: XlaBlocks (XLA ops, one batch row and QUERY_TILE queries at a time) and
SplashBlocks (the Pallas splash kernel, splash.py); BLOCK_KERNEL picks one, by default splash on TPU.

Shapes: q [B, Q, G, R, K] (query heads grouped by kv head, R = H / G), k and v [B, S, G, K]; original
token indices q_idx [Q], k_idx [S] (the zig-zag layout makes them non-contiguous); segment ids [B, Q],
[B, S] or None. Scores, probabilities and accumulators are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from megadoc_jax.attention.splash import (
    MIN_SPLASH_BLOCK,
    splash_block_backward,
    splash_block_forward,
    splash_blocks_available,
    splash_fits_block,
)

NEG = float(jnp.finfo(jnp.float32).min)  # finite: max/exp of a fully masked row never makes NaN


def varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """x marked as varying over the same manual axes as `like` (loop carries inside shard_map)."""
    varying = lambda a: jax.typeof(a).manual_axis_type.varying
    axes = tuple(sorted(varying(like) - varying(x)))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def block_mask(q_idx_Q, k_idx_S, q_seg_BxQ, k_seg_BxS, causal: bool) -> jax.Array | None:
    """Boolean [B or 1, Q, 1, 1, S] (True = may attend) from original indices and segment ids."""
    mask = None
    if causal:
        mask = (q_idx_Q[:, None] >= k_idx_S[None, :])[None]
    if q_seg_BxQ is not None:
        same = q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]
        mask = same if mask is None else mask & same
    return None if mask is None else mask[:, :, None, None, :]


def scores(q_BxQxGxRxK, k_BxSxGxK, mask) -> jax.Array:
    """Scaled fp32 scores [B, Q, G, R, S], masked entries set to NEG."""
    scale = q_BxQxGxRxK.shape[-1] ** -0.5
    s_BxQxGxRxS = jnp.einsum("bqgrk,bsgk->bqgrs", q_BxQxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    s_BxQxGxRxS = s_BxQxGxRxS * scale
    return s_BxQxGxRxS if mask is None else jnp.where(mask, s_BxQxGxRxS, NEG)


def block_forward(acc, q, q_idx, q_seg, keys, causal: bool):
    """Online-softmax update of acc = (o fp32 [B,Q,G,R,K], m, l fp32 [B,Q,G,R]) with one K/V block;
    keys = (k [B,S,G,K], v, original indices [S], segment ids [B,S] or None)."""
    k, v, k_idx, k_seg = keys
    mask = block_mask(q_idx, k_idx, q_seg, k_seg, causal)
    o, m, l = acc
    s = scores(q, k, mask)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a row with no visible key here adds nothing
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum("bqgrs,bsgk->bqgrk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o * alpha[..., None] + pv, m_new, l * alpha + p.sum(axis=-1)


def block_backward(q, do, lse, delta, q_idx, q_seg, keys, causal: bool):
    """(dq, dk, dv) of one block in fp32, from the final logsumexp and delta = rowsum(do * o)."""
    k, v, k_idx, k_seg = keys
    mask = block_mask(q_idx, k_idx, q_seg, k_seg, causal)
    scale = q.shape[-1] ** -0.5
    p = jnp.exp(scores(q, k, mask) - lse[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dv = jnp.einsum("bqgrs,bqgrk->bsgk", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqgrk,bsgk->bqgrs", do, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bqgrs,bsgk->bqgrk", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bqgrs,bqgrk->bsgk", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


# Scores are materialised for one batch row and QUERY_TILE queries at a time, so a block's temporary
# memory is QUERY_TILE x S per head instead of B x Q x S (32k tokens on 4 devices: 0.4 GB, not 50 GB).
QUERY_TILE = 512


def _tiles(x, n: int):
    """[1, Q, ...] -> [n, 1, Q/n, ...]."""
    return jnp.moveaxis(x.reshape(1, n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _untile(x):
    """[n, 1, T, ...] -> [1, n*T, ...]."""
    return jnp.moveaxis(x, 0, 1).reshape(1, -1, *x.shape[3:])


def _tiled(q_len: int) -> int:
    """Number of query tiles (0: compute the block at once)."""
    return q_len // QUERY_TILE if q_len > QUERY_TILE and q_len % QUERY_TILE == 0 else 0


def tiled_forward(acc, q, q_idx, q_seg, keys, causal: bool):
    """block_forward, one batch row and one query tile at a time."""
    n = _tiled(q.shape[1])
    if not n:
        return block_forward(acc, q, q_idx, q_seg, keys, causal)
    k, v, k_idx, k_seg = keys
    expand = lambda tree: jax.tree.map(lambda x: x[None], tree)

    def row(args):
        acc_r, q_r, q_seg_r, k_r, v_r, k_seg_r = expand(args)

        def tile(t):
            acc_t, q_t, q_idx_t, q_seg_t = t
            return block_forward(acc_t, q_t, q_idx_t, q_seg_t, (k_r, v_r, k_idx, k_seg_r), causal)

        tiles = (
            jax.tree.map(lambda x: _tiles(x, n), acc_r),
            _tiles(q_r, n),
            q_idx.reshape(n, -1),
            None if q_seg_r is None else _tiles(q_seg_r, n),
        )
        return jax.tree.map(lambda x: _untile(x)[0], jax.lax.map(tile, tiles))

    return jax.lax.map(row, (acc, q, q_seg, k, v, k_seg))


def tiled_backward(q, do, lse, delta, q_idx, q_seg, keys, causal: bool):
    """block_backward, one batch row and one query tile at a time; dK/dV summed over the tiles."""
    n = _tiled(q.shape[1])
    if not n:
        return block_backward(q, do, lse, delta, q_idx, q_seg, keys, causal)
    k, v, k_idx, k_seg = keys
    expand = lambda tree: jax.tree.map(lambda x: x[None], tree)

    def row(args):
        q_r, do_r, lse_r, delta_r, q_seg_r, k_r, v_r, k_seg_r = expand(args)

        def tile(dkv, t):
            q_t, do_t, lse_t, delta_t, q_idx_t, q_seg_t = t
            keys_r = (k_r, v_r, k_idx, k_seg_r)
            dq_t, dk_t, dv_t = block_backward(q_t, do_t, lse_t, delta_t, q_idx_t, q_seg_t, keys_r, causal)
            return (dkv[0] + dk_t, dkv[1] + dv_t), dq_t

        zeros = varying_like(jnp.zeros(k_r.shape, jnp.float32), k_r)
        per_tile = [_tiles(x, n) for x in (q_r, do_r, lse_r, delta_r)]
        tiles = (*per_tile, q_idx.reshape(n, -1), None if q_seg_r is None else _tiles(q_seg_r, n))
        (dk_r, dv_r), dq_tiles = jax.lax.scan(tile, (zeros, zeros), tiles)
        return _untile(dq_tiles)[0], dk_r[0], dv_r[0]

    return jax.lax.map(row, (q, do, lse, delta, q_seg, k, v, k_seg))


# --------------------------------------------------------------------------------------------------
# The block kernels: XLA tiles or splash, chosen by BLOCK_KERNEL
# --------------------------------------------------------------------------------------------------


class XlaBlocks:
    """Block kernel from XLA ops (the tiles above): masks from original token indices, query tiles."""

    @staticmethod
    def forward(acc, q, q_idx, q_seg, keys, causal: bool, diagonal: bool):
        return tiled_forward(acc, q, q_idx, q_seg, keys, causal)

    @staticmethod
    def backward(q, do, out, lse, delta, q_idx, q_seg, keys, causal: bool, diagonal: bool):
        return tiled_backward(q, do, lse, delta, q_idx, q_seg, keys, causal)


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Block kernel from the Pallas splash kernel (splash.py). In the zig-zag layout the
    diagonal block is causal in local order and the visible part of any other block is fully visible,
    so static masks suffice. interpret: None = compiled on TPU, interpret mode elsewhere."""

    interpret: bool | None = None

    def forward(self, acc, q, q_idx, q_seg, keys, causal: bool, diagonal: bool):
        k, v, _, k_seg = keys
        out_b, lse_b = splash_block_forward(q, k, v, q_seg, k_seg, causal and diagonal, self.interpret)
        # Merge a normalised block as (o, m, l) = (out_b, lse_b, 1). A row with no visible key in the
        # block has lse_b near the kernel's mask value (-2.4e38): its weight against any real block is 0.
        o, m, l = acc
        m_new = jnp.maximum(m, lse_b)
        alpha, beta = jnp.exp(m - m_new), jnp.exp(lse_b - m_new)
        return o * alpha[..., None] + out_b * beta[..., None], m_new, l * alpha + beta

    def backward(self, q, do, out, lse, delta, q_idx, q_seg, keys, causal: bool, diagonal: bool):
        k, v, _, k_seg = keys
        return splash_block_backward(q, k, v, q_seg, k_seg, out, lse, do, causal and diagonal, self.interpret)


# Block kernel of ring attention, read when a program is traced. auto: splash on TPU where the zig-zag
# chunks are multiples of 128 tokens, XLA tiles elsewhere (chosen when the program is lowered for its
# platform); "xla" or "splash" force one (splash off TPU runs in Pallas interpret mode: slow, for tests).
BLOCK_KERNEL = "auto"


@functools.lru_cache(maxsize=1)
def _warn_no_splash_blocks() -> None:
    warnings.warn(
        f"ring attention: this jax ({jax.__version__}) lacks splash_attention_kernel._splash_attention_bwd; "
        f"ring blocks use XLA tiles on TPU too",
        stacklevel=3,
    )


def with_block_kernel(run, chunk: int):
    """run(blocks) with the block kernel of BLOCK_KERNEL for zig-zag chunks of `chunk` tokens."""
    if BLOCK_KERNEL not in ("auto", "xla", "splash"):
        raise ValueError(f"ring_blocks.BLOCK_KERNEL must be auto, xla or splash, got {BLOCK_KERNEL!r}")
    fits, available = splash_fits_block(chunk), splash_blocks_available()
    if BLOCK_KERNEL == "splash":
        if not fits or not available:
            raise ValueError(
                f"ring attention with splash blocks: chunks of {chunk} tokens (seq_len / (2 x context)) "
                f"must be multiples of {MIN_SPLASH_BLOCK}, and jax must have splash's backward entry point "
                f"(available: {available})"
            )
        return run(SplashBlocks())
    if BLOCK_KERNEL == "xla" or not fits:
        return run(XlaBlocks())
    if not available:
        _warn_no_splash_blocks()
        return run(XlaBlocks())
    return jax.lax.platform_dependent(tpu=lambda: run(SplashBlocks(interpret=False)), default=lambda: run(XlaBlocks()))
