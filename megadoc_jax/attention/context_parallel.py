"""Context-parallel attention over the mesh's `context` axis: `ring` and `all_gather` backends.

Both run inside `jax.shard_map` over the mesh set with `jax.set_mesh(mesh)`: batch rows split over
('data', 'fsdp'), heads over 'tensor', the sequence over 'context' (C devices, sharding.RULES).

Layout: when context > 1 both take their inputs in the load-balanced zig-zag layout (layout.py; they
register with zigzag_layout=True, so step.py permutes every [B, L] batch array before the model).
Attention recomputes each token's original index from the device index, so causal masking follows the
original order. The loss is a sum over tokens and needs no un-permutation; per-token outputs come back
to the original order with registry.inverse_token_order.

Ring (forward): each device keeps its queries; K/V (and their segment ids) travel one hop per step with
`lax.ppermute`, the next hop issued before the current block is computed so that the transfer overlaps
with compute. Online softmax in fp32. With the zig-zag layout every off-diagonal block is exactly half
masked: from a device j < d, all local queries see only chunk j; from j > d, only chunk 2C-1-d sees both
chunks of j. The fully masked half is skipped (`lax.cond`), so each device does the same work per step.

Ring (backward): a custom VJP around the whole backend (forward and backward are each one shard_map of
local code that is never differentiated). Residuals are the shards of q, k, v, the output and the fp32
logsumexp ([B, L/C, H]); the backward pass runs the ring again, recomputing each block's probabilities,
with the dK/dV accumulators travelling with their K/V and one last hop home. Per-device memory is
therefore the local sequence's activations plus one block's working set, never the [L/C, L] strip that
all_gather keeps.

Block kernel: each block is computed by XlaBlocks (XLA ops, one tile of 512 queries at a time) or
SplashBlocks (the Pallas splash kernel), by ring_blocks.BLOCK_KERNEL; by default splash on TPU, XLA
elsewhere.

all_gather: the simple baseline. K/V and segment ids are gathered over 'context' (a [B, L, G, K] copy
per device) and the local queries attend to the whole sequence; plain autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from megadoc_jax import sharding
from megadoc_jax.attention import ring_blocks
from megadoc_jax.attention.layout import CONTEXT_AXIS, context_size
from megadoc_jax.attention.registry import register_backend
from megadoc_jax.attention.ring_blocks import NEG, block_mask, scores, varying_like

# --------------------------------------------------------------------------------------------------
# Token indices on each device
# --------------------------------------------------------------------------------------------------


def _device_index(context: int) -> jax.Array:
    """This device's index along 'context' (0 without a context axis: nothing to bind it to)."""
    return jax.lax.axis_index(CONTEXT_AXIS) if context > 1 else jnp.int32(0)


def _local_indices(device: jax.Array, chunk: int, context: int) -> jax.Array:
    """int32 [2 * chunk]: original indices of the tokens that `device` holds in the zig-zag layout."""
    within = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate([device * chunk + within, (2 * context - 1 - device) * chunk + within])


def _tie_to(q, device, seg):
    """(device, seg) made to depend on this call's q.

    Masks depend only on token indices and segment ids, which are the same in every layer. Inside the
    model's layer scan, JAX's autodiff then treats them as loop invariants and hoists them out of the
    scan: every block's and every query tile's mask (and its fill constants) are materialised at once,
    [ring steps x tiles x 512 x heads x keys] -- 18 GiB per device for the 300m step at 32k tokens on
    a v5e:2x2. An optimization barrier that also takes q makes them per-layer values again, computed
    tile by tile inside the loops.
    """
    device, seg, _ = jax.lax.optimization_barrier((device, seg, q))
    return device, seg


# --------------------------------------------------------------------------------------------------
# Ring
# --------------------------------------------------------------------------------------------------


def _rotate(tree, context: int):
    """Send every array one hop around the ring: device d receives from d - 1."""
    perm = [(d, (d + 1) % context) for d in range(context)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, perm), tree)


