"""Sampling from the Decoder with a KV cache: prefill the prompts, then decode one token at a time.

The decoder's own submodules do the work (embedding, per-layer norms, q/k/v/o projections, MLP, rotary
functions, final norm, lm_head); only attention differs from model.py: queries attend to a cache of
keys and values, [layers, B, S, G, K] in the model's compute dtype, instead of to their own sequence.

Padding. A batch holds prompts of different lengths in S cache slots. Each row has `start` (its first
real slot) and `next` (the slot its next token goes to); a token in slot s has rotary position
s - start and sees the slots start..s. Right padding (start = 0, next = prompt length) and left padding
(start = P - prompt length, next = P) are the same code path. Under right padding the pad tokens of a
short prompt are written into slots that row has not reached yet; each is overwritten by the row's own
next token before it becomes visible.

Ensembles. `Sampler` and `generate_tokens` take one decoder or several (an ensemble: independently
seeded models over one vocabulary, of any shapes). Each member keeps its own KV cache; every step the
members' fp32 logits are averaged (the paper's ensembles average logits) and the average is sampled.
This is the teacher of ensemble distillation: a student trained on text sampled from the ensemble. An
ensemble of one is exactly the single model.

Sampling. Row b draws with its own key: step t uses fold_in(key_b, t), key_b built from the row's
64-bit seed the way jax.random.key(seed) does. A row's tokens therefore depend on its prompt and seed,
not on the other rows of its batch. Temperature, top-k (ties with the k-th logit are kept), top-p
(the smallest set of most likely tokens whose mass reaches p), then jax.random.categorical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megadoc_jax.attention import masked_attention
from megadoc_jax.config import ModelConfig
from megadoc_jax.data.store_types import FINISH_LENGTH, FINISH_STOP
from megadoc_jax.model import Decoder, apply_rope, rope_angles
from megadoc_jax.sharding import constrain

CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # of each layer's buffer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn; hashable, so it is a static argument of the compiled loop."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"SamplingConfig: need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {self}")


class KVCache(NamedTuple):
    # One [B, G, S, K] buffer per layer (G = key/value heads, S = cache slots), not one stacked
    # [N, B, S, G, K] array: a step writes one slot per row into each buffer in place, and attention
    # reads it as it lies (heads next to the batch, the layout batched matmuls want). The stacked cache,
    # scanned over the layers, was sliced, transposed and rebuilt whole several times a step.
    keys_BxGxSxK: tuple[jax.Array, ...]
    values_BxGxSxK: tuple[jax.Array, ...]
    start_B: jax.Array  # int32: first slot of each row's prompt
    next_B: jax.Array  # int32: slot of each row's next token


@dataclasses.dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # the EOS included when finish_reason is "stop"
    finish_reason: str


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> KVCache:
    shape = (batch, cfg.kv_heads, slots, cfg.head_size)
    buffers = tuple(constrain(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)), CACHE_AXES) for _ in range(cfg.layers))
    index = jnp.zeros((batch,), jnp.int32)
    return KVCache(buffers, buffers, index, index)


# --------------------------------------------------------------------------------------------------
# The forward pass over a cache
# --------------------------------------------------------------------------------------------------


def cached_attention(
    q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array, visible_BxTxS: jax.Array
) -> jax.Array:
    """GQA attention of T queries over S cached slots. A row with nothing visible (a left-pad query) gets
    a uniform softmax, not NaN; its output is unused."""
    return masked_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, visible_BxTxS, kv_layout="bgsk")


def layer_blocks(model: Decoder) -> tuple[nnx.Module, ...]:
    """The decoder's layers one by one, static slices of its stacked parameters. generate_tokens takes
    them once, before its loop, so that no step slices (copies) the weights again."""
    graphdef, layer_state = nnx.split(model.layers)
    return tuple(
        nnx.merge(graphdef, jax.tree.map(lambda p: p[i], layer_state))  # noqa: B023 (used at once)
        for i in range(model.cfg.layers)
    )


def forward(
    model: Decoder,
    tokens_BxT: jax.Array,
    slots_BxT: jax.Array,
    cache: KVCache,
    blocks: Sequence[nnx.Module] | None = None,
) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [B, T, D] of tokens written at cache slots `slots_BxT`, and the cache
    holding their keys and values. `cache.start_B` must already be set; `next_B` is left as it is.
    blocks: layer_blocks(model), when the caller has them already."""
    cfg = model.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    positions_BxT = jnp.maximum(slots_BxT - cache.start_B[:, None], 0)
    sin_cos = rope_angles(positions_BxT, cfg.head_size, cfg.rope_base)
    slot_S = jnp.arange(cache.keys_BxGxSxK[0].shape[2])
    visible_BxTxS = (slot_S >= cache.start_B[:, None, None]) & (slot_S <= slots_BxT[:, :, None])
    rows_Bx1 = jnp.arange(tokens_BxT.shape[0])[:, None]
    w = lambda p: p[...].astype(dtype)  # noqa: E731

    def write(buffer_BxGxSxK: jax.Array, new_BxTxGxK: jax.Array) -> jax.Array:
        # Indices on axes 0 and 2 around a slice: the update is laid out [B, T, G, K].
        return constrain(
            buffer_BxGxSxK.at[rows_Bx1, :, slots_BxT].set(new_BxTxGxK.astype(buffer_BxGxSxK.dtype)), CACHE_AXES
        )

    x_BxTxD = jnp.take(model.embed[...], tokens_BxT, axis=0).astype(dtype)
    keys, values = [], []
    # The layers unrolled, each with its own cache buffers (see KVCache).
    blocks = layer_blocks(model) if blocks is None else blocks
    for block, k_BxGxSxK, v_BxGxSxK in zip(blocks, cache.keys_BxGxSxK, cache.values_BxGxSxK, strict=True):
        attention = block.attention
        h_BxTxD = block.attn_norm(x_BxTxD)
        q_BxTxHxK = apply_rope(jnp.einsum("btd,dhk->bthk", h_BxTxD, w(attention.wq)), *sin_cos)
        k_BxGxSxK = write(k_BxGxSxK, apply_rope(jnp.einsum("btd,dgk->btgk", h_BxTxD, w(attention.wk)), *sin_cos))
        v_BxGxSxK = write(v_BxGxSxK, jnp.einsum("btd,dgk->btgk", h_BxTxD, w(attention.wv)))
        out_BxTxHxK = cached_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, visible_BxTxS)
        x_BxTxD = x_BxTxD + jnp.einsum("bthk,hkd->btd", out_BxTxHxK, w(attention.wo))
        x_BxTxD = x_BxTxD + block.mlp(block.mlp_norm(x_BxTxD))
        keys.append(k_BxGxSxK)
        values.append(v_BxGxSxK)
    cache = cache._replace(keys_BxGxSxK=tuple(keys), values_BxGxSxK=tuple(values))
    return model.final_norm(x_BxTxD), cache


