"""Mask templates, per-image mode (DESIGN.md method 3): XOR keys, templates, key files, CLI.

CPU-sized: the real dlib ResNet, a few Adam steps per key (the protection reached at the
default 60 steps is a benchmark's business). Two photos (Obama and Biden together, Kit alone)
run through the photo pipeline once per b = 1..4; every face of a b is one compiled call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil import losses
from faceveil.engine import keyfile
from faceveil.engine.methods import base, mask
from faceveil.engine.pipeline import faces, image_io, mask_files, masks, photos
from faceveil.models import registry

PHOTOS = ("multi/obama_and_biden.jpg", "faces/kit_harington/kit1.jpg")
ITERS = 8
PASS = "correct horse battery"
SCRYPT_N = 2**10  # fast key files in tests (the format records n; real keys use 2**15)


def _config(bits: int) -> mask.MaskConfig:
    return mask.preset("quick", bits=bits, iters=ITERS)


# ----------------------------------------------------------------------------------------------
# Pure pieces


def test_xor_low_bits_is_uint8_xor_with_straight_through_gradient():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for b in (1, 2, 3, 4):
        bits = rng.integers(0, 2, (5, 7, 3, b)).astype(np.float32)
        k = np.sum(bits.astype(np.uint8) << np.arange(b, dtype=np.uint8), axis=-1, dtype=np.uint8)
        y = losses.xor_low_bits(x.astype(np.float32) / 255.0, bits)
        np.testing.assert_array_equal(np.round(np.asarray(y) * 255.0).astype(np.uint8), x ^ k)
    # The gradient of sum(x XOR k) reaches every logit: +2^j / 255 * sigmoid' where bit j of x
    # is 0, minus that where it is 1.
    g = jax.grad(lambda w: jnp.sum(losses.xor_low_bits(
        x.astype(np.float32) / 255.0, losses.straight_through_bits(w))))(jnp.zeros((5, 7, 3, 2)))
    expect = 0.25 * (1 << np.arange(2)) * (1 - 2 * ((x[..., None] >> np.arange(2)) & 1)) / 255.0
    np.testing.assert_allclose(np.asarray(g), expect, rtol=1e-5, atol=1e-8)


def test_sensitivity_map_marks_the_pixels_the_embedding_reads():
    # A linear "recogniser" that reads only the chip's top-left 10 x 20 pixels: exactly the two
    # top-left cells are sensitive (Jacobian norms are estimated, so only up to noise).
    w = jax.random.normal(jax.random.key(1), (10, 20, 3, 16))

    def embed(chips):
        return jnp.einsum("nhwc,hwcd->nd", chips[:, :10, :20], w)

    m = losses.sensitivity_map(jnp.zeros((2, 40, 40, 3)), embed_fn=embed, key=jax.random.key(0),
                               cell=10, probes=64)
    assert m.shape == (2, 4, 4)
    np.testing.assert_allclose(np.asarray(m).max(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m)[:, 0, :2] > 0.5, True)
    np.testing.assert_array_equal(np.asarray(m)[:, 1:], 0.0)
    assert jax.jit(lambda c: losses.sensitivity_map(c, embed_fn=embed, key=jax.random.key(0),
                                                    cell=15))(jnp.zeros((40, 40, 3))).shape == (3, 3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_key_packs_and_unpacks_exactly(bits):
    rng = np.random.default_rng(bits)
    key = rng.integers(0, 1 << bits, (13, 7, 3), dtype=np.uint8)
    key[:5] = 0
    np.testing.assert_array_equal(masks.unpack_key(masks.pack_key(key, bits), key.shape, bits),
                                  key)
    with pytest.raises(ValueError):
        masks.pack_key(np.full((2, 2, 3), 1 << bits, np.uint8), bits)


def test_xor_paste_composes_overlapping_keys_and_clips_at_the_border():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (1, 20, 24, 3), dtype=np.uint8)
    offsets = np.array([[-3, 2], [5, 6]])  # the first patch leaves the frame, the two overlap
    clean = np.stack([faces.crop_patches(frame, offsets[i:i + 1], 12)[0] for i in range(2)])
    keys = rng.integers(0, 16, clean.shape, dtype=np.uint8)
    out = frame
    for i in range(2):
        out = faces.paste_patches(out, clean[i:i + 1], clean[i:i + 1] ^ keys[i:i + 1],
                                  offsets[i:i + 1], np.ones(1, bool), combine="xor")
    photo_key = out[0] ^ frame[0]
    assert photo_key.max() < 16 and photo_key.any()
    np.testing.assert_array_equal(out[0] ^ photo_key, frame[0])
    # Where both patches lie, the photo's key is the XOR of the two faces' keys.
    np.testing.assert_array_equal(photo_key[6:14, 5:9], keys[0, 4:12, 8:12] ^ keys[1, 0:8, 0:4])


# ----------------------------------------------------------------------------------------------
# Photos through the pipeline, b = 1..4


@pytest.fixture(scope="module")
def photo_set(data_dir):
    """Returns (images, found faces) of the two test photos (detected once)."""
    images = [image_io.read_image(data_dir / p) for p in PHOTOS]
    found = [faces.find_photo_faces(im) for im in images]
    assert [len(f.boxes) for f in found] == [2, 1], [len(f.boxes) for f in found]
    return images, found


@pytest.fixture(scope="module")
def masked(photo_set):
    """Returns masked(bits) -> MaskResult of both photos (cached per b)."""
    images, found = photo_set
    done = {}

    def run(bits):
        if bits not in done:
            done[bits] = masks.mask_images(images, config=_config(bits), found=found,
                                           show_progress=False)
        return done[bits]

    return run


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_restoration_is_bit_exact_and_the_key_is_low_bits_on_the_faces(photo_set, masked, bits):
    images, found = photo_set
    res = masked(bits)
    rec = registry.get("dlib")
    for i, (img, prot, key) in enumerate(zip(images, res.images, res.keys)):
        np.testing.assert_array_equal(masks.restore(prot, key), img)
        assert key.max() < 1 << bits and key.any()
        assert not np.array_equal(prot, img)
        # Zero outside the templates: the union of every face's template on the photo grid.
        allowed = np.zeros(img.shape[:2], bool)
        for j in np.flatnonzero(res.photos.faces.image == i):
            tmpl = res.photos.faces.metrics["template"][j] > 0.5
            plan = faces.plan_faces(found[i].landmarks[j - np.flatnonzero(
                res.photos.faces.image == i)[0]][None], np.ones(1, bool), rec,
                size=tmpl.shape[0])
            x, y = plan.offsets[0]
            h, w = img.shape[:2]
            ys, xs = np.nonzero(tmpl)
            ok = (ys + y >= 0) & (ys + y < h) & (xs + x >= 0) & (xs + x < w)
            allowed[ys[ok] + y, xs[ok] + x] = True
        assert not key[~allowed].any(), "key set outside the template"
    # The face patches stay close to the originals: at most 2^b - 1 levels per channel.
    ssim = res.photos.faces.metrics["ssim"]
    assert np.all(ssim > 0.9), ssim


def test_optimised_keys_move_the_embedding_beyond_their_random_start(masked):
    res = masked(4)
    m = res.photos.faces.metrics
    # The optimisation keeps the best hard key it meets, starting from a random key: after a few
    # steps every face's distance is larger than at the start, and the photo the pipeline
    # wrote (re-aligned through `recognise`) shows it too.
    assert np.all(m["protection"] > m["start_protection"]), (m["protection"],
                                                               m["start_protection"])
    d = res.photos.faces.recognised_by["dlib"]
    assert np.all(d > 0.3), d
    np.testing.assert_allclose(d, m["protection"], atol=0.05)
    assert np.all(m["coverage"] > 0.2) and np.all(m["coverage"] < 0.8), m["coverage"]


def test_a_second_call_of_the_same_shape_does_not_recompile(photo_set, masked):
    images, found = photo_set
    first = masked(2)
    method, _ = masks.method_for("dlib", _config(2))
    fn = base.chunk_fn(method)
    before = fn._cache_size()
    again = masks.mask_images(images, config=_config(2), found=found, show_progress=False,
                              measure=False)
    assert fn._cache_size() == before  # same shapes: no recompilation
    for a, b in zip(first.keys, again.keys):  # the same seed gives the same keys
        np.testing.assert_array_equal(a, b)


def test_two_recognisers_superpose_their_templates(data_dir):
    # One face against dlib and FaceNet at once: the template is the union of both, the key
    # is zero outside it and restores exactly; both distances are reported.
    rec = registry.get("dlib,facenet")
    image = image_io.read_image(data_dir / "faces" / "obama" / "obama2.jpg")
    found = faces.find_photo_faces(image)
    plan = faces.plan_faces(found.landmarks[:1], np.ones(1, bool), rec,
                            margin=photos.PHOTO_MARGIN)
    patch = faces.crop_patches(image[None], plan.offsets, plan.size)
    method, params = masks.method_for("dlib,facenet", mask.preset("quick", iters=2))
    out = jax.device_get(base.solve_faces(method, params, patch, plan.m_chip, jax.random.key(0)))
    key = np.asarray(out.protected) ^ patch
    tmpl = np.asarray(out.metrics.template[0]) > 0.5
    assert key.any() and not key[0][~tmpl].any()
    np.testing.assert_array_equal(np.asarray(out.protected) ^ key, patch)
    assert out.metrics.distances.shape == (1, 2) and np.all(out.metrics.distances > 0)
    single, _ = masks.method_for("dlib", mask.preset("quick", iters=2))
    t_dlib = mask.template(single.recogniser, params[0], jnp.asarray(patch[0] / 255.0,
                                                                     jnp.float32),
                           plan.m_chip[0, 0], jax.random.split(jax.random.key(0))[0],
                           single.config)
    assert tmpl.sum() > np.asarray(t_dlib).sum()


# ----------------------------------------------------------------------------------------------
# Files, key files and the command line


@pytest.fixture(scope="module")
def protected_files(data_dir, tmp_path_factory, masked):
    """Returns (tmp, originals) after `protect_files` of the two photos at b = 2."""
    masked(2)  # compiled already: the files run reuses the photo set's compilation
    tmp = tmp_path_factory.mktemp("mask")
    src = [data_dir / p for p in PHOTOS]
    mask_files.protect_files(src, tmp / "out", tmp / "keys", passphrase=PASS,
                             config=_config(2), show_progress=False, scrypt_n=SCRYPT_N)
    return tmp, [image_io.read_image(f) for f in src]


def test_protect_and_restore_files_bit_exact(protected_files):
    tmp, originals = protected_files
    outs = sorted((tmp / "out").iterdir())
    assert [p.name for p in outs] == ["kit1.png", "obama_and_biden.png"]
    assert sorted(p.name for p in (tmp / "keys").iterdir()) == ["kit1.mask.key",
                                                                 "obama_and_biden.mask.key"]
    mask_files.restore_files(outs, tmp / "keys", tmp / "restored", passphrase=PASS,
                             show_progress=False)
    for name, orig in zip(("obama_and_biden.png", "kit1.png"), originals):
        np.testing.assert_array_equal(image_io.read_image(tmp / "restored" / name), orig)
    meta = keyfile.read_key(tmp / "keys" / "kit1.mask.key", PASS, kind="mask").meta
    assert meta["bits"] == 2 and meta["recognisers"] == ["dlib"] and meta["mask_format"] == 1


def _refused(tmp, inputs, keys, match, passphrase=PASS):
    out = tmp / "refused"
    with pytest.raises(image_io.InputError, match=match):
        mask_files.restore_files(inputs, keys, out, passphrase=passphrase, show_progress=False)
    assert not out.exists() or not any(out.iterdir()), "something was written"


def test_wrong_passphrase_other_key_and_tampered_key_are_refused(protected_files):
    tmp, _ = protected_files
    outs = sorted((tmp / "out").iterdir())
    _refused(tmp, outs, tmp / "keys", "kit1.mask.key: wrong passphrase",
             passphrase="not the passphrase")
    # Kit's photo under the other photo's key (renamed so it is the one looked up).
    other = tmp / "other_keys"
    other.mkdir()
    shutil.copy(tmp / "keys" / "obama_and_biden.mask.key", other / "kit1.mask.key")
    _refused(tmp, [tmp / "out" / "kit1.png"], other, "kit1.mask.key: is the key of another image")
    # One flipped byte in the ciphertext.
    tampered = tmp / "tampered"
    tampered.mkdir()
    data = bytearray((tmp / "keys" / "kit1.mask.key").read_bytes())
    data[-40] ^= 1
    (tampered / "kit1.mask.key").write_bytes(bytes(data))
    _refused(tmp, [tmp / "out" / "kit1.png"], tampered, "kit1.mask.key: the key file was modified")
    # A changed pixel in the protected photo.
    img = image_io.read_image(tmp / "out" / "kit1.png")
    img[0, 0, 0] ^= 128
    image_io.write_image(tmp / "edited" / "kit1.png", img)
    _refused(tmp, [tmp / "edited" / "kit1.png"], tmp / "keys", "is the key of another image")


def test_jpeg_is_refused_for_outputs_and_restores(protected_files, data_dir):
    tmp, _ = protected_files
    with pytest.raises(image_io.OutputError, match="PNG only"):
        mask_files.protect_files([data_dir / PHOTOS[1]], tmp / "x.jpg", tmp / "k",
                                 passphrase=PASS, show_progress=False)
    _refused(tmp, [data_dir / PHOTOS[1]], tmp / "keys", "is a JPEG")


def _faceveil(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faceveil.engine.commands.cli", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
                          check=False)


def test_cli_restore_and_its_errors(protected_files):
    tmp, originals = protected_files
    outs = sorted((tmp / "out").iterdir())
    bad = _faceveil("mask", "restore", *outs, "--keys", tmp / "keys", "--out", tmp / "cli",
                    FACEVEIL_PASSPHRASE="wrong one")
    assert bad.returncode == 1 and "wrong passphrase" in bad.stderr and "mask.key" in bad.stderr
    assert not (tmp / "cli").exists()
    ok = _faceveil("mask", "restore", *outs, "--keys", tmp / "keys", "--out", tmp / "cli",
                   FACEVEIL_PASSPHRASE=PASS)
    assert ok.returncode == 0, ok.stderr
    np.testing.assert_array_equal(image_io.read_image(tmp / "cli" / "kit1.png"), originals[1])
    bits = _faceveil("mask", "protect", outs[0], "--keys", tmp / "k", "--out", tmp / "o",
                     "--bits", "5", FACEVEIL_PASSPHRASE=PASS)
    assert bits.returncode == 1 and "bits must be in 1..4" in bits.stderr


def test_faces_of_two_patch_sizes_keep_their_own_templates(data_dir):
    # Four faces of each size: groups that small-group merging keeps apart, so the per-pixel
    # template metric has two shapes in one call.
    small = image_io.read_image(data_dir / PHOTOS[1])
    big = np.asarray(Image.fromarray(small).resize((small.shape[1] * 2, small.shape[0] * 2)))
    images = [big] * 4 + [small] * 4
    found = [faces.find_photo_faces(big)] * 4 + [faces.find_photo_faces(small)] * 4
    res = masks.mask_images(images, config=mask.preset("quick", bits=2, iters=2), found=found,
                            show_progress=False)
    tmpl = res.photos.faces.metrics["template"]
    assert len(tmpl) == 8
    assert len({t.shape for t in tmpl}) == 2, [t.shape for t in tmpl]
    for img, prot, key in zip(images, res.images, res.keys):
        np.testing.assert_array_equal(masks.restore(prot, key), img)