def _ring_steps(context: int, device, step_fn, carry, travelling):
    """Runs step_fn(carry, travelling, source) for the diagonal and the C-1 visiting blocks.

    The hop to the next device is issued before the current block's compute (no data dependency), so
    the transfer can overlap with it. Returns the carry and the travelling tree after the last block.
    """
    if context == 1:
        return step_fn(carry, travelling, device), travelling
    incoming = _rotate(travelling, context)
    carry = step_fn(carry, travelling, device)

    def body(state, step):
        carry, current = state
        nxt = _rotate(current, context)
        carry = step_fn(carry, current, (device - step) % context)
        return (carry, nxt), None

    (carry, current), _ = jax.lax.scan(body, (carry, incoming), jnp.arange(1, context - 1))
    carry = step_fn(carry, current, (device - (context - 1)) % context)
    return carry, current


def _visible_part(source, device, causal: bool, full_fn, first_kv_fn, second_q_fn):
    """Dispatch on which part of a zig-zag block is visible (module docstring); the diagonal block
    (source == device) is the local causal block, computed whole."""
    if not causal:
        return full_fn()
    return jax.lax.cond(source == device, full_fn, lambda: jax.lax.cond(source < device, first_kv_fn, second_q_fn))


def _ring_forward(q, k, v, seg, causal: bool, context: int, blocks):
    """Local q [B, 2c, G, R, K], k/v [B, 2c, G, K], seg [B, 2c] or None -> (out, lse)."""
    b, length, g, r, size = q.shape
    chunk = length // 2
    device, seg = _tie_to(q, _device_index(context), seg)
    q_idx = _local_indices(device, chunk, context)
    zeros = lambda shape: varying_like(jnp.zeros(shape, jnp.float32), q)
    acc = (zeros(q.shape), varying_like(jnp.full((b, length, g, r), NEG, jnp.float32), q), zeros((b, length, g, r)))

    def step(acc, kv, source):
        k_s, v_s, seg_s = kv
        k_idx = _local_indices(source, chunk, context)
        seg_2 = None if seg is None else seg[:, chunk:]

        def full():  # the diagonal block (or any block without causal masking)
            return blocks.forward(acc, q, q_idx, seg, (k_s, v_s, k_idx, seg_s), causal, diagonal=True)

        def first_kv():  # source < device: every local query sees only the source's first chunk
            seg_s1 = None if seg_s is None else seg_s[:, :chunk]
            keys = (k_s[:, :chunk], v_s[:, :chunk], k_idx[:chunk], seg_s1)
            return blocks.forward(acc, q, q_idx, seg, keys, causal, diagonal=False)

        def second_q():  # source > device: only the second local chunk sees the source, all of it
            acc_2 = tuple(x[:, chunk:] for x in acc)
            keys = (k_s, v_s, k_idx, seg_s)
            part = blocks.forward(acc_2, q[:, chunk:], q_idx[chunk:], seg_2, keys, causal, diagonal=False)
            return tuple(jnp.concatenate([x[:, :chunk], y], axis=1) for x, y in zip(acc, part))

        return _visible_part(source, device, causal, full, first_kv, second_q)

    (o, m, l), _ = _ring_steps(context, device, step, acc, (k, v, seg))
    out = (o / l[..., None]).astype(q.dtype)
    return out, m + jnp.log(l)


