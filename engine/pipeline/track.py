"""Face tracking across video frames: greedy IoU / landmark-distance matching on the host.

Input is the detector's per-frame output (`faceveil.engine.pipeline.detect.Detections`, or any object
with `boxes [N, K, 4]` as (x1, y1, x2, y2) pixels, `landmarks [N, K, 5, 2]` and `valid [N, K]`).
Output is a `Tracks`: for every track the detection slot it uses in every frame (-1 where the
track has no face), as a dense [tracks, frames] array plus mask, ready to be gathered into the
per-track chains that `faceveil.engine.methods.cloak` runs side by side under `vmap`.

Matching, frame by frame: every live track is compared with every detection of the new frame by
the IoU of its last box and by the mean distance of the five landmarks divided by the box
diagonal (so the gate does not depend on face size). A pair is a candidate when the IoU reaches
`iou_threshold` or the normalised landmark distance is at most `landmark_threshold` (a fast
face whose boxes stop overlapping can still be followed by its landmarks); candidates are taken
greedily, highest IoU first. An unmatched detection starts a new track. A track that has not
been matched for more than `max_gap` frames ends; if the face returns later it starts a new
track (its cloak chain then cold-starts, which is the safe choice after a long absence).
This is plain numpy: tracking is a few hundred comparisons per video, not device work.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tracks:
    """Face tracks over a video.

    Attributes:
      slots: [num_tracks, num_frames] int32, the detection slot of the track in each frame,
        -1 where the track has no face.
      mask: [num_tracks, num_frames] bool, slots >= 0.
    """

    slots: np.ndarray
    mask: np.ndarray

    @property
    def num_tracks(self) -> int:
        """Returns the number of tracks."""
        return int(self.slots.shape[0])

    def members(self, track: int) -> list[tuple[int, int]]:
        """Returns the (frame index, detection slot) pairs of one track, in frame order."""
        frames = np.flatnonzero(self.mask[track])
        return [(int(f), int(self.slots[track, f])) for f in frames]

    def lengths(self) -> np.ndarray:
        """Returns [num_tracks] the number of frames in which each track has a face."""
        return self.mask.sum(axis=1)

    def select(self, keep: np.ndarray) -> Tracks:
        """Returns the tracks where `keep` ([num_tracks] bool or indices) selects them."""
        return Tracks(self.slots[keep], self.mask[keep])

    def gather(self, per_detection: np.ndarray, fill=0) -> np.ndarray:
        """Returns [num_tracks, num_frames, ...] of a per-detection array [N, K, ...].

        Frames where a track has no face get `fill`.
        """
        per_detection = np.asarray(per_detection)
        frames = np.arange(self.slots.shape[1])[None, :]
        out = per_detection[frames, np.maximum(self.slots, 0)]
        where = self.mask.reshape(self.mask.shape + (1,) * (out.ndim - 2))
        return np.where(where, out, np.asarray(fill, out.dtype))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Returns the [A, B] IoU of boxes a [A, 4] and b [B, 4], each (x1, y1, x2, y2)."""
    a = np.asarray(a, np.float64)[:, None, :]
    b = np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def landmark_distance(a_lm: np.ndarray, a_box: np.ndarray, b_lm: np.ndarray) -> np.ndarray:
    """Returns [A, B] mean landmark distance between faces, divided by the diagonal of a's box.

    Args:
      a_lm: [A, 5, 2] landmarks of the tracks' last faces.
      a_box: [A, 4] their boxes (the scale the distance is measured in).
      b_lm: [B, 5, 2] landmarks of the new detections.
    """
    d = np.linalg.norm(np.asarray(a_lm)[:, None] - np.asarray(b_lm)[None], axis=-1).mean(-1)
    diag = np.hypot(a_box[:, 2] - a_box[:, 0], a_box[:, 3] - a_box[:, 1])
    return d / np.maximum(diag, 1e-9)[:, None]


def track(detections, *, iou_threshold: float = 0.3, landmark_threshold: float = 0.25,
          max_gap: int = 5, min_score: float | None = None) -> Tracks:
    """Returns the Tracks that link a video's per-frame detections into face tracks.

    Args:
      detections: per-frame detections with boxes [N, K, 4], landmarks [N, K, 5, 2],
        valid [N, K] (and scores [N, K] when `min_score` is given).
      iou_threshold: smallest box IoU that links a detection to a track.
      landmark_threshold: largest mean landmark distance (as a fraction of the box diagonal)
        that links a detection to a track when the boxes overlap too little.
      max_gap: a track survives up to this many frames without a face; one more ends it.
      min_score: detections scoring below this are ignored (None: use `valid` only).
    """
    boxes = np.asarray(detections.boxes, np.float64)
    lms = np.asarray(detections.landmarks, np.float64)
    valid = np.asarray(detections.valid, bool)
    if min_score is not None:
        valid = valid & (np.asarray(detections.scores) >= min_score)
    n_frames = boxes.shape[0]

    rows: list[np.ndarray] = []  # one [n_frames] slot row per track
    last_frame: list[int] = []
    live: list[int] = []
    for f in range(n_frames):
        # A track last seen at frame l may be matched at f when the gap f - l - 1 <= max_gap.
        live = [t for t in live if f - last_frame[t] - 1 <= max_gap]
        dets = np.flatnonzero(valid[f])
        unmatched = set(dets.tolist())
        if live and dets.size:
            prev = np.array([rows[t][last_frame[t]] for t in live])
            prev_frames = np.array([last_frame[t] for t in live])
            prev_boxes = boxes[prev_frames, prev]
            iou = box_iou(prev_boxes, boxes[f, dets])
            lmd = landmark_distance(lms[prev_frames, prev], prev_boxes, lms[f, dets])
            cand = (iou >= iou_threshold) | (lmd <= landmark_threshold)
            ti, di = np.nonzero(cand)
            # Highest IoU first, closest landmarks breaking ties (and ordering the IoU-0 pairs).
            order = np.lexsort((lmd[ti, di], -iou[ti, di]))
            used_t: set[int] = set()
            for k in order:
                t, d = live[ti[k]], int(dets[di[k]])
                if t in used_t or d not in unmatched:
                    continue
                used_t.add(t)
                unmatched.discard(d)
                rows[t][f] = d
                last_frame[t] = f
        for d in sorted(unmatched):
            row = np.full(n_frames, -1, np.int32)
            row[f] = d
            rows.append(row)
            last_frame.append(f)
            live.append(len(rows) - 1)
    slots = np.stack(rows) if rows else np.zeros((0, n_frames), np.int32)
    return Tracks(slots=slots, mask=slots >= 0)
