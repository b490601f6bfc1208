"""Mask keys on photos: protect = photo XOR key, restore = protected XOR key, and the key file.

`mask_images(images, recognisers=..., config=..., model=None)` runs the per-image mask method
(`faceveil.engine.methods.mask`), or a trained model's generator (`methods.mask_model`), on
every face of every photo through the one photo pipeline
(`photos.protect_photos`: all faces of a patch size in one compiled call); the pipeline XORs each
face's key into its photo, so the photo's key is protected XOR photo: uint8 [H, W, 3], each value
below 2^b, zero outside the faces' templates, on the photo's own pixel grid. Restoring is
`restore(protected, key)`, bit for bit, for any photo size and any number of faces.

Key file (`faceveil.engine.keyfile`, kind "mask": AES-GCM under a scrypt-derived key). Meta:
{"mask_format": 1, "bits": b, "recognisers": [...], "shape": [H, W, 3], "protected_sha256",
"faces", "source"}; array "key": the key's b bit planes, `np.packbits`, then zlib (the key is
zero outside the faces, so a photo's key costs little more than its faces). The digest is the
SHA-256 of the protected photo's decoded pixels (`pixel_sha256`): any pixel change is refused,
while a lossless re-encoding of the same pixels still restores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zlib

import jax
import numpy as np

from faceveil.engine import keyfile
from faceveil.engine.methods import mask, mask_model
from faceveil.engine.pipeline import photos, recognise

KIND = "mask"
MASK_FORMAT = 1
# Faces per compiled call: every face runs the same fixed number of steps, so lanes never wait
# for a slower one (unlike the cloak's early stop) and all faces of a patch size share a call.
MAX_LANES = 64


@dataclasses.dataclass
class MaskResult:
    """Protected photos, their keys, and the photo run's per-face records."""

    images: list  # uint8 [H, W, 3] protected photos
    keys: list  # uint8 [H, W, 3] keys (protected ^ photo), values < 2^bits
    photos: photos.PhotoResult  # the pipeline's run (faces, metrics, timings)
    recognisers: tuple[str, ...]
    bits: int


def method_for(recognisers: str, config: mask.MaskConfig, model=None):
    """Returns (method, params) against recognisers 'dlib', 'facenet' or 'dlib,facenet'.

    Per-image mode (`mask.MaskMethod`), or with a trained `mask_training.MaskModel` its
    generator (`mask_model.GeneratorMaskMethod`, b = config.bits). ValueError when the model
    was not trained for these recognisers.
    """
    rec, params = recognise.recogniser_params(recognisers)
    if model is None:
        return mask.MaskMethod(rec, config), params
    gcfg = mask_model.GeneratorConfig(model.config, bits=config.bits,
                                      rows=model.rows(recognisers))
    return (mask_model.GeneratorMaskMethod(rec, gcfg),
            {"recognisers": params, "model": jax.device_put(model.params)})


def mask_images(images: list[np.ndarray], *, recognisers: str = "dlib",
                config: mask.MaskConfig | None = None, seed: int = 0,
                min_face: float = 40.0, names=None, show_progress: bool = True,
                found=None, measure: bool = True, model=None) -> MaskResult:
    """Returns the MaskResult of protecting every face of every photo with a per-image key.

    Args:
      images: uint8 [H, W, 3] photos (sizes may differ).
      recognisers: comma-separated recogniser names; several superpose their templates.
      config: the mask key's settings (`mask.PRESETS`; default `mask.MaskConfig()`); with a
        model only its `bits` is used.
      seed: seed of the sensitivity probes and the keys' random start.
      min_face: faces smaller than this (pixels) are left alone.
      names, show_progress, found, measure: as `photos.protect_photos` takes them.
      model: a trained `mask_training.MaskModel` (None: the per-image mode).
    """
    config = config or mask.MaskConfig()
    method, params = method_for(recognisers, config, model)
    res = photos.protect_photos(
        images, method, params, key=jax.random.key(seed), min_face=min_face, names=names,
        show_progress=show_progress, found=found, measure=measure, lanes=MAX_LANES)
    keys = [np.bitwise_xor(p, np.asarray(x, np.uint8)) for p, x in zip(res.images, images)]
    return MaskResult(images=res.images, keys=keys, photos=res,
                      recognisers=tuple(r.name for r in _members(recognisers)),
                      bits=config.bits)