def _ring_backward(q, k, v, seg, out, lse, do, causal: bool, context: int, blocks):
    b, length, g, r, size = q.shape
    chunk = length // 2
    device, seg = _tie_to(q, _device_index(context), seg)
    q_idx = _local_indices(device, chunk, context)
    delta = jnp.einsum("bqgrk,bqgrk->bqgr", do.astype(jnp.float32), out.astype(jnp.float32))
    f32_zeros = lambda x: varying_like(jnp.zeros(x.shape, jnp.float32), x)
    do = do.astype(q.dtype)

    def step(dq, travelling, source):
        k_s, v_s, seg_s, dk_s, dv_s = travelling
        k_idx = _local_indices(source, chunk, context)
        seg_2 = None if seg is None else seg[:, chunk:]

        def full():
            keys = (k_s, v_s, k_idx, seg_s)
            dq_b, dk_b, dv_b = blocks.backward(q, do, out, lse, delta, q_idx, seg, keys, causal, diagonal=True)
            return dq + dq_b, dk_s + dk_b, dv_s + dv_b

        def first_kv():
            seg_s1 = None if seg_s is None else seg_s[:, :chunk]
            keys = (k_s[:, :chunk], v_s[:, :chunk], k_idx[:chunk], seg_s1)
            dq_b, dk_b, dv_b = blocks.backward(q, do, out, lse, delta, q_idx, seg, keys, causal, diagonal=False)
            pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
            return dq + dq_b, dk_s + pad(dk_b), dv_s + pad(dv_b)

        def second_q():
            keys = (k_s, v_s, k_idx, seg_s)
            half = lambda x: x[:, chunk:]
            dq_b, dk_b, dv_b = blocks.backward(
                half(q),
                half(do),
                half(out),
                half(lse),
                half(delta),
                q_idx[chunk:],
                seg_2,
                keys,
                causal,
                diagonal=False,
            )
            return dq + jnp.concatenate([jnp.zeros_like(dq_b), dq_b], axis=1), dk_s + dk_b, dv_s + dv_b

        dq, dk_s, dv_s = _visible_part(source, device, causal, full, first_kv, second_q)
        return dq, (k_s, v_s, seg_s, dk_s, dv_s)

    # dK/dV accumulators travel with their K/V and come home after the last block.
    travelling = (k, v, seg, f32_zeros(k), f32_zeros(v))
    dq, (_, _, _, dk, dv) = _ring_steps_with_accumulators(context, device, step, f32_zeros(q), travelling)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_steps_with_accumulators(context: int, device, step_fn, carry, travelling):
    """Like _ring_steps, but the travelling tree is updated by each block (dK/dV accumulate into it).

    K/V hop ahead of the compute; the accumulators hop after it. After the last block the accumulators
    are one hop short of home, so they make that hop.
    """
    carry, travelling = step_fn(carry, travelling, device)
    if context == 1:
        return carry, travelling

    def body(state, step):
        carry, (k, v, seg, dk, dv) = state
        k, v, seg = _rotate((k, v, seg), context)
        dk, dv = _rotate((dk, dv), context)
        carry, travelling = step_fn(carry, (k, v, seg, dk, dv), (device - step) % context)
        return (carry, travelling), None

    (carry, travelling), _ = jax.lax.scan(body, (carry, travelling), jnp.arange(1, context))
    k, v, seg, dk, dv = travelling
    dk, dv = _rotate((dk, dv), context)
    return carry, (k, v, seg, dk, dv)


# --------------------------------------------------------------------------------------------------
# all_gather
# --------------------------------------------------------------------------------------------------


def _all_gather_local(q, k, v, seg, causal: bool, context: int):
    chunk = q.shape[1] // 2
    device = _device_index(context)
    if context == 1:
        gather = lambda x: x
    else:
        gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
    k_all, v_all = gather(k), gather(v)
    seg_all = None if seg is None else gather(seg)
    k_idx = jnp.concatenate([_local_indices(d, chunk, context) for d in range(context)])
    mask = block_mask(_local_indices(device, chunk, context), k_idx, seg, seg_all, causal)
    s = scores(q, k_all, mask)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bqgrs,bsgk->bqgrk", p.astype(v.dtype), v_all, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def _specs(q_shape, k_shape, mesh) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, PartitionSpec]:
    """shard_map specs for q, k/v, segment ids and the logsumexp [B, L, H], from sharding.RULES; heads
    are split over 'tensor' only if both the query and the kv heads divide."""
    sizes = dict(mesh.shape)
    q_spec = sharding.logical_to_spec(("batch", "seq", "heads", "head_dim"), q_shape, sizes)
    k_spec = sharding.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k_shape, sizes)
    if q_spec[2] != k_spec[2]:  # kv heads not divisible: keep all heads whole on each device
        q_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
        k_spec = PartitionSpec(k_spec[0], k_spec[1], None, None)
    if q_spec[1] != CONTEXT_AXIS and sizes.get(CONTEXT_AXIS, 1) > 1:
        raise ValueError(
            f"context attention: sequence length {q_shape[1]} is not divisible by the context axis "
            f"({sizes[CONTEXT_AXIS]})"
        )
    return q_spec, k_spec, PartitionSpec(q_spec[0], q_spec[1]), PartitionSpec(*q_spec[:3])


