"""Cloaking still photos: every face of every photo, many faces per compiled call.

Modes map to the visual budget (DSSIM rho), the protection the optimisation stops at (as a
multiple of the recogniser's own same-person threshold) and the iteration limit:

| mode | rho (DSSIM) | ~SSIM floor | stop at distance | max iterations |
| --- | --- | --- | --- | --- |
| low  | 0.005 | 0.99 | 1.10 x threshold | 40 |
| mid  | 0.010 | 0.98 | 1.25 x threshold | 60 |
| high | 0.020 | 0.96 | 1.50 x threshold | 100 |

For dlib (threshold 0.6) `mid` stops once the cloaked face is 0.75 from the clean one.
Targeted mode (a target pool: a folder of identity folders) also pulls the face towards the
centroid of the pool identity farthest from it, as Fawkes does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import image_io, recognise

# Visual budget (DSSIM rho), stop distance (a multiple of the recogniser's same-person
# threshold) and iteration cap of the named modes. 'mid', the default, is CloakConfig's
# defaults (for dlib: stop at 0.8, rho 0.006, 40 iterations), the settings the benchmarks
# measure; every mode sees jittered alignments (CloakConfig.jitter).
MODES = {
    "low": {"rho": 0.004, "factor": 1.15, "max_iters": 40},
    "mid": {"rho": 0.006, "factor": 4 / 3, "max_iters": 40},
    "high": {"rho": 0.012, "factor": 1.75, "max_iters": 80},
}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def config_for(mode: str, model: str = "dlib", *, targeted: bool = False,
               **overrides) -> cloak.CloakConfig:
    """Returns the CloakConfig of a named mode ('low', 'mid', 'high') for a recogniser."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got '{mode}'")
    from faceveil.models import registry

    m = MODES[mode]
    rec = registry.get(model)
    settings = {"rho": m["rho"], "threshold": round(m["factor"] * rec.threshold, 4),
                "max_iters": m["max_iters"], "targeted": targeted}
    settings.update(overrides)
    return cloak.CloakConfig(**settings)


def target_centroids(pool: str | Path, model: str = "dlib") -> tuple[list[str], np.ndarray]:
    """Returns (identity names, centroid embeddings [I, D]) of a target pool folder."""
    pool = Path(pool)
    if not pool.is_dir():
        raise image_io.InputError(pool, "the target pool must be a folder of identity folders")
    idents = sorted(p for p in pool.iterdir() if p.is_dir())
    who, embs = recognise.photo_gallery(idents, model, skip_faceless=True)
    names = sorted(set(who.tolist()))
    cents = [embs[who == n].mean(axis=0) for n in names]
    if not names:
        raise image_io.InputError(pool, "no identity folder with a detectable face")
    return names, np.stack(cents)


@dataclasses.dataclass
class _Face:
    image: int
    landmarks: np.ndarray
    box: np.ndarray
    plan: cloak.TrackPatches | None = None


def cloak_images(images: list[np.ndarray], *, model: str = "dlib", mode: str = "mid",
                 target_pool: str | Path | None = None, seed: int = 0, min_score: float = 0.9,
                 min_face: float = 40.0, config: cloak.CloakConfig | None = None):
    """Returns (protected uint8 images, report) with every face of every image cloaked.

    Args:
      images: uint8 [H, W, 3] photos (sizes may differ).
      model: recogniser cloaked against ('dlib' or 'facenet').
      mode: 'low', 'mid' or 'high' (module docstring); ignored when `config` is given.
      target_pool: folder of identity folders for targeted cloaks (default untargeted).
      seed: PRNG seed of the cold-start cloaks.
      min_score: detections below this score are ignored.
      min_face: faces whose box side is smaller (pixels) are left alone and reported.
      config: explicit CloakConfig instead of a mode.
    """
    rec, params = recognise.recogniser_params(model)
    targeted = target_pool is not None
    config = config or config_for(mode, model, targeted=targeted)
    faces: list[_Face] = []
    report = {"model": model, "mode": mode, "config": dataclasses.asdict(config),
              "images": []}
    for i, img in enumerate(images):
        boxes, scores, lms, valid = recognise.detect_photo(img)
        ok = valid & (scores >= min_score)
        side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        small = int((ok & (side < min_face)).sum())
        for k in np.flatnonzero(ok & (side >= min_face)):
            faces.append(_Face(i, lms[k], boxes[k]))
        report["images"].append({"faces": [], "small_faces_left_alone": small})
    out = [np.array(img, copy=True) for img in images]
    if not faces:
        return out, report

    names, cents = (target_centroids(target_pool, model) if targeted else (None, None))
    for f in faces:
        f.plan = cloak.plan_track(f.landmarks[None], np.ones(1, bool), rec.template,
                                  rec.chip_size)
    key = jax.random.PRNGKey(seed)
    for size in sorted({f.plan.size for f in faces}):
        group = [f for f in faces if f.plan.size == size]
        patches = np.stack([cloak.crop_patches(images[f.image][None], f.plan.offsets, size)[0]
                            for f in group])
        m_chip = np.stack([f.plan.m_chip[0] for f in group])
        target, target_names = None, None
        if targeted:
            clean = np.stack([recognise.embed_faces(images[f.image], f.landmarks[None],
                                                    model)[0][0] for f in group])
            far = np.argmax(np.linalg.norm(clean[:, None] - cents[None], axis=-1), axis=1)
            target, target_names = cents[far], [names[j] for j in far]
        n = len(group)
        b = next((x for x in BATCH_BUCKETS if x >= n), -(-n // 256) * 256)
        pad = b - n  # pad the batch to a bucket: a few compiled shapes serve any face count
        patches_b = np.concatenate([patches, np.repeat(patches[:1], pad, 0)])
        m_b = np.concatenate([m_chip, np.repeat(m_chip[:1], pad, 0)])
        target_b = None if target is None else np.concatenate([target,
                                                               np.repeat(target[:1], pad, 0)])
        prot, iters, met = cloak.cloak_faces(params, rec, patches_b, m_b,
                                             jax.random.fold_in(key, size), config,
                                             target=target_b)
        prot, iters, met = jax.device_get((prot, iters, met))
        for j, f in enumerate(group):
            out[f.image] = cloak.paste_patches(out[f.image][None], patches[j:j + 1],
                                               prot[j:j + 1], f.plan.offsets,
                                               np.ones(1, bool))[0]
            entry = {"box": [round(float(v), 1) for v in f.box], "iterations": int(iters[j]),
                     "protection": float(met.protection[j]), "ssim": float(met.ssim[j]),
                     "passed": bool(met.passed[j])}
            if targeted:
                entry["target"] = target_names[j]
                entry["target_distance"] = float(met.target_distance[j])
            report["images"][f.image]["faces"].append(entry)
    all_faces = [e for im in report["images"] for e in im["faces"]]
    report["faces"] = len(all_faces)
    report["mean_protection"] = float(np.mean([e["protection"] for e in all_faces]))
    report["mean_ssim"] = float(np.mean([e["ssim"] for e in all_faces]))
    report["passed_fraction"] = float(np.mean([e["passed"] for e in all_faces]))
    return out, report
