"""MSR, PMT verification accuracy, r_s and UP on hand-worked cases and brute-force references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from faceveil.losses import match_success, msr, pmt_accuracy, r_s, up, verification_correct


def test_msr_hand_worked():
    gallery = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    gallery_ids = np.array([0, 1, 2])
    probes = np.array([[1.0, 0.0], [9.0, 1.0], [6.0, 5.0], [0.5, 9.0]], np.float32)
    probe_ids = np.array([0, 1, 2, 1])
    # Nearest (L2): p0 -> 0 (ok), p1 -> 1 (ok), p2 = (6, 5) -> 1 (6.4 vs 7.8: wrong),
    # p3 -> 2 (wrong): 2 of 4.
    ok = match_success(probes, gallery, probe_ids, gallery_ids)
    np.testing.assert_array_equal(ok, [True, True, False, False])
    assert float(msr(probes, gallery, probe_ids, gallery_ids)) == 0.5


def test_msr_matches_brute_force_and_jits():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(20, 16)).astype(np.float32)
    gallery_ids = np.repeat(np.arange(5), 4)
    probes = (gallery[::2] + 0.8 * rng.normal(size=(10, 16))).astype(np.float32)
    probe_ids = gallery_ids[::2]
    for metric in ("euclidean", "cosine"):
        if metric == "euclidean":
            d = np.linalg.norm(probes[:, None] - gallery[None], axis=-1)
        else:
            pn = probes / np.linalg.norm(probes, axis=1, keepdims=True)
            gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
            d = -pn @ gn.T
        ref = np.mean(gallery_ids[np.argmin(d, axis=1)] == probe_ids)
        f = jax.jit(msr, static_argnames="metric")
        np.testing.assert_allclose(f(probes, gallery, probe_ids, gallery_ids, metric=metric), ref)


def test_pmt_accuracy_hand_worked():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    # cosines: 1.0, 0.1, 0.5, -1.0
    b = np.array([[2.0, 0.0], [0.1, np.sqrt(0.99)], [0.5, np.sqrt(0.75)], [-1.0, 0.0]], np.float32)
    same = np.array([True, True, False, False])
    # kappa 0.2: predicted same = [T, F, T, F]; correct = [T, F, F, T] -> 0.5.
    np.testing.assert_array_equal(verification_correct(a, b, same), [True, False, False, True])
    assert float(pmt_accuracy(a, b, same)) == 0.5
    # kappa 0.05: predicted same = [T, T, T, F] -> correct [T, T, F, T] = 0.75.
    assert float(pmt_accuracy(a, b, same, kappa=0.05)) == 0.75


def test_r_s():
    # Definition: F_c / (1 + T_o - F_c).
    np.testing.assert_allclose(r_s(0.99, 0.99), 0.99)
    np.testing.assert_allclose(r_s(0.99, 0.0), 0.0)
    np.testing.assert_allclose(r_s(0.9, 0.3), 0.3 / 1.6, rtol=1e-6)
    np.testing.assert_allclose(r_s(np.array([1.0, 0.8]), np.array([0.5, 0.8])), [1 / 3, 0.8])


def test_up_counts_private_and_useful():
    privacy = np.array([0.6, 0.2, 0.7, 0.9])  # LPIPS(x, x~)
    utility = np.array([0.9, 0.9, 0.1, 0.3])  # cos(F(x~), F(x))
    # sigma 0.5, kappa 0.2: private = [T, F, T, T], useful = [T, T, F, T] -> 2 of 4.
    assert float(up(privacy, utility, sigma=0.5, kappa=0.2)) == 0.5
    assert float(up(privacy, utility, sigma=0.0, kappa=-1.0)) == 1.0
    with pytest.raises(TypeError):
        up(privacy, utility, 0.5, 0.2)  # thresholds are keyword-only
