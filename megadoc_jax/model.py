"""The Llama-style decoder (Flax NNX): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
untied input and output embeddings, no biases.

Parameters are stored in model.param_dtype (fp32) and cast to model.compute_dtype (bf16) where they are
used; norms, rotary angles, softmax and logits run in fp32. The layers' parameters are always stacked
along a leading 'layers' axis (one pytree for all layers). model.scan_layers picks how they are applied:
a `jax.lax.scan` over that axis (one compiled layer body, compile time flat in depth) or a Python loop
over its slices (unrolled). Both read the same parameters and compute the same function, so checkpoints
move freely between the two. model.remat wraps the layer body in `jax.checkpoint`.

Every parameter carries logical axis names (see sharding.RULES) in its `out_sharding` metadata;
`create_sharded_model` and `abstract_model` build the decoder on a mesh from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megadoc_jax import attention as attention_lib
from megadoc_jax import sharding
from megadoc_jax.config import ModelConfig
from megadoc_jax.matmul import token_matmul
from megadoc_jax.sharding import constrain

# jax.checkpoint policies by model.remat. 'dots' keeps the outputs of weight matmuls (dots without batch
# dimensions) and recomputes the rest, including the [L, L] attention scores, which are the large part.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def count_parameters(cfg: ModelConfig) -> int:
    """Number of parameters, in closed form (docs/model.md)."""
    d, f, v, k = cfg.hidden, cfg.mlp, cfg.vocab_size, cfg.head_size
    attention = d * cfg.heads * k * 2 + d * cfg.kv_heads * k * 2  # wq, wo; wk, wv
    per_layer = attention + 3 * d * f + 2 * d  # SwiGLU (gate, up, down); two norm scales
    return 2 * v * d + d + cfg.layers * per_layer  # embed, lm_head, final norm


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], logical_axes: tuple[str, ...]) -> nnx.Param:
    """A normal(init_std) weight in param_dtype, annotated with its logical axes."""
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    # eager_sharding=False: the names are logical; sharding.py maps them to mesh axes.
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


# --------------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------------


def rope_angles(positions_BxL: jax.Array, head_size: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each fp32 [B, L, 1, K/2], for positions [B, L]."""
    inverse_frequency_K2 = base ** (-jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size)
    angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inverse_frequency_K2
    return jnp.sin(angles_BxLxK2)[:, :, None, :], jnp.cos(angles_BxLxK2)[:, :, None, :]


def apply_rope(x_BxLxHxK: jax.Array, sin_BxLx1xK2: jax.Array, cos_BxLx1xK2: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + K/2) of each head by the position's angles (the Hugging Face Llama layout)."""
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = [x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2, x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2]
    return jnp.concatenate(rotated, axis=-1).astype(x_BxLxHxK.dtype)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.scale = nnx.Param(
            jnp.ones((cfg.hidden,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",), eager_sharding=False
        )
        self.eps = cfg.norm_eps
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention: H query heads share G key/value heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_size
        self.wq = _param(rngs, cfg, (d, h, k), ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, cfg, (d, g, k), ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, cfg, (d, g, k), ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, cfg, (h, k, d), ("heads", "head_dim", "embed"))
        self.impl = cfg.attention
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(
        self, x_BxLxD: jax.Array, sin_cos: tuple[jax.Array, jax.Array], segment_ids_BxL: jax.Array | None
    ) -> jax.Array:
        w = lambda p: p[...].astype(self.compute_dtype)
        q_BxLxHxK = apply_rope(token_matmul(x_BxLxD, w(self.wq)), *sin_cos)
        k_BxLxGxK = apply_rope(token_matmul(x_BxLxD, w(self.wk)), *sin_cos)
        v_BxLxGxK = token_matmul(x_BxLxD, w(self.wv))
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "seq", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "seq", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "seq", "kv_heads", "head_dim"))
        out_BxLxHxK = attention_lib.attention(
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=segment_ids_BxL, causal=True, impl=self.impl
        )
        return token_matmul(out_BxLxHxK, w(self.wo), in_axes=2)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.w_gate = _param(rngs, cfg, (cfg.hidden, cfg.mlp), ("embed", "mlp"))
        self.w_up = _param(rngs, cfg, (cfg.hidden, cfg.mlp), ("embed", "mlp"))
        self.w_down = _param(rngs, cfg, (cfg.mlp, cfg.hidden), ("mlp", "embed"))
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.compute_dtype)
        gate_BxLxF = token_matmul(x_BxLxD, w(self.w_gate))
        up_BxLxF = token_matmul(x_BxLxD, w(self.w_up))
        hidden_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "seq", "mlp"))
        return token_matmul(hidden_BxLxF, w(self.w_down))


