"""Block variance, total variation and the budget hinge against plain numpy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faceveil.losses import (
    block_sums,
    block_variance,
    block_variance_terms,
    budget_hinge,
    total_variation,
)


def _block_variance_loops(img, size=3):
    """Returns (Var_inner, Var_intra) of one [H, W, C] image with explicit Python loops.

    DESIGN.md: S_bc = sum of the size x size block b of channel c;
    Var_inner = sum_c var_b(S_bc); Var_intra = sum_c mean_b (S_bc / 9 - mean_b S_bc)^2.
    """
    h, w, c = img.shape
    inner = intra = 0.0
    for ch in range(c):
        sums = []
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                total = 0.0
                for di in range(size):
                    for dj in range(size):
                        total += float(img[i + di, j + dj, ch])
                sums.append(total)
        sums = np.array(sums)
        mean = sums.mean()
        inner += np.mean((sums - mean) ** 2)
        intra += np.mean((sums / (size * size) - mean) ** 2)
    return inner, intra


def _tv_loops(img, beta):
    """Returns the beta-TV of one [H, W, C] image with explicit loops (Mahendran & Vedaldi)."""
    h, w, c = img.shape
    total = 0.0
    for ch in range(c):
        for i in range(h - 1):
            for j in range(w - 1):
                dx = float(img[i, j + 1, ch]) - float(img[i, j, ch])
                dy = float(img[i + 1, j, ch]) - float(img[i, j, ch])
                total += (dx * dx + dy * dy) ** (beta / 2)
    return total


def test_block_sums_is_the_all_ones_convolution():
    x = np.random.default_rng(0).random((2, 9, 11, 3)).astype(np.float32)
    kernel = np.ones((3, 3, 1, 3), np.float32)
    ref = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=3,
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(block_sums(x), ref, rtol=1e-6, atol=1e-6)
    assert block_sums(x, stride=3).shape == (2, 3, 3, 3)


def test_block_variance_matches_loops():
    rng = np.random.default_rng(1)
    x = rng.random((2, 10, 12, 3)).astype(np.float32)
    inner, intra = block_variance_terms(x)
    assert inner.shape == intra.shape == (2,)
    for n in range(2):
        ref_inner, ref_intra = _block_variance_loops(x[n])
        np.testing.assert_allclose(inner[n], ref_inner, rtol=1e-5)
        np.testing.assert_allclose(intra[n], ref_intra, rtol=1e-5)
        np.testing.assert_allclose(block_variance(x)[n], ref_inner + ref_intra, rtol=1e-5)


@pytest.mark.parametrize("beta", [2.0, 1.0, 1.5])
def test_total_variation_matches_loops(beta):
    x = np.random.default_rng(2).random((2, 7, 9, 3)).astype(np.float32)
    tv = total_variation(x, beta=beta)
    assert tv.shape == (2,)
    for n in range(2):
        np.testing.assert_allclose(tv[n], _tv_loops(x[n], beta), rtol=1e-5)


def test_budget_hinge():
    d = np.array([0.0, 0.005, 0.01, 0.02, 0.5], np.float32)
    np.testing.assert_allclose(budget_hinge(d, 0.01), [0, 0, 0, 0.01, 0.49], atol=1e-7)
    g = jax.grad(lambda z: jnp.sum(budget_hinge(z, 0.01)))(d)
    np.testing.assert_array_equal(g, [0, 0, 0, 1, 1])


_FLAT_GRADS = [
    jax.jit(jax.value_and_grad(fn))
    for fn in (
        block_variance,
        lambda z: total_variation(z, beta=1.0),
        lambda z: total_variation(z, beta=2.0),
    )
]


@pytest.mark.parametrize("value", [0.0, 1.0, 0.37])
def test_finite_with_finite_gradients_on_flat_images(value):
    flat = jnp.full((12, 12, 3), value, jnp.float32)
    for val_and_grad in _FLAT_GRADS:
        val, grad = val_and_grad(flat)
        assert np.isfinite(val)
        assert np.all(np.isfinite(grad))
    # A flat image has no variation and no between-block variance.
    assert float(total_variation(flat)) == 0.0
    assert float(block_variance_terms(flat)[0]) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=15, deadline=None)
@given(hnp.arrays(np.float32, (8, 8, 3), elements=st.floats(0, 1, width=32)))
def test_property_regularisers_nonnegative_and_finite(x):
    for val in (block_variance(x), total_variation(x), total_variation(x, beta=1.0)):
        assert np.isfinite(val) and float(val) >= 0.0
