"""The one host face pipeline every method shares: find faces, plan them for a recogniser, batch.

    find      `detect_photo` / `find_photo_faces` (one photo, any size, a few compiled shapes)
              `detect_frames` + `track_faces` (chunked detection, score and size filters,
              tracks across frames)
    plan      `chip_transforms` (the one alignment path: template, chip size and aspect of the
              recogniser) and `plan_faces` (a patch of real frame pixels around each face, with
              the chip transform in patch pixels)
    batch     `crop_patches`, `batch_bucket` / `lane_count` (pad to a few compiled shapes)
    paste     `paste_patches` (add each face's change back into its frame)

`faceveil.engine.pipeline.recognise` embeds faces through `chip_transforms`, and every method
optimises the chip `warp(patch, plan.m_chip)`, so what a method changes is exactly what the
recogniser it is judged by sees (a test checks this for every recogniser).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.pipeline import align, image_io, track, video_io

PATCH_BUCKETS = (128, 192, 256, 384, 512, 768)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Optimised faces: a padded lane costs a whole face's work at every iteration (a recogniser's
# forward needs far less), so the steps are finer: at most a third of the lanes are padding.
SOLVE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LANE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PHOTO_MAX_SIDE = 1280
PHOTO_BUCKET = 160


def batch_bucket(n: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """Returns the padded batch size for n items: a bucket, or a multiple of the largest."""
    return next((b for b in buckets if b >= n), -(-n // buckets[-1]) * buckets[-1])


def lane_count(n: int) -> int:
    """Returns the padded lane count for n chains: a bucket, or a multiple of 64."""
    return batch_bucket(n, LANE_BUCKETS)


# ----------------------------------------------------------------------------------------------
# Find


@dataclasses.dataclass(frozen=True)
class PhotoFaces:
    """The faces of one photo that a method will protect, and those left alone."""

    boxes: np.ndarray  # [F, 4] float32 (x1, y1, x2, y2) photo pixels
    scores: np.ndarray  # [F]
    landmarks: np.ndarray  # [F, 5, 2] photo pixels
    small: int  # faces found but smaller than min_face (left alone)


def detect_photo(image: np.ndarray, *, max_side: int = PHOTO_MAX_SIDE,
                 bucket: int = PHOTO_BUCKET):
    """Returns (boxes [K, 4], scores [K], landmarks [K, 5, 2], valid [K]) of one photo.

    Photos come in every size and each size would compile its own detector: a photo is scaled
    down so its longer side is at most `max_side`, padded with black to a multiple of `bucket`
    on each side, detected, and the boxes and landmarks are mapped back to its own pixels. A
    few compiled shapes then serve any set of photos.
    """
    from PIL import Image

    from faceveil.engine.pipeline.detect import detect

    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        small = np.asarray(Image.fromarray(image).resize(
            (max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    else:
        small = image
    sh, sw = small.shape[:2]
    ph, pw = -(-sh // bucket) * bucket, -(-sw // bucket) * bucket
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:sh, :sw] = small
    det = detect(padded[None])
    sx, sy = sw / w, sh / h
    boxes = np.asarray(det.boxes[0]) / np.array([sx, sy, sx, sy], np.float32)
    lms = np.asarray(det.landmarks[0]) / np.array([sx, sy], np.float32)
    return boxes, np.asarray(det.scores[0]), lms, np.asarray(det.valid[0])


def box_side(boxes: np.ndarray) -> np.ndarray:
    """Returns the shorter side of boxes [..., 4]."""
    return np.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])


def find_photo_faces(image: np.ndarray, *, min_score: float = 0.9,
                     min_face: float = 40.0) -> PhotoFaces:
    """Returns the PhotoFaces of one photo: faces scoring >= min_score, at least min_face px."""
    boxes, scores, lms, valid = detect_photo(image)
    ok = valid & (scores >= min_score)
    big = ok & (box_side(boxes) >= min_face)
    return PhotoFaces(boxes=boxes[big], scores=scores[big], landmarks=lms[big],
                      small=int((ok & ~big).sum()))


@dataclasses.dataclass(frozen=True)
class VideoFaces:
    """Detections of every frame of a video and the tracks that link them.

    `detections` holds numpy arrays [T, K, ...]: boxes, landmarks, scores, valid (after the
    score and size filters) and small (faces found but under min_face, left alone).
    """

    detections: dict
    tracks: track.Tracks

    @property
    def num_frames(self) -> int:
        """Returns the number of frames."""
        return int(self.detections["boxes"].shape[0])

    @property
    def boxes(self) -> np.ndarray:
        """Returns [C, T, 4] the tracked faces' boxes (0 where a track has no face)."""
        return self.tracks.gather(self.detections["boxes"])

    @property
    def landmarks(self) -> np.ndarray:
        """Returns [C, T, 5, 2] the tracked faces' landmarks (0 where a track has no face)."""
        return self.tracks.gather(self.detections["landmarks"])


