"""Face tracker: IoU / landmark matching, gaps, dense index arrays; a real multi-face video."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from faceveil.engine.pipeline import track as track_lib


@dataclasses.dataclass
class _Dets:
    """Per-frame detections in the detector's layout (boxes, scores, landmarks, valid)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    valid: np.ndarray


def _face(cx, cy, side):
    box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    unit = np.array([[-0.2, -0.1], [0.2, -0.1], [0.0, 0.05], [-0.15, 0.25], [0.15, 0.25]])
    return box, np.array([cx, cy]) + unit * side


def _dets(faces_per_frame, k=4):
    """Builds detections from per-frame lists of (slot, cx, cy, side)."""
    n = len(faces_per_frame)
    d = _Dets(np.zeros((n, k, 4)), np.zeros((n, k)), np.zeros((n, k, 5, 2)),
              np.zeros((n, k), bool))
    for f, faces in enumerate(faces_per_frame):
        for slot, cx, cy, side in faces:
            d.boxes[f, slot], d.landmarks[f, slot] = _face(cx, cy, side)
            d.scores[f, slot], d.valid[f, slot] = 0.99, True
    return d


def test_box_iou_known_values():
    # Hand-computed: identical boxes 1; half-overlapping unit squares 0.5/1.5 = 1/3; disjoint 0.
    a = np.array([[0, 0, 2, 2]])
    b = np.array([[0, 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(track_lib.box_iou(a, b), [[1.0, 1 / 3, 0.0]], atol=1e-12)


def test_two_moving_faces_with_slot_swaps_give_two_tracks():
    # Two faces drift right; the detector lists them in a different slot order every other
    # frame, so only geometry can link them.
    frames = []
    for f in range(10):
        a, b = (100 + 5 * f, 100, 60), (300 + 5 * f, 120, 50)
        frames.append([(0, *a), (1, *b)] if f % 2 == 0 else [(1, *a), (0, *b)])
    tr = track_lib.track(_dets(frames))
    assert tr.num_tracks == 2
    assert tr.mask.all()
    want = np.array([[0, 1] * 5, [1, 0] * 5])
    np.testing.assert_array_equal(tr.slots, want)
    assert tr.members(1)[:2] == [(0, 1), (1, 0)]
    np.testing.assert_array_equal(tr.lengths(), [10, 10])


def test_gap_within_max_gap_continues_and_longer_gap_starts_new_track():
    # Face A is missing in frames 3-4 (gap 2 <= max_gap 2): one track with a hole.
    # Face B is missing in frames 3-5 (gap 3 > 2): it comes back as a new track.
    frames = []
    for f in range(9):
        faces = []
        if f not in (3, 4):
            faces.append((0, 100 + 2 * f, 100, 60))
        if f not in (3, 4, 5):
            faces.append((1, 400, 200 + 2 * f, 60))
        frames.append(faces)
    tr = track_lib.track(_dets(frames), max_gap=2)
    assert tr.num_tracks == 3
    a = next(t for t in range(3) if tr.mask[t, 0] and tr.slots[t, 0] == 0)
    np.testing.assert_array_equal(tr.mask[a], [1, 1, 1, 0, 0, 1, 1, 1, 1])
    b_new = next(t for t in range(3) if not tr.mask[t, 0])
    np.testing.assert_array_equal(np.flatnonzero(tr.mask[b_new]), [6, 7, 8])
    # gather: dense per-track boxes with the fill where the track is absent.
    boxes = tr.gather(_dets(frames).boxes, fill=-1.0)
    assert boxes.shape == (3, 9, 4)
    np.testing.assert_array_equal(boxes[a, 3], [-1, -1, -1, -1])
    np.testing.assert_allclose(boxes[a, 5], _face(110, 100, 60)[0])


def test_fast_face_without_overlap_is_followed_by_landmarks_not_iou():
    # A face jumps 45 px per frame with side 60: consecutive boxes overlap by IoU
    # (15*60)/(2*3600-900) = 0.14 < 0.3, but the mean landmark distance is 45 / diag(84.9) = 0.53.
    frames = [[(0, 100 + 45 * f, 100, 60)] for f in range(4)]
    assert track_lib.track(_dets(frames), landmark_threshold=0.6).num_tracks == 1
    assert track_lib.track(_dets(frames), landmark_threshold=0.25).num_tracks == 4


def test_min_score_drops_weak_detections():
    d = _dets([[(0, 100, 100, 60), (1, 300, 100, 60)] for _ in range(3)])
    d.scores[:, 1] = 0.5
    assert track_lib.track(d).num_tracks == 2
    assert track_lib.track(d, min_score=0.9).num_tracks == 1


def test_no_faces_gives_no_tracks():
    tr = track_lib.track(_dets([[] for _ in range(5)]))
    assert tr.num_tracks == 0 and tr.slots.shape == (0, 5)


@pytest.mark.skipif(importlib.util.find_spec("faceveil.engine.pipeline.detect") is None,
                    reason="the MTCNN detector module faceveil.engine.pipeline.detect is not written yet")
def test_real_multi_face_photo_as_moving_video(data_dir):
    # A 10-frame synthetic video: the shared multi-face photo slowly translated and zoomed with
    # align.warp; every face the detector finds in frame 0 must be one unbroken track.
    import jax.numpy as jnp
    from PIL import Image

    from faceveil.engine.pipeline import align, detect

    img = np.asarray(Image.open(data_dir / "multi" / "kit_with_rose.jpg").convert("RGB"))
    img = img.astype(np.float32) / 255.0
    h, w = img.shape[:2]
    frames = []
    for f in range(10):
        s = 1.0 - 0.01 * f  # zoom in by 1% per frame, pan 3 px right / 1 px down per frame
        m = np.array([[s, 0, 3.0 * f], [0, s, 1.0 * f]], np.float32)
        frames.append(np.asarray(align.warp(jnp.asarray(img), m, (h, w))))
    video = (np.stack(frames) * 255).round().astype(np.uint8)
    dets = detect.detect(video)
    n0 = int(np.asarray(dets.valid)[0].sum())
    assert n0 >= 2, "the photo holds two faces"
    tr = track_lib.track(dets, min_score=0.9)
    full = tr.select(tr.lengths() == 10)
    assert full.num_tracks == n0
    # Output pixel u shows input point s*u + t, so a face centred at c in frame 0 (the photo
    # itself) is at (c - t_f) / s_f in frame f; MTCNN boxes jitter by a few pixels (tolerance 5).
    boxes = full.gather(np.asarray(dets.boxes))
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [tracks, 10, 2]
    f = np.arange(10)[:, None]
    want = (centre[:, :1] - np.concatenate([3.0 * f, 1.0 * f], 1)) / (1.0 - 0.01 * f)
    np.testing.assert_allclose(centre, want, atol=5.0)
