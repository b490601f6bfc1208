"""Video cloak core: warm-start warps, the stop rule, reuse savings, compilation, vmap lanes.

Most tests use TinyNet, a small randomly initialised Flax CNN registered as a `Recogniser`
(32x32 chips, 16-d embedding, named intermediate features). It is a test fixture model, not a
mock of the product: the cloak engine is generic over recognisers, and the properties checked
here (where a warped cloak lands, when the loop stops, how lanes are batched, what recompiles)
do not depend on which network is inside, while a real 0.27-GMAC network would make each test
minutes long on a 2-core CPU. One test runs the real dlib ResNet when its port is available.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from faceveil.engine.methods import base, cloak
from faceveil.engine.pipeline import align, faces
from faceveil.losses import objectives, perceptual
from faceveil.models.registry import Recogniser


class TinyNet(nn.Module):
    """Two strided convs and a dense head: the fixture recogniser (see the module docstring)."""

    @nn.compact
    def __call__(self, x):
        x = (x - 0.5) * 2.0
        h1 = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv1")(x))
        h2 = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(h1))
        emb = nn.Dense(16, name="fc")(h2.mean((1, 2)))
        return emb, {"stage1": h1, "stage2": h2}


def _tiny_apply(params, chips):
    return TinyNet().apply({"params": params}, chips)


TEMPLATE = np.array([[10, 12], [22, 12], [16, 18], [11, 24], [21, 24]], np.float32)
P = 64  # patch side used throughout


@pytest.fixture(scope="module")
def tiny():
    params = TinyNet().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rec = Recogniser(name="tiny_test_cnn", chip_size=32, template=TEMPLATE, apply=_tiny_apply,
                     embed_dim=16, threshold=1.0, metric="euclidean",
                     layers=("stage1", "stage2"), load_params=lambda: params)
    return rec, params


@pytest.fixture(scope="module")
def video(data_dir):
    """Returns (frames uint8 [8, P, P, 3], landmarks [8, 5, 2]) of a smoothly moving face.

    A real portrait rotates by 2 degrees, zooms by 1% and drifts by (1.5, 1) px per frame; the
    landmarks are the template's points carried along by the same motion, so they follow the
    picture exactly.
    """
    img = Image.open(data_dir / "faces" / "obama" / "obama1.jpg").convert("RGB")
    base = jnp.asarray(np.asarray(img.resize((2 * P, 2 * P))), jnp.float32) / 255.0
    base_lm = (TEMPLATE - 16.0) * 2.0 + P
    ctr = (P - 1) / 2.0
    ws = []
    for t in range(8):
        ang, sc = np.deg2rad(2.0 * t), 1.0 + 0.01 * t
        c, s = np.cos(ang) / sc, np.sin(ang) / sc
        w = np.array([[c, -s, 0.0], [s, c, 0.0]], np.float32)  # frame pixel -> base pixel
        w[:, 2] = np.array([P / 2 + 1.5 * t + ctr, P / 2 + 1.0 * t + ctr]) - w[:, :2] @ [ctr, ctr]
        ws.append(w)
    ws = np.stack(ws)
    frames = jax.jit(jax.vmap(lambda w: align.warp(base, w, (P, P))))(ws)
    # A base point b is at w^-1(b) in the frame.
    lin_inv = np.linalg.inv(ws[:, :, :2])
    lms = np.einsum("tij,tkj->tki", lin_inv, base_lm[None] - ws[:, None, :, 2])
    return (np.asarray(frames) * 255).round().astype(np.uint8), lms.astype(np.float32)


def _chain_frames(tiny, frames, lms, present=None):
    rec, _ = tiny
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms), rec.template)
    t = frames.shape[0]
    present = np.ones(t, bool) if present is None else present
    return base.FaceFrame(jnp.asarray(frames)[None], m[None], jnp.asarray(lms)[None],
                             jnp.zeros((1, t, 2)), jnp.asarray(present)[None])


def _fn(rec, cfg):
    """Returns the compiled chunk function of the cloak method (`base.chunk_fn`)."""
    return base.chunk_fn(cloak.CloakMethod(rec, cfg))


def _init(rec, params, cfg, key, n):
    """Returns the carry of n fresh chains of P-pixel patches."""
    return base.init_carry(cloak.CloakMethod(rec, cfg), params, jax.random.split(key, n), P)


# The tiny recogniser's alignment geometry, for the host planning test (no network needed).
TINY_GEOMETRY = types.SimpleNamespace(template=TEMPLATE, chip_size=32, aspect=1.0)


def _stack(chains):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *chains)


# Tiny-net settings: its embedding moves ~0.12 in a few to a few tens of Adadelta steps at lr 1,
# the range where the stop rule and reuse have something to show (measured while writing these
# tests). lambda1 < 1: with lambda1 = 1 the temporal term cancels the protection term's pull
# past the previous face's distance, so protection could never exceed it. jitter 0: these tests
# check the loop's mechanics against hand-run references through the detected alignment.
VIDEO_CFG = {"threshold": 0.12, "lr": 1.0, "max_iters": 40, "lambda1": 0.3, "jitter": 0.0,
             "field": "patch"}


# (a) ---------------------------------------------------------------------------------------


def _blob_centres(img, points, radius=4):
    """Returns the intensity centroid of img [H, W] in a window around each point."""
    out = []
    for x, y in np.round(points).astype(int):
        win = img[y - radius:y + radius + 1, x - radius:x + radius + 1]
        yy, xx = np.mgrid[y - radius:y + radius + 1, x - radius:x + radius + 1]
        out.append([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])
    return np.array(out)


def test_affine_warm_start_moves_dots_with_the_landmarks():
    # Gaussian dots at known points of the previous cloak; the current landmarks are the
    # previous ones under a known affine A, so every dot must land at A(dot).
    size = 96
    dots = np.array([[30.0, 30.0], [60.0, 28.0], [45.0, 50.0], [32.0, 66.0], [62.0, 64.0]])
    yy, xx = np.mgrid[:size, :size]
    pattern = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)) for x, y in dots)
    delta_prev = np.repeat(pattern[..., None], 3, axis=-1).astype(np.float32) * 0.05
    a = np.array([[1.05, 0.12, 4.0], [-0.1, 0.97, -3.0]], np.float32)
    lm_prev = np.array([[35, 40], [60, 40], [48, 52], [38, 65], [58, 65]], np.float32)
    lm_cur = np.asarray(align.apply_transform(a, lm_prev))
    warmed = cloak.warm_start("affine", delta_prev, lm_prev, np.zeros(2), lm_cur, np.zeros(2),
                              size)
    want = np.asarray(align.apply_transform(a, dots))
    # Bilinear resampling of a sigma-1.5 blob shifts its centroid by well under 0.1 px.
    np.testing.assert_allclose(_blob_centres(np.asarray(warmed)[..., 0], want), want, atol=0.1)
    # Coverage: a constant cloak stays 1 where the source point A^-1(u) is well inside the
    # previous patch and becomes 0 (no cloak) where it falls outside it.
    ones = cloak.warm_start("affine", np.ones((size, size, 3), np.float32), lm_prev,
                            np.zeros(2), lm_cur, np.zeros(2), size)[..., 0]
    src = np.asarray(align.apply_transform(align.invert(a),
                                           np.stack([xx, yy], -1).astype(np.float32)))
    inside = np.all((src >= 1) & (src <= size - 2), axis=-1)
    outside = np.any((src <= -1) | (src >= size), axis=-1)
    assert inside.any() and outside.any()
    np.testing.assert_allclose(np.asarray(ones)[inside], 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ones)[outside], 0.0)


def test_copy_warm_start_keeps_the_cloak_on_the_same_frame_pixels():
    # The patch moved by (+5, -3) frame pixels, so the cloak shifts by (-5, +3) inside it.
    rng = np.random.default_rng(0)
    delta_prev = rng.normal(size=(40, 40, 3)).astype(np.float32)
    lm = np.zeros((5, 2), np.float32)
    out = np.asarray(cloak.warm_start("copy", delta_prev, lm, np.array([10.0, 20.0]), lm,
                                      np.array([15.0, 17.0]), 40))
    np.testing.assert_allclose(out[3:, :35], delta_prev[:37, 5:], atol=1e-6)
    np.testing.assert_array_equal(out[:3], 0.0)
    np.testing.assert_array_equal(out[:, 35:], 0.0)


def test_chunk_starts_each_frame_from_the_warped_previous_cloak(tiny, video):
    # With threshold -inf every evaluation passes, so no update is made and each protected
    # frame is exactly its warm start: frame 1 = frame 0's cold cloak warped by the landmarks.
    rec, params = tiny
    frames, lms = video
    cfg = cloak.CloakConfig(threshold=-np.inf, reuse="affine", field="patch")
    carry = _init(rec, params, cfg, jax.random.key(3), 1)
    _, res = _fn(rec, cfg)(params, _chain_frames(tiny, frames[:2], lms[:2]), carry,
                                      carry.feat[0])
    np.testing.assert_array_equal(res.iters, [[0, 0]])
    prot = np.asarray(res.protected[0]).astype(np.float32) / 255.0
    clean = frames[:2].astype(np.float32) / 255.0
    delta0 = prot[0] - clean[0]
    # Cold start: uniform in +-init_scale, then rounded to uint8 (half a level more).
    assert np.abs(delta0).max() <= cfg.init_scale + 0.5 / 255 + 1e-6
    assert np.abs(delta0).max() > 0.5 / 255
    want = np.asarray(cloak.warm_start("affine", delta0, lms[0], np.zeros(2), lms[1],
                                       np.zeros(2), P))
    got = prot[1] - clean[1]
    # The engine warps the unrounded cloak, the reference the rounded one: they differ by the
    # warp of a +-0.5 level rounding error, plus the final rounding: at most 1 level.
    np.testing.assert_allclose(got, want, atol=1.0 / 255 + 1e-6)


# (b) ---------------------------------------------------------------------------------------


def _reference_trajectories(rec, params, origs, m_chips, deltas0, cfg, steps):
    """Returns per lane, per evaluation (protection, dssim, delta) of a plain Python loop.

    The "traditional" per-face loop: one jitted Adadelta step called from Python, the
    objective on the straight-through rounded patch, and protection/DSSIM measured
    independently on the uint8-rounded patch with the recogniser and `perceptual.dssim`.
    """
    opt = optax.adadelta(cfg.lr, rho=cfg.adadelta_rho, eps=cfg.adadelta_eps)

    def loss_fn(delta, orig, m_chip):
        feat0 = cloak.features(rec, params, orig, m_chip, None)[1]
        prot = jnp.clip(orig + delta, 0.0, 1.0)
        q = prot + jax.lax.stop_gradient(cloak.quantise(prot) - prot)
        return objectives.cloak_objective(
            q, orig, features_fn=lambda x: cloak.features(rec, params, x, m_chip, None)[1],
            feat_original=feat0, feat_previous=feat0, has_previous=False,
            lambda1=cfg.lambda1, lam=cfg.lam, rho=cfg.rho, p=cfg.p)[0]

    @jax.jit
    def step(delta, state, orig, m_chip):
        grad = jax.grad(loss_fn)(delta, orig, m_chip)
        upd, state = opt.update(grad, state, delta)
        return jnp.clip(orig + delta + upd, 0.0, 1.0) - orig, state

    @jax.jit
    def measure(delta, orig, m_chip):
        q = cloak.quantise(jnp.clip(orig + delta, 0.0, 1.0))
        feat = cloak.features(rec, params, q, m_chip, None)[1]
        feat0 = cloak.features(rec, params, orig, m_chip, None)[1]
        return jnp.linalg.norm(feat - feat0), perceptual.dssim(orig, q)

    trajs = []
    for orig, m_chip, delta0 in zip(origs, m_chips, deltas0):
        delta, state, out = delta0, opt.init(delta0), []
        for _ in range(steps + 1):
            prot, vis = measure(delta, orig, m_chip)
            out.append((float(prot), float(vis), delta))
            delta, state = step(delta, state, orig, m_chip)
        trajs.append(out)
    return trajs


def test_stop_rule_matches_a_python_reference_loop(tiny, video):
    rec, params = tiny
    frames, lms = video
    patches = frames[[0, 5]]
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms[[0, 5]]), rec.template)
    key = jax.random.key(7)
    base = cloak.CloakConfig(max_iters=12, lr=1.0, jitter=0.0, field="patch")
    # The cold starts the engine draws: init_carry splits the key per lane, each frame splits
    # the lane key once and uses the second half.
    lane_keys = jax.random.split(key, 2)
    deltas0 = [base.init_scale * jax.random.uniform(jax.random.split(k)[1], (P, P, 3),
                                                    jnp.float32, -1.0, 1.0) for k in lane_keys]
    origs = [jnp.asarray(p, jnp.float32) / 255.0 for p in patches]
    trajs = _reference_trajectories(rec, params, origs, m,
                                    [jnp.clip(o + d, 0, 1) - o for o, d in zip(origs, deltas0)],
                                    base, 12)
    # A threshold that lane 0 first reaches around evaluation 6 (between its values at 5 and
    # 6), so the stop index is strictly inside (0, max_iters).
    prot0 = np.array([t[0] for t in trajs[0]])
    thr = float(np.mean(np.sort(prot0)[5:7]))
    cfg = cloak.CloakConfig(max_iters=12, lr=1.0, threshold=thr, jitter=0.0, field="patch")
    want = []
    for traj in trajs:
        hit = [i for i, (pr, vis, _) in enumerate(traj[:13]) if pr >= thr and vis <= cfg.rho]
        want.append(hit[0] if hit else cfg.max_iters)
    assert 0 < want[0] < cfg.max_iters

    protected, iters, met = cloak.cloak_faces(params, rec, patches, m, key, cfg)
    np.testing.assert_array_equal(iters, want)
    for lane in range(2):
        k = want[lane]
        ref = np.round(np.clip(origs[lane] + trajs[lane][k][2], 0, 1) * 255).astype(np.int16)
        got = np.asarray(protected[lane]).astype(np.int16)
        # Same arithmetic compiled differently (fused while_loop vs separate jitted steps):
        # float differences may flip a rounding, never by more than one level.
        assert np.abs(got - ref).max() <= 1
        assert np.mean(got != ref) < 0.01
        np.testing.assert_allclose(met.feature_distance[lane], trajs[lane][k][0], atol=2e-3)
        assert bool(met.passed[lane]) == (k < cfg.max_iters)
        curve = np.asarray(met.loss_curve[lane])
        n_eval = min(k + 1, cfg.max_iters)
        assert np.isfinite(curve[:n_eval]).all() and np.isnan(curve[n_eval:]).all()
    # Protection is the embedding distance after rounding, recomputed here from the output.
    emb = jax.vmap(lambda p, mm: cloak.features(rec, params, p, mm, None)[0])
    d = jnp.linalg.norm(emb(protected.astype(jnp.float32) / 255.0, m)
                        - emb(jnp.asarray(patches, jnp.float32) / 255.0, m), axis=-1)
    np.testing.assert_allclose(met.protection, d, atol=1e-5)


def test_targeted_intermediate_layer_run_moves_towards_target_for_max_iters(tiny, video):
    # One compiled config checks three things: (1) the optimised feature is the flattened
    # 'stage2' map (the objective's protect and target distances are measured in it); (2)
    # targeted mode moves it towards the target; (3) target_threshold 0 is never met, so the
    # loop runs exactly max_iters updates and fills all max_iters curve entries.
    rec, params = tiny
    frames, lms = video
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms[:2]), rec.template)
    feat = jax.vmap(lambda p, mm: cloak.features(rec, params, p, mm, "stage2")[1])
    clean = feat(jnp.asarray(frames[:2], jnp.float32) / 255.0, m)
    assert clean.shape == (2, 8 * 8 * 16)
    # Targets: the feature maps of the same patches upside down (another "identity" that the
    # network can actually produce; a pool's centroid would do the same).
    target = feat(jnp.asarray(frames[:2, ::-1], jnp.float32) / 255.0, m)
    cfg = cloak.CloakConfig(max_iters=6, threshold=-np.inf, target_threshold=0.0,
                            targeted=True, layer="stage2", jitter=0.0, field="patch")
    protected, iters, met = cloak.cloak_faces(params, rec, frames[:2], m, jax.random.key(0), cfg,
                                              target=target)
    np.testing.assert_array_equal(iters, [6, 6])
    assert np.isfinite(met.loss_curve).all() and not np.asarray(met.passed).any()
    after = feat(protected.astype(jnp.float32) / 255.0, m)
    np.testing.assert_allclose(met.feature_distance, jnp.linalg.norm(after - clean, axis=-1),
                               rtol=1e-4)
    after_d = jnp.linalg.norm(after - target, axis=-1)
    np.testing.assert_allclose(met.target_distance, after_d, rtol=1e-4)
    before_d = jnp.linalg.norm(clean - target, axis=-1)
    assert np.all(after_d < 0.97 * before_d), (after_d, before_d)


# (c), (d) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tiny, video):
    """Runs modes none and affine over the video as two chunks of 4 frames each.

    Returns {mode: (iters [8], protection [8], ssim [8], compile messages per chunk call)}.
    """
    rec, params = tiny
    frames, lms = video
    cf = _chain_frames(tiny, frames, lms)
    out = {}
    handler = _ListHandler()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        for mode in ("none", "affine"):
            cfg = cloak.CloakConfig(reuse=mode, **VIDEO_CFG)
            fn = _fn(rec, cfg)
            carry = _init(rec, params, cfg, jax.random.key(11), 1)
            iters, prot, ssim, logs = [], [], [], []
            for start in (0, 4):
                chunk = jax.tree.map(lambda x, s=start: x[:, s:s + 4], cf)
                handler.records.clear()
                with jax.log_compiles():
                    carry, res = fn(params, chunk, carry, carry.feat[0])
                    jax.block_until_ready(res)
                logs.append([r for r in handler.records
                             if r.startswith("Compiling") and "_chunk" in r])
                iters.append(np.asarray(res.iters[0]))
                prot.append(np.asarray(res.metrics.protection[0]))
                ssim.append(np.asarray(res.metrics.ssim[0]))
            out[mode] = (np.concatenate(iters), np.concatenate(prot), np.concatenate(ssim), logs)
    finally:
        logger.removeHandler(handler)
    return out


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_affine_reuse_needs_fewer_iterations_at_equal_protection(streamed):
    it_none, prot_none, _ssim_none, _ = streamed["none"]
    it_aff, prot_aff, ssim_aff, _ = streamed["affine"]
    # Frame 0 cold-starts in every mode from the same key: identical work.
    assert it_none[0] == it_aff[0]
    assert np.all(it_none <= 40) and np.all(it_aff <= 40)
    # Measured while writing the test (same video, another key): none 170, affine 58
    # iterations (copy, the ablation, 114); demand a clear margin, not the exact figures.
    assert it_aff.sum() <= 0.6 * it_none.sum()
    # Equal protection: every frame that stopped early reached the threshold in both modes.
    thr = VIDEO_CFG["threshold"]
    assert np.all(prot_aff[it_aff < 40] >= thr - 2e-3)
    assert abs(prot_aff.mean() - prot_none.mean()) <= 0.1 * prot_none.mean()
    assert np.all(ssim_aff >= 0.98 - 1e-3)  # within the DSSIM budget rho = 0.01


def test_second_chunk_of_the_same_shape_does_not_recompile(streamed):
    for mode in ("none", "affine"):
        first, second = streamed[mode][3]
        assert len(first) == 1, first  # each config compiles its chunk function once
        assert second == [], second


# (e) and masking ---------------------------------------------------------------------------


def test_vmap_lanes_match_single_lanes_and_absent_frames_are_masked(tiny, video):
    rec, params = tiny
    frames, lms = video
    # Below VIDEO_CFG's 0.12, where protection plateaus: there a float difference between the
    # batched and the single-lane compilation can decide whether a face crosses the threshold
    # at iteration 30 or never (measured: one face, 30 vs 40), which is chaos, not masking.
    cfg = cloak.CloakConfig(reuse="affine", **{**VIDEO_CFG, "threshold": 0.1})
    fn = _fn(rec, cfg)
    absent = np.array([False, True, False, True])
    chains = [_chain_frames(tiny, frames[:4], lms[:4]),
              _chain_frames(tiny, frames[4:], lms[4:]),
              _chain_frames(tiny, frames[2:6], lms[2:6], present=absent)]
    carry = _init(rec, params, cfg, jax.random.key(21), 3)
    carry_out, res = fn(params, _stack(chains), carry, carry.feat[0])
    for lane, chain in enumerate(chains):
        one = jax.tree.map(lambda x, i=lane: x[i:i + 1], carry)
        c1, r1 = fn(params, chain, one, one.feat[0])
        np.testing.assert_array_equal(res.iters[lane], r1.iters[0])
        diff = np.abs(np.asarray(res.protected[lane], np.int16) - np.asarray(r1.protected[0]))
        # Same arithmetic in 3 vmap lanes instead of 1: float differences may flip a rounding,
        # and a flipped value then takes its own Adadelta path, so a few values (< 0.1%) may
        # end a few levels apart (measured on resized copies of the portrait: at most 7 of
        # 49152, up to 7 levels); the rest agree to one level.
        assert np.mean(diff > 1) < 1e-3 and diff.mean() < 0.01
        np.testing.assert_allclose(res.metrics.protection[lane], r1.metrics.protection[0],
                                   atol=1e-4)
        d_delta = np.abs(np.asarray(carry_out.delta[lane]) - np.asarray(c1.delta[0]))
        assert np.mean(d_delta > 2e-3) < 2e-3, d_delta.max()
    # Lane 2: frames 0 and 2 absent -> 0 iterations, clean patch back, NaN metrics; the carry
    # passed through frame 2, so frame 3 warm-starts from frame 1.
    np.testing.assert_array_equal(np.asarray(res.iters[2])[~absent], 0)
    assert np.isfinite(np.asarray(res.metrics.protection[2])[absent]).all()
    np.testing.assert_array_equal(res.protected[2][~absent], frames[2:6][~absent])
    assert np.isnan(np.asarray(res.metrics.protection[2])[~absent]).all()
    assert np.isnan(np.asarray(res.metrics.loss_curve[2])[~absent]).all()
    np.testing.assert_allclose(carry_out.landmarks[2], lms[5], atol=1e-5)
    assert bool(carry_out.has_previous.all())


def test_absent_chain_keeps_its_initial_carry(tiny, video):
    rec, params = tiny
    frames, lms = video
    cfg = cloak.CloakConfig(reuse="affine", **VIDEO_CFG)
    carry = _init(rec, params, cfg, jax.random.key(1), 1)
    out, res = _fn(rec, cfg)(
        params, _chain_frames(tiny, frames[:4], lms[:4], present=np.zeros(4, bool)), carry,
        carry.feat[0])
    np.testing.assert_array_equal(res.iters, 0)
    np.testing.assert_array_equal(res.protected[0], frames[:4])
    assert not bool(out.has_previous[0])
    np.testing.assert_array_equal(out.delta, 0.0)


# Host helpers ------------------------------------------------------------------------------


def test_plan_crop_paste_round_trip():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    # Faces: template scaled by 2 at different places, the last one cut by the border.
    lms = np.stack([TEMPLATE * 2 + [20, 30], TEMPLATE * 2 + [90, 40], TEMPLATE * 2 + [120, 70]])
    plan = faces.plan_faces(lms, np.ones(3, bool), TINY_GEOMETRY, buckets=(48, 64, 96, 128))
    # Chip footprint: 32 px * scale 2 = 64 px, +15% margin = 73.6 -> the 96 bucket.
    assert plan.size == 96
    # m_chip maps template points onto the landmarks in patch coordinates.
    for t in range(3):
        np.testing.assert_allclose(align.apply_transform(plan.m_chip[t], TEMPLATE),
                                   plan.landmarks[t], atol=1e-3)
        np.testing.assert_allclose(plan.landmarks[t] + plan.offsets[t], lms[t], atol=1e-4)
    patches = faces.crop_patches(frames, plan.offsets, plan.size)
    x, y = plan.offsets[0]
    np.testing.assert_array_equal(patches[0][max(-y, 0):, max(-x, 0):][:10, :10],
                                  frames[0, max(y, 0):max(y, 0) + 10, max(x, 0):max(x, 0) + 10])
    protected = np.clip(patches.astype(np.int16) + 3, 0, 255).astype(np.uint8)
    out = faces.paste_patches(frames, patches, protected, plan.offsets, np.array([1, 0, 1], bool))
    np.testing.assert_array_equal(out[1], frames[1])  # absent face: untouched
    changed = out[0].astype(np.int16) - frames[0]
    inside = np.zeros(frames.shape[1:3], bool)
    inside[max(y, 0):y + 96, max(x, 0):x + 96] = True
    assert np.all(changed[~inside] == 0)
    assert np.all(changed[inside] == np.minimum(3, 255 - frames[0][inside]))


# Real recogniser ---------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("faceveil.models.dlib_resnet") is None
                    or importlib.util.find_spec("faceveil.engine.pipeline.detect") is None,
                    reason="the dlib ResNet port or the MTCNN detector is not written yet")
def test_real_dlib_cloak_protects_a_real_face(data_dir):
    from faceveil.engine.pipeline import detect
    from faceveil.models import registry
    from tests.conftest import store_params

    rec = registry.get("dlib")
    params = store_params("dlib_resnet")
    # The 240p portrait: a small frame keeps the detector's share of this test's time low.
    img = np.asarray(Image.open(data_dir / "faces" / "obama" / "obama1_240p.jpg").convert("RGB"))
    dets = detect.detect(img[None])
    best = int(np.argmax(np.where(np.asarray(dets.valid[0]), np.asarray(dets.scores[0]), -1)))
    lm = np.asarray(dets.landmarks[0, best])[None]
    plan = faces.plan_faces(lm, np.ones(1, bool), rec)
    patches = faces.crop_patches(img[None], plan.offsets, plan.size)
    # The product defaults: protection 0.8, past dlib's own same-person threshold 0.6
    # (notes/dlib_resnet.md), within DSSIM 0.006 (SSIM >= 0.988).
    cfg = cloak.CloakConfig()
    protected, iters, met = cloak.cloak_faces(params, rec, patches, plan.m_chip,
                                              jax.random.key(0), cfg)
    assert 0 < int(iters[0]) <= cfg.max_iters
    assert bool(met.passed[0])
    assert float(met.protection[0]) >= cfg.threshold
    assert float(met.ssim[0]) >= 1.0 - 2.0 * cfg.rho - 1e-4
    # Independent check: the embedding of the shipped uint8 patch, re-extracted from scratch.
    emb = functools.partial(cloak.features, rec, params, m_chip=jnp.asarray(plan.m_chip[0]),
                            layer=None)
    d = jnp.linalg.norm(emb(patch=protected[0].astype(jnp.float32) / 255.0)[0]
                        - emb(patch=jnp.asarray(patches[0], jnp.float32) / 255.0)[0])
    assert float(d) > rec.threshold


def test_jitter_transform_is_a_small_similarity_about_the_chip_centre():
    ident = cloak.jitter_transform(jax.random.key(0), 150, 0.0)
    np.testing.assert_allclose(ident, np.eye(2, 3), atol=1e-6)
    centre = np.array([74.5, 74.5])
    for k in range(20):
        m = np.asarray(cloak.jitter_transform(jax.random.key(k), 150, 0.03))
        lin = m[:, :2]
        scale = np.sqrt(np.linalg.det(lin))
        np.testing.assert_allclose(lin @ lin.T, scale**2 * np.eye(2), atol=1e-5)  # similarity
        assert np.exp(-0.03) - 1e-5 <= scale <= np.exp(0.03) + 1e-5
        moved = lin @ centre + m[:, 2] - centre  # where the centre goes: the shift alone
        assert np.all(np.abs(moved) <= 0.03 * 150 + 1e-3)
    a = cloak.jitter_transform(jax.random.key(1), 150, 0.03)
    b = cloak.jitter_transform(jax.random.key(2), 150, 0.03)
    assert not np.allclose(a, b)  # fresh draws per key


def test_views_must_be_positive():
    with pytest.raises(ValueError, match="views"):
        cloak.CloakConfig(views=0)


def test_more_views_make_the_cloak_hold_under_fresh_alignments(tiny, video):
    # A cloak that must pass on several jittered alignments at once before it stops holds up
    # better when the chip is placed anew, as an attacker's own detector does.
    rec, params = tiny
    frames, lms = video
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms), rec.template)
    # Tiny-net settings where every face passes in both runs (measured while writing this).
    base = dict(VIDEO_CFG, jitter=0.04, jitter_scale=0.04, jitter_turn=0.04,
                jitter_scale_bias=0.0, threshold=0.04)
    origs = jnp.asarray(frames, jnp.float32) / 255.0
    fresh = jax.vmap(lambda k: cloak.jitter_transform(k, rec.chip_size, 0.04))(
        jax.random.split(jax.random.key(99), 32))

    def held(protected):  # fraction of (face, fresh view) pairs beyond the threshold
        prot = jnp.asarray(protected, jnp.float32) / 255.0

        def dist(p, o, mm, j):
            mv = align.compose(mm, j)
            return jnp.linalg.norm(cloak.features(rec, params, p, mv, None)[0]
                                   - cloak.features(rec, params, o, mv, None)[0])

        d = jax.vmap(lambda p, o, mm: jax.vmap(lambda j: dist(p, o, mm, j))(fresh))(
            prot, origs, m)
        return float((d >= base["threshold"]).mean())

    out = {}
    for views in (1, 4):
        cfg = cloak.CloakConfig(**base, views=views)
        protected, iters, met = cloak.cloak_faces(params, rec, frames, m, jax.random.key(3), cfg)
        passed = np.asarray(met.passed)
        # Four views at once are harder to pass: at most one face of eight may end at the cap.
        assert passed.mean() >= 7 / 8, views
        # The reported protection is that of the least protected view, so it passed too.
        assert np.all(np.asarray(met.protection)[passed] >= base["threshold"] - 1e-5)
        out[views] = held(protected), int(np.sum(iters))
    # Measured: 0.30 of fresh views held with one view per evaluation, 0.73 with four.
    assert out[4][0] > out[1][0] + 0.2, out


def test_field_must_be_known():
    with pytest.raises(ValueError, match="field"):
        cloak.CloakConfig(field="pixels")


def test_chip_field_cloak_stays_on_the_chip_and_protects(tiny, video):
    # field 'chip': the optimised variable is a chip-sized field carried to the patch through
    # the chip warp, so the cloak is zero outside the chip's footprint and has the chip's
    # size whatever the patch's.
    rec, params = tiny
    frames, lms = video
    # Landmarks pulled halfway to the patch centre: a chip footprint of ~32 of the 64 px.
    small = (lms[:4] - P / 2) * 0.5 + P / 2
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(small), rec.template)
    cfg = cloak.CloakConfig(**{**VIDEO_CFG, "field": "chip"})
    protected, iters, met = cloak.cloak_faces(params, rec, frames[:4], m, jax.random.key(5), cfg)
    assert bool(np.all(met.passed)) and np.all(np.asarray(iters) >= 1)
    diff = np.abs(np.asarray(protected, np.int16) - frames[:4]).max(axis=-1)
    # Patch pixels whose chip coordinates fall outside the chip (with a pixel of bilinear
    # reach) must be untouched.
    yy, xx = np.mgrid[:P, :P]
    pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
    for t in range(4):
        inv = np.asarray(align.invert(m[t]))
        chip_xy = pts @ inv[:, :2].T + inv[:, 2]
        outside = ((chip_xy < -1) | (chip_xy > rec.chip_size)).any(axis=1).reshape(P, P)
        assert outside.any() and diff[t][outside].max() == 0
        assert diff[t][~outside].max() > 0


def test_chip_field_warm_start_reuses_the_aligned_field(tiny, video):
    # With threshold -inf nothing is updated: the carried chip field after two frames is the
    # first frame's cold start, unwarped (the chip is aligned to the landmarks already).
    rec, params = tiny
    frames, lms = video
    cfg = cloak.CloakConfig(field="chip", threshold=-np.inf, reuse="affine")
    fn = _fn(rec, cfg)
    carry = _init(rec, params, cfg, jax.random.key(3), 1)
    assert carry.delta.shape == (1, rec.chip_size, rec.chip_size, 3)
    one, _ = fn(params, _chain_frames(tiny, frames[:1], lms[:1]), carry, carry.feat[0])
    two, res = fn(params, _chain_frames(tiny, frames[:2], lms[:2]), carry, carry.feat[0])
    np.testing.assert_array_equal(res.iters, [[0, 0]])
    np.testing.assert_allclose(two.delta, one.delta)
    assert np.abs(np.asarray(one.delta)).max() > 0


# Several recognisers at once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny):
    """Returns (Ensemble of two tiny recognisers with different chips, their params)."""
    from faceveil.models import registry

    rec_a, params_a = tiny
    params_b = TinyNet().init(jax.random.key(5), jnp.zeros((1, 40, 40, 3)))["params"]
    # A larger chip with the face placed a little higher and smaller: another geometry.
    rec_b = Recogniser(name="tiny_b", chip_size=40, template=TEMPLATE * 1.1 + [2.0, 1.0],
                       apply=_tiny_apply, embed_dim=16, threshold=1.5, metric="euclidean",
                       layers=("stage1", "stage2"), load_params=lambda: params_b)
    return registry.Ensemble((rec_a, rec_b)), (params_a, params_b)


def _member_distances(ens, params, protected, patches, m):
    """Returns [R, B] each member's embedding distance, protected vs clean patches."""
    out = []
    for r, (rec, p) in enumerate(zip(ens.members, params)):
        emb = jax.vmap(lambda x, mm, rec=rec, p=p: cloak.features(rec, p, x, mm, None)[0])
        prot = jnp.asarray(protected, jnp.float32) / 255.0
        clean = jnp.asarray(patches, jnp.float32) / 255.0
        out.append(np.asarray(jnp.linalg.norm(emb(prot, m[:, r]) - emb(clean, m[:, r]),
                                              axis=-1)))
    return np.stack(out)


