"""PMT on photos (DESIGN.md method 4): every face of every photo obfuscated for an authorised
service, through the shared photo pipeline (`photos.protect_photos` with `methods.pmt`).

`pmt_images(images, authorised="dlib")` returns, per face, the obfuscated aligned chip x~
(image upload), the photo with the face's chip region replaced by x~, and the authorised
recognisers' cut features of x~ (feature upload: what the service's deeper layers finish with
`Recogniser.rest`). `write_outputs` writes them for the CLI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from faceveil.engine.methods import pmt
from faceveil.engine.pipeline import image_io, photos, recognise
from faceveil.models import registry


@dataclasses.dataclass
class PmtResult:
    """What a PMT run produced, per photo and per face."""

    photos: photos.PhotoResult  # the photos with faces replaced, per-face records
    chips: np.ndarray  # [F, S, S, 3] float32 x~ on the primary authorised chip
    features: dict  # recogniser name -> [F, h, w, c] E_c(x~) at the cut
    authorised_distance: np.ndarray  # [F, R] finished embedding of x~ vs the clean face
    config: pmt.PmtConfig
    authorised: str


def pmt_images(images: list[np.ndarray], *, authorised: str = "dlib",
               config: pmt.PmtConfig | None = None, seed: int = 0, min_face: float = 40.0,
               names=None, show_progress: bool = True) -> PmtResult:
    """Returns the PmtResult of obfuscating every face of these photos for `authorised`.

    Args:
      images: uint8 [H, W, 3] photos.
      authorised: recogniser(s) whose shallow part is shared ('dlib', 'facenet', or
        'dlib,facenet' for MR-PMT).
      config: PMT settings (default `PmtConfig()`, the enhanced PMT).
      seed: PRNG seed of the initial noise and the augmentations.
      min_face: faces with a smaller box side (pixels) are left alone.
      names: a name per photo for progress lines.
      show_progress: progress lines on stderr.
    """
    cfg = config or pmt.PmtConfig()
    rec, params = recognise.recogniser_params(authorised)
    method = pmt.PmtMethod(rec, cfg)
    pmt.check_pool(rec, params, cfg.layers, cfg.pool)
    res = photos.protect_photos(images, method, params, key=jax.random.PRNGKey(seed),
                                min_face=min_face, names=names, show_progress=show_progress,
                                lanes=256)
    chips = np.asarray(res.faces.metrics.get("obfuscated", np.zeros((0,) + (rec.chip_size,) * 2
                                                                     + (3,))), np.float32)
    members = registry.members(rec)
    dist = np.asarray(res.faces.metrics.get("authorised_distance", np.zeros((0, len(members)))))
    dist = dist.reshape(len(chips), len(members))
    feats = {}
    member_params = tuple(params) if len(members) > 1 else (params,)
    for r, (m, p) in enumerate(zip(members, member_params)):
        if r == 0:
            views = chips
        else:  # the member's own chip of the photo a user would upload
            views = np.concatenate([recognise.embed_faces(res.images[i], res.faces.landmarks[
                [j]], m.name)[1] for j, i in enumerate(res.faces.image)]) if len(chips) else \
                np.zeros((0, m.chip_size, m.chip_size, 3), np.float32)
        feats[m.name] = (np.asarray(pmt.cut_features(m, p, views, cfg.layers)) if len(views)
                         else np.zeros((0,), np.float32))
    return PmtResult(photos=res, chips=chips, features=feats, authorised_distance=dist,
                     config=cfg, authorised=authorised)


def write_outputs(result: PmtResult, sources: list[Path], out_dir: Path, *, upload: str,
                  overwrite: bool = False) -> list[Path]:
    """Returns the files written: per photo its faces' chips (or features) and the photo."""
    out_dir = Path(out_dir)
    written = []
    f = result.photos.faces
    for i, src in enumerate(sources):
        sel = np.flatnonzero(f.image == i)
        stem = Path(src).stem
        if upload == "image":
            written.append(image_io.write_image(out_dir / f"{stem}.png", result.photos.images[i],
                                                inputs=sources, overwrite=overwrite))
            for k, j in enumerate(sel):
                written.append(image_io.write_image(
                    out_dir / f"{stem}_face{k}.png", image_io.to_uint8(result.chips[j]),
                    inputs=sources, overwrite=overwrite))
        else:
            arrays = {f"{name}_face{k}": v[j] for name, v in result.features.items()
                      for k, j in enumerate(sel)}
            path = out_dir / f"{stem}.features.npz"
            image_io.ensure_not_input(path, sources, overwrite=overwrite)
            image_io._atomic_write(path, lambda fh, a=arrays: np.savez(fh, layers=np.array(
                result.config.layers), **a), binary=True)
            written.append(path)
    return written
