"""The PMT attack evaluators: data abuse (Eq. 10) and white-box reconstruction."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from faceveil import losses
from faceveil.engine.attacks import data_abuse, reconstruction
from faceveil.engine.pipeline import align, faces, image_io
from faceveil.models import registry
from tests.conftest import store_params


def test_centred_cosine_and_match_accuracy():
    centre = np.array([10.0, 10.0, 0.0])
    a = centre + np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    b = centre + np.array([[2.0, 0.1, 0], [1.0, 0, 0], [-1.0, 0, 0]])
    cos = data_abuse.centred_cosine(a, b, centre)
    np.testing.assert_allclose(cos, [2 / np.sqrt(4.01), 0.0, -1.0], atol=1e-9)
    # Raw, every pair lies in the cone around the centre: a fixed kappa calls all a match.
    assert data_abuse.match_accuracy(a, b, kappa=0.2) == 1.0
    assert data_abuse.match_accuracy(a, b, kappa=0.2, centre=centre) == pytest.approx(1 / 3)


def test_verification_uses_same_person_pairs_only():
    ids = ["a", "b", "a", "c", "b"]
    i, j = data_abuse.same_person_pairs(ids)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 4)]
    e = np.array([[1.0, 0], [0, 1.0], [1.0, 0.1], [5, 5], [1.0, 0]])
    assert data_abuse.verification(e, ids) == 0.5  # a-a matches, b-b (orthogonal) does not
    assert np.isnan(data_abuse.verification(e[:2], ids[:2]))


def test_white_box_reconstruction_brings_back_unprotected_faces(data_dir):
    rec = registry.get("dlib")
    params = jax.device_put(store_params("dlib_resnet"))
    image = image_io.read_image(data_dir / "multi" / "two_people.jpg")
    found = faces.find_photo_faces(image)
    x = np.stack([np.asarray(align.extract_chip(np.asarray(image, np.float32) / 255, lm,
                                                rec.template, rec.chip_size))
                  for lm in found.landmarks])
    feats = rec.shallow(params, x, 1)[-1]
    cfg = reconstruction.ReconstructionConfig(iters=100)
    res = reconstruction.attack(rec, params, feats, x, 1, cfg)
    grey = np.asarray(losses.ssim(x, np.full_like(x, 0.5)))
    assert res.chips.shape == x.shape and res.chips.min() >= 0 and res.chips.max() <= 1
    assert np.all(res.ssim > grey + 0.15), (res.ssim, grey)
    assert res.matched.dtype == bool and 0.0 <= res.srra <= 1.0
    # Same shapes, same config: one compilation.
    key = (rec.name, 1, cfg)
    reconstruction.reconstruct(rec, params, feats, 1, cfg)
    assert reconstruction._FNS[key]._cache_size() == 1
