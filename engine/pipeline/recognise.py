"""Face embeddings of whole photos: detect, align to the recogniser's template, embed."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.pipeline import align, image_io


class NoFaceError(image_io.InputError):
    """No face was found where one was needed."""


@functools.cache
def _embed_fn(name: str):
    from faceveil.models import registry

    rec = registry.get(name)
    template = jnp.asarray(rec.template, jnp.float32)

    @jax.jit
    def embed(params, frame, landmarks):
        chips = jax.vmap(lambda lm: align.extract_chip(
            frame, lm, template, rec.chip_size, rec.aspect))(landmarks)
        return rec.apply(params, chips)[0], chips

    return rec, embed


@functools.cache
def recogniser_params(name: str):
    """Returns the recogniser `name` and its params (loaded once per process)."""
    from faceveil.models import registry

    rec = registry.get(name)
    return rec, jax.device_put(rec.load_params())


def embed_faces(image: np.ndarray, landmarks: np.ndarray, model: str = "dlib"):
    """Returns (embeddings [K, D], chips [K, S, S, 3]) of faces with these landmarks [K, 5, 2].

    Args:
      image: uint8 [H, W, 3] RGB photo.
      landmarks: [K, 5, 2] landmarks in the photo (MTCNN order).
      model: recogniser name.
    """
    _, params = recogniser_params(model)
    _, embed = _embed_fn(model)
    frame = image_io.to_float(image)
    emb, chips = embed(params, jnp.asarray(frame), jnp.asarray(landmarks, jnp.float32))
    return np.asarray(emb), np.asarray(chips)


PHOTO_MAX_SIDE = 1280
PHOTO_BUCKET = 160


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


def largest_face(image: np.ndarray, *, min_score: float = 0.9, source: str = "image"):
    """Returns (box [4], landmarks [5, 2], score) of the largest detected face of a photo.

    Raises:
      NoFaceError: naming `source` when no face scores at least `min_score`.
    """
    boxes, scores, lms, valid = detect_photo(image)
    ok = valid & (scores >= min_score)
    if not ok.any():
        raise NoFaceError(source, f"no face found (score >= {min_score})")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = int(np.argmax(np.where(ok, area, -np.inf)))
    return boxes[k], lms[k], float(scores[k])


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def photo_gallery(paths, model: str = "dlib", *, skip_faceless: bool = False):
    """Returns (identities [N] str, embeddings [N, D]) of the largest face of each photo.

    The identity of a photo is its parent folder's name (faces/<name>/x.jpg); a folder argument
    stands for every .jpg/.jpeg/.png under it. A photo without a face is a NoFaceError naming
    it, or is skipped with `skip_faceless`.
    """
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in PHOTO_SUFFIXES)
        else:
            files.append(p)
    names, embs = [], []
    for f in files:
        image = image_io.read_image(f)
        try:
            _, lms, _ = largest_face(image, source=str(f))
        except NoFaceError:
            if skip_faceless:
                continue
            raise
        names.append(f.parent.name)
        embs.append(embed_faces(image, lms[None], model)[0][0])
    return np.asarray(names, dtype=str), np.asarray(embs, np.float32).reshape(len(embs), -1)