def test_ensemble_cloak_stops_only_when_every_recogniser_passes(pair, video):
    ens, params = pair
    frames, lms = video
    m = jnp.stack([jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms[:2]), r.template)
                   for r in ens.members], axis=1)  # [B, R, 2, 3]
    cfg = cloak.CloakConfig(**{**VIDEO_CFG, "threshold": (0.08, 0.08)})
    prot, iters, met = cloak.cloak_faces(params, ens, frames[:2], m, jax.random.key(0), cfg)
    assert np.asarray(met.passed).all() and (np.asarray(iters) < cfg.max_iters).all()
    d = _member_distances(ens, params, prot, frames[:2], m)
    assert (d >= 0.08 - 1e-4).all(), d  # both recognisers moved past their own distance
    # The second recogniser's distance is out of reach: the primary alone passing is not
    # enough, every face runs to the cap and does not pass.
    cfg = dataclasses.replace(cfg, threshold=(0.08, np.inf), max_iters=6)
    _, iters, met = cloak.cloak_faces(params, ens, frames[:2], m, jax.random.key(0), cfg)
    np.testing.assert_array_equal(iters, [6, 6])
    assert not np.asarray(met.passed).any()


def test_ensemble_config_checks():
    from faceveil.models import registry

    ens = registry.get("dlib,facenet")
    assert isinstance(ens, registry.Ensemble) and ens.name == "dlib,facenet"
    assert [r.name for r in registry.members(ens)] == ["dlib", "facenet"]
    assert ens.chip_size == 150 and ens.threshold == 0.6  # the primary's
    cfg = cloak.preset("mid", ens)
    assert cfg.threshold == (0.8, round(4 / 3 * 0.94, 4))  # each recogniser's own multiple
    with pytest.raises(ValueError, match="threshold"):
        cloak.CloakMethod(ens, cloak.CloakConfig(threshold=0.8))
    with pytest.raises(ValueError, match="untargeted"):
        cloak.CloakMethod(ens, dataclasses.replace(cfg, targeted=True))
    assert registry.get("dlib,").name == "dlib"


