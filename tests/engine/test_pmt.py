"""PMT (DESIGN.md method 4): the compiled core on real faces, the photo pipeline, the CLI.

CPU-sized: the real dlib ResNet cut after its second stage and a few tens of sign steps (PMT's
strength at the paper's 300 steps is a benchmark's business, not this file's). Each distinct
PmtConfig is one compilation, so the tests share a few configs through module fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil import losses
from faceveil.engine.methods import base, pmt
from faceveil.engine.pipeline import align, faces, image_io, pmts
from faceveil.models import registry
from tests.conftest import store_params

DLIB_THRESHOLD = 0.6  # dlib's same-person distance
LAYERS = 2
ITERS = 40
FEATURE_SHAPE = (35, 35, 32)  # dlib's output of stage 2 on a 150 px chip


@pytest.fixture(scope="module")
def dlib():
    """Returns (dlib recogniser, params, jitted embed, jitted rest)."""
    rec = registry.get("dlib")
    params = jax.device_put(store_params("dlib_resnet"))
    embed = jax.jit(rec.embed)
    rest = jax.jit(rec.rest, static_argnums=2)
    return rec, params, embed, rest


@pytest.fixture(scope="module")
def two_faces(data_dir, dlib):
    """Returns (uint8 patches [2, P, P, 3], m_chip [2, 2, 3]) of Obama and Biden."""
    rec = dlib[0]
    lms, images = [], []
    for name in ("obama/obama1.jpg", "biden/biden1.jpg"):
        image = image_io.read_image(data_dir / "faces" / name)
        found = faces.find_photo_faces(image)
        assert len(found.landmarks) >= 1, f"{name}: no face found"
        k = int(np.argmax(faces.box_side(found.boxes)))
        lms.append(found.landmarks[k])
        images.append(image)
    # One patch side for both (the larger default bucket): a margin around each footprint.
    size = max(faces.plan_faces(lm[None], np.ones(1, bool), rec).size for lm in lms)
    patches, ms = [], []
    for image, lm in zip(images, lms):
        plan = faces.plan_faces(lm[None], np.ones(1, bool), rec, size=size)
        patches.append(faces.crop_patches(image[None], plan.offsets, plan.size)[0])
        ms.append(plan.m_chip[0])
    return np.stack(patches), np.stack(ms).astype(np.float32)


@pytest.fixture(scope="module")
def solve(dlib, two_faces):
    """Returns solve(config) -> numpy FaceOutput of the two faces (cached per config)."""
    rec, params = dlib[:2]
    patches, ms = two_faces
    done = {}

    def run(config: pmt.PmtConfig):
        if config not in done:
            out = base.solve_faces(pmt.PmtMethod(rec, config), params, patches, ms,
                                   jax.random.key(0))
            done[config] = jax.tree.map(np.asarray, jax.device_get(out))
        return done[config]

    return run


def _footprint(m_chip: np.ndarray, patch_size: int, chip_size: int):
    """Returns (inside, clear) [P, P] bool: the chip's footprint and the pixels off its edge."""
    inv = np.linalg.inv(np.vstack([m_chip.astype(np.float64), [0, 0, 1]]))[:2]
    v, u = np.meshgrid(np.arange(patch_size, dtype=float), np.arange(patch_size, dtype=float),
                       indexing="ij")
    xs = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    ys = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    last = chip_size - 1
    inside = (xs >= 0) & (xs <= last) & (ys >= 0) & (ys <= last)
    edge = np.minimum.reduce([np.abs(xs), np.abs(xs - last), np.abs(ys), np.abs(ys - last)])
    return inside, edge > 1e-3


# ----------------------------------------------------------------------------------------------
# The compiled core


def test_pmt_hides_the_face_yet_the_service_still_recognises_it(dlib, two_faces, solve):
    rec, params, embed, rest = dlib
    patches, ms = two_faces
    s = rec.chip_size
    out = solve(pmt.PmtConfig(layers=LAYERS, iters=ITERS))
    x = out.metrics.obfuscated
    assert x.shape == (2, s, s, 3)
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    assert out.protected.dtype == np.uint8 and out.protected.shape == patches.shape
    np.testing.assert_array_equal(out.iters, [ITERS, ITERS])

    dist = out.metrics.authorised_distance
    assert dist.shape == (2, 1)
    assert (dist[:, 0] < DLIB_THRESHOLD).all(), dist
    # Independently: the service finishes the embedding from the uploaded cut features of x~.
    origs = np.stack([np.asarray(align.warp(p.astype(np.float32) / 255.0, m, (s, s)))
                      for p, m in zip(patches, ms)])
    finished = rest(params, pmt.cut_features(rec, params, x, LAYERS), LAYERS)
    d = np.linalg.norm(np.asarray(finished) - np.asarray(embed(params, origs)), axis=-1)
    np.testing.assert_allclose(d, dist[:, 0], atol=2e-3)

    for k in range(2):
        sim = float(losses.ssim(jnp.asarray(x[k]), jnp.asarray(origs[k])))
        assert sim < 0.3, (k, sim)  # the obfuscated chip does not look like the face
        inside, clear = _footprint(ms[k], patches.shape[1], s)
        outside = ~inside & clear
        assert outside.mean() > 0.05  # the patch has a margin around the chip
        np.testing.assert_array_equal(out.protected[k][outside], patches[k][outside])
        changed = np.abs(out.protected[k].astype(int) - patches[k])[inside & clear]
        assert changed.mean() > 20, changed.mean()  # the footprint holds x~, not the face


