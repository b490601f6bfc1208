"""Does a cloak work against a recogniser that knows the person? The attacker's view of a video.

The per-frame protection the optimiser reports compares a cloaked face with the same frame's
clean face, through the landmarks the cloak was made with. An attacker does neither: it runs
its own detector on the published (cloaked, rounded, composited) frames, aligns with the
landmarks *it* finds, and compares the embedding with what it already knows of the person:
clean photos, or clean frames of the same person from elsewhere. This module measures that.

For every tracked face of the clean video it finds the attacker's face in the cloaked frame
(the detection with the highest box IoU, at least `min_iou`; a face the detector misses
counts as protected and is counted apart), embeds it, and measures its distance to
  * `centroid`: the mean clean embedding of the track's *other* frames (leave-one-out), the
    enrolment template a recogniser would build from the rest of the footage;
  * `nearest_frame`: the nearest clean embedding among the track's other frames (the
    strictest gallery: it contains near-duplicates of the frame itself);
  * `photo`: the nearest photo of the identity the track's clean faces match (a labelled
    gallery, e.g. ../shared/data/faces); tracks whose clean centroid matches no photo within
    the threshold have no photo figure.
A face counts as protected against a reference when that distance exceeds the recogniser's
threshold (dlib 0.6). `fraction_protected` is per reference; `all` needs every reference.
"""

from __future__ import annotations

import numpy as np

from faceveil.engine.pipeline import faces, recognise, track

REFERENCES = ("centroid", "nearest_frame", "photo")


def attacker_landmarks(detections: dict, boxes: np.ndarray, mask: np.ndarray, *,
                       min_iou: float = 0.3, min_score: float = 0.9):
    """Returns (landmarks [C, T, 5, 2], found [C, T]) of the attacker's detections.

    Args:
      detections: the detector's output on the cloaked frames, numpy {boxes [T, K, 4],
        landmarks [T, K, 5, 2], valid [T, K], scores [T, K]}.
      boxes: [C, T, 4] the clean tracked faces' boxes.
      mask: [C, T] where the clean tracks have a face.
      min_iou: the attacker's face is the detection overlapping the clean box most, if at
        least this much.
      min_score: detections scoring below this are not faces.
    """
    c, t = mask.shape
    lms = np.zeros((c, t, 5, 2), np.float32)
    found = np.zeros((c, t), bool)
    for f in range(t):
        ok = np.flatnonzero(detections["valid"][f] & (detections["scores"][f] >= min_score))
        faces = np.flatnonzero(mask[:, f])
        if not ok.size or not faces.size:
            continue
        iou = track.box_iou(boxes[faces, f], detections["boxes"][f, ok])
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(faces)), best] >= min_iou
        lms[faces[hit], f] = detections["landmarks"][f, ok[best[hit]]]
        found[faces[hit], f] = True
    return lms, found


def reference_distances(clean: np.ndarray, attacked: np.ndarray, found: np.ndarray,
                        mask: np.ndarray, gallery=None, threshold: float = 0.6) -> dict:
    """Returns {reference: [C, T] distances (NaN where not measured)} and the photo identities.

    Args:
      clean: [C, T, D] clean embeddings of the tracked faces.
      attacked: [C, T, D] embeddings of the attacker's faces in the cloaked frames.
      found: [C, T] the attacker found the face.
      mask: [C, T] the clean track has a face.
      gallery: optional (identities [N], embeddings [N, D]) of labelled clean photos.
      threshold: the recogniser's same-person distance (to match a track to a photo identity).
    """
    c, t = mask.shape
    out = {r: np.full((c, t), np.nan, np.float32) for r in REFERENCES}
    identities: list[str | None] = []
    for i in range(c):
        frames = np.flatnonzero(mask[i])
        if not frames.size:  # a track the attacker never saw (e.g. its detector missed it)
            identities.append(None)
            continue
        e_clean = clean[i, frames].astype(np.float64)
        e_att = attacked[i, frames].astype(np.float64)
        n = len(frames)
        who = None
        if gallery is not None and len(gallery[0]):
            names, g = gallery
            d_g = np.linalg.norm(g - e_clean.mean(0), axis=1)
            if d_g.min() < threshold:
                who = str(names[d_g.argmin()])
                same = g[names == who].astype(np.float64)
                d_photo = np.linalg.norm(e_att[:, None] - same[None], axis=-1).min(axis=1)
                out["photo"][i, frames] = d_photo
        identities.append(who)
        if n < 2:  # no other frame to compare with
            continue
        loo = (e_clean.sum(0)[None] - e_clean) / (n - 1)
        out["centroid"][i, frames] = np.linalg.norm(e_att - loo, axis=1)
        pair = np.linalg.norm(e_att[:, None] - e_clean[None], axis=-1)
        np.fill_diagonal(pair, np.inf)
        out["nearest_frame"][i, frames] = pair.min(axis=1)
    for r in REFERENCES:
        # A face the attacker's detector missed is protected against every reference the
        # track has (its embedding there is NaN; a track without that reference stays NaN).
        has_ref = ~np.isnan(np.where(mask & found, out[r], np.nan)).all(axis=1, keepdims=True)
        out[r] = np.where(mask & ~found & has_ref, np.inf, out[r])
    return out, identities


