"""The backend registry: each backend registers under a name with what it needs, and `attention()` calls it.

A backend declares, where it registers, what the rest of the stack must do for it (`BackendSpec`): the
config check (`check_mesh`) and the train step's token layout (`token_order`) read those declarations,
never lists of names. Adding a backend is one module with one `@register_backend(...)`, imported before
the model is built (megadoc_jax/attention/__init__.py imports the built-in ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
import numpy as np

from megadoc_jax.attention.layout import CONTEXT_AXIS, context_size, zigzag_order
from megadoc_jax.config import ConfigError


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


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A registered backend and what it needs.

    context_parallel: it runs with the sequence split over the mesh's 'context' axis (mesh.context > 1):
        ring and all_gather by shard_map, xla through XLA's partitioner. The Pallas (splash) and cuDNN
        kernels cannot be partitioned along the sequence, so they declare False and are refused there.
    zigzag_layout: with mesh.context > 1 it takes every [B, L] input in the load-balanced zig-zag order
        (layout.zigzag_order), so data.seq_len must be divisible by 2 x mesh.context.
    """

    name: str
    fn: AttentionBackend
    context_parallel: bool
    zigzag_layout: bool


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(
    name: str, *, context_parallel: bool, zigzag_layout: bool
) -> Callable[[AttentionBackend], AttentionBackend]:
    """Decorator: make `fn` available as attention(..., impl=name), with its declared needs (BackendSpec)."""
    if zigzag_layout and not context_parallel:
        raise ValueError(f"attention backend {name!r}: zigzag_layout needs context_parallel (a split sequence)")

    def register(fn: AttentionBackend) -> AttentionBackend:
        if name in _BACKENDS:
            raise ValueError(f"attention backend {name!r} is already registered")
        _BACKENDS[name] = BackendSpec(name, fn, context_parallel=context_parallel, zigzag_layout=zigzag_layout)
        return fn

    return register


def backends() -> tuple[str, ...]:
    """Names of the registered backends, sorted."""
    return tuple(sorted(_BACKENDS))


def _unknown(impl: str) -> str:
    return f"unknown attention backend {impl!r} (model.attention); registered backends: {list(backends())}"


def get_backend(impl: str) -> BackendSpec:
    """The declaration of backend `impl`, or ValueError listing the known names (model.attention)."""
    try:
        return _BACKENDS[impl]
    except KeyError:
        raise ValueError(_unknown(impl)) from None


def _no_context_split(spec: BackendSpec) -> str | None:
    """Why `spec` cannot run with mesh.context > 1, or None if it can."""
    if spec.context_parallel:
        return None
    able = [name for name in backends() if _BACKENDS[name].context_parallel]
    return (
        f"attention backend {spec.name!r} does not split the sequence; with mesh.context > 1 use "
        f"model.attention=ring (backends that do: {able})"
    )


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
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
    """Self-attention output [B, L, H, K] with the backend `impl` (conventions: the package docstring)."""
    spec = get_backend(impl)
    check_shapes(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    refusal = _no_context_split(spec)
    if refusal and context_size() > 1:
        raise ValueError(refusal)
    return spec.fn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=segment_ids_BxL, causal=causal)


def check_mesh(impl: str, seq_len: int, mesh_sizes: Mapping[str, int]) -> None:
    """What backend `impl` (model.attention) needs of a mesh with these axis sizes and of data.seq_len,
    checked before anything is compiled; raises ConfigError naming the key."""
    if impl not in _BACKENDS:
        raise ConfigError(f"model.attention: {_unknown(impl)}")
    spec, context = _BACKENDS[impl], mesh_sizes.get(CONTEXT_AXIS, 1)
    if context == 1:
        return
    refusal = _no_context_split(spec)
    if refusal:
        raise ConfigError(f"mesh.context: {context}, but {refusal}")
    if spec.zigzag_layout and seq_len % (2 * context):
        raise ConfigError(
            f"data.seq_len: {seq_len} is not divisible by 2 * mesh.context = {2 * context}, which "
            f"model.attention={impl!r} needs for its load-balanced (zig-zag) layout"
        )


def token_order(impl: str, length: int, context: int | None = None) -> np.ndarray | None:
    """int32 [length]: the original index of the token at each position of the layout that backend `impl`
    takes its [B, L] inputs in (x_layout = x[:, order]), on a context axis of `context` devices (default:
    the mesh set with jax.set_mesh); None where that is the original order."""
    context = context_size() if context is None else context
    if context == 1 or not get_backend(impl).zigzag_layout:
        return None
    return zigzag_order(length, context)


def inverse_token_order(impl: str, length: int, context: int | None = None) -> np.ndarray | None:
    """int32 [length], the inverse of token_order: per-token outputs computed in the layout come back to the
    original order as x_original = x_layout[:, inverse] (jnp.take(x, inverse, axis=1)); None where the
    layout is the original order."""
    order = token_order(impl, length, context)
    return None if order is None else np.argsort(order).astype(np.int32)
