"""Protecting still photos with any method: every face of every photo, many faces per call.

`protect_photos(images, method, params)` finds the faces of each photo (`pipeline.faces`), plans
each one for the method's recogniser, groups the faces by patch side, pads every group to a
batch bucket (a few compiled shapes serve any number of faces), runs the method's compiled core
on each group in one call, pastes the results back, and measures each face's protection again
through `recognise` on the written uint8 photo (the recogniser's own chip of the photo a site
would receive). `cloak_images` is the photo cloak (DESIGN.md method 1 on stills; presets in
`faceveil.engine.methods.cloak.PRESETS`); targeted mode (a target pool: a folder of identity
folders) pulls each face towards the centroid of the pool identity farthest from it, as Fawkes
does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from faceveil.engine import sharding
from faceveil.engine.methods import base, cloak
from faceveil.engine.pipeline import faces, image_io, progress, recognise
from faceveil.models import registry

# A still face's patch holds its chip's footprint plus 6% (a video's: 15%, for the face's motion
# within a chain): enough for the views' jitter (shift 3%, scale 5%) at a smaller patch bucket,
# whose pixel-wise work (low-pass, SSIM, the chip-field warp) grows with its area.
PHOTO_MARGIN = 0.06


@dataclasses.dataclass(frozen=True)
class FaceRecords:
    """Per-face records of a photo run, as arrays over the F faces of all photos."""

    image: np.ndarray  # [F] int, index of the photo
    box: np.ndarray  # [F, 4] detector box in photo pixels
    landmarks: np.ndarray  # [F, 5, 2]
    iterations: np.ndarray  # [F] int optimisation steps
    metrics: dict  # name -> [F] (or [F, ...]) the method's diagnostics
    recognised_distance: np.ndarray  # [F] distance clean vs protected, through `recognise`
    target: tuple | None = None  # [F] target identity names (targeted mode)
    recognised_by: dict | None = None  # recogniser name -> [F] the same distance, per member
    #                                     of the method's recogniser (several for an ensemble)
    face_lpips: np.ndarray | None = None  # [F] LPIPS, clean vs protected aligned face (the
    #                                        primary recogniser's chip of the written photo)

    def __len__(self) -> int:
        return int(self.image.shape[0])


@dataclasses.dataclass
class PhotoResult:
    """What a photo run did: the protected photos, per-face records, settings, timings."""

    images: list  # uint8 [H, W, 3] protected photos (copies of the inputs where no face)
    faces: FaceRecords
    small_faces: np.ndarray  # [N] faces per photo too small to protect (left alone)
    method: str
    model: str
    mode: str | None
    config: object  # the method's frozen config
    threshold: float  # the (primary) recogniser's same-person distance
    thresholds: dict | None = None  # recogniser name -> same-person distance, every member
    detect_seconds: float = 0.0
    solve_seconds: float = 0.0  # compiled calls, compilation included
    wall_seconds: float = 0.0


def summary(result: PhotoResult) -> dict:
    """Returns the JSON-ready report of a photo run (pure: no I/O)."""
    f = result.faces
    per_image = [{"faces": [], "small_faces_left_alone": int(n)} for n in result.small_faces]
    for j in range(len(f)):
        entry = {"box": [round(float(v), 1) for v in f.box[j]],
                 "iterations": int(f.iterations[j]),
                 "protection": float(f.metrics["protection"][j]),
                 "protection_recognised": round(float(f.recognised_distance[j]), 5),
                 "protection_recognised_by": {
                     name: round(float(d[j]), 5) for name, d in (f.recognised_by or {}).items()},
                 "ssim": float(f.metrics["ssim"][j]), "passed": bool(f.metrics["passed"][j])}
        if f.face_lpips is not None:
            entry["lpips"] = round(float(f.face_lpips[j]), 6)
        if f.target is not None:
            entry["target"] = f.target[j]
            entry["target_distance"] = float(f.metrics["target_distance"][j])
        per_image[int(f.image[j])]["faces"].append(entry)
    out = {"method": result.method, "model": result.model, "mode": result.mode,
           "config": dataclasses.asdict(result.config), "threshold": result.threshold,
           "images": per_image, "faces": len(f),
           "detect_seconds": round(result.detect_seconds, 3),
           "solve_seconds": round(result.solve_seconds, 3),
           "wall_seconds": round(result.wall_seconds, 3)}
    if len(f):
        rd = f.recognised_distance
        out.update({
            "mean_protection": float(np.mean(f.metrics["protection"])),
            "mean_protection_recognised": float(np.mean(rd)),
            "fraction_beyond_threshold_recognised": float(np.mean(rd > result.threshold)),
            "mean_ssim": float(np.mean(f.metrics["ssim"])),  # the face patch, photo scale
            "min_ssim": float(np.min(f.metrics["ssim"])),
            "passed_fraction": float(np.mean(f.metrics["passed"] > 0))})
        if f.face_lpips is not None:
            out["mean_lpips"] = float(np.mean(f.face_lpips))
            out["max_lpips"] = float(np.max(f.face_lpips))
        thr = result.thresholds or {result.model: result.threshold}
        out["recognised_by"] = {
            name: {"threshold": thr[name], "mean_protection": float(np.mean(d)),
                   "fraction_beyond_threshold": float(np.mean(d > thr[name]))}
            for name, d in (f.recognised_by or {}).items()}
    return out


def _per_face(a: np.ndarray) -> np.ndarray:
    """Returns an object array [N] holding each row of `a` as its own array."""
    out = np.empty(len(a), object)
    for i, row in enumerate(a):
        out[i] = row
    return out


def protect_photos(images: list[np.ndarray], method: base.Method, params, *, key,
                   targets: Callable[[list[np.ndarray], np.ndarray, np.ndarray],
                                     tuple[np.ndarray, list]] | None = None,
                   min_score: float = 0.9, min_face: float = 40.0, names=None,
                   show_progress: bool = True, found: list[faces.PhotoFaces] | None = None,
                   lanes: int | None = None, measure: bool = True) -> PhotoResult:
    """Returns the PhotoResult of running a method on every face of every photo.

    Args:
      images: uint8 [H, W, 3] photos (sizes may differ).
      method: a method of `faceveil.engine.methods` (its recogniser plans the chips).
      params: the recogniser's parameters.
      key: PRNG key (folded with each group's patch side).
      targets: optional `(images, image index [B], landmarks [B, 5, 2]) -> (targets [B, ...],
        names [B])` for a group of faces (targeted methods).
      min_score: detections below this score are ignored.
      min_face: faces whose box side is smaller (pixels) are left alone and counted.
      names: a name per photo for the progress lines (default its index).
      show_progress: progress lines on stderr.
      found: the faces of each photo, found before (skips detection: e.g. only one person's
        faces, or faces a veil's sidecar recorded).
      lanes: faces per compiled call (default `solve_lanes`: one per call on a CPU, where
        lanes of an iterative method run in lock step; a method without iterations takes all).
        With several local devices a call takes at least one face per device (the lanes are
        sharded over them); each face keeps the PRNG key it has with `lanes` per call on one
        device, so the results do not depend on the device count.
      measure: measure each face's protection again through `recognise` (and its LPIPS).
    """
    t_start = time.perf_counter()
    rec = method.recogniser
    mesh = sharding.lane_mesh()
    params = sharding.replicate(params, mesh)  # once: every call below reuses the copies
    names = names or [f"photo {i + 1}" for i in range(len(images))]
    if found is None:
        found = []
        for i, img in enumerate(images):
            found.append(faces.find_photo_faces(img, min_score=min_score, min_face=min_face))
            progress.say(f"find faces: {i + 1}/{len(images)} {names[i]}: "
                         f"{len(found[-1].boxes)} face(s)", enabled=show_progress)
    t_detect = time.perf_counter() - t_start
    idx = np.array([i for i, pf in enumerate(found) for _ in range(len(pf.boxes))], int)
    boxes = np.concatenate([pf.boxes for pf in found] + [np.zeros((0, 4), np.float32)])
    lms = np.concatenate([pf.landmarks for pf in found] + [np.zeros((0, 5, 2), np.float32)])
    n = len(idx)
    out = [np.array(img, copy=True) for img in images]
    iters = np.zeros(n, np.int32)
    metrics: dict[str, np.ndarray] = {}
    target_names: list | None = [None] * n if targets is not None else None
    plans = [faces.plan_faces(lms[j][None], np.ones(1, bool), rec, margin=PHOTO_MARGIN)
             for j in range(n)]
    sides = faces.merge_sides([p.size for p in plans])
    plans = [p if p.size == side else faces.plan_faces(lms[j][None], np.ones(1, bool), rec,
                                                       size=side)
             for j, (p, side) in enumerate(zip(plans, sides))]
    sizes = sorted(set(sides))
    # How a face's change enters its photo: added (every method so far), or XORed (a mask key,
    # so that overlapping faces' keys compose and the photo stays restorable bit for bit).
    combine = getattr(method, "combine", "add")
    t_solve = 0.0
    for g, size in enumerate(sizes):
        group = [j for j in range(n) if plans[j].size == size]
        patches = np.stack([faces.crop_patches(images[idx[j]][None], plans[j].offsets, size)[0]
                            for j in group])
        m_chip = np.stack([plans[j].m_chip[0] for j in group])
        target = None
        if targets is not None:
            target, tn = targets(images, idx[group], lms[group])
            for j, name in zip(group, tn):
                target_names[j] = name
        key_lanes = lanes or solve_lanes(len(group))
        keys = face_keys(jax.random.fold_in(key, size), len(group), key_lanes)
        # Several devices: at least one face per device and call (a multiple of their count).
        multiple = sharding.lane_multiple(mesh)
        per_call = sharding.round_up(key_lanes, multiple)
        progress.say(f"{method.name}: batch {g + 1}/{len(sizes)}: {len(group)} face(s) at "
                     f"{size} px ({per_call} per call)", enabled=show_progress)
        t = time.perf_counter()
        offsets = np.stack([plans[j].offsets[0] for j in group])
        plms = np.stack([plans[j].landmarks[0] for j in group])
        parts = []
        for lo in range(0, len(group), per_call):
            sl = slice(lo, lo + per_call)
            # `solve_faces` pads b to a multiple of the devices with absent faces.
            b = faces.batch_bucket(len(group[sl]), faces.SOLVE_BUCKETS)
            part = base.solve_faces(
                method, params, faces.pad_batch(patches[sl], b), faces.pad_batch(m_chip[sl], b),
                keys=_pad_keys(keys[sl], b),
                target=None if target is None else faces.pad_batch(target[sl], b),
                offsets=faces.pad_batch(offsets[sl], b), landmarks=faces.pad_batch(plms[sl], b))
            k = len(group[sl])
            parts.append(jax.tree.map(lambda x, k=k: np.asarray(x)[:k], jax.device_get(part)))
        res = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        t_solve += time.perf_counter() - t
        for k, j in enumerate(group):
            out[idx[j]] = faces.paste_patches(out[idx[j]][None], patches[k:k + 1],
                                              res.protected[k:k + 1], plans[j].offsets,
                                              np.ones(1, bool), combine=combine)[0]
            iters[j] = res.iters[k]
        for name, v in res.metrics._asdict().items():
            if name not in metrics:
                metrics[name] = np.full((n,) + v.shape[1:], np.nan, np.float32)
            elif metrics[name].dtype != object and metrics[name].shape[1:] != v.shape[1:]:
                # A per-pixel metric (a mask template) has each patch size's shape: the
                # faces then keep one array each.
                metrics[name] = _per_face(metrics[name])
            if metrics[name].dtype == object:
                for k, j in enumerate(group):
                    metrics[name][j] = v[k]
            else:
                metrics[name][group] = v[:len(group)]
    # The protection each recogniser sees in the written photo, through its own alignment path.
    # The face-region LPIPS of the report: the primary recogniser's aligned chips.
    recs = registry.members(rec)
    by = {r.name: np.full(n, 0.0 if measure else np.nan, np.float32) for r in recs}
    chips: list = [None] * n
    for i in sorted(set(idx.tolist())) if measure else ():
        sel = np.flatnonzero(idx == i)
        for r in recs:
            e_clean, c_clean = recognise.embed_faces(images[i], lms[sel], r.name)
            e_prot, c_prot = recognise.embed_faces(out[i], lms[sel], r.name)
            by[r.name][sel] = np.linalg.norm(e_clean - e_prot, axis=-1)
            if r is recs[0]:
                for k, j in enumerate(sel):
                    chips[j] = (c_clean[k], c_prot[k])
    face_lpips = (chip_lpips(np.stack([c for c, _ in chips]), np.stack([p for _, p in chips]))
                  if n and measure else None)
    records = FaceRecords(image=idx, box=boxes, landmarks=lms, iterations=iters,
                          metrics=metrics, recognised_distance=by[recs[0].name],
                          target=None if target_names is None else tuple(target_names),
                          recognised_by=by, face_lpips=face_lpips)
    return PhotoResult(images=out, faces=records,
                       small_faces=np.array([pf.small for pf in found], int),
                       method=method.name, model=rec.name, mode=None, config=method.config,
                       threshold=float(rec.threshold),
                       thresholds={r.name: float(r.threshold) for r in recs},
                       detect_seconds=t_detect,
                       solve_seconds=t_solve, wall_seconds=time.perf_counter() - t_start)


def face_keys(key: jax.Array, n: int, lanes: int) -> jax.Array:
    """Returns [n] PRNG keys, one per face, as calls of `lanes` faces each split them.

    Call c's faces take the first of `jax.random.split(fold_in(key, c), b)`, b their padded
    batch: each face's key depends only on its place and `lanes`, not on how many faces a
    compiled call really runs (more with several devices).
    """
    parts = []
    for c, lo in enumerate(range(0, n, lanes)):
        k = min(lanes, n - lo)
        b = faces.batch_bucket(k, faces.SOLVE_BUCKETS)
        parts.append(jax.random.split(jax.random.fold_in(key, c), b)[:k])
    return jnp.concatenate(parts) if parts else jax.random.split(key, 0)


def _pad_keys(keys: jax.Array, n: int) -> jax.Array:
    """Returns keys [n] with the rows past their length repeating the first (`pad_batch` for
    PRNG keys, which numpy cannot hold when they are typed)."""
    extra = n - keys.shape[0]
    return jnp.concatenate([keys, jnp.repeat(keys[:1], extra, 0)]) if extra > 0 else keys


def solve_lanes(n: int) -> int:
    """Returns how many faces one compiled call optimises side by side (vmap lanes).

    Lanes run in lock step: a call lasts as long as its slowest face, and a finished lane is
    masked but still computed. An accelerator fills its width with lanes, so all n go in one
    call; a CPU gains nothing from width, so its faces go one per call (same compiled shape)
    and each stops at its own iteration count.
    """
    return 1 if jax.default_backend() == "cpu" else n


def chip_lpips(clean: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Returns [F] LPIPS (AlexNet) of float chip pairs [F, S, S, 3], one compiled batch.

    The batch is padded to a bucket, so calls of any size reuse a few compilations.
    """
    from faceveil.models import lpips

    m = faces.batch_bucket(len(clean))
    d = _lpips_fn()(jax.device_put(lpips.load()), faces.pad_batch(clean, m),
                    faces.pad_batch(other, m))
    return np.asarray(d)[:len(clean)]


@functools.cache
def _lpips_fn():
    from faceveil.models import lpips

    return jax.jit(lpips.lpips)


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


def cloak_images(images: list[np.ndarray], *, model: str = "dlib", mode: str = "mid",
                 target_pool: str | Path | None = None, seed: int = 0, min_score: float = 0.9,
                 min_face: float = 40.0, config: cloak.CloakConfig | None = None,
                 names=None, show_progress: bool = True) -> PhotoResult:
    """Returns the PhotoResult of cloaking every face of every photo against `model`.

    Args:
      images: uint8 [H, W, 3] photos (sizes may differ).
      model: recogniser cloaked against ('dlib', 'facenet', or 'dlib,facenet': both at once,
        each through its own chip, every one must reach its stop distance).
      mode: a preset of `faceveil.engine.methods.cloak.PRESETS`; ignored when `config` is given.
      target_pool: folder of identity folders for targeted cloaks (default untargeted).
      seed: PRNG seed of the cold-start cloaks.
      min_score: detections below this score are ignored.
      min_face: faces whose box side is smaller (pixels) are left alone and reported.
      config: explicit CloakConfig instead of a preset.
      names: a name per photo for the progress lines.
      show_progress: progress lines on stderr.
    """
    rec, params = recognise.recogniser_params(model)
    targeted = target_pool is not None
    config = config or cloak.preset(mode, rec, targeted=targeted)
    targets = None
    if targeted:
        pool_names, cents = target_centroids(target_pool, model)

        def targets(imgs, image_idx, landmarks):
            clean = np.stack([recognise.embed_faces(imgs[i], lm[None], model)[0][0]
                              for i, lm in zip(image_idx, landmarks)])
            far = np.argmax(np.linalg.norm(clean[:, None] - cents[None], axis=-1), axis=1)
            return cents[far], [pool_names[j] for j in far]

    result = protect_photos(images, cloak.CloakMethod(rec, config),
                            cloak.method_params(config, params),
                            key=jax.random.PRNGKey(seed), targets=targets, min_score=min_score,
                            min_face=min_face, names=names, show_progress=show_progress)
    result.mode = mode
    return result
