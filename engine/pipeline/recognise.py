"""Face embeddings of whole photos: detect, align to the recogniser's template, embed."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine.pipeline import align, faces, image_io


class NoFaceError(image_io.InputError):
    """No face was found where one was needed."""


FRAME_BUCKET = 256


@functools.cache
def _embed_fn(name: str):
    from faceveil.models import registry

    rec = registry.get(name)

    @jax.jit
    def embed(params, frame, m_chip):
        chips = jax.vmap(lambda m: align.warp(frame, m, (rec.chip_size, rec.chip_size)))(m_chip)
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
    rec, embed = _embed_fn(model)
    m_chip = faces.chip_transforms(landmarks, rec)  # the one alignment path (pipeline.faces)
    k = m_chip.shape[0]
    # A few compiled shapes serve every photo: the frame is padded with black to a multiple of
    # FRAME_BUCKET per side (the warp samples 0 outside the frame anyway, so the chips are the
    # same) and the faces to a batch bucket.
    frame = image_io.to_float(image)
    h, w = frame.shape[:2]
    frame = np.pad(frame, ((0, -(-h // FRAME_BUCKET) * FRAME_BUCKET - h),
                           (0, -(-w // FRAME_BUCKET) * FRAME_BUCKET - w), (0, 0)))
    m_pad = faces.pad_batch(m_chip, faces.batch_bucket(k))
    emb, chips = embed(params, jnp.asarray(frame), jnp.asarray(m_pad))
    return np.asarray(emb)[:k], np.asarray(chips)[:k]


def track_embeddings(frames: np.ndarray, landmarks: np.ndarray, mask: np.ndarray,
                     model: str = "dlib") -> np.ndarray:
    """Returns [C, T, D] embeddings of the tracked faces (NaN where a track has no face).

    Args:
      frames: uint8 [T, H, W, 3].
      landmarks: [C, T, 5, 2] frame-pixel landmarks of the C tracks.
      mask: [C, T] bool, where the tracks have a face.
      model: recogniser name.
    """
    out = None
    for t in range(frames.shape[0]):
        faces = np.flatnonzero(mask[:, t])
        if not faces.size:
            continue
        emb, _ = embed_faces(frames[t], landmarks[faces, t], model)
        if out is None:
            out = np.full(mask.shape + (emb.shape[1],), np.nan, np.float32)
        out[faces, t] = emb
    return out if out is not None else np.full(mask.shape + (1,), np.nan, np.float32)


def largest_face(image: np.ndarray, *, min_score: float = 0.9, source: str = "image"):
    """Returns (box [4], landmarks [5, 2], score) of the largest detected face of a photo.

    Raises:
      NoFaceError: naming `source` when no face scores at least `min_score`.
    """
    boxes, scores, lms, valid = faces.detect_photo(image)
    ok = valid & (scores >= min_score)
    if not ok.any():
        raise NoFaceError(source, f"no face found (score >= {min_score})")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    k = int(np.argmax(np.where(ok, area, -np.inf)))
    return boxes[k], lms[k], float(scores[k])


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def photo_files(paths) -> list[Path]:
    """Returns the photos of `paths`: files as given, folders as every photo under them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*")
                            if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        else:
            files.append(p)
    return files


def photo_gallery(paths, model: str = "dlib", *, skip_faceless: bool = False):
    """Returns (identities [N] str, embeddings [N, D]) of the largest face of each photo.

    The identity of a photo is its parent folder's name (faces/<name>/x.jpg); a folder argument
    stands for every .jpg/.jpeg/.png under it. A photo without a face is a NoFaceError naming
    it, or is skipped with `skip_faceless`.
    """
    names, embs = [], []
    for f in photo_files(paths):
        image = image_io.read_image(f)
        try:
            _, lms, _ = largest_face(image, source=str(f))
        except NoFaceError:
            if skip_faceless:
                continue
            raise
        names.append(f.parent.name)
        embs.append(embed_faces(image, lms[None], model)[0][0])
    if not embs:  # no photo with a face: an empty gallery of the recogniser's width
        from faceveil.models import registry

        return np.zeros(0, str), np.zeros((0, registry.get(model).embed_dim), np.float32)
    return np.asarray(names, dtype=str), np.asarray(embs, np.float32)
