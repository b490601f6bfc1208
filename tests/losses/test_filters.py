"""Separable filters with a filter as backward pass, and the skipped zero-cotangent pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.losses import filters, lazy, perceptual


def _direct(x, taps, axis):
    """Returns the sum-of-shifted-slices form of a 'valid' correlation along axis."""
    k = taps.shape[0]
    n_out = x.shape[axis] - k + 1
    return sum(taps[i] * jax.lax.slice_in_dim(x, i, i + n_out, axis=axis) for i in range(k))


@pytest.mark.parametrize("n,k,axis", [(40, 11, 0), (77, 13, 1), (11, 11, 2), (50, 5, -1),
                                      (33, 3, 0)])
def test_correlate_valid_matches_numpy(n, k, axis):
    rng = np.random.default_rng(n + k)
    shape = [6, 7, 5]
    shape[axis] = n
    x = rng.normal(size=shape).astype(np.float32)
    taps = rng.normal(size=k).astype(np.float32)
    got = np.asarray(filters.correlate_valid(x, taps, axis=axis))
    want = np.apply_along_axis(lambda v: np.correlate(v, taps, mode="valid"), axis, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_correlate_valid_rejects_too_few_samples():
    with pytest.raises(ValueError, match="taps need at least"):
        filters.correlate_valid(np.zeros((4, 3)), np.ones(5), axis=0)


def test_separable_gradient_and_traced_taps_under_vmap_match_the_direct_form():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(3, 45, 38, 3)).astype(np.float32))
    sigmas = jnp.asarray([0.7, 1.5, 2.5], jnp.float32)

    def taps(s):
        t = jnp.exp(-0.5 * (jnp.arange(-6.0, 7.0) / s) ** 2)
        return t / t.sum()

    def filtered(img, s):
        return jnp.sum(filters.separable_valid(img, taps(s), axes=(0, 1)) ** 2)

    def direct(img, s):
        return jnp.sum(_direct(_direct(img, taps(s), 1), taps(s), 0) ** 2)

    for f, g in ((filtered, direct),):
        got = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1))))(x, sigmas)
        want = jax.vmap(jax.value_and_grad(g, argnums=(0, 1)))(x, sigmas)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.uniform(size=(64, 70, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(scale=0.1, size=a.shape), 0, 1).astype(np.float32)
    want = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0)
    assert float(perceptual.ssim(a, b)) == pytest.approx(want, abs=1e-5)


def test_skip_zero_cotangent_keeps_gradients_and_skips_zero_ones():
    def f(a, b):
        return jnp.sum((a - b) ** 2 * jnp.arange(a.size).reshape(a.shape))

    lazy_f = lazy.skip_zero_cotangent(f)
    rng = np.random.default_rng(2)
    a, b = (jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32) for _ in range(2))

    def loss(fn, a, b, w):  # w = 0 sends a zero cotangent into fn
        return w * fn(a, b)

    for w in (0.0, 2.5):
        got = jax.grad(loss, argnums=(1, 2))(lazy_f, a, b, w)
        want = jax.grad(loss, argnums=(1, 2))(f, a, b, w)
        for g, h in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-6)
    # Batched lanes, some with a zero cotangent: every lane gets its own gradient.
    w = jnp.asarray([0.0, 1.0, 0.0, 3.0])
    got = jax.jit(jax.vmap(jax.grad(functools.partial(loss, lazy_f))))(a, b, w)
    want = jax.vmap(jax.grad(functools.partial(loss, f)))(a, b, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert not np.asarray(got[0]).any() and np.asarray(got[1]).any()
