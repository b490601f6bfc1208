"""MI-FGSM, sign and translation-invariant smoothing as optax transforms, on hand-worked cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage as ndi

from faceveil.losses import mi_fgsm, sign, smooth, smoothing_kernel


def _run(tx, grads, params):
    state = tx.init(params)
    outs = []
    for g in grads:
        upd, state = tx.update(g, state, params)
        outs.append(upd)
    return outs, state


def test_mi_fgsm_hand_worked():
    # g1 = [1, -3] / 4 = [0.25, -0.75]; g2 = decay * g1 + [2, 2] / 4.
    grads = [jnp.array([1.0, -3.0]), jnp.array([2.0, 2.0])]
    outs, state = _run(mi_fgsm(decay=1.0), grads, jnp.zeros(2))
    np.testing.assert_allclose(outs[0], [0.25, -0.75])
    np.testing.assert_allclose(outs[1], [0.75, -0.25])
    np.testing.assert_allclose(state.momentum, [0.75, -0.25])
    outs, _ = _run(mi_fgsm(decay=0.5), grads, jnp.zeros(2))
    np.testing.assert_allclose(outs[1], [0.625, 0.125])


def test_mi_fgsm_per_example_normalisation():
    g = jnp.array([[1.0, 3.0], [10.0, -10.0]])
    outs, _ = _run(mi_fgsm(batched=True), [g], jnp.zeros((2, 2)))
    np.testing.assert_allclose(outs[0], [[0.25, 0.75], [0.5, -0.5]])
    outs, _ = _run(mi_fgsm(batched=False), [g], jnp.zeros((2, 2)))
    np.testing.assert_allclose(outs[0], np.asarray(g) / 24.0)
    # A zero gradient stays zero (no 0/0).
    outs, _ = _run(mi_fgsm(), [jnp.zeros(3)], jnp.zeros(3))
    np.testing.assert_array_equal(outs[0], np.zeros(3))


def test_mi_fgsm_sign_scale_chain_is_the_paper_step():
    # veil <- veil - step * sign(g): with step 0.1 the update is -0.1 * sign(g).
    tx = optax.chain(mi_fgsm(decay=1.0), sign(), optax.scale(-0.1))
    params = {"veil": jnp.zeros((2, 2, 1))}
    grads = [{"veil": jnp.array([[[1.0], [-3.0]], [[0.0], [2.0]]])}]
    outs, _ = _run(tx, grads, params)
    np.testing.assert_allclose(outs[0]["veil"][..., 0], [[-0.1, 0.1], [0.0, -0.1]])
    new = optax.apply_updates(params, outs[0])
    assert new["veil"].shape == (2, 2, 1)


def test_kernels_hand_worked():
    # Linear, length 3: the triangle [0.5, 1, 0.5], outer product / 4.
    lin = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]) / 4.0
    np.testing.assert_allclose(smoothing_kernel("linear", 3), lin, rtol=1e-6)
    # Gaussian, length 3 on [-3, 3]: taps exp(-4.5), 1, exp(-4.5).
    k1 = np.array([np.exp(-4.5), 1.0, np.exp(-4.5)])
    gau = np.outer(k1, k1) / np.outer(k1, k1).sum()
    np.testing.assert_allclose(smoothing_kernel("gaussian", 3), gau, rtol=1e-6)
    for kind in ("linear", "gaussian"):
        k = smoothing_kernel(kind, 7)
        np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
        np.testing.assert_allclose(k, k.T)
    with pytest.raises(ValueError, match="linear"):
        smoothing_kernel("box", 3)


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_smooth_matches_scipy_correlate(kind):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
    tx = smooth(kind, 5)
    out, _ = tx.update({"img": jnp.asarray(g), "scalar": jnp.ones(())}, tx.init(None))
    k = smoothing_kernel(kind, 5)
    # Reference: scipy.ndimage.correlate per image and channel, zero padding ('SAME').
    ref = np.stack(
        [
            np.stack([ndi.correlate(g[n, :, :, c], k, mode="constant") for c in range(3)], -1)
            for n in range(2)
        ]
    )
    np.testing.assert_allclose(out["img"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["scalar"], 1.0)  # non-image leaves pass through


def test_smooth_of_a_delta_is_the_kernel_and_chains():
    delta = np.zeros((7, 7, 1), np.float32)
    delta[3, 3, 0] = 1.0
    tx = optax.chain(smooth("linear", 3), optax.scale(2.0))
    out, _ = tx.update(jnp.asarray(delta), tx.init(jnp.zeros_like(delta)))
    expect = np.zeros((7, 7))
    expect[2:5, 2:5] = 2.0 * smoothing_kernel("linear", 3)
    np.testing.assert_allclose(out[..., 0], expect, atol=1e-7)


def test_pmt_chain_jits():
    tx = optax.chain(smooth("gaussian", 5), mi_fgsm(batched=True), sign(), optax.scale(-0.01))
    params = jnp.zeros((2, 16, 16, 3))

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    g = jax.random.normal(jax.random.PRNGKey(0), params.shape)
    p, _ = step(params, tx.init(params), g)
    assert p.shape == params.shape
    np.testing.assert_allclose(np.abs(np.asarray(p)).max(), 0.01, rtol=1e-6)
