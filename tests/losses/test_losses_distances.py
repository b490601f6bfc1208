"""Feature distances against numpy / scipy references, gradients against finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faceveil.losses import (
    cosine_similarity,
    hull_distance,
    hull_projection,
    minkowski,
    subspace_distance,
    subspace_projection,
)

# Jitted once per module; the tests reuse a few shapes ([10, 128] points mostly) because each
# new shape recompiles the hull solver (~2 s on a loaded 2-core box).
_hull = jax.jit(hull_projection)
_subspace = jax.jit(subspace_projection)
_grads = {
    "subspace": jax.jit(jax.grad(subspace_distance)),
    "hull": jax.jit(jax.grad(hull_distance)),
}
_dists = {"subspace": jax.jit(subspace_distance), "hull": jax.jit(hull_distance)}
N, D = 10, 128


def _face_like(rng, n, d, spread=0.3):
    """Returns n points around a shared direction, like embeddings of one person ([n, d])."""
    base = rng.normal(size=d)
    return base + spread * rng.normal(size=(n, d)), base


def _hull_reference(q, points, big=1e5):
    """Returns (distance, w) by scipy NNLS with the sum-to-one row appended, weight `big`.

    The appended row only penalises sum(w) != 1, leaving a violation ~ |gradient| / big^2: with
    embeddings of norm ~30 a weight of 1e3 was measured to shift the distance by 1e-4
    relative, 1e5 agrees with SLSQP to 1e-9.
    """
    a = np.vstack([points.T, big * np.ones((1, len(points)))])
    b = np.concatenate([q, [big]])
    w, _ = so.nnls(a, b, maxiter=10_000)
    return np.linalg.norm(points.T @ w - q), w


def _hull_slsqp(q, points):
    """Returns the hull distance by scipy SLSQP (an independent second reference)."""
    n = len(points)
    res = so.minimize(
        lambda w: np.sum((points.T @ w - q) ** 2),
        np.full(n, 1.0 / n),
        jac=lambda w: 2 * points @ (points.T @ w - q),
        bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return np.linalg.norm(points.T @ res.x - q)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
def test_minkowski_matches_numpy(p):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    ref = np.linalg.norm(a - b, ord=p, axis=-1)  # numpy's vector p-norm
    np.testing.assert_allclose(minkowski(a, b, p=p), ref, rtol=1e-5)


def test_minkowski_rejects_order_below_one():
    with pytest.raises(ValueError, match=">= 1"):
        minkowski(np.zeros(3), np.ones(3), p=0.5)


def test_cosine_matches_numpy_and_handles_zero():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    ref = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(cosine_similarity(a, b), ref, rtol=1e-5)
    assert float(cosine_similarity(np.zeros(8), b[0])) == 0.0
    g = jax.grad(lambda z: cosine_similarity(z, b[0]))(jnp.zeros(8))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize(("n", "d"), [(3, 8), (6, 128), (12, 512), (10, 4)])
def test_subspace_matches_numpy_lstsq(n, d):
    rng = np.random.default_rng(n * d)
    basis, _ = _face_like(rng, n, d)
    q = rng.normal(size=d)
    w_ref, *_ = np.linalg.lstsq(basis.T, q, rcond=None)
    d_ref = np.linalg.norm(basis.T @ w_ref - q)
    dist, w = _subspace(q.astype(np.float32), basis.astype(np.float32))
    # float32 SVD least squares against float64 numpy: distances agree to ~1e-5 relative.
    np.testing.assert_allclose(dist, d_ref, rtol=1e-4, atol=1e-5)
    if n <= d:  # unique weights only for a full-column-rank basis
        np.testing.assert_allclose(w, w_ref, rtol=1e-3, atol=1e-3)


def test_subspace_distance_zero_inside_span():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(4, 32)).astype(np.float32)
    q = (np.array([0.5, -1.0, 2.0, 0.1]) @ basis).astype(np.float32)
    assert float(subspace_distance(q, basis)) < 1e-4


@pytest.mark.parametrize("trial", range(10))
def test_hull_matches_scipy(trial):
    rng = np.random.default_rng(100 + trial)
    # Mostly [10, 128] (dlib-sized); trials 8-9 have more points than dimensions.
    n, d = (N, D) if trial < 8 else (16, 8)
    points, base = _face_like(rng, n, d)
    if trial % 2:  # unit-norm embeddings, as FaceNet's
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    q = base + 0.3 * (trial % 4) * rng.normal(size=d)
    d_ref, w_ref = _hull_reference(q, points)
    d_slsqp = _hull_slsqp(q, points)
    dist, w = _hull(q.astype(np.float32), points.astype(np.float32))
    # References: scipy.optimize.nnls with an appended sum-to-one row (weight 1e5) and SLSQP
    # (scipy 1.17, float64); measured worst relative gap of ours 3.9e-6 over 60 such problems.
    np.testing.assert_allclose(dist, d_ref, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(dist, d_slsqp, rtol=2e-5, atol=1e-5)
    assert np.all(np.asarray(w) >= 0)
    np.testing.assert_allclose(np.sum(w), 1.0, atol=1e-5)
    if n <= d + 1:  # affinely independent points: the optimal weights are unique
        np.testing.assert_allclose(w, w_ref, atol=2e-3)


def test_hull_distance_zero_inside_and_vertex_outside():
    rng = np.random.default_rng(3)
    points = (rng.normal(size=(N, D)) + 2).astype(np.float32)
    inside = (rng.dirichlet(np.ones(N)) @ points).astype(np.float32)
    # Relative to |inside| ~ 2 sqrt(128) ~ 23: float32 rounding of the residual.
    assert float(_hull(inside, points)[0]) < 1e-3
    # Far along a vertex's own direction away from the centroid, the nearest hull point is
    # that vertex: distance = |q - vertex|, weight one-hot.
    centre = points.mean(0)
    far = points[2] + 5.0 * (points[2] - centre)
    dist, w = _hull(far, points)
    np.testing.assert_allclose(dist, np.linalg.norm(far - points[2]), rtol=1e-5)
    np.testing.assert_allclose(w, np.eye(N)[2], atol=1e-5)


def test_hull_and_subspace_batched_queries():
    rng = np.random.default_rng(4)
    points, _ = _face_like(rng, N, D)
    qs = rng.normal(size=(3, D)).astype(np.float32)
    points = points.astype(np.float32)
    dists, ws = _hull(qs, points)
    assert dists.shape == (3,) and ws.shape == (3, N)
    for i in range(3):
        np.testing.assert_allclose(dists[i], _hull(qs[i], points)[0], rtol=1e-6)
    sd, sw = _subspace(qs, points)
    assert sd.shape == (3,) and sw.shape == (3, N)


@pytest.mark.parametrize("kind", ["subspace", "hull"])
def test_gradients_match_finite_differences(kind):
    rng = np.random.default_rng(5)
    points, base = _face_like(rng, N, D)
    points = points.astype(np.float32)
    q = (base + 0.5 * rng.normal(size=D)).astype(np.float32)
    g = np.asarray(_grads[kind](q, points))
    eps = 1e-2
    for i in range(0, D, 16):
        e = np.zeros(D, np.float32)
        e[i] = eps
        fd = (float(_dists[kind](q + e, points)) - float(_dists[kind](q - e, points))) / (2 * eps)
        # Central differences in float32 with step 1e-2: truncation ~eps^2 |f'''|, ~1e-4 here.
        np.testing.assert_allclose(g[i], fd, atol=5e-4)
    # The gradient of a Euclidean distance to a convex set is a unit vector outside the set.
    np.testing.assert_allclose(np.linalg.norm(g), 1.0, rtol=1e-4)


@pytest.mark.parametrize("kind", ["subspace", "hull"])
def test_gradient_finite_at_zero_distance(kind):
    points = np.eye(N, D, dtype=np.float32)
    q = points[1]  # a vertex: distance exactly 0
    g = _grads[kind](q, points)
    assert np.all(np.isfinite(g))


_vec = hnp.arrays(np.float32, (2, 16), elements=st.floats(-10, 10, width=32))


@settings(max_examples=25, deadline=None)
@given(_vec)
def test_property_distances_zero_on_identical_and_symmetric(v):
    a, b = v[0], v[1]
    for p in (1.0, 2.0, 3.0):
        assert float(minkowski(a, a, p=p)) == 0.0
        np.testing.assert_allclose(minkowski(a, b, p=p), minkowski(b, a, p=p), rtol=1e-6)
        assert np.all(np.isfinite(jax.grad(lambda z, p=p: minkowski(z, a, p=p))(a)))
    np.testing.assert_allclose(cosine_similarity(a, b), cosine_similarity(b, a), rtol=1e-6)
    assert -1.0 - 1e-6 <= float(cosine_similarity(a, b)) <= 1.0 + 1e-6


@settings(max_examples=15, deadline=None)
@given(hnp.arrays(np.float32, (4, 16), elements=st.floats(-3, 3, width=32)))
def test_property_set_distances_zero_on_members(points):
    # Each row is in both its subspace and its hull: distance ~0 (float32 rounding).
    scale = 1.0 + float(np.abs(points).max())
    for i in range(4):
        assert float(_subspace(points[i], points)[0]) < 1e-4 * scale
        assert float(_hull(points[i], points)[0]) < 1e-4 * scale
