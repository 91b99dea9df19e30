"""matmul.token_matmul / token_sum_outer: the merged 2-D form against einsum, with and without a split sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megadoc_jax import sharding
from megadoc_jax.matmul import token_matmul, token_sum_outer


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("split_axis", [None, "data", "context"])
def test_token_matmul_and_its_weight_gradient_match_einsum(split_axis):
    x_BxLxD = _random((4, 8, 6), 0)
    w_DxHxK = _random((6, 2, 3), 1)
    out_BxLxHxK = _random((4, 8, 2, 3), 2)
    w_HxKxD = _random((2, 3, 6), 3)
    g_BxLxO = _random((4, 8, 5), 4)

    def products():
        return (
            token_matmul(x_BxLxD, w_DxHxK),
            token_matmul(out_BxLxHxK, w_HxKxD, in_axes=2),
            token_sum_outer(x_BxLxD, g_BxLxO),
            jax.grad(lambda w: jnp.sum(token_matmul(x_BxLxD, w) ** 2))(w_DxHxK),
        )

    if split_axis is None:
        got = products()
    else:
        mesh = sharding.make_mesh({split_axis: 2}, devices=jax.devices()[:2])
        with jax.set_mesh(mesh):
            assert sharding.splits("seq") == (split_axis == "context")
            got = jax.jit(products)()
    expected = (
        jnp.einsum("bld,dhk->blhk", x_BxLxD, w_DxHxK),
        jnp.einsum("blhk,hkd->bld", out_BxLxHxK, w_HxKxD),
        jnp.einsum("bli,blo->io", x_BxLxD, g_BxLxO),
        jnp.einsum("bld,blhk->dhk", x_BxLxD, 2 * jnp.einsum("bld,dhk->blhk", x_BxLxD, w_DxHxK)),
    )
    for got_array, expected_array in zip(got, expected, strict=True):
        assert got_array.shape == expected_array.shape
        np.testing.assert_allclose(np.asarray(got_array), np.asarray(expected_array), rtol=1e-5, atol=1e-5)


def test_token_matmul_refuses_weights_that_do_not_share_the_input_axes():
    with pytest.raises(ValueError, match=r"token_matmul: x \(2, 3, 4\) and w \(5, 6\) do not share 1 input axes"):
        token_matmul(jnp.zeros((2, 3, 4)), jnp.zeros((5, 6)))
    with pytest.raises(ValueError, match="do not share 2 input axes"):
        token_matmul(jnp.zeros((2, 3, 4)), jnp.zeros((4, 6)), in_axes=2)