def test_jpeg_views_run_and_jitter_ranges():
    # The JPEG views need a quality range inside the views; the jitter's scale range is
    # centred on its bias.
    with pytest.raises(ValueError, match="jpeg_views"):
        cloak.CloakConfig(views=2, jpeg_views=3)
    scales = []
    for k in range(50):
        m = np.asarray(cloak.jitter_transform(jax.random.key(k), 150, 0.0, scale=0.05,
                                              turn=0.0, scale_bias=-0.02))
        scales.append(np.log(np.sqrt(np.linalg.det(m[:, :2]))))
    assert -0.07 - 1e-5 <= min(scales) < -0.05 and 0.01 < max(scales) <= 0.03 + 1e-5


def test_jpeg_view_cloak_survives_a_real_jpeg_better(tiny, video):
    # One of two views sees the face through the differentiable JPEG: after the same number of
    # updates under the same budget, the cloak holds better under Pillow's real JPEG at
    # quality 70 than a cloak fitted without it.
    import io

    rec, params = tiny
    frames, lms = video
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms), rec.template)
    base_cfg = {**VIDEO_CFG, "jitter": 1e-4, "jitter_scale": 0.0, "jitter_turn": 0.0,
                "jitter_scale_bias": 0.0, "threshold": np.inf, "max_iters": 10, "views": 2}

    def after_jpeg(protected):
        out = []
        for p in np.asarray(protected):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="JPEG", quality=70)
            out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        emb = jax.vmap(lambda x, mm: cloak.features(rec, params, x, mm, None)[0])
        d = jnp.linalg.norm(emb(jnp.asarray(np.stack(out), jnp.float32) / 255.0, m)
                            - emb(jnp.asarray(frames, jnp.float32) / 255.0, m), axis=-1)
        return float(jnp.mean(d))

    held = {}
    for jv in (0, 1):
        cfg = cloak.CloakConfig(**base_cfg, jpeg_views=jv, jpeg_quality=(65.0, 75.0))
        prot, iters, _ = cloak.cloak_faces(params, rec, frames, m, jax.random.key(2), cfg)
        np.testing.assert_array_equal(iters, 10)
        held[jv] = after_jpeg(prot)
    assert held[1] > held[0], held