def _members(recognisers: str):
    from faceveil.models import registry

    return registry.members(registry.get(recognisers))


def restore(protected: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Returns the original photo: protected XOR key (uint8 [H, W, 3])."""
    return np.bitwise_xor(np.asarray(protected, np.uint8), np.asarray(key, np.uint8))


def pixel_sha256(image: np.ndarray) -> str:
    """Returns the hex SHA-256 of a uint8 photo's shape and pixels (what a key is bound to)."""
    image = np.ascontiguousarray(image, np.uint8)
    h = hashlib.sha256(("x".join(map(str, image.shape)) + ":").encode("ascii"))
    h.update(image.tobytes())
    return h.hexdigest()


def pack_key(key: np.ndarray, bits: int) -> np.ndarray:
    """Returns the key's `bits` bit planes packed (np.packbits) and zlib-compressed, as uint8.

    Raises ValueError when a key value needs more than `bits` bits.
    """
    key = np.asarray(key, np.uint8)
    if key.size and int(key.max()) >= 1 << bits:
        raise ValueError(f"the key has values of more than {bits} bits")
    planes = (key[None] >> np.arange(bits, dtype=np.uint8)[:, None, None, None]) & 1
    return np.frombuffer(zlib.compress(np.packbits(planes).tobytes(), 6), np.uint8)


def unpack_key(packed: np.ndarray, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Returns the uint8 key [shape] of `pack_key`'s output; ValueError if it does not fit."""
    raw = np.frombuffer(zlib.decompress(np.asarray(packed, np.uint8).tobytes()), np.uint8)
    count = bits * int(np.prod(shape))
    if raw.size != -(-count // 8):
        raise ValueError("packed key of the wrong size")
    planes = np.unpackbits(raw, count=count).reshape((bits,) + tuple(shape))
    weights = (1 << np.arange(bits, dtype=np.uint8))[:, None, None, None]
    return np.sum(planes * weights, axis=0, dtype=np.uint8)


def write_mask_key(path: str | os.PathLike, key: np.ndarray, protected: np.ndarray, *,
                   bits: int, recognisers, passphrase: str, source: str = "", faces: int = 0,
                   overwrite: bool = False, inputs=(), n: int = keyfile.SCRYPT_N):
    """Returns the path written: the encrypted key file of one protected photo."""
    meta = {"mask_format": MASK_FORMAT, "bits": int(bits), "recognisers": list(recognisers),
            "shape": list(np.shape(protected)), "protected_sha256": pixel_sha256(protected),
            "faces": int(faces), "source": source}
    return keyfile.write_key(path, KIND, meta, {"key": pack_key(key, bits)}, passphrase,
                             overwrite=overwrite, inputs=inputs, n=n)


def read_mask_key(path: str | os.PathLike, passphrase: str, protected: np.ndarray,
                  image_name: str = "the image") -> tuple[np.ndarray, dict]:
    """Returns (key uint8 [H, W, 3], meta) of the key file of `protected`.

    Raises:
      keyfile.KeyFileError: naming the key file: wrong passphrase, modified or damaged, another
        format, or the key of another image (shape or pixel SHA-256 differ from `protected`).
    """
    contents = keyfile.read_key(path, passphrase, kind=KIND)
    meta = contents.meta
    version = meta.get("mask_format")
    if version != MASK_FORMAT:
        raise keyfile.KeyFileError(path, f"has mask key format {version!r}; this faceveil "
                                         f"reads format {MASK_FORMAT}")
    shape = tuple(meta.get("shape", ()))
    if shape != tuple(np.shape(protected)) or meta.get("protected_sha256") != pixel_sha256(
            protected):
        raise keyfile.KeyFileError(path, f"is the key of another image, not of {image_name} "
                                         "(its pixels' SHA-256 differs from the one the key was "
                                         "made for; only the photo as written can be restored)")
    try:
        key = unpack_key(contents.arrays["key"], shape, int(meta["bits"]))
    except (KeyError, ValueError, zlib.error) as e:
        raise keyfile.KeyFileError(path, f"is damaged (unreadable key: {e})") from e
    return key, meta
