"""Next-token scores over a large vocabulary without materialising all the logits.

The hidden states [B, L, D] are cut into chunks of `chunk_tokens` sequence positions; a `lax.scan` walks
the chunks and computes each chunk's logits [B, chunk, V] = x_chunk @ W in fp32 and, per token, their
log-sum-exp and the target's logit (`_chunk_logits` is the one place that computes logits). The
backward pass recomputes a chunk's logits instead of storing them (the loss's gradient is written out
by hand, `_chunk_sums_backward`; the per-token scores use `jax.checkpoint`): at most one chunk of
logits (and its gradient) is alive at a time, never the full [B, L, V].

Chunks are strided (chunk j holds positions j, j + n, j + 2n, ... for n chunks): when the sequence axis
is split over the 'context' mesh axis in contiguous blocks, every chunk then takes its positions from
each block, and the scan never moves data between devices.

Two reductions of the same chunk scores:

`next_token_loss` keeps only running sums, so that gradient accumulation can add microbatches and
divide once:
    loss_sum   = sum_t mask_t * (logsumexp(logits_t) - logits_t[target_t])
    z_loss_sum = z_loss * sum_t mask_t * logsumexp(logits_t)^2
    weight_sum = sum_t mask_t
The training objective is (loss_sum + z_loss_sum) / weight_sum.

`next_token_scores` keeps every token: log_prob_t = logits_t[target_t] - logsumexp(logits_t) (fp32
[B, L]) and, if asked, is_greedy_t = (argmax(logits_t) == target_t), the first maximum winning ties as
in torch.argmax. These are the per-token numbers that evaluation builds on (losses by position or by
segment, multiple-choice log-likelihoods); their masked sum is loss_sum up to fp32 summation order.

Ensembles: `next_token_scores` also takes K members' hidden states and unembeddings (members may differ
in width D, not in vocabulary) and scores their combination, chunk by chunk like one model:
mean_logits (the paper's ensembles: softmax of the mean of the members' logits) or mean_probs (the mean
of the members' probabilities). An ensemble of one is the model itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from megadoc_jax.matmul import token_matmul, token_sum_outer
from megadoc_jax.sharding import constrain

DEFAULT_CHUNK_TOKENS = 256  # sequence positions per chunk: live logits are B_local x 256 x V fp32


ENSEMBLE_MODES = ("mean_logits", "mean_probs")  # how an ensemble's members combine (next_token_scores)


def _chunk_logits(unembeds: tuple[jax.Array, ...], xs: tuple[jax.Array, ...], ensemble: str) -> jax.Array:
    """fp32 [B, C, V] scores of one chunk whose log-softmax is the (ensemble's) next-token distribution.

    One member: its logits. mean_logits: the mean of the members' logits. mean_probs: log of the mean of
    the members' probabilities, log(1/K sum_k softmax(logits_k)) (already normalised). Running sums in
    member order, so at most two members' chunk logits are alive at once.
    """
    combined_BxCxV = None
    for unembed_DxV, x_BxCxD in zip(unembeds, xs):
        logits_BxCxV = token_matmul(x_BxCxD.astype(jnp.float32), unembed_DxV.astype(jnp.float32))
        logits_BxCxV = constrain(logits_BxCxV, ("batch", "seq", "vocab"))
        if len(xs) == 1:
            return logits_BxCxV
        if ensemble == "mean_probs":
            logits_BxCxV = logits_BxCxV - jax.nn.logsumexp(logits_BxCxV, axis=-1, keepdims=True)
            combined_BxCxV = logits_BxCxV if combined_BxCxV is None else jnp.logaddexp(combined_BxCxV, logits_BxCxV)
        else:
            combined_BxCxV = logits_BxCxV if combined_BxCxV is None else combined_BxCxV + logits_BxCxV
    shift = jnp.log(float(len(xs))) if ensemble == "mean_probs" else None
    return combined_BxCxV - shift if shift is not None else combined_BxCxV / len(xs)


def _chunk_token_scores(
    unembeds: tuple[jax.Array, ...],
    xs: tuple[jax.Array, ...],
    targets_BxC: jax.Array,
    *,
    greedy: bool = False,
    ensemble: str = "mean_logits",
) -> dict[str, jax.Array]:
    """Per-token scores of one chunk: 'lse' and 'target_logit' (fp32 [B, C]), 'is_greedy' (bool) if asked.

    unembeds / xs: one entry per ensemble member (one for a single model), combined by _chunk_logits.
    """
    return _logit_scores(_chunk_logits(unembeds, xs, ensemble), targets_BxC, greedy=greedy)


def _logit_scores(logits_BxCxV: jax.Array, targets_BxC: jax.Array, *, greedy: bool = False) -> dict[str, jax.Array]:
    """_chunk_token_scores of a chunk whose logits are in hand."""
    scores = {
        "lse": jax.nn.logsumexp(logits_BxCxV, axis=-1),
        "target_logit": jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0],
    }
    if greedy:
        # The first index holding the maximum (torch.argmax's tie rule) as a max and a min reduction: XLA:CPU
        # runs these far faster than its argmax (the multiple-choice benchmark measures it).
        vocab = logits_BxCxV.shape[-1]
        is_max_BxCxV = logits_BxCxV == jnp.max(logits_BxCxV, axis=-1, keepdims=True)
        first_max_BxC = jnp.min(jnp.where(is_max_BxCxV, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
        scores["is_greedy"] = first_max_BxC == targets_BxC
    return scores


@jax.custom_vjp
def _chunk_sums(unembed_DxV: jax.Array, x_BxCxD: jax.Array, targets_BxC: jax.Array, mask_BxC: jax.Array) -> jax.Array:
    """[ce_sum, lse_squared_sum, weight_sum] (fp32 [3]) of one chunk; its gradient is _chunk_sums_backward."""
    return _chunk_sums_forward(unembed_DxV, x_BxCxD, targets_BxC, mask_BxC)[0]


def _chunk_sums_forward(
    unembed_DxV: jax.Array, x_BxCxD: jax.Array, targets_BxC: jax.Array, mask_BxC: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    scores = _chunk_token_scores((unembed_DxV,), (x_BxCxD,), targets_BxC)
    lse_BxC, target_logit_BxC = scores["lse"], scores["target_logit"]
    sums_3 = jnp.stack(
        [
            jnp.sum(mask_BxC * (lse_BxC - target_logit_BxC)),
            jnp.sum(mask_BxC * jnp.square(lse_BxC)),
            jnp.sum(mask_BxC),
        ]
    )
    # Residuals: the inputs and two [B, C] rows; the chunk's logits are recomputed, never kept.
    return sums_3, (unembed_DxV, x_BxCxD, targets_BxC, mask_BxC, lse_BxC, target_logit_BxC)


def _logits_gradient_products(
    logits_BxCxV: jax.Array,
    lse_BxC: jax.Array,
    unembed_DxV: jax.Array,
    x_BxCxD: jax.Array,
    targets_BxC: jax.Array,
    softmax_weight_BxC: jax.Array,
    target_weight_BxC: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """fp32 (d_x [B, C, D], d_unembed [D, V]) of d_logits = softmax_weight * softmax - target_weight * onehot.

    Written out rather than left to autodiff, which scatters the target logits' cotangent into a [B, C, V]
    buffer and transposes it before the weight gradient; on XLA:CPU that took as long as the chunk's three
    matmuls together (docs/performance.md). Here the one-hot is a select fused into the softmax's pass.
    """
    d_logits_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None]) * softmax_weight_BxC[..., None]
    is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1], dtype=targets_BxC.dtype) == targets_BxC[..., None]
    d_logits_BxCxV = jnp.where(is_target_BxCxV, d_logits_BxCxV - target_weight_BxC[..., None], d_logits_BxCxV)
    d_logits_BxCxV = constrain(d_logits_BxCxV, ("batch", "seq", "vocab"))
    d_x_BxCxD = token_matmul(d_logits_BxCxV, unembed_DxV.astype(jnp.float32).T)
    d_unembed_DxV = token_sum_outer(x_BxCxD.astype(jnp.float32), d_logits_BxCxV)
    return d_x_BxCxD, d_unembed_DxV


def _chunk_sums_backward(residuals: tuple[jax.Array, ...], g_3: jax.Array) -> tuple[Any, ...]:
    """The gradient of the chunk's sums: d(logits) = mask * ((g_ce + 2 g_z lse) softmax - g_ce onehot),
    the chunk's logits recomputed."""
    unembed_DxV, x_BxCxD, targets_BxC, mask_BxC, lse_BxC, target_logit_BxC = residuals
    g_ce, g_lse_squared, g_weight = g_3[0], g_3[1], g_3[2]
    logits_BxCxV = _chunk_logits((unembed_DxV,), (x_BxCxD,), "mean_logits")
    softmax_weight_BxC = mask_BxC * (g_ce + 2.0 * g_lse_squared * lse_BxC)
    d_x_BxCxD, d_unembed_DxV = _logits_gradient_products(
        logits_BxCxV, lse_BxC, unembed_DxV, x_BxCxD, targets_BxC, softmax_weight_BxC, mask_BxC * g_ce
    )
    d_mask_BxC = g_ce * (lse_BxC - target_logit_BxC) + g_lse_squared * jnp.square(lse_BxC) + g_weight
    return (
        d_unembed_DxV.astype(unembed_DxV.dtype),
        d_x_BxCxD.astype(x_BxCxD.dtype),
        None,  # integer targets
        d_mask_BxC.astype(mask_BxC.dtype),
    )


_chunk_sums.defvjp(_chunk_sums_forward, _chunk_sums_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(
    dtypes: tuple[Any, ...],
    unembed_DxV: jax.Array,
    x_NxBxCxD: jax.Array,
    targets_NxBxC: jax.Array,
    mask_NxBxC: jax.Array,
) -> jax.Array:
    """[ce_sum, weight_sum] (fp32 [2]) over all chunks, without z-loss; its gradient is computed in the
    forward pass under differentiation (_fused_sums_forward), so no chunk's logits are computed twice.
    dtypes: those of (unembed, x, mask), which their gradients take."""

    def add_chunk(total_2: jax.Array, chunk: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        sums_3 = _chunk_sums_forward(unembed_DxV, *chunk)[0]
        return total_2 + sums_3[jnp.array([0, 2])], None

    return jax.lax.scan(add_chunk, jnp.zeros((2,), jnp.float32), (x_NxBxCxD, targets_NxBxC, mask_NxBxC))[0]


def _fused_sums_forward(
    dtypes: tuple[Any, ...],
    unembed_DxV: jax.Array,
    x_NxBxCxD: jax.Array,
    targets_NxBxC: jax.Array,
    mask_NxBxC: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The sums, and the gradient of ce_sum for x, the unembedding and the mask, chunk by chunk.

    Without z-loss every entry of the sums' cotangent reaches x and the unembedding through ce_sum alone,
    so the backward pass only scales what is computed here: exact for any cotangent. Residuals: d_x (fp32,
    the size of x), d_unembed (fp32 [D, V], a running sum over chunks) and each token's cross-entropy.
    """

    def chunk_step(carry: tuple[jax.Array, jax.Array], chunk: tuple[jax.Array, ...]) -> tuple[Any, Any]:
        total_2, d_unembed_DxV = carry
        x_BxCxD, targets_BxC, mask_BxC = chunk
        logits_BxCxV = _chunk_logits((unembed_DxV,), (x_BxCxD,), "mean_logits")
        scores = _logit_scores(logits_BxCxV, targets_BxC)
        lse_BxC = scores["lse"]
        ce_BxC = lse_BxC - scores["target_logit"]
        d_x_BxCxD, d_unembed_chunk_DxV = _logits_gradient_products(
            logits_BxCxV, lse_BxC, unembed_DxV, x_BxCxD, targets_BxC, mask_BxC, mask_BxC
        )
        total_2 = total_2 + jnp.stack([jnp.sum(mask_BxC * ce_BxC), jnp.sum(mask_BxC)])
        return (total_2, d_unembed_DxV + d_unembed_chunk_DxV), (d_x_BxCxD, ce_BxC)

    zeros = (jnp.zeros((2,), jnp.float32), jnp.zeros(unembed_DxV.shape, jnp.float32))
    (total_2, d_unembed_DxV), (d_x_NxBxCxD, ce_NxBxC) = jax.lax.scan(
        chunk_step, zeros, (x_NxBxCxD, targets_NxBxC, mask_NxBxC)
    )
    return total_2, (d_unembed_DxV, d_x_NxBxCxD, ce_NxBxC)


def _fused_sums_backward(dtypes: tuple[Any, ...], residuals: tuple[jax.Array, ...], g_2: jax.Array) -> tuple[Any, ...]:
    d_unembed_DxV, d_x_NxBxCxD, ce_NxBxC = residuals
    unembed_dtype, x_dtype, mask_dtype = dtypes
    g_ce, g_weight = g_2[0], g_2[1]
    return (
        (g_ce * d_unembed_DxV).astype(unembed_dtype),
        (g_ce * d_x_NxBxCxD).astype(x_dtype),
        None,  # integer targets
        (g_ce * ce_NxBxC + g_weight).astype(mask_dtype),
    )


_fused_sums.defvjp(_fused_sums_forward, _fused_sums_backward)


def _to_chunks(a_BxL: jax.Array, chunks: int) -> jax.Array:
    """[B, L, ...] -> [chunks, B, L / chunks, ...], chunk j holding positions j, j + chunks, ..."""
    b, length = a_BxL.shape[:2]
    a_BxCxNx = a_BxL.reshape(b, length // chunks, chunks, *a_BxL.shape[2:])
    return jnp.moveaxis(a_BxCxNx, 2, 0)


def _from_chunks(a_NxBxC: jax.Array, length: int) -> jax.Array:
    """The inverse of _to_chunks for per-token values, the padding dropped: [chunks, B, C] -> [B, length]."""
    chunks, b, c = a_NxBxC.shape
    a_BxL = jnp.moveaxis(a_NxBxC, 0, 2).reshape(b, c * chunks)[:, :length]
    return constrain(a_BxL, ("batch", "seq"))


def _members(x: jax.Array | Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return (x,) if isinstance(x, jax.Array) else tuple(x)


def _chunked(
    caller: str,
    xs: tuple[jax.Array, ...],
    unembeds: tuple[jax.Array, ...],
    targets_BxL: jax.Array,
    mask_BxL: jax.Array | None,
    chunk_tokens: int,
) -> tuple[Any, ...]:
    """Checks the shapes, pads L to whole chunks and cuts every x, targets (and mask) into strided chunks:
    (xs chunked, targets chunked[, mask chunked])."""
    if not xs or len(xs) != len(unembeds):
        raise ValueError(f"{caller}: {len(xs)} hidden states for {len(unembeds)} unembeddings (one per member)")
    b, length = targets_BxL.shape if targets_BxL.ndim == 2 else (None, None)
    vocab = {w.shape[-1] for w in unembeds}
    for k, (x_BxLxD, unembed_DxV) in enumerate(zip(xs, unembeds)):
        member = f" (member {k})" if len(xs) > 1 else ""
        if x_BxLxD.ndim != 3:
            raise ValueError(f"{caller}: x{member} must be [B, L, D], got {x_BxLxD.shape}")
        if unembed_DxV.ndim != 2 or unembed_DxV.shape[0] != x_BxLxD.shape[2]:
            raise ValueError(f"{caller}: unembed{member} {unembed_DxV.shape} must be [D={x_BxLxD.shape[2]}, V]")
        if targets_BxL.shape != x_BxLxD.shape[:2]:
            raise ValueError(f"{caller}: targets {targets_BxL.shape} must be [B, L] = {x_BxLxD.shape[:2]}")
    if len(vocab) > 1:
        raise ValueError(f"{caller}: ensemble members have different vocabulary sizes {sorted(vocab)}")
    if mask_BxL is not None and mask_BxL.shape != (b, length):
        raise ValueError(f"{caller}: loss_mask {mask_BxL.shape} must be [B, L] = {(b, length)}")
    if chunk_tokens < 1:
        raise ValueError(f"{caller}: chunk_tokens must be positive, got {chunk_tokens}")

    chunk = min(chunk_tokens, length)
    chunks = -(-length // chunk)
    padding = chunks * chunk - length

    def cut(a: jax.Array) -> jax.Array:
        if padding:  # padded positions carry mask 0 and add nothing; their scores are dropped
            a = jnp.pad(a, [(0, 0), (0, padding)] + [(0, 0)] * (a.ndim - 2))
        return _to_chunks(a, chunks)

    rest = [targets_BxL] + ([] if mask_BxL is None else [mask_BxL])
    return (tuple(cut(x) for x in xs), *(cut(a) for a in rest))


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
    if loss_mask_BxL is None:
        mask_BxL = jnp.ones(targets_BxL.shape, jnp.float32)
    else:
        mask_BxL = loss_mask_BxL.astype(jnp.float32)
    (x_NxBxCxD,), *inputs = _chunked("next_token_loss", (x_BxLxD,), (unembed_DxV,), targets_BxL, mask_BxL, chunk_tokens)

    if z_loss == 0.0:  # the gradient in the forward pass: each chunk's logits computed once
        dtypes = (unembed_DxV.dtype, x_NxBxCxD.dtype, mask_BxL.dtype)
        ce_sum, weight_sum = _fused_sums(dtypes, unembed_DxV, x_NxBxCxD, *inputs)
        return {"loss_sum": ce_sum, "z_loss_sum": jnp.zeros((), jnp.float32), "weight_sum": weight_sum}

    def add_chunk(total_3: jax.Array, chunk_inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total_3 + _chunk_sums(unembed_DxV, *chunk_inputs), None

    total_3, _ = jax.lax.scan(add_chunk, jnp.zeros((3,), jnp.float32), (x_NxBxCxD, *inputs))
    return {"loss_sum": total_3[0], "z_loss_sum": z_loss * total_3[1], "weight_sum": total_3[2]}


def next_token_scores(
    x_BxLxD: jax.Array | Sequence[jax.Array],
    unembed_DxV: jax.Array | Sequence[jax.Array],
    targets_BxL: jax.Array,
    *,
    greedy: bool = False,
    ensemble: str = "mean_logits",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, jax.Array]:
    """Every token's 'log_prob' of its target (fp32 [B, L]) and, with greedy, 'is_greedy' (bool [B, L]).

    In the order of x's positions; no mask: the caller weights or selects tokens. See the module docstring.
    An ensemble: x and unembed are sequences, one [B, L, D_k] / [D_k, V] per member (members may differ in
    D), combined per `ensemble` (ENSEMBLE_MODES) chunk by chunk; the full [B, L, V] logits never exist.
    """
    if ensemble not in ENSEMBLE_MODES:
        raise ValueError(f"next_token_scores: ensemble {ensemble!r} not in {ENSEMBLE_MODES}")
    unembeds = _members(unembed_DxV)
    xs, targets_NxBxC = _chunked("next_token_scores", _members(x_BxLxD), unembeds, targets_BxL, None, chunk_tokens)
    chunk_scores = jax.checkpoint(functools.partial(_chunk_token_scores, greedy=greedy, ensemble=ensemble))

    def score_chunk(carry: None, chunk_inputs: tuple[Any, jax.Array]) -> tuple[None, dict[str, jax.Array]]:
        scores = chunk_scores(unembeds, *chunk_inputs)
        scores["log_prob"] = scores.pop("target_logit") - scores.pop("lse")
        return carry, scores

    _, scores_NxBxC = jax.lax.scan(score_chunk, None, (xs, targets_NxBxC))
    return {key: _from_chunks(value, targets_BxL.shape[1]) for key, value in scores_NxBxC.items()}
