"""Mask templates, trained mode (DESIGN.md method 3): template network, key generator, files.

CPU-sized: a model trained for a few steps on five test faces (the protection a trained
generator reaches is a benchmark's business); what is tested is what must hold for any model:
the template network learns its targets, restores are bit-exact for b = 1..4, keys stay below
2^b and inside their templates, checkpoints resume, bad files are named.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.engine import checkpoints
from faceveil.engine.methods import base, mask, mask_model
from faceveil.engine.pipeline import faces, image_io, mask_files, mask_training, masks
from faceveil.models import mask_nets

TRAIN = ("faces/obama", "faces/biden")
PHOTOS = ("multi/obama_and_biden.jpg", "faces/kit_harington/kit1.jpg")
TINY = mask_training.MaskTrainConfig(template_steps=3, generator_steps=2, batch=2, probes=2,
                                     checkpoint_every=1, log_every=1)
PASS = "correct horse battery"


@pytest.fixture(scope="module")
def train_faces(data_dir):
    """Returns the TrainingFaces of the Obama and Biden photos (detected once)."""
    data = mask_training.training_faces([data_dir / p for p in TRAIN], ("dlib",),
                                        show_progress=False)
    assert len(data.names) == 5 and data.source.shape[1:] == (256, 256, 3)
    return data


@pytest.fixture(scope="module")
def trained(train_faces, tmp_path_factory):
    """Returns (model, its folder) of a tiny dlib model."""
    out = tmp_path_factory.mktemp("mask_model")
    model = mask_training.train(None, ("dlib",), out=out, config=TINY, data=train_faces,
                                show_progress=False)
    return model, out


def test_networks_are_fully_convolutional_with_the_documented_shapes():
    cfg = mask_model.MaskModelConfig()
    params = mask_training.init_params(cfg, 2, jax.random.key(0))
    views = jnp.zeros((2, 128, 128, 3))
    basis = mask_model.template_net(cfg).apply(params["template"], views)
    assert basis.shape == (2, 16, 16, cfg.basis)
    assert mask_nets.templates(basis, params["tau"]).shape == (2, 16, 16, 2)
    # Any multiple of 8 works: no dense layer, no pooling.
    for g in (64, 128):
        z = jnp.zeros((1, g, g, cfg.channels))
        assert mask_model.generator_net(cfg).apply(params["generator"], z).shape == (
            1, g, g, 3)


def test_templates_superpose_linearly_through_tau():
    basis = jax.random.normal(jax.random.key(1), (1, 4, 4, 3))
    tau = jnp.asarray([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    t = mask_nets.templates(basis, tau)
    np.testing.assert_allclose(t[..., 0] + t[..., 1], mask_nets.templates(
        basis, tau.sum(0, keepdims=True))[..., 0], rtol=1e-5, atol=1e-6)


def test_template_network_learns_its_sensitivity_targets(train_faces):
    cfg = mask_model.MaskModelConfig()
    views, m_fc = mask_training._frame_views(cfg, train_faces)
    targets = mask_training.sensitivity_targets(("dlib",), cfg, views, m_fc, jax.random.key(0),
                                                probes=2, show_progress=False)
    assert targets.shape == (5, 16, 16, 1)
    assert np.isclose(targets.max(axis=(1, 2, 3)), 1.0).all()
    run = dataclasses.replace(TINY, template_steps=30, template_lr=3e-3)
    step = mask_training._compiled("template", ("dlib",), cfg, run)
    p = mask_training.init_params(cfg, 1, jax.random.key(0))
    topt, gopt = mask_training._optimisers(run)
    state = mask_training.TrainState(p, topt.init({"net": p["template"]["params"],
                                                   "tau": p["tau"]}),
                                     gopt.init(p["generator"]["params"]))
    errs = []
    for k in range(run.template_steps):
        state, m = step(state, views, jnp.asarray(targets), jax.random.key(k))
        errs.append(float(m["sq_err"]))
    assert np.mean(errs[-5:]) < 0.5 * np.mean(errs[:5]), errs


def test_carried_changes_land_where_the_frame_says():
    # A frame that is the patch shifted by (10, 4) and scaled by 2: patch pixel (u, v) reads
    # frame position ((u - 10) / 2, (v - 4) / 2).
    values = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8, 1)
    m_frame = jnp.asarray([[2.0, 0.0, 10.0], [0.0, 2.0, 4.0]])
    out = mask_model.carry_to_patch(values, m_frame, 32)
    assert float(out[4 + 2 * 3, 10 + 2 * 5, 0]) == 3 * 8 + 5
    assert float(out[0, 0, 0]) == 0.0  # outside the frame: no change


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_a_signed_change_stays_in_each_pixels_block_of_2_to_the_b_levels(bits):
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, 256, (16, 16, 3))
    x = jnp.asarray(levels / 255.0, jnp.float32)
    change = jnp.asarray(rng.uniform(-1, 1, (16, 16, 3)), jnp.float32)
    allowed = np.zeros((16, 16), bool)
    allowed[4:12] = True
    face = mask_model.Prepared(z=None, m_frame=jnp.asarray([[1.0, 0, 0], [0, 1.0, 0]]),
                               allowed=jnp.asarray(allowed))
    y = np.round(np.asarray(mask_model.protected_levels(change, face, x, bits)) * 255).astype(int)
    key = levels ^ y
    assert key.max() < 1 << bits and np.all(key[~allowed] == 0)
    assert np.all(y >> bits == levels >> bits)  # the high-order bits are kept
    # Within the block, the pixel moves the way the change says (as far as the block allows).
    span = (1 << bits) - 1
    want = np.clip(levels % (1 << bits) + np.asarray(change) * span, 0, span)
    np.testing.assert_array_equal(y[allowed] % (1 << bits), np.round(want)[allowed])
    g = jax.grad(lambda c: jnp.sum(mask_model.protected_levels(c, face, x, bits)))(change)
    assert np.all(np.asarray(g)[~allowed] == 0) and np.any(np.asarray(g)[allowed] > 0)


@pytest.fixture(scope="module")
def photo_set(data_dir):
    images = [image_io.read_image(data_dir / p) for p in PHOTOS]
    return images, [faces.find_photo_faces(im) for im in images]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_generated_keys_restore_bit_exact_and_stay_below_2_to_the_b(trained, photo_set, bits):
    model, _ = trained
    images, found = photo_set
    res = masks.mask_images(images, config=mask.MaskConfig(bits=bits), found=found,
                            show_progress=False, model=model, measure=False)
    # A barely trained generator's change is small: at b <= 2 it may round to no change at
    # all (a zero key), which still restores; from b = 3 up it moves pixels.
    for img, prot, key in zip(images, res.images, res.keys):
        np.testing.assert_array_equal(masks.restore(prot, key), img)
        assert key.max() < 1 << bits and (bits < 3 or key.any())
    m = res.photos.faces.metrics
    assert np.all(m["ssim"] > 0.8) and np.all(np.isfinite(m["protection"]))
    # `flipped` is a fraction of the template's bits: the key stays inside its template.
    assert np.all((m["flipped"] >= 0) & (m["flipped"] <= 1))
    assert bits < 3 or np.all(m["flipped"] > 0)


def test_a_second_protect_of_the_same_shape_does_not_recompile(trained, photo_set):
    model, _ = trained
    images, found = photo_set
    cfg = mask.MaskConfig(bits=3)
    first = masks.mask_images(images, config=cfg, found=found, show_progress=False, model=model,
                              measure=False)
    method, _ = masks.method_for("dlib", cfg, model)
    fn = base.chunk_fn(method)
    before = fn._cache_size()
    again = masks.mask_images(images, config=cfg, found=found, show_progress=False, model=model,
                              measure=False)
    assert fn._cache_size() == before
    for a, b in zip(first.keys, again.keys):
        np.testing.assert_array_equal(a, b)


def test_model_saves_loads_and_a_checkpoint_resumes(trained, train_faces, tmp_path):
    model, out = trained
    loaded = mask_training.MaskModel.load(out)
    assert (loaded.template_step, loaded.generator_step) == (3, 2)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
    # Continue the same run two more generator steps: it resumes (no template step again).
    more = dataclasses.replace(TINY, generator_steps=4)
    resumed = mask_training.train(None, ("dlib",), out=out, config=more, data=train_faces,
                                  show_progress=False)
    assert (resumed.template_step, resumed.generator_step) == (3, 4)
    jax.tree.map(np.testing.assert_array_equal, resumed.params["template"],
                 model.params["template"])
    # A finished model saved without optimiser state is loadable but not resumable.
    saved = loaded.save(tmp_path / "m")
    assert mask_training.MaskModel.load(saved).generator_step == 2


def test_bad_model_files_and_other_recognisers_are_named(trained, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match="trained for dlib, not facenet"):
        model.rows("facenet")
    bad = tmp_path / "mask_model.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(image_io.InputError, match="mask_model.npz"):
        mask_training.MaskModel.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        mask_training.MaskModel.load(tmp_path / "none")
    # A decoder checkpoint is not a mask model.
    checkpoints.write(tmp_path / "other.npz", {"format": "faceveil-decoder-1"}, {})
    with pytest.raises(image_io.InputError, match="format"):
        mask_training.MaskModel.load(tmp_path / "other.npz")


def test_protect_files_with_a_model_and_restore_them(trained, data_dir, tmp_path):
    _, out = trained
    model = mask_training.MaskModel.load(out)
    src = data_dir / PHOTOS[1]
    reports = mask_files.protect_files([src], tmp_path / "out", tmp_path / "keys",
                                       passphrase=PASS, config=mask.MaskConfig(bits=2),
                                       show_progress=False, scrypt_n=2**10, model=model)
    assert reports[0].faces == 1
    back = mask_files.restore_files([tmp_path / "out" / "kit1.png"], tmp_path / "keys",
                                    tmp_path / "back", passphrase=PASS, show_progress=False)
    assert back[0].faces == 1
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "back" / "kit1.png"),
                                  image_io.read_image(src))


def _faceveil(*args, **env):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "faceveil.engine.commands.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
                          check=False)


def test_cli_protect_with_a_model_and_its_errors(trained, data_dir, tmp_path):
    _, out = trained
    src = data_dir / PHOTOS[1]
    both = _faceveil("mask", "protect", src, "--out", tmp_path / "o", "--keys", tmp_path / "k",
                     "--model", out, "--per-image", FACEVEIL_PASSPHRASE=PASS)
    assert both.returncode == 1 and "exclude each other" in both.stderr
    other = _faceveil("mask", "protect", src, "--out", tmp_path / "o", "--keys", tmp_path / "k",
                      "--model", out, "--recognisers", "facenet", FACEVEIL_PASSPHRASE=PASS)
    assert other.returncode == 1 and "trained for dlib" in other.stderr
    missing = _faceveil("mask", "train", "--out", tmp_path / "m")
    assert missing.returncode == 1 and "--faces" in missing.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
    ok = _faceveil("mask", "protect", src, "--out", tmp_path / "o", "--keys", tmp_path / "k",
                   "--model", out, "--bits", "3", FACEVEIL_PASSPHRASE=PASS)
    assert ok.returncode == 0, ok.stderr
    back = _faceveil("mask", "restore", tmp_path / "o" / "kit1.png", "--keys", tmp_path / "k",
                     "--out", tmp_path / "r", FACEVEIL_PASSPHRASE=PASS)
    assert back.returncode == 0, back.stderr
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "r" / "kit1.png"),
                                  image_io.read_image(src))