def test_lpips_budget_is_the_stop_rule_and_is_reported(tiny, video):
    # budget 'lpips': the stop rule needs LPIPS of the aligned face within lpips_rho (DSSIM is
    # only reported). A protection threshold every cold start meets: with a loose LPIPS
    # budget the faces stop at once; with budget 0 (no cloak has LPIPS 0) they run to the cap.
    from tests.conftest import store_params

    rec, params = tiny
    frames, lms = video
    m = jax.vmap(align.chip_transform, (0, None))(jnp.asarray(lms[:2]), rec.template)
    both = {"recognisers": params, "lpips": store_params("lpips")}
    runs = {}
    for rho in (1.0, 0.0):
        cfg = cloak.CloakConfig(**{**VIDEO_CFG, "budget": "lpips", "lpips_rho": rho,
                                   "threshold": -np.inf, "max_iters": 5})
        _, iters, met = cloak.cloak_faces(both, rec, frames[:2], m, jax.random.key(0), cfg)
        assert np.isfinite(np.asarray(met.lpips)).all() and (np.asarray(met.lpips) > 0).all()
        runs[rho] = (np.asarray(iters), np.asarray(met.passed))
    np.testing.assert_array_equal(runs[1.0][0], 0)
    assert runs[1.0][1].all()
    np.testing.assert_array_equal(runs[0.0][0], 5)
    assert not runs[0.0][1].any()
    with pytest.raises(ValueError, match="budget"):
        cloak.CloakConfig(budget="psnr")
