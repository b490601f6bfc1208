"""Alignment: least-squares transforms, bilinear warp, its gradient, chip paste-back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.pipeline import align


def _rand_similarity(rng):
    s, t = rng.uniform(0.5, 2.0), rng.uniform(-np.pi, np.pi)
    return np.array([[s * np.cos(t), -s * np.sin(t), rng.uniform(-50, 50)],
                     [s * np.sin(t), s * np.cos(t), rng.uniform(-50, 50)]], np.float32)


def test_similarity_recovers_exact_transform():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = _rand_similarity(rng)
        src = rng.uniform(0, 600, (5, 2)).astype(np.float32)
        dst = src @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(align.estimate_similarity(src, dst), m, atol=2e-3)


def test_similarity_is_least_squares_against_numpy():
    # Reference: numpy lstsq on the same linear model (a, b, tx, ty), float64.
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 150, (5, 2))
    dst = src * 1.3 + rng.normal(0, 2.0, (5, 2)) + 7
    x, y = src[:, 0], src[:, 1]
    a_mat = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1),
                            np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
    sol = np.linalg.lstsq(a_mat, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    want = np.array([[sol[0], -sol[1], sol[2]], [sol[1], sol[0], sol[3]]])
    np.testing.assert_allclose(align.estimate_similarity(src, dst), want, atol=1e-3)


def test_affine_recovers_exact_transform_and_inverse():
    rng = np.random.default_rng(2)
    m = np.array([[1.1, 0.2, 5.0], [-0.1, 0.9, -3.0]], np.float32)
    src = rng.uniform(0, 300, (5, 2)).astype(np.float32)
    dst = align.apply_transform(m, src)
    est = align.estimate_affine(src, dst)
    np.testing.assert_allclose(est, m, atol=2e-3)
    back = align.apply_transform(align.invert(est), dst)
    np.testing.assert_allclose(back, src, atol=1e-2)
    ident = align.compose(align.invert(m), m)
    np.testing.assert_allclose(ident, np.eye(2, 3), atol=1e-5)


def test_warp_identity_and_integer_shift():
    img = jnp.asarray(np.random.default_rng(3).random((20, 30, 3)), jnp.float32)
    out = align.warp(img, jnp.eye(2, 3), (20, 30))
    np.testing.assert_allclose(out, img, atol=1e-6)
    shift = jnp.array([[1.0, 0, 4], [0, 1.0, 2]])
    out = align.warp(img, shift, (10, 10))
    np.testing.assert_allclose(out, img[2:12, 4:14], atol=1e-6)


def test_warp_bilinear_half_pixel_and_fill():
    img = jnp.arange(12, dtype=jnp.float32).reshape(3, 4, 1)
    out = align.warp(img, jnp.array([[1.0, 0, 0.5], [0, 1.0, 0.5]]), (2, 2))
    # Mean of the 2x2 neighbourhood: bilinear weight 1/4 each.
    np.testing.assert_allclose(out[..., 0], [[2.5, 3.5], [6.5, 7.5]], atol=1e-6)
    out = align.warp(img, jnp.array([[1.0, 0, -10], [0, 1.0, 0]]), (1, 1), fill=-1.0)
    assert float(out[0, 0, 0]) == -1.0


def test_warp_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    img = jnp.asarray(rng.random((12, 12, 2)), jnp.float32)
    m = jnp.array([[0.9, -0.2, 2.3], [0.2, 0.9, 1.7]])
    w = jnp.asarray(rng.random((6, 6, 2)), jnp.float32)

    def f(x):
        return jnp.sum(align.warp(x, m, (6, 6)) * w)

    g = jax.grad(f)(img)
    eps = 1e-2
    for (i, j, c) in [(3, 4, 0), (5, 2, 1), (7, 7, 0), (0, 0, 1)]:
        e = jnp.zeros_like(img).at[i, j, c].set(eps)
        fd = (f(img + e) - f(img - e)) / (2 * eps)
        np.testing.assert_allclose(g[i, j, c], fd, atol=2e-3)
    # Gradient w.r.t. the transform exists and is finite (sub-pixel landmark motion).
    gm = jax.grad(lambda mm: jnp.sum(align.warp(img, mm, (6, 6)) * w))(m)
    assert np.all(np.isfinite(gm))


def test_extract_chip_puts_landmarks_on_template_and_paste_back():
    rng = np.random.default_rng(5)
    frame = jnp.asarray(rng.random((80, 100, 3)), jnp.float32)
    template = jnp.array([[10.0, 12], [30, 12], [20, 22], [12, 30], [28, 30]])
    m_true = jnp.array([[1.5, -0.4, 30.0], [0.4, 1.5, 10.0]])
    landmarks = align.apply_transform(m_true, template)
    m = align.chip_transform(landmarks, template)
    np.testing.assert_allclose(m, m_true, atol=1e-3)
    chip = align.extract_chip(frame, landmarks, template, 40)
    # Landmark pixels of the chip are the frame sampled at the landmarks.
    want = align.sample_bilinear(frame, landmarks[:, 0], landmarks[:, 1])
    got = chip[template[:, 1].astype(int), template[:, 0].astype(int)]
    # The chip samples the frame at m @ template with m a float32 least-squares fit, so its sample
    # points differ from `landmarks` (pixel coordinates up to ~100, ulp 7.6e-6) by a few ulps
    # (1.9e-5 px measured), and bilinear values of a random frame change by up to ~2x that. 1e-4
    # honours float32 arithmetic (1.04e-5 was seen) while a 0.01 px misplacement still fails.
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Pasting a zero perturbation changes nothing; pasting the chip back changes little inside.
    np.testing.assert_allclose(align.paste_delta(frame, jnp.zeros_like(chip), m), frame)
    pasted = align.paste(frame, chip, m)
    assert pasted.shape == frame.shape
    assert float(jnp.abs(pasted - frame).max()) < 1.0


def test_jit_vmap_over_faces():
    rng = np.random.default_rng(6)
    frame = jnp.asarray(rng.random((64, 64, 3)), jnp.float32)
    template = jnp.array([[10.0, 12], [30, 12], [20, 22], [12, 30], [28, 30]])
    lms = jnp.stack([template + 5, template + 10])
    f = jax.jit(jax.vmap(lambda lm: align.extract_chip(frame, lm, template, 40)))
    chips = f(lms)
    assert chips.shape == (2, 40, 40, 3)
    np.testing.assert_allclose(chips[0, 5:, 5:], frame[10:45, 10:45], atol=1e-4)


def test_chip_transform_with_aspect_squashes_height():
    # A face region 1.25x taller than wide maps onto the square template when aspect = 1.25.
    template = jnp.array([[10.0, 12], [30, 12], [20, 22], [12, 30], [28, 30]])
    landmarks = template * jnp.array([2.0, 2.5]) + 7.0  # x scaled by 2, y by 2.5 = 2 * 1.25
    m = align.chip_transform(landmarks, template, aspect=1.25)
    np.testing.assert_allclose(align.apply_transform(m, template), landmarks, atol=1e-3)
    m1 = align.chip_transform(landmarks, template)  # a plain similarity cannot fit it
    assert float(jnp.abs(align.apply_transform(m1, template) - landmarks).max()) > 1.0


def test_antialias_is_identity_when_not_shrinking_and_a_gaussian_when_shrinking():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    img = rng.uniform(size=(40, 48, 3)).astype(np.float32)
    up = np.array([[0.5, 0.0, 3.0], [0.0, 0.5, 2.0]], np.float32)  # output px = half an input px
    np.testing.assert_array_equal(np.asarray(align.antialias(img, up)), img)
    # Three input pixels per output pixel, turned 30 degrees: sigma = (3 - 1) / 2 = 1.
    c, s = 3 * np.cos(np.pi / 6), 3 * np.sin(np.pi / 6)
    down = np.array([[c, -s, 0.0], [s, c, 0.0]], np.float32)
    want = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0.0), mode="nearest", truncate=6.0)
    np.testing.assert_allclose(np.asarray(align.antialias(img, down)), want, atol=1e-5)


def test_warp_image_is_warp_with_the_same_image_gradient():
    rng = np.random.default_rng(5)
    img = jnp.asarray(rng.uniform(size=(37, 41, 3)), jnp.float32)
    # A turned, shrinking map that reads partly outside the image (fill and clipped taps). Its
    # entries put no sample exactly on a pixel centre: there XLA may round the position
    # differently in the fused forward and backward passes (floor jumps by one), for warp too.
    m = jnp.asarray([[1.3101, -0.4037, -3.013], [0.4029, 1.2983, 2.517]], jnp.float32)
    ct = jnp.asarray(rng.normal(size=(30, 33, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(align.warp_image(img, m, (30, 33), fill=0.2)),
                                  np.asarray(align.warp(img, m, (30, 33), fill=0.2)))

    def grad(warp):
        return jax.jit(jax.grad(lambda x: jnp.sum(ct * warp(x, m, (30, 33)))))(img)

    np.testing.assert_allclose(np.asarray(grad(align.warp_image)), np.asarray(grad(align.warp)),
                               rtol=1e-5, atol=5e-5)
