"""A toy attention backend added from outside megadoc_jax: this one file and its one registration.

`toy` is the xla reference computed another way (kv heads repeated, `jax.nn.dot_product_attention`'s XLA
implementation with a boolean document mask) and it declares the zig-zag token layout: on a mesh with
context > 1 the train step hands it every [B, L] input in that order (it reads the declaration), so the
backend puts q, k, v and the segment ids back into the original order, attends, and returns its output in
the layout's order again.
"""

import jax
import jax.numpy as jnp

from megadoc_jax import attention


@attention.register_backend("toy", context_parallel=True, zigzag_layout=True)
def toy_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, *, segment_ids_BxL, causal):
    length = q_BxLxHxK.shape[1]
    order_L, inverse_L = attention.token_order("toy", length), attention.inverse_token_order("toy", length)
    original = (lambda x: x) if inverse_L is None else (lambda x: jnp.take(x, inverse_L, axis=1))
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = (original(x) for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK))
    repeat = q_BxLxHxK.shape[2] // k_BxLxGxK.shape[2]
    k_BxLxHxK, v_BxLxHxK = (jnp.repeat(x, repeat, axis=2) for x in (k_BxLxGxK, v_BxLxGxK))
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        segment_ids_BxL = original(segment_ids_BxL)
        mask_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, is_causal=causal, implementation="xla"
    )
    return out_BxLxHxK if order_L is None else jnp.take(out_BxLxHxK, order_L, axis=1)