class _Dets:
    """Detections-like view of the numpy detection dict (what `track.track` reads)."""

    def __init__(self, det):
        self.boxes, self.landmarks = det["boxes"], det["landmarks"]
        self.valid, self.scores = det["valid"], det["scores"]


def source_name(source) -> str:
    """Returns a printable name of a video source (a path, or '<frames>' for an array)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else "<frames>"


def iter_frames(source, size: int, start: int = 0, limit: int | None = None):
    """Yields uint8 chunks [<=size, H, W, 3] of a video path or a frame array, from `start`."""
    if isinstance(source, np.ndarray):
        end = source.shape[0] if limit is None else min(limit, source.shape[0])
        for t in range(start, end, size):
            yield source[t:min(t + size, end)]
    else:
        left = None if limit is None else max(limit - start, 0)
        yield from video_io.iter_chunks(source, size, start=start, limit=left)


def detect_frames(source, *, chunk: int = 16, min_score: float = 0.9, min_face: float = 0.0,
                  max_frames: int | None = None,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Returns numpy detections {boxes, landmarks, scores, valid, small} of a whole video.

    Frames are decoded and detected `chunk` at a time (the last chunk padded by repeating its
    last frame, so one compiled shape serves the video). `valid` keeps faces scoring at least
    `min_score` with a box side of at least `min_face`; `small` marks the smaller ones.
    """
    from faceveil.engine.pipeline.detect import detect

    parts, done = [], 0
    for frames in iter_frames(source, chunk, 0, max_frames):
        n = frames.shape[0]
        if n < chunk:
            frames = np.concatenate([frames, np.repeat(frames[-1:], chunk - n, 0)])
        det = detect(frames)
        parts.append({k: np.asarray(v)[:n] for k, v in det._asdict().items()})
        done += n
        if progress:
            progress(done)
    if not parts:
        raise image_io.InputError(source_name(source), "no frames could be decoded")
    det = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ok = det["valid"] & (det["scores"] >= min_score)
    side = box_side(det["boxes"])
    det["small"] = ok & (side < min_face)
    det["valid"] = ok & (side >= min_face)
    return det


def track_faces(detections: dict) -> VideoFaces:
    """Returns the VideoFaces of per-frame detections (as `detect_frames` returns them)."""
    return VideoFaces(dict(detections), track.track(_Dets(detections)))


# ----------------------------------------------------------------------------------------------
# Plan


@functools.partial(jax.jit, static_argnames="aspect")
def _chip_transforms(landmarks, template, aspect):
    return jax.vmap(align.chip_transform, (0, None, None))(landmarks, template, aspect)


def chip_transforms(landmarks: np.ndarray, recogniser) -> np.ndarray:
    """Returns [N, 2, 3] chip pixels -> frame pixels of faces with landmarks [N, 5, 2].

    The one alignment path: the recogniser's template, fitted with its aspect (FaceNet's chips
    squash a 1.26x taller region), so every method and `recognise` see the same chip.
    """
    lms = jnp.asarray(np.asarray(landmarks, np.float32).reshape(-1, 5, 2))
    return np.asarray(_chip_transforms(lms, jnp.asarray(recogniser.template, jnp.float32),
                                       float(recogniser.aspect)))


@dataclasses.dataclass(frozen=True)
class FacePlan:
    """Where one face (or one track's faces, frame by frame) sits as a patch of real pixels."""

    size: int  # patch side P
    offsets: np.ndarray  # [T, 2] int32 patch top-left (x, y) in frame pixels
    landmarks: np.ndarray  # [T, 5, 2] float32 landmarks in patch pixels
    m_chip: np.ndarray  # [T, 2, 3] float32 chip pixels -> patch pixels ([T, R, 2, 3]: one per
    #                     member of an ensemble of R recognisers, `registry.Ensemble`)
    present: np.ndarray  # [T] bool