def summarise(distances: dict, found: np.ndarray, mask: np.ndarray, threshold: float) -> dict:
    """Returns JSON-ready fractions of faces farther than `threshold` from each reference."""
    out = {"threshold": threshold, "faces": int(mask.sum()),
           "attacker_missed_face": int((mask & ~found).sum())}
    every = np.ones(mask.shape, bool)
    for r, d in distances.items():
        have = mask & ~np.isnan(d)
        if not have.any():
            out[r] = None
            continue
        finite = d[have & np.isfinite(d)]
        out[r] = {"faces": int(have.sum()),
                  "fraction_protected": float((d[have] > threshold).mean()),
                  "mean_distance": float(finite.mean()) if finite.size else None,
                  "min_distance": float(finite.min()) if finite.size else None}
        every &= np.where(have, d > threshold, True)
    out["fraction_protected_all"] = float(every[mask].mean()) if mask.any() else None
    return out


def evaluate(clean_frames: np.ndarray, cloaked_frames: np.ndarray, landmarks: np.ndarray,
             boxes: np.ndarray, mask: np.ndarray, *, model: str = "dlib", gallery=None,
             detections: dict | None = None, clean: np.ndarray | None = None,
             min_score: float = 0.9) -> dict:
    """Returns the attacker's-view summary (module docstring) of one cloaked video.

    Args:
      clean_frames, cloaked_frames: uint8 [T, H, W, 3] before and after cloaking.
      landmarks, boxes: [C, T, 5, 2], [C, T, 4] the clean tracks' faces.
      mask: [C, T] where the tracks have a face.
      model: the recogniser the attacker uses.
      gallery: optional labelled photos, as `recognise.photo_gallery` returns them.
      detections: the detector's output on `cloaked_frames` (computed when None; pass it to
        evaluate several models on one detection pass).
      clean: `track_embeddings` of the clean faces for `model` (computed when None; pass it
        to evaluate several cloaked versions of one video).
    """
    from faceveil.models import registry

    rec = registry.get(model)
    if detections is None:
        detections = detect_frames(cloaked_frames, min_score=min_score)
    att_lms, found = attacker_landmarks(detections, boxes, mask, min_score=min_score)
    if clean is None:
        clean = recognise.track_embeddings(clean_frames, landmarks, mask, model)
    attacked = recognise.track_embeddings(cloaked_frames, att_lms, mask & found, model)
    dist, who = reference_distances(clean, attacked, found, mask, gallery, rec.threshold)
    return summarise(dist, found, mask, rec.threshold) | {
        "model": model, "track_identities": who}


def detect_frames(frames: np.ndarray, *, chunk: int = 16, min_score: float = 0.9) -> dict:
    """Returns the detector's numpy output {boxes, landmarks, valid, scores} on frames."""
    return faces.detect_frames(frames, chunk=chunk, min_score=min_score, min_face=0.0)