def test_objective_falls_with_more_iterations(solve):
    few = solve(pmt.PmtConfig(layers=LAYERS, iters=5)).metrics.objective
    many = solve(pmt.PmtConfig(layers=LAYERS, iters=ITERS)).metrics.objective
    assert np.isfinite(few).all() and np.isfinite(many).all()
    assert (many < few).all(), (few, many)


def test_basic_and_enhanced_presets_run(solve):
    basic = pmt.preset("basic", iters=10, layers=LAYERS)
    assert (basic.augment, basic.aggregate, basic.kernel) == ("none", False, "none")
    assert pmt.preset("enhanced", iters=ITERS, layers=LAYERS) == pmt.PmtConfig(
        layers=LAYERS, iters=ITERS)
    for config in (basic, pmt.preset(iters=ITERS, layers=LAYERS)):
        m = solve(config).metrics
        assert np.isfinite(m.objective).all() and (m.objective >= 0).all(), config
        assert np.isfinite(m.authorised_distance).all(), config
        assert m.obfuscated.min() >= 0.0 and m.obfuscated.max() <= 1.0


def test_config_and_cut_are_checked(dlib):
    for bad in ({"init": "zeros"}, {"augment": "flip"}, {"kernel": "box"}, {"iters": 0},
                {"pool": 0}):
        with pytest.raises(ValueError):
            pmt.PmtConfig(**bad)
    with pytest.raises(ValueError):
        pmt.preset("strongest")
    with pytest.raises(ValueError, match=r"1\.\.6"):
        pmt.check_layers(registry.get("dlib"), 7)
    with pytest.raises(ValueError, match=r"1\.\.6"):
        pmt.PmtMethod(dlib[0], pmt.PmtConfig(layers=7))
    pmt.check_layers(registry.get("dlib"), 6)  # the deepest valid cut


# ----------------------------------------------------------------------------------------------
# Photos


def test_pmt_images_features_finish_to_the_chips_embedding(data_dir, dlib):
    rec, params, embed, rest = dlib
    image = image_io.read_image(data_dir / "multi" / "two_people.jpg")
    res = pmts.pmt_images([image], authorised="dlib",
                          config=pmt.PmtConfig(layers=LAYERS, iters=20), show_progress=False)
    n = len(res.photos.faces)
    assert n == 2
    assert res.chips.shape == (n, rec.chip_size, rec.chip_size, 3)
    assert res.chips.min() >= 0.0 and res.chips.max() <= 1.0
    feats = res.features["dlib"]
    assert feats.shape == (n,) + FEATURE_SHAPE
    assert res.authorised_distance.shape == (n, 1)
    assert np.isfinite(res.authorised_distance).all()
    np.testing.assert_allclose(rest(params, feats, LAYERS), embed(params, res.chips),
                               atol=1e-4, rtol=0)
    assert res.photos.images[0].shape == image.shape
    assert not np.array_equal(res.photos.images[0], image)  # the faces were replaced


# ----------------------------------------------------------------------------------------------
# The command line


def _faceveil(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faceveil.engine.commands.cli", *map(str, args)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600,
                          check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_image_upload(tmp_path, data_dir):
    out = tmp_path / "out"
    proc = _ok(_faceveil("pmt", data_dir / "faces" / "obama" / "obama1.jpg", "--out", out,
                         "--iters", 10))
    assert "authorised distance" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["obama1.png", "obama1_face0.png"]
    photo = np.asarray(Image.open(out / "obama1.png"))
    assert photo.shape == (512, 410, 3)
    assert np.asarray(Image.open(out / "obama1_face0.png")).shape == (150, 150, 3)


def test_cli_feature_upload(tmp_path, data_dir):
    out = tmp_path / "out"
    _ok(_faceveil("pmt", data_dir / "faces" / "obama" / "obama1.jpg", "--out", out,
                  "--iters", 10, "--upload", "features"))
    assert sorted(p.name for p in out.iterdir()) == ["obama1.features.npz"]
    with np.load(out / "obama1.features.npz", allow_pickle=False) as z:
        assert int(z["layers"]) == LAYERS
        assert z["dlib_face0"].shape == FEATURE_SHAPE
        assert np.isfinite(z["dlib_face0"]).all()


@pytest.mark.parametrize("flag, value, words", [
    ("--layers", 9, ("--layers", "1..6")),
    ("--authorised", "nosuchnet", ("--authorised", "nosuchnet")),
    ("--pool", 500, ("--pool", "pool 500 is larger than dlib's")),
    ("--pool", 0, ("--pool", "at least 1")),
])
def test_cli_refuses_bad_settings(tmp_path, data_dir, flag, value, words):
    out = tmp_path / "out"
    proc = _faceveil("pmt", data_dir / "faces" / "obama" / "obama1.jpg", "--out", out,
                     flag, value)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_cli_photo_without_a_face(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(grey)
    out = tmp_path / "out"
    proc = _ok(_faceveil("pmt", grey, "--out", out, "--iters", 10))
    assert "no face" in proc.stdout