class Block(nnx.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self, x_BxLxD: jax.Array, sin_cos: tuple[jax.Array, jax.Array], segment_ids_BxL: jax.Array | None
    ) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attention(self.attn_norm(x_BxLxD), sin_cos, segment_ids_BxL)
        x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        return constrain(x_BxLxD, ("batch", "seq", "act_embed"))


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """cfg.layers Blocks as one Block whose parameters have a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return create(rngs)


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        attention_lib.get_backend(cfg.attention)  # an unknown backend fails here, not mid-compile
        if cfg.remat != "none" and cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat: {cfg.remat!r} not in {['none', *REMAT_POLICIES]}")
        self.cfg = cfg
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"))
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg)
        # Named lm_head, not 'unembed': the default no_decay pattern 'embed' must not match it.
        self.lm_head = _param(rngs, cfg, (cfg.hidden, cfg.vocab_size), ("embed", "vocab"))

    def unembed_DxV(self) -> jax.Array:
        """The output projection [D, V] (param dtype), for loss.next_token_loss."""
        return self.lm_head[...]

    def hidden_states(
        self, inputs_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None
    ) -> jax.Array:
        """Final-normed hidden states [B, L, D] in compute dtype."""
        if inputs_BxL.ndim != 2 or positions_BxL.shape != inputs_BxL.shape:
            raise ValueError(
                f"Decoder: inputs {inputs_BxL.shape} and positions {positions_BxL.shape} must be equal [B, L]"
            )
        if segment_ids_BxL is not None and segment_ids_BxL.shape != inputs_BxL.shape:
            raise ValueError(f"Decoder: segment_ids {segment_ids_BxL.shape} must match inputs {inputs_BxL.shape}")
        cfg = self.cfg
        x_BxLxD = jnp.take(self.embed[...], inputs_BxL, axis=0).astype(jnp.dtype(cfg.compute_dtype))
        x_BxLxD = constrain(x_BxLxD, ("batch", "seq", "act_embed"))
        sin_cos = rope_angles(positions_BxL, cfg.head_size, cfg.rope_base)

        graphdef, layer_state = nnx.split(self.layers)

        def layer(x_BxLxD: jax.Array, one_layer_state: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, one_layer_state)(x_BxLxD, sin_cos, segment_ids_BxL), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            x_BxLxD, _ = jax.lax.scan(layer, x_BxLxD, layer_state)
        else:
            for i in range(cfg.layers):
                x_BxLxD, _ = layer(x_BxLxD, jax.tree.map(lambda p: p[i], layer_state))
        return self.final_norm(x_BxLxD)

    def __call__(
        self, inputs_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, L, V] in fp32 (the same product loss.py computes chunk by chunk)."""
        x_BxLxD = self.hidden_states(inputs_BxL, positions_BxL, segment_ids_BxL)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD.astype(jnp.float32), self.unembed_DxV().astype(jnp.float32))
        return constrain(logits_BxLxV, ("batch", "seq", "vocab"))


# --------------------------------------------------------------------------------------------------
# Construction on a mesh
# --------------------------------------------------------------------------------------------------


def abstract_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0) -> Decoder:
    """The decoder with jax.ShapeDtypeStruct leaves that carry their shardings; allocates nothing.

    Use it for memory estimates, ahead-of-time compiles and as the target of a checkpoint restore.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, sharding.abstract_state(state, mesh))


def create_sharded_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int) -> Decoder:
    """The decoder initialised under jit with out_shardings: each device creates only its shards.

    The values equal those of `Decoder(cfg, rngs=nnx.Rngs(seed))` on one device (partitionable RNG).
    """
    factory = lambda: Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    init_state = jax.jit(lambda: nnx.state(factory()), out_shardings=sharding.state_shardings(abstract_state, mesh))
    return nnx.merge(graphdef, init_state())
