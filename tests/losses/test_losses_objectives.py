"""The four objectives: values against their formulas, jit, grad, vmap, and no recompilation.

The feature extractor is a small randomly initialised Flax CNN: the objectives take the
network only as a function, so any differentiable image -> features map exercises them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.losses import (
    CLOAK_LAM,
    CLOAK_RHO,
    aggregate_layers,
    block_variance,
    cloak_objective,
    dssim,
    hull_distance,
    minkowski,
    pmt_objective,
    ridge_penalty,
    subspace_distance,
    template_ridge_loss,
    veil_objective,
)

S = 32  # face region / chip side


class TinyNet(nn.Module):
    """Two strided convs and a dense embedding; returns (embedding [16], {layer: output})."""

    @nn.compact
    def __call__(self, x):
        h1 = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv1")(x))
        h2 = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(h1))
        emb = nn.Dense(16, name="fc")(jnp.mean(h2, axis=(-3, -2)))
        return emb, {"conv1": h1, "conv2": h2}


@pytest.fixture(scope="module")
def nets():
    """Returns two (params, apply) pairs of TinyNet with different random weights."""
    net = TinyNet()
    init = jax.jit(net.init)
    return [(init(jax.random.PRNGKey(seed), jnp.zeros((S, S, 3))), net.apply) for seed in (0, 1)]


def _images(seed, n=None):
    shape = (S, S, 3) if n is None else (n, S, S, 3)
    return jax.random.uniform(jax.random.PRNGKey(seed), shape)


# ---------------------------------------------------------------- cloak


def _cloak_parts(nets):
    params, apply = nets[0]
    traces = []

    def features_fn(region):
        traces.append(region.shape)  # runs once per trace: counts compilations
        return apply(params, region)[0]

    return features_fn, traces


def test_cloak_value_matches_formula(nets):
    features_fn, _ = _cloak_parts(nets)
    feat = jax.jit(features_fn)
    x = _images(0)
    xm = jnp.clip(x + 0.4 * (_images(1) - 0.5), 0, 1)  # beyond the budget on purpose
    fo, fp = feat(x), feat(_images(2))
    target = feat(_images(3))
    d_m, vis = feat(xm), float(jax.jit(dssim)(x, xm))
    assert vis > CLOAK_RHO
    # Jitted (eager Flax + SSIM dispatch op by op and dominate the test's time otherwise).
    objective = jax.jit(
        functools.partial(cloak_objective, features_fn=features_fn),
        static_argnames=("lambda1", "p"),
    )
    kw = {"feat_original": fo, "feat_previous": fp}

    loss, aux = objective(xm, x, has_previous=False, **kw)
    protect = float(minkowski(d_m, fo))
    expect = -protect + CLOAK_LAM * (vis - CLOAK_RHO)
    np.testing.assert_allclose(loss, expect, rtol=1e-5)
    np.testing.assert_allclose(aux["protect"], protect, rtol=1e-6)
    np.testing.assert_allclose(aux["dssim"], vis, rtol=1e-6)
    assert float(aux["temporal"]) == 0.0 and float(aux["target_dist"]) == 0.0

    loss, aux = objective(xm, x, has_previous=True, lambda1=0.5, target=target, p=3.0, **kw)
    temporal = float(minkowski(d_m, fp, p=3.0))
    tdist = float(minkowski(d_m, target, p=3.0))
    np.testing.assert_allclose(
        loss, tdist + 0.5 * temporal + CLOAK_LAM * (vis - CLOAK_RHO), rtol=1e-5
    )
    np.testing.assert_allclose(aux["temporal"], temporal, rtol=1e-6)
    np.testing.assert_allclose(aux["target_dist"], tdist, rtol=1e-6)

    # Within the budget the hinge is zero.
    small = jnp.clip(x + 0.002 * (_images(4) - 0.5), 0, 1)
    _, aux = objective(small, x, has_previous=False, **kw)
    assert float(aux["budget"]) == 0.0 and float(aux["dssim"]) < CLOAK_RHO


def test_cloak_jit_grad_vmap_no_recompile(nets):
    features_fn, traces = _cloak_parts(nets)
    fo = features_fn(_images(0))
    traces.clear()

    def loss_fn(xm, x, f_orig, f_prev, has_prev):
        return cloak_objective(
            xm,
            x,
            features_fn=features_fn,
            feat_original=f_orig,
            feat_previous=f_prev,
            has_previous=has_prev,
        )

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    x = _images(0)
    # First frame: previous features are padding (NaN) and must not leak into the gradient.
    (loss, _), grad = step(x + 0.01, x, fo, jnp.full_like(fo, jnp.nan), jnp.asarray(False))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    (loss2, _), grad2 = step(_images(5), x, fo, fo + 0.1, jnp.asarray(True))
    assert np.isfinite(loss2) and np.all(np.isfinite(grad2))
    assert grad.shape == x.shape
    # One trace, and in it F evaluated exactly once (on `protected`): the documented contract.
    assert len(traces) == 1, f"recompiled or F called more than once: {traces}"

    # Several faces side by side.
    b = 3
    xs, xms = _images(6, b), _images(7, b)
    fos = jax.vmap(features_fn)(xs)
    batched = jax.jit(jax.vmap(lambda *a: loss_fn(*a)[0]))
    losses = batched(xms, xs, fos, fos, jnp.array([False, True, True]))
    assert losses.shape == (b,)
    np.testing.assert_allclose(
        losses[1], loss_fn(xms[1], xs[1], fos[1], fos[1], True)[0], rtol=1e-5
    )


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_cloak_finite_on_flat_images(nets, value):
    features_fn, _ = _cloak_parts(nets)
    flat = jnp.full((S, S, 3), value)
    fo = jax.jit(features_fn)(flat)
    grad_fn = jax.jit(
        jax.grad(
            lambda z: cloak_objective(
                z,
                flat,
                features_fn=features_fn,
                feat_original=fo,
                feat_previous=fo,
                has_previous=True,
            )[0]
        )
    )
    for start in (flat, jnp.full((S, S, 3), 1.0 - value)):
        assert np.all(np.isfinite(grad_fn(start)))


# ---------------------------------------------------------------- veil


def _veil_step(apply, mode, traces):
    """Returns jit(value_and_grad) of the veil objective as a function of (params, veil, ...)."""

    def objective(params, veil, chips, basis):
        def features_fn(chip):
            traces.append(chip.shape)  # runs once per trace: counts compilations
            return apply(params, chip)[0]

        return veil_objective(
            veil, chips, features_fn=features_fn, basis_feats=basis, mode=mode, lam=0.01, mu=0.01
        )

    return jax.jit(jax.value_and_grad(objective, argnums=1, has_aux=True)), objective


@pytest.mark.parametrize("mode", ["subspace", "hull"])
def test_veil_value_jit_grad_vmap_no_recompile(nets, mode):
    params, apply = nets[0]
    traces = []
    step, objective = _veil_step(apply, mode, traces)
    embed = jax.jit(jax.vmap(lambda c: apply(params, c)[0]))
    chips = _images(10, 4)
    basis = embed(chips)
    veil = _images(11)

    (loss, aux), grad = step(params, veil, chips, basis)
    # Reference: the formula, from the pieces (alpha 0.2, lam = mu = 0.01).
    blended = 0.2 * chips + 0.8 * veil
    dist = jax.jit(subspace_distance if mode == "subspace" else hull_distance)
    fea = dist(embed(blended), basis)
    vis = np.linalg.norm(np.asarray(chips - blended).reshape(4, -1), axis=1)
    var = jax.jit(block_variance)(blended)
    np.testing.assert_allclose(aux["fea"], fea, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux["vis"], vis, rtol=1e-5)
    np.testing.assert_allclose(aux["var"], var, rtol=1e-5)
    np.testing.assert_allclose(loss, np.sum(fea - 0.01 * vis + 0.01 * var), rtol=1e-5)
    assert grad.shape == veil.shape and np.all(np.isfinite(grad))

    (_, _), grad2 = step(params, _images(12), chips, basis)
    assert np.all(np.isfinite(grad2)) and not np.allclose(grad, grad2)
    assert len(traces) == 1, f"recompiled: {traces}"

    # Two people side by side (the value only).
    two = jax.jit(jax.vmap(lambda v, c, w: objective(params, v, c, w)[0]))
    out = two(jnp.stack([veil, veil]), jnp.stack([chips, chips]), jnp.stack([basis, basis]))
    np.testing.assert_allclose(out, [loss, loss], rtol=1e-5)


@pytest.mark.parametrize("mode", ["subspace", "hull"])
def test_veil_finite_on_flat_images(nets, mode):
    params, apply = nets[0]
    step, _ = _veil_step(apply, mode, [])
    embed = jax.jit(jax.vmap(lambda c: apply(params, c)[0]))
    for value in (0.0, 1.0, 0.5):
        chips = jnp.full((4, S, S, 3), value)
        basis = embed(chips)  # identical rows: a rank-1 basis, a one-point hull
        for veil in (jnp.full((S, S, 3), value), jnp.full((S, S, 3), 1.0 - value)):
            (val, _), grad = step(params, veil, chips, basis)
            assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_veil_rejects_unknown_mode():
    with pytest.raises(ValueError, match="subspace"):
        veil_objective(
            _images(0),
            _images(1, 2),
            features_fn=lambda c: c.sum(),
            basis_feats=np.ones((2, 1)),
            mode="affine",
        )


# ---------------------------------------------------------------- PMT


def test_pmt_value_layers_augment_and_mr(nets):
    (p0, apply), (p1, _) = nets
    shallow = jax.jit(lambda p, z: apply(p, z)[1])
    x, xt = _images(20), _images(21)

    def flip(z):  # one fixed "random draw" of T
        return z[..., ::-1, :]

    def agg(p, z, layers):
        out = shallow(p, flip(z))
        return np.concatenate([np.asarray(out[k]).mean(axis=(0, 1)) for k in layers])

    @functools.partial(jax.jit, static_argnames=("two", "layers"))
    def run(xt, x, two=False, layers=None):
        e0 = functools.partial(apply_layers, apply, p0)
        e1 = functools.partial(apply_layers, apply, p1)
        fns = [e0, e1] if two else e0
        sel = None if layers is None else [None if k is None else list(k) for k in layers]
        if layers is not None and not two:
            sel = list(layers)
        return pmt_objective(xt, x, shallow_fns=fns, augment=flip, layers=sel)

    j, _ = run(xt, x, layers=("conv1", "conv2"))
    ref0 = np.sum((agg(p0, xt, ["conv1", "conv2"]) - agg(p0, x, ["conv1", "conv2"])) ** 2)
    np.testing.assert_allclose(j, ref0, rtol=1e-5)
    assert j.shape == ()

    # MR-PMT with per-model layer choices: the sum of the two terms.
    j2, aux2 = run(xt, x, two=True, layers=(None, ("conv2",)))
    ref1 = np.sum((agg(p1, xt, ["conv2"]) - agg(p1, x, ["conv2"])) ** 2)
    np.testing.assert_allclose(aux2["per_model"], [ref0, ref1], rtol=1e-5)
    np.testing.assert_allclose(j2, ref0 + ref1, rtol=1e-5)

    # Identical inputs: zero objective (T applied identically to both sides).
    np.testing.assert_allclose(run(x, x, two=True)[0], 0.0)
    # List outputs and integer layer indices aggregate like the dict.
    outs = shallow(p0, x)
    np.testing.assert_allclose(
        aggregate_layers(list(outs.values()), [1]), aggregate_layers(outs, ["conv2"]), rtol=1e-6
    )


def apply_layers(apply, params, z):
    """Returns the TinyNet layer dict: a shallow model E as PMT sees it."""
    return apply(params, z)[1]


def test_pmt_jit_grad_vmap_no_recompile(nets):
    (p0, apply), (p1, _) = nets
    traces = []

    def e0(z):
        traces.append(z.shape)
        return apply(p0, z)[1]

    def e1(z):
        return apply(p1, z)[1]

    def objective(xt, x, key):
        noise = 0.01 * jax.random.normal(key, x.shape)
        return pmt_objective(xt, x, shallow_fns=[e0, e1], augment=lambda z: z + noise)

    step = jax.jit(jax.value_and_grad(objective, has_aux=True))
    x = _images(30)
    (j1, _), g1 = step(_images(31), x, jax.random.PRNGKey(0))
    (_, _), g2 = step(_images(32), x, jax.random.PRNGKey(1))
    assert len(traces) == 2, f"recompiled: {traces}"  # one trace, E0 called on both sides
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2)) and float(j1) > 0

    per_image = jax.jit(jax.vmap(lambda a, b, k: objective(a, b, k)[0]))
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    out = per_image(_images(33, 3), _images(34, 3), keys)
    assert out.shape == (3,)
    np.testing.assert_allclose(
        out[1], step(_images(33, 3)[1], _images(34, 3)[1], keys[1])[0][0], rtol=1e-5
    )
    # A batch passed whole gives one J per image too, and flat images have finite gradients.
    batch = jax.jit(lambda a, b: pmt_objective(a, b, shallow_fns=e1)[0])
    assert batch(_images(33, 3), _images(34, 3)).shape == (3,)
    gflat = jax.jit(jax.grad(lambda z: pmt_objective(z, jnp.zeros_like(z), shallow_fns=e1)[0]))
    assert np.all(np.isfinite(gflat(jnp.ones((S, S, 3)))))


# ---------------------------------------------------------------- template ridge loss


def test_template_ridge_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred = rng.random((2, 8, 8)).astype(np.float32)
    target = rng.random((2, 8, 8)).astype(np.float32)
    params = {
        "conv": {"kernel": rng.normal(size=(4, 4, 3, 2)), "bias": rng.normal(size=2)},
        "bn": {"scale": rng.normal(size=2)},
    }
    loss, aux = template_ridge_loss(pred, target, params, ridge=0.1)
    sq = np.sum((pred - target) ** 2, axis=(1, 2))
    pen = np.sum(params["conv"]["kernel"] ** 2)  # only 'kernel' leaves are penalised
    np.testing.assert_allclose(aux["sq_err"], sq, rtol=1e-5)
    np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)
    np.testing.assert_allclose(loss, sq.mean() + 0.1 * pen, rtol=1e-5)
    # A bare list of arrays is penalised whole.
    np.testing.assert_allclose(ridge_penalty([np.ones(3), 2 * np.ones(2)]), 11.0)
    grads = jax.jit(jax.grad(lambda p: template_ridge_loss(pred, target, p, ridge=0.1)[0]))(params)
    np.testing.assert_allclose(grads["conv"]["kernel"], 0.2 * params["conv"]["kernel"], rtol=1e-5)
    np.testing.assert_array_equal(grads["conv"]["bias"], 0.0)


def test_template_ridge_loss_jit_vmap_no_recompile():
    rng = np.random.default_rng(1)
    params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(4, 4, 3, 2)), jnp.float32)}}
    traces = []

    def loss_fn(p, pred, target):
        traces.append(pred.shape)  # runs once per trace
        return template_ridge_loss(pred, target, p, ridge=1e-3)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    for seed in (2, 3):
        r = np.random.default_rng(seed)
        (loss, _), grads = step(params, r.random((2, 8, 8)), r.random((2, 8, 8)))
        assert np.isfinite(loss) and np.all(np.isfinite(grads["conv"]["kernel"]))
    assert len(traces) == 1, f"recompiled: {traces}"
    # Several recognisers' template batches side by side, one loss each.
    batched = jax.jit(jax.vmap(lambda pr, t: loss_fn(params, pr, t)[0]))
    preds, targets = rng.random((3, 2, 8, 8)), rng.random((3, 2, 8, 8))
    out = batched(preds, targets)
    assert out.shape == (3,)
    np.testing.assert_allclose(out[2], loss_fn(params, preds[2], targets[2])[0], rtol=1e-5)


def test_aggregate_layers_window_pools_cells():
    a = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3)
    b = jnp.ones((2, 2, 2, 4))
    got = aggregate_layers([a, b], window=2)
    # a: the 2 x 2 cells of the top-left 4 x 4 (the fifth row and column dropped).
    want = np.asarray(a)[:, :4, :4].reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(got[:, :12], want, rtol=1e-6)
    np.testing.assert_allclose(got[:, 12:], np.ones((2, 4)))
    np.testing.assert_allclose(aggregate_layers([a], window=1), np.asarray(a).reshape(2, -1))
    np.testing.assert_allclose(aggregate_layers([a]), np.asarray(a).mean(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="larger than"):
        aggregate_layers([b], window=3)