def _check_length(length: int, context: int) -> None:
    if length % (2 * context):
        raise ValueError(
            f"context attention: sequence length {length} must be divisible by 2 x context = {2 * context}"
        )


def _per_device(fn, arg_kinds: str, out_kinds: str, *args, check_vma: bool = True):
    """Runs fn on each device's shards inside shard_map (directly without a mesh).

    Kinds name each array's layout: q = [B, L, H, K], k = [B, L, G, K], s = segment ids [B, L] (may be
    None), l = logsumexp [B, L, H]. fn sees q-kind arrays grouped as [B, L/C, G, R, K] and l-kind as
    [B, L/C, G, R] (R = H / G query heads per kv head) and returns its outputs in that form.
    """

    def local(*local_args):
        groups = local_args[arg_kinds.index("k")].shape[2]  # kv heads on this device
        grouped = {
            "q": lambda x: x.reshape(*x.shape[:2], groups, -1, x.shape[3]),
            "l": lambda x: x.reshape(*x.shape[:2], groups, -1),
        }
        inputs = [grouped.get(kind, lambda x: x)(x) for kind, x in zip(arg_kinds, local_args)]
        outputs = fn(*inputs)
        flat = {"q": lambda x: x.reshape(*x.shape[:2], -1, x.shape[4]), "l": lambda x: x.reshape(*x.shape[:2], -1)}
        return tuple(flat.get(kind, lambda x: x)(x) for kind, x in zip(out_kinds, outputs))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:  # one device, no mesh: the same local code with C = 1
        return local(*args)
    q, k = args[arg_kinds.index("q")], args[arg_kinds.index("k")]
    spec = dict(zip("qksl", _specs(q.shape, k.shape, mesh)))
    in_specs = tuple(spec[kind] for kind in arg_kinds)
    out_specs = tuple(spec[kind] for kind in out_kinds)
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)(*args)


# The custom VJP sits outside shard_map: forward and backward are each one shard_map of local code that
# is never differentiated, and the residuals are global arrays with the shardings of q and the lse.
def _ring_forward_sharded(q, k, v, seg, causal: bool):
    context = context_size()
    chunk = q.shape[1] // (2 * context)
    local = lambda q, k, v, seg: ring_blocks.with_block_kernel(
        lambda blocks: _ring_forward(q, k, v, seg, causal, context, blocks), chunk
    )
    # check_vma=False: splash's Pallas calls declare their outputs without varying-axis types.
    return _per_device(local, "qkks", "ql", q, k, v, seg, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, seg, causal: bool):
    return _ring_forward_sharded(q, k, v, seg, causal)[0]


def _ring_fwd(q, k, v, seg, causal):
    out, lse = _ring_forward_sharded(q, k, v, seg, causal)
    return out, (q, k, v, seg, out, lse)


def _ring_bwd(causal, residuals, do):
    context = context_size()
    chunk = residuals[0].shape[1] // (2 * context)
    local = lambda q, k, v, seg, out, lse, do: ring_blocks.with_block_kernel(
        lambda blocks: _ring_backward(q, k, v, seg, out, lse, do, causal, context, blocks), chunk
    )
    dq, dk, dv = _per_device(local, "qkksqlq", "qkk", *residuals, do, check_vma=False)
    return dq, dk, dv, None


_ring.defvjp(_ring_fwd, _ring_bwd)


@register_backend("ring", context_parallel=True, zigzag_layout=True)
def ring_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """Ring attention over 'context' (inputs in the zig-zag layout when context > 1)."""
    _check_length(q_BxLxHxK.shape[1], context_size())
    return _ring(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, causal)


@register_backend("all_gather", context_parallel=True, zigzag_layout=True)
def all_gather_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    """K/V gathered over 'context' (inputs in the zig-zag layout when context > 1); plain autodiff."""
    context = context_size()
    _check_length(q_BxLxHxK.shape[1], context)
    local = lambda q, k, v, seg: (_all_gather_local(q, k, v, seg, causal, context),)
    return _per_device(local, "qkks", "q", q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)[0]
