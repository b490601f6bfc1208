"""The convolution whose input gradient is a forward convolution: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from faceveil.models import convs

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size,k,stride,pad", [(15, 3, 1, "SAME"), (16, 3, 2, "VALID"),
                                               (17, 3, 2, ((0, 0), (0, 0))), (9, 1, 1, "VALID"),
                                               (20, 5, 2, ((2, 1), (1, 2))),
                                               (150, 7, 2, "VALID")])
def test_values_and_gradients_match_lax(size, k, stride, pad):
    rng = np.random.default_rng(size * k)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 3, 4)), jnp.float32)
    hi = lax.Precision.HIGHEST

    def run(conv):
        def f(x, w):
            y = conv(x, w, (stride, stride), pad, dimension_numbers=NHWC, precision=hi)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)

    (_, y), (gx, gw) = run(convs.conv_general_dilated)
    (_, y0), (gx0, gw0) = run(lax.conv_general_dilated)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw0), rtol=1e-4, atol=1e-3)


def test_unsupported_forms_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 4))  # two feature groups
    got = convs.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                     feature_group_count=2)
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                    feature_group_count=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
