"""The attacker's view of a cloaked video: references, matching, fractions (faceveil.engine.attacks.protection)."""

from __future__ import annotations

import numpy as np
import pytest

from faceveil.engine.attacks import protection
from faceveil.engine.pipeline import recognise


def _unit(v):
    return v / np.linalg.norm(v)


def test_reference_distances_by_hand():
    rng = np.random.default_rng(0)
    d = 8
    c, t = 2, 4
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    clean = rng.normal(size=(c, t, d)).astype(np.float32)
    attacked = clean + 0.5
    found = mask.copy()
    found[1, 1] = False  # the attacker's detector missed this face
    g_emb = np.stack([clean[0, :3].mean(0) + 0.01, rng.normal(size=d) + 10.0])
    gallery = (np.array(["alice", "bob"]), g_emb.astype(np.float32))
    dist, who = protection.reference_distances(clean, attacked, found, mask, gallery,
                                               threshold=0.6)
    # Leave-one-out centroid of track 0 at frame 1: mean of frames 0 and 2.
    want = np.linalg.norm(attacked[0, 1] - clean[0, [0, 2]].mean(0))
    np.testing.assert_allclose(dist["centroid"][0, 1], want, rtol=1e-5)
    want = min(np.linalg.norm(attacked[0, 1] - clean[0, 0]),
               np.linalg.norm(attacked[0, 1] - clean[0, 2]))
    np.testing.assert_allclose(dist["nearest_frame"][0, 1], want, rtol=1e-5)
    # Track 0's clean centroid is alice's photo (0.01 * sqrt(8) away); track 1 matches nobody.
    assert who == ["alice", None]
    np.testing.assert_allclose(dist["photo"][0, 2], np.linalg.norm(attacked[0, 2] - g_emb[0]),
                               rtol=1e-5)
    assert np.isnan(dist["photo"][1]).all()
    assert np.isnan(dist["centroid"][0, 3])  # no face there
    assert np.isinf(dist["centroid"][1, 1])  # missed by the attacker: protected

    s = protection.summarise(dist, found, mask, threshold=0.6)
    assert s["faces"] == 5 and s["attacker_missed_face"] == 1
    cen = dist["centroid"][mask]
    assert s["centroid"]["fraction_protected"] == pytest.approx((cen > 0.6).mean())
    assert s["photo"]["faces"] == 3  # only track 0 has a photo identity


def test_attacker_landmarks_take_the_best_overlap_above_min_iou():
    boxes = np.array([[[10, 10, 50, 50]], [[100, 100, 140, 140]]], np.float32)  # [C=2, T=1]
    mask = np.ones((2, 1), bool)
    det = {"boxes": np.array([[[12, 12, 52, 52], [0, 0, 5, 5], [300, 300, 340, 340]]],
                             np.float32),
           "landmarks": np.arange(3 * 10, dtype=np.float32).reshape(1, 3, 5, 2),
           "valid": np.array([[True, True, True]]), "scores": np.array([[0.99, 0.99, 0.5]])}
    lms, found = protection.attacker_landmarks(det, boxes, mask)
    assert found.tolist() == [[True], [False]]  # track 1 overlaps no confident detection
    np.testing.assert_array_equal(lms[0, 0], det["landmarks"][0, 0])


def test_photo_gallery_names_identities_by_folder(data_dir):
    names, embs = recognise.photo_gallery([data_dir / "faces" / "kit_harington",
                                           data_dir / "faces" / "biden" / "biden1.jpg"])
    assert names.tolist() == ["kit_harington"] * 3 + ["biden"]
    assert embs.shape == (4, 128)
    d = np.linalg.norm(embs[:, None] - embs[None], axis=-1)
    assert d[:3, :3].max() < 0.6 < d[3, :3].min()  # dlib: same person within its threshold


def test_clean_video_is_not_protected(data_dir):
    """The clean clip against its own references: nearly every face is recognised."""
    from faceveil.engine.pipeline import faces, video_io

    clip = video_io.read_video(data_dir / "video" / "hamilton_clip.mp4", limit=16)
    det = protection.detect_frames(clip)
    found = faces.track_faces(det)
    tr, lms, boxes = found.tracks, found.landmarks, found.boxes
    gallery = recognise.photo_gallery([data_dir / "faces" / "lin_manuel_miranda"])
    s = protection.evaluate(clip, clip, lms, boxes, tr.mask, gallery=gallery, detections=det)
    assert s["attacker_missed_face"] == 0
    assert s["centroid"]["fraction_protected"] == 0.0
    # One photo is a weaker reference than the track's own frames: these 16 real frames of a
    # moving, talking face sit 0.52-0.64 from Lin-Manuel Miranda's photo (dlib's threshold is
    # 0.6), so some clean frames already pass it; on average the clean face is recognised.
    assert s["photo"] is not None and s["photo"]["mean_distance"] < 0.6
    assert s["photo"]["fraction_protected"] <= 0.5