def logits_of(model: Decoder, x_BxD: jax.Array) -> jax.Array:
    """fp32 logits [B, V], the product Decoder.__call__ computes."""
    return jnp.einsum("bd,dv->bv", x_BxD.astype(jnp.float32), model.unembed_DxV().astype(jnp.float32))


def prefill(
    model: Decoder,
    tokens_BxP: jax.Array,
    start_B: jax.Array,
    next_B: jax.Array,
    cache: KVCache,
    blocks: Sequence[nnx.Module] | None = None,
) -> tuple[jax.Array, KVCache]:
    """Writes the padded prompts into slots 0..P-1; returns the logits [B, V] of each row's last prompt
    token (slot next_B - 1) and the cache ready for decode_step."""
    b, p = tokens_BxP.shape
    cache = cache._replace(start_B=start_B.astype(jnp.int32), next_B=next_B.astype(jnp.int32))
    slots_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    x_BxPxD, cache = forward(model, tokens_BxP, slots_BxP, cache, blocks)
    last_BxD = jnp.take_along_axis(x_BxPxD, (cache.next_B - 1)[:, None, None], axis=1)[:, 0]
    return logits_of(model, last_BxD), cache


def decode_step(
    model: Decoder, tokens_B: jax.Array, cache: KVCache, blocks: Sequence[nnx.Module] | None = None
) -> tuple[jax.Array, KVCache]:
    """One new token per row at slot next_B: its logits [B, V] and the cache advanced by one."""
    x_Bx1xD, cache = forward(model, tokens_B[:, None], cache.next_B[:, None], cache, blocks)
    return logits_of(model, x_Bx1xD[:, 0]), cache._replace(next_B=cache.next_B + 1)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """Typed threefry keys [B], one per 64-bit seed: the key jax.random.key(seed) gives under x64."""
    seeds_B = np.asarray([int(s) % (1 << 64) for s in seeds], np.uint64)
    key_data_Bx2 = np.stack([seeds_B >> np.uint64(32), seeds_B & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(key_data_Bx2), impl="threefry2x32")


def filter_logits(logits_V: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, then top-k and top-p cuts (cut tokens get -inf)."""
    logits_V = logits_V.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits_V.shape[-1]:
        kth = jax.lax.top_k(logits_V, sampling.top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    if sampling.top_p < 1.0:
        descending_V = jnp.sort(logits_V)[::-1]
        probs_V = jax.nn.softmax(descending_V)
        mass_before_V = jnp.cumsum(probs_V) - probs_V
        kept = jnp.maximum(jnp.sum(mass_before_V < sampling.top_p), 1)  # the most likely token always stays
        logits_V = jnp.where(logits_V < descending_V[kept - 1], -jnp.inf, logits_V)
    return logits_V


def first_max_index(x_BxV: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first maximum; the first NaN if any) from two plain reductions: XLA:CPU
    runs argmax's (value, index) reduction element by element, which cost more than a decode step's
    matmuls of a small model."""
    top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    hit_BxV = (x_BxV == top_Bx1) | jnp.isnan(x_BxV)
    return jnp.min(jnp.where(hit_BxV, jnp.arange(x_BxV.shape[-1]), x_BxV.shape[-1]), axis=-1)


def categorical(key: jax.Array, logits_V: jax.Array) -> jax.Array:
    """jax.random.categorical(key, logits_V), the same draw (Gumbel-max with jax's own gumbel noise), with
    first_max_index for the argmax (tests/test_decode.py pins the equality)."""
    return first_max_index(jax.random.gumbel(key, logits_V.shape, logits_V.dtype) + logits_V)


def sample_tokens(logits_BxV: jax.Array, keys_B: jax.Array, step: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row, drawn with fold_in(key_b, step): independent of the other rows."""

    def one(logits_V: jax.Array, key: jax.Array) -> jax.Array:
        return categorical(jax.random.fold_in(key, step), filter_logits(logits_V, sampling))

    return jax.vmap(one)(logits_BxV, keys_B).astype(jnp.int32)


def members_of(models: Decoder | Sequence[Decoder]) -> tuple[Decoder, ...]:
    """The ensemble as a tuple (one decoder is an ensemble of one); members must share a vocabulary."""
    members = (models,) if isinstance(models, Decoder) else tuple(models)
    if not members:
        raise ValueError("decode: an ensemble needs at least one model")
    vocab = {m.cfg.vocab_size for m in members}
    if len(vocab) > 1:
        raise ValueError(f"decode: ensemble members have different vocabulary sizes {sorted(vocab)}")
    return members


def ensemble_logits(logits_MxBxV: Sequence[jax.Array]) -> jax.Array:
    """The mean of the members' fp32 logits [B, V]."""
    if len(logits_MxBxV) == 1:
        return logits_MxBxV[0]
    return jnp.mean(jnp.stack(logits_MxBxV), axis=0)


def generate_tokens(
    models: Decoder | Sequence[Decoder],
    tokens_BxP: jax.Array,
    start_B: jax.Array,
    next_B: jax.Array,
    keys_B: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [B, max_new_tokens], lengths [B], stopped [B]): the whole loop, jit-able with the three
    keyword arguments static. A row stops after its first EOS (kept); the loop ends when every row has.
    With several models, their averaged logits are sampled (module docstring)."""
    members = members_of(models)
    b, p = tokens_BxP.shape
    blocks = [layer_blocks(m) for m in members]  # sliced once, outside the loop
    prefilled = [
        prefill(m, tokens_BxP, start_B, next_B, init_cache(m.cfg, b, p + max_new_tokens), layers)
        for m, layers in zip(members, blocks)
    ]
    logits_BxV = ensemble_logits([logits for logits, _ in prefilled])
    caches = tuple(cache for _, cache in prefilled)
    eos_E = jnp.asarray(eos_ids, jnp.int32)

    def record(step: jax.Array, logits_BxV: jax.Array, out_BxN: jax.Array, stopped_B: jax.Array, lengths_B: jax.Array):
        token_B = jnp.where(stopped_B, eos_E[0], sample_tokens(logits_BxV, keys_B, step, sampling))
        out_BxN = out_BxN.at[:, step].set(token_B)
        lengths_B = lengths_B + (~stopped_B).astype(jnp.int32)
        return token_B, out_BxN, stopped_B | jnp.isin(token_B, eos_E), lengths_B

    out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32)
    first = record(jnp.int32(0), logits_BxV, out_BxN, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    state = (jnp.int32(0), *first, caches)

    def not_done(state: tuple) -> jax.Array:
        step, _, _, stopped_B, _, _ = state
        return (step + 1 < max_new_tokens) & ~jnp.all(stopped_B)

    def body(state: tuple) -> tuple:
        step, token_B, out_BxN, stopped_B, lengths_B, caches = state
        stepped = [decode_step(m, token_B, cache, layers) for m, cache, layers in zip(members, caches, blocks)]
        logits_BxV = ensemble_logits([logits for logits, _ in stepped])
        caches = tuple(cache for _, cache in stepped)
        return (step + 1, *record(step + 1, logits_BxV, out_BxN, stopped_B, lengths_B), caches)

    _, _, out_BxN, stopped_B, lengths_B, _ = jax.lax.while_loop(not_done, body, state)
    return out_BxN, lengths_B, stopped_B


# --------------------------------------------------------------------------------------------------
# Host side: padding, compiled loop, results
# --------------------------------------------------------------------------------------------------


def pad_prompts(
    prompts: Sequence[Sequence[int]], width: int, padding: str, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [B, width], start [B], next [B]) for right or left padding (see the module docstring)."""
    if padding not in ("right", "left"):
        raise ValueError(f"padding: expected 'right' or 'left', got {padding!r}")
    if not prompts or any(not 0 < len(p) <= width for p in prompts):
        raise ValueError(f"pad_prompts: every prompt needs 1..{width} tokens, got lengths {[len(p) for p in prompts]}")
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        if padding == "right":
            tokens_BxP[row, : len(prompt)] = prompt
        else:
            tokens_BxP[row, width - len(prompt) :] = prompt
    if padding == "right":
        return tokens_BxP, np.zeros_like(lengths_B), lengths_B
    return tokens_BxP, width - lengths_B, np.full_like(lengths_B, width)


class Sampler:
    """Compiled sampling from one decoder or an ensemble (a sequence of decoders, logits averaged).
    Shapes are static: batch rows, prompt width and max_new_tokens pick the compiled program (the
    caller pads to a few sizes to bound compiles)."""

    def __init__(self, models: Decoder | Sequence[Decoder], eos_ids: Sequence[int], pad_id: int = 0):
        if not eos_ids:
            raise ValueError("Sampler: at least one EOS id is needed")
        members = members_of(models)
        self.cfg: ModelConfig = members[0].cfg
        self.ensemble_size = len(members)
        self.eos_ids = tuple(sorted({int(i) for i in eos_ids}))
        self.pad_id = int(pad_id)
        graphdefs, self.params = zip(*(nnx.split(m) for m in members))
        self.graphdefs = graphdefs

        def run(params, tokens_BxP, start_B, next_B, keys_B, *, max_new_tokens, sampling, eos_ids):
            return generate_tokens(
                [nnx.merge(g, p) for g, p in zip(graphdefs, params)],
                tokens_BxP,
                start_B,
                next_B,
                keys_B,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eos_ids=eos_ids,
            )

        self._run = jax.jit(run, static_argnames=("max_new_tokens", "sampling", "eos_ids"))

    @property
    def models(self) -> tuple[Decoder, ...]:
        """The ensemble's decoders (one for a single model)."""
        return tuple(nnx.merge(g, p) for g, p in zip(self.graphdefs, self.params))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling: SamplingConfig,
        max_new_tokens: int,
        *,
        width: int | None = None,
        padding: str = "right",
        input_sharding: jax.sharding.Sharding | None = None,
    ) -> list[Generated]:
        """One sample per (prompt, seed) row; `width` (default: the longest prompt) is the padded length."""
        if len(prompts) != len(seeds):
            raise ValueError(f"Sampler.generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if max_new_tokens <= 0:
            raise ValueError(f"Sampler.generate: max_new_tokens must be positive, got {max_new_tokens}")
        arrays = pad_prompts(prompts, width or max(len(p) for p in prompts), padding, self.pad_id)
        if any(int(t) >= self.cfg.vocab_size or int(t) < 0 for p in prompts for t in p):
            raise ValueError(f"Sampler.generate: a prompt token is outside the vocabulary [0, {self.cfg.vocab_size})")
        put = (lambda x: jax.device_put(x, input_sharding)) if input_sharding is not None else jnp.asarray
        keys_B = seed_keys(seeds)
        if input_sharding is not None:
            keys_B = jax.device_put(keys_B, input_sharding)
        out_BxN, lengths_B, stopped_B = jax.device_get(
            self._run(
                self.params,
                *(put(a) for a in arrays),
                keys_B,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eos_ids=self.eos_ids,
            )
        )
        return [
            Generated(tuple(int(t) for t in row[:length]), FINISH_STOP if stopped else FINISH_LENGTH)
            for row, length, stopped in zip(out_BxN, lengths_B, stopped_B)
        ]