def plan_faces(landmarks: np.ndarray, present: np.ndarray, recogniser, *, margin: float = 0.15,
               buckets: tuple[int, ...] = PATCH_BUCKETS, size: int | None = None) -> FacePlan:
    """Returns the FacePlan of a track (or of one face, T = 1): one patch side for all frames.

    The patch side is the smallest bucket that holds every frame's chip footprint (the
    axis-aligned box of the rotated, scaled chip, aspect included) enlarged by `margin`; a
    face larger than the largest bucket gets the largest bucket (the chip then samples 0 past
    the patch edge). Each patch is centred on the chip centre at an integer offset, so a
    method's change lands on real frame pixels.

    Args:
      landmarks: [T, 5, 2] frame-pixel landmarks (any value where not present).
      present: [T] bool.
      recogniser: a `faceveil.models.registry.Recogniser` (template, chip_size, aspect), or an
        `Ensemble` (the patch holds every member's chip; m_chip [T, R, 2, 3]).
      margin: fraction added to the footprint's side.
      buckets: allowed patch sides, ascending.
      size: force this patch side instead of choosing a bucket.
    """
    from faceveil.models import registry

    landmarks = np.asarray(landmarks, np.float32)
    present = np.asarray(present, bool)
    safe = np.where(present[:, None, None], landmarks, landmarks[present][:1]
                    if present.any() else np.zeros((1, 5, 2), np.float32))
    recs = registry.members(recogniser)
    ms = [chip_transforms(safe, r) for r in recs]
    # Footprint of each member's chip square: the images of its two edge vectors, (s, 0) and
    # (0, s); the patch holds every member's chip.
    footprint = np.zeros(len(safe), np.float32)
    for m, r in zip(ms, recs):
        ex, ey = m[:, :, 0] * r.chip_size, m[:, :, 1] * r.chip_size
        footprint = np.maximum(footprint, np.maximum(np.abs(ex[:, 0]) + np.abs(ey[:, 0]),
                                                     np.abs(ex[:, 1]) + np.abs(ey[:, 1])))
    footprint = footprint * (1.0 + margin)
    if size is None:
        need = footprint[present].max() if present.any() else buckets[0]
        size = next((b for b in buckets if b >= need), buckets[-1])
    m, c = ms[0], (recs[0].chip_size - 1) / 2.0  # centred on the primary chip's centre
    centre = m[:, :, 0] * c + m[:, :, 1] * c + m[:, :, 2]
    offsets = np.round(centre - (size - 1) / 2.0).astype(np.int32)
    m_patch = np.stack(ms, axis=1)  # [T, R, 2, 3]
    m_patch[..., 2] -= offsets[:, None, :]
    if len(recs) == 1:
        m_patch = m_patch[:, 0]
    return FacePlan(size=int(size), offsets=offsets,
                    landmarks=(safe - offsets[:, None, :]).astype(np.float32),
                    m_chip=m_patch.astype(np.float32), present=present)


# ----------------------------------------------------------------------------------------------
# Batch and paste


def merge_sides(sides: list[int], min_group: int = 4) -> list[int]:
    """Returns the patch side each face is solved at: small groups join the next larger side.

    Every distinct side is one compilation (tens of seconds on a CPU) and a padded batch: a
    group of fewer than `min_group` faces is solved in the next larger side's batch instead
    (a larger patch only costs its pixel-wise work; the recogniser still sees its own chip).
    The largest side keeps its faces, however few.
    """
    counts = {s: sides.count(s) for s in sorted(set(sides))}
    target, carried = {}, []
    order = list(counts)
    for k, side in enumerate(order):
        carried.append(side)
        total = sum(counts[s] for s in carried)
        if total >= min_group or k == len(order) - 1:
            target.update({s: side for s in carried})
            carried = []
    return [target[s] for s in sides]



def crop_patches(frames: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Returns [T, size, size, C] patches of frames [T, H, W, C] at offsets, 0 outside."""
    frames = np.asarray(frames)
    t, h, w = frames.shape[:3]
    out = np.zeros((t, size, size) + frames.shape[3:], frames.dtype)
    for i, (x, y) in enumerate(np.asarray(offsets)):
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x1 > x0 and y1 > y0:
            out[i, y0 - y:y1 - y, x0 - x:x1 - x] = frames[i, y0:y1, x0:x1]
    return out


def paste_patches(frames: np.ndarray, clean: np.ndarray, protected: np.ndarray,
                  offsets: np.ndarray, present: np.ndarray, *,
                  combine: str = "add") -> np.ndarray:
    """Returns uint8 frames with each present face's change (protected - clean) added in place.

    Adding the difference rather than writing the patch keeps every face's change where two
    patches overlap (one face's margin over another face). `combine="xor"` XORs each face's
    change (protected ^ clean, a key) into the frame instead: keys of overlapping faces then
    compose into one key, and frame ^ key restores the frame bit for bit (mask templates).
    """
    if combine == "xor":
        out = np.array(frames, np.uint8, copy=True)
        h, w = out.shape[1:3]
        size = clean.shape[1]
        keys = np.asarray(protected, np.uint8) ^ np.asarray(clean, np.uint8)
        for i, (x, y) in enumerate(np.asarray(offsets)):
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
            if present[i] and x1 > x0 and y1 > y0:
                out[i, y0:y1, x0:x1] ^= keys[i, y0 - y:y1 - y, x0 - x:x1 - x]
        return out
    if combine != "add":
        raise ValueError(f"combine must be 'add' or 'xor', got {combine!r}")
    out = np.asarray(frames).astype(np.int16)
    h, w = out.shape[1:3]
    size = clean.shape[1]
    diff = protected.astype(np.int16) - clean.astype(np.int16)
    for i, (x, y) in enumerate(np.asarray(offsets)):
        if not present[i]:
            continue
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x1 > x0 and y1 > y0:
            out[i, y0:y1, x0:x1] += diff[i, y0 - y:y1 - y, x0 - x:x1 - x]
    return np.clip(out, 0, 255).astype(np.uint8)


def pad_batch(a: np.ndarray, n: int) -> np.ndarray:
    """Returns a [n, ...] with the rows past a's length repeating its first row."""
    a = np.asarray(a)
    return np.concatenate([a, np.repeat(a[:1], n - a.shape[0], 0)]) if n > a.shape[0] else a
