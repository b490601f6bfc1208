"""The one face pipeline: a method optimises exactly the chip its recogniser embeds."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import align, faces, image_io, recognise


@pytest.fixture(scope="module")
def photo(data_dir):
    """Returns (uint8 photo, landmarks [1, 5, 2]) of a real portrait."""
    image = image_io.read_image(data_dir / "faces" / "obama" / "obama1.jpg")
    found = faces.find_photo_faces(image)
    assert len(found.landmarks) == 1
    return image, found.landmarks


@pytest.mark.parametrize("model", ["dlib", "facenet"])
def test_chip_the_method_optimises_is_the_chip_recognise_embeds(photo, model):
    image, lms = photo
    rec, params = recognise.recogniser_params(model)
    plan = faces.plan_faces(lms, np.ones(1, bool), rec)
    patch = faces.crop_patches(image[None], plan.offsets, plan.size)[0]
    patch_f = jnp.asarray(patch, jnp.float32) / 255.0
    s = rec.chip_size
    method_chip = np.asarray(align.warp(patch_f, plan.m_chip[0], (s, s)))
    emb, chips = recognise.embed_faces(image, lms, model)
    # The same bilinear samples of the same pixels, in patch instead of photo coordinates:
    # float32 rounding of coordinates ~1e3 px moves a sample by ~1e-4 px.
    np.testing.assert_allclose(method_chip, chips[0], atol=2e-3)
    # And the method's features (without its anti-aliasing low-pass) are recognise's embedding.
    got, _ = cloak.features(rec, params, patch_f, jnp.asarray(plan.m_chip[0]), None,
                            antialias=False)
    cos = float(np.dot(got, emb[0]) / np.linalg.norm(got) / np.linalg.norm(emb[0]))
    assert cos > 0.9999, cos


def test_facenet_chip_honours_its_aspect(photo):
    # FaceNet's chip squashes a 1.26x taller region: the plan's transform must say so (the bug
    # this pipeline removed: the cloak once planned FaceNet chips with aspect 1).
    _, lms = photo
    rec, _ = recognise.recogniser_params("facenet")
    assert rec.aspect > 1.2
    m = faces.chip_transforms(lms, rec)[0]
    col_x, col_y = np.linalg.norm(m[:, 0]), np.linalg.norm(m[:, 1])
    np.testing.assert_allclose(col_y / col_x, rec.aspect, rtol=1e-4)
    plan = faces.plan_faces(lms, np.ones(1, bool), rec)
    # Every chip sample point lies inside the patch (so the margin covers the taller region).
    corners = np.array([[0, 0], [rec.chip_size - 1, 0], [0, rec.chip_size - 1],
                        [rec.chip_size - 1, rec.chip_size - 1]], np.float32)
    pts = np.asarray(align.apply_transform(plan.m_chip[0], corners))
    assert pts.min() >= 0 and pts.max() <= plan.size - 1


def test_batch_buckets_and_padding():
    assert [faces.batch_bucket(n) for n in (1, 3, 5, 256, 257)] == [1, 4, 8, 256, 512]
    assert [faces.batch_bucket(n, faces.SOLVE_BUCKETS) for n in (3, 5, 7, 13, 257)] == [
        3, 6, 8, 16, 512]
    assert [faces.lane_count(n) for n in (1, 3, 64, 65)] == [1, 4, 64, 128]
    a = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(faces.pad_batch(a, 4), [[0, 1], [2, 3], [4, 5], [0, 1]])


def test_merge_sides_joins_small_groups_upwards():
    # 1 + 1 + 1 faces join the 3 at 384 (one compiled batch of 6); 5 at 512 and the largest
    # side keep theirs, however few.
    sides = [128, 192, 256, 384, 384, 384, 512, 512, 512, 512, 512, 768]
    assert faces.merge_sides(sides) == [384] * 6 + [512] * 5 + [768]
    assert faces.merge_sides([192, 768]) == [768, 768]
    assert faces.merge_sides([]) == []


def test_ensemble_plan_holds_every_members_chip(photo):
    # Two recognisers at once: one patch that holds both chips, each member's transform the
    # one `recognise` would use for that recogniser (same frame geometry, patch coordinates).
    from faceveil.models import registry

    _, lms = photo
    ens = registry.get("dlib,facenet")
    plan = faces.plan_faces(lms, np.ones(1, bool), ens)
    assert plan.m_chip.shape == (1, 2, 2, 3)
    for r, rec in enumerate(ens.members):
        single = faces.plan_faces(lms, np.ones(1, bool), rec)
        assert plan.size >= single.size
        in_frame = plan.m_chip[0, r].copy()
        in_frame[:, 2] += plan.offsets[0]
        want = single.m_chip[0].copy()
        want[:, 2] += single.offsets[0]
        np.testing.assert_allclose(in_frame, want, atol=1e-3)
        # The member's whole chip lies inside the patch (with the planning margin).
        s = rec.chip_size
        corners = np.array([[0, 0], [s, 0], [0, s], [s, s]], np.float32)
        pts = corners @ plan.m_chip[0, r, :, :2].T + plan.m_chip[0, r, :, 2]
        assert (pts >= 0).all() and (pts <= plan.size).all(), pts
