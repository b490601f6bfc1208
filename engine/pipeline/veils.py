"""Person-specific veils on photos and videos (DESIGN.md method 2): make, apply, recover.

    make_veil(photos)            the person's faces (one per photo; in a group photo the one
                                 closest to their other photos), then the veil, made by the
                                 compiled core of `faceveil.engine.methods.veil` chunk by chunk
    veil_images / recover_images every face of the key's person in a set of photos (matched by
                                 the recogniser against the key's identity features; other
                                 people are left alone), one compiled call per patch size
    veil_video / recover_video   the same through the shared video pipeline (tracks matched as
                                 a whole), written losslessly so that recovery stays exact

A `Veil` is what the key file holds (`faceveil.engine.keyfile`, kind 'veil'): the veil, its
config, the model id and alignment template, the seed, the person's identity features and a
random key id. Recovery needs each veiled face's alignment: the file commands write it to a
sidecar JSON beside the output (`<output>.veil.json`, with the output's SHA-256 and the key
id), never the original pixels.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path

import jax
import numpy as np

from faceveil.engine import keyfile
from faceveil.engine.methods import veil as veil_core
from faceveil.engine.pipeline import faces, image_io, photos, progress, recognise
from faceveil.models import registry

KEY_KIND = "veil"
FORMAT_VERSION = 1
DEFAULT_COUNT = 10
CHUNK_STEPS = 25  # MI-FGSM iterations per compiled call (one progress line each)


@dataclasses.dataclass(frozen=True)
class Veil:
    """A person's veil and everything a key file keeps with it."""

    veil: np.ndarray  # [S, S, 3] float32 in [0, 1], on the recogniser's chip
    config: veil_core.VeilConfig
    model: str
    template: np.ndarray  # [5, 2] the recogniser's alignment template at make time
    seed: int  # the veil's initial noise
    identity: np.ndarray  # [n, D] features of the person's clean chips (to find their faces)
    key_id: str  # random hex; sidecars name the key that veiled a file

    def save(self, path, passphrase: str, *, overwrite: bool = False, inputs=()) -> Path:
        """Returns the path of the encrypted key file written for this veil."""
        meta = {"format_version": FORMAT_VERSION, "model": self.model, "seed": self.seed,
                "key_id": self.key_id, "config": dataclasses.asdict(self.config)}
        arrays = {"veil": self.veil.astype(np.float32), "identity": self.identity,
                  "template": np.asarray(self.template, np.float32)}
        return keyfile.write_key(path, KEY_KIND, meta, arrays, passphrase,
                                 overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, path, passphrase: str) -> Veil:
        """Returns the Veil of a key file (KeyFileError when it cannot be used)."""
        k = keyfile.read_key(path, passphrase, kind=KEY_KIND)
        meta = k.meta
        if meta.get("format_version") != FORMAT_VERSION:
            raise keyfile.KeyFileError(path, f"veil format {meta.get('format_version')} is not "
                                             f"supported (this faceveil reads {FORMAT_VERSION})")
        try:
            rec = registry.get(meta["model"])
        except KeyError:
            raise keyfile.KeyFileError(path, f"made for model '{meta['model']}', which this "
                                             "faceveil does not know") from None
        if not np.allclose(np.asarray(rec.template), k.arrays["template"], atol=1e-5):
            raise keyfile.KeyFileError(path, f"made with another alignment template for "
                                             f"{rec.name}: its veil would not line up")
        return cls(veil=k.arrays["veil"], config=veil_core.VeilConfig(**meta["config"]),
                   model=meta["model"], template=k.arrays["template"], seed=int(meta["seed"]),
                   identity=k.arrays["identity"], key_id=meta["key_id"])

    @property
    def recogniser(self):
        """Returns the recogniser the veil was made against."""
        return registry.get(self.model)

    def method(self, *, recover: bool = False) -> veil_core.VeilMethod:
        """Returns the pipeline method that applies (or removes) this veil."""
        return veil_core.VeilMethod(self.recogniser, self.config, recover=recover)

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        """Returns [K] each embedding's distance to the nearest of the person's features."""
        e = np.asarray(embeddings, np.float32).reshape(-1, self.identity.shape[1])
        return np.linalg.norm(e[:, None] - self.identity[None], axis=-1).min(axis=1)


# ----------------------------------------------------------------------------------------------
# Make


@dataclasses.dataclass(frozen=True)
class PersonFaces:
    """One face per photo of one person, aligned for the recogniser."""

    files: list  # [n] the photos used
    chips: np.ndarray  # [n, S, S, 3] float32 aligned chips
    embeddings: np.ndarray  # [n, D]
    notes: list  # warnings and choices to show the user


def person_faces(paths, model: str = "dlib", *, count: int = DEFAULT_COUNT,
                 min_face: float = 40.0, min_score: float = 0.9) -> PersonFaces:
    """Returns the PersonFaces of a folder (or list) of photos of one person.

    A photo with several faces contributes the one closest to the person's single-face photos.
    Raises InputError naming the file for a photo without a usable face, for faces that are
    too small, and for a photo that shows someone else than the rest.
    """
    rec = registry.get(model)
    files = recognise.photo_files(paths)
    if not files:
        raise image_io.InputError(", ".join(map(str, paths)), "no photos (.jpg, .jpeg, .png)")
    notes = []
    if len(files) > count:
        notes.append(f"using the first {count} of {len(files)} photos (--count)")
        files = files[:count]
    elif len(files) < count:
        notes.append(f"only {len(files)} photo(s) of the person (asked for {count}): the veil "
                     "sees fewer views of the face, so it may keep new photos of them "
                     "recognisable less reliably")
    found = []  # (file, embeddings [K, D], chips [K, ...])
    for f in files:
        img = image_io.read_image(f)
        pf = faces.find_photo_faces(img, min_score=min_score, min_face=0.0)
        if not len(pf.boxes):
            raise recognise.NoFaceError(f, f"no face found (score >= {min_score})")
        big = faces.box_side(pf.boxes) >= min_face
        if not big.any():
            side = float(faces.box_side(pf.boxes).max())
            raise image_io.InputError(f, f"the face is too small ({side:.0f} px; at least "
                                         f"{min_face:.0f} px): use a larger photo")
        emb, chips = recognise.embed_faces(img, pf.landmarks[big], model)
        found.append((f, emb, chips))
    single = [e[0] for _, e, _ in found if len(e) == 1]
    if not single:
        raise image_io.InputError(files[0].parent, "every photo shows several faces: add at "
                                                   "least one photo of the person alone")
    centre = np.mean(single, axis=0)
    embs, chips = [], []
    for f, e, c in found:
        k = int(np.argmin(np.linalg.norm(e - centre, axis=1)))
        if len(e) > 1:
            notes.append(f"{f}: {len(e)} faces; using the one closest to the other photos")
        embs.append(e[k])
        chips.append(c[k])
    embs = np.stack(embs)
    _check_one_person(files, embs, rec.threshold)
    return PersonFaces(files=list(files), chips=np.stack(chips).astype(np.float32),
                       embeddings=embs.astype(np.float32), notes=notes)


def _check_one_person(files, embs: np.ndarray, threshold: float) -> None:
    """Raises InputError when the photos' faces are not all of one person."""
    d = np.linalg.norm(embs[:, None] - embs[None], axis=-1)
    n = len(embs)
    if n == 2 and d[0, 1] > threshold:
        raise image_io.InputError(files[1], f"shows a different person than {files[0]} "
                                            f"(distance {d[0, 1]:.2f} > {threshold}): a veil "
                                            "is made for one person")
    if n >= 3:
        med = np.array([np.median(np.delete(d[i], i)) for i in range(n)])
        worst = int(np.argmax(med))
        if med[worst] > threshold:
            raise image_io.InputError(files[worst], f"shows a different person than the other "
                                                    f"photos (median distance {med[worst]:.2f} "
                                                    f"> {threshold}): a veil is made for one "
                                                    "person; move the photo to its own folder")


@dataclasses.dataclass
class MakeResult:
    """A made veil, the faces it was made from, its loss curve and timings."""

    veil: Veil
    person: PersonFaces
    losses: veil_core.StepLosses  # [iters] numpy per-iteration terms
    seconds: float  # optimisation, compilation included
    compile_seconds: float


def _seed_key(seed: int) -> jax.Array:
    # A 62-bit seed as two 31-bit words (a PRNGKey takes 32 bits).
    return jax.random.fold_in(jax.random.PRNGKey(seed >> 31), seed & 0x7FFFFFFF)


def make_veil(photos_in, *, model: str = "dlib", count: int = DEFAULT_COUNT,
              config: veil_core.VeilConfig | None = None, seed: int | None = None,
              min_face: float = 40.0, person: PersonFaces | None = None,
              show_progress: bool = True) -> MakeResult:
    """Returns the MakeResult of making one person's veil from their photos.

    Args:
      photos_in: a folder of the person's photos, or a list of photo files / folders.
      model: recogniser ('dlib' or 'facenet') the person must stay recognisable to.
      count: photos to use (fewer are allowed, with a note in `person.notes`).
      config: the veil's settings (default `VeilConfig()`).
      seed: the initial noise's seed (default: a fresh random 62-bit seed).
      min_face: faces with a smaller box side (pixels) are refused.
      person: the person's faces found before (skips `person_faces`).
      show_progress: progress lines on stderr.
    """
    cfg = config or veil_core.VeilConfig()
    rec, params = recognise.recogniser_params(model)
    if person is None:
        paths = [photos_in] if isinstance(photos_in, (str, Path)) else list(photos_in)
        person = person_faces(paths, model, count=count, min_face=min_face)
    for note in person.notes:
        progress.say(f"veil make: {note}", enabled=show_progress)
    seed = secrets.randbits(62) if seed is None else int(seed)
    state = veil_core.init_veil(_seed_key(seed), rec.chip_size, cfg)
    chips, basis = person.chips, person.embeddings
    weights = np.ones(len(chips), np.float32)
    parts, done, t0, t_compile = [], 0, time.perf_counter(), 0.0
    while done < cfg.iters:
        steps = min(CHUNK_STEPS, cfg.iters - done)
        fn = veil_core.make_steps(rec, cfg, steps)
        if done == 0:
            t = time.perf_counter()
            fn = fn.lower(params, state, chips, basis, weights).compile()
            t_compile = time.perf_counter() - t
        state, terms = fn(params, state, chips, basis, weights)
        parts.append(jax.device_get(terms))
        done += steps
        progress.say(f"\rveil make: {done}/{cfg.iters} iterations, feature distance "
                     f"{float(parts[-1].fea[-1]):.4f}", end="", enabled=show_progress)
    progress.say("", enabled=show_progress)
    curve = veil_core.StepLosses(*(np.concatenate(x) for x in zip(*parts)))
    made = Veil(veil=np.asarray(state.veil, np.float32), config=cfg, model=rec.name,
                template=np.asarray(rec.template, np.float32), seed=seed,
                identity=basis, key_id=secrets.token_hex(16))
    return MakeResult(veil=made, person=person, losses=curve,
                      seconds=time.perf_counter() - t0, compile_seconds=t_compile)


# ----------------------------------------------------------------------------------------------
# Apply and recover on arrays


@dataclasses.dataclass
class VeiledImages:
    """Photos with the person's faces veiled, and where each veiled face is."""

    images: list  # uint8 [H, W, 3]
    faces: list  # per photo: faces.PhotoFaces of the veiled faces (recovery needs them)
    others: np.ndarray  # [N] faces per photo left alone (other people)
    distances: list  # per photo: [F] clean distance of each veiled face to the key's person


def footprints(landmarks: np.ndarray, recogniser) -> np.ndarray:
    """Returns [K, 4] (x1, y1, x2, y2) the frame-pixel box around each face's chip."""
    m = faces.chip_transforms(np.asarray(landmarks, np.float32).reshape(-1, 5, 2), recogniser)
    s = recogniser.chip_size - 1.0
    corners = np.array([[0, 0, 1], [s, 0, 1], [0, s, 1], [s, s, 1]], np.float32)
    pts = np.einsum("kij,cj->kci", m, corners)  # [K, 4 corners, 2]
    return np.concatenate([pts.min(axis=1), pts.max(axis=1)], axis=1)


def apart(landmarks: np.ndarray, recogniser) -> np.ndarray:
    """Returns [K] bool: the faces to veil so that no two veiled footprints overlap.

    Recovery removes each face's veil on its own, which only inverts the blend where one veil
    lies: where two footprints of the person overlap (in practice a second, smaller detection
    of the same face) the larger face is kept and the other left alone.
    """
    box = footprints(landmarks, recogniser)
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    keep = np.zeros(len(box), bool)
    for k in np.argsort(-area, kind="stable"):
        kept = box[keep]
        hit = ((np.minimum(kept[:, 2], box[k, 2]) > np.maximum(kept[:, 0], box[k, 0]))
               & (np.minimum(kept[:, 3], box[k, 3]) > np.maximum(kept[:, 1], box[k, 1])))
        keep[k] = not hit.any()
    return keep


def person_photo_faces(image: np.ndarray, veil: Veil, *, min_face: float = 40.0,
                       min_score: float = 0.9) -> tuple[faces.PhotoFaces, int, np.ndarray]:
    """Returns (the person's faces, other faces left alone, their distances) of one photo."""
    pf = faces.find_photo_faces(image, min_score=min_score, min_face=min_face)
    if not len(pf.boxes):
        return pf, 0, np.zeros(0, np.float32)
    emb, _ = recognise.embed_faces(image, pf.landmarks, veil.model)
    d = veil.distance(emb)
    mine = d <= veil.recogniser.threshold
    mine[mine] = apart(pf.landmarks[mine], veil.recogniser)
    chosen = faces.PhotoFaces(boxes=pf.boxes[mine], scores=pf.scores[mine],
                              landmarks=pf.landmarks[mine], small=pf.small)
    return chosen, int((~mine).sum()), d[mine]


def _run(images, veil: Veil, found, *, recover: bool, show_progress: bool) -> list:
    n = sum(len(f.boxes) for f in found)
    if n == 0:
        return [np.array(img, copy=True) for img in images]
    res = photos.protect_photos(list(images), veil.method(recover=recover),
                                np.asarray(veil.veil, np.float32), key=jax.random.PRNGKey(0),
                                found=found, lanes=max(n, 1), measure=False,
                                show_progress=show_progress)
    return res.images


def veil_images(images: list[np.ndarray], veil: Veil, *, min_face: float = 40.0,
                show_progress: bool = False) -> VeiledImages:
    """Returns the VeiledImages of veiling every face of the key's person in these photos."""
    found, others, dists = [], [], []
    for img in images:
        pf, k, d = person_photo_faces(img, veil, min_face=min_face)
        found.append(pf)
        others.append(k)
        dists.append(d)
    out = _run(images, veil, found, recover=False, show_progress=show_progress)
    return VeiledImages(images=out, faces=found, others=np.array(others, int), distances=dists)


def recover_images(images: list[np.ndarray], veil: Veil, found: list[faces.PhotoFaces], *,
                   show_progress: bool = False) -> list[np.ndarray]:
    """Returns the photos with the veil removed from the faces `found` recorded when veiling."""
    return _run(images, veil, found, recover=True, show_progress=show_progress)


def photo_faces_from(entries: list[dict]) -> faces.PhotoFaces:
    """Returns the PhotoFaces of a sidecar's face entries ({box, landmarks})."""
    boxes = np.array([e["box"] for e in entries], np.float32).reshape(-1, 4)
    lms = np.array([e["landmarks"] for e in entries], np.float32).reshape(-1, 5, 2)
    return faces.PhotoFaces(boxes=boxes, scores=np.ones(len(boxes), np.float32), landmarks=lms,
                            small=0)


def face_entries(pf: faces.PhotoFaces) -> list[dict]:
    """Returns a sidecar's face entries of PhotoFaces (float32 values written exactly)."""
    return [{"box": [float(v) for v in b], "landmarks": [[float(x), float(y)] for x, y in lm]}
            for b, lm in zip(pf.boxes, pf.landmarks)]


# ----------------------------------------------------------------------------------------------
# Videos


def person_tracks(source, found: faces.VideoFaces, veil: Veil, *, samples: int = 5) -> np.ndarray:
    """Returns [C] bool: the tracks whose median distance to the key's person is a match.

    Each track is judged on up to `samples` of its frames, spread over its length.
    """
    tracks, lms = found.tracks, found.landmarks
    want: dict[int, list[int]] = {}
    for i in range(tracks.num_tracks):
        frames = np.flatnonzero(tracks.mask[i])
        for t in frames[np.linspace(0, len(frames) - 1, min(samples, len(frames)))
                        .round().astype(int)]:
            want.setdefault(int(t), []).append(i)
    dists: dict[int, list[float]] = {i: [] for i in range(tracks.num_tracks)}
    t0 = 0
    for chunk in faces.iter_frames(source, 32):
        for t in range(t0, t0 + chunk.shape[0]):
            for i in want.get(t, []):
                emb, _ = recognise.embed_faces(chunk[t - t0], lms[i, t][None], veil.model)
                dists[i].append(float(veil.distance(emb)[0]))
        t0 += chunk.shape[0]
    thr = veil.recogniser.threshold
    return np.array([bool(d) and float(np.median(d)) <= thr
                     for d in (dists[i] for i in range(tracks.num_tracks))], bool)


def video_entries(det: dict) -> list[dict]:
    """Returns a sidecar's face entries ({frame, box, landmarks}) of valid detections."""
    return [{"frame": int(t), "box": [float(v) for v in det["boxes"][t, k]],
             "landmarks": [[float(x), float(y)] for x, y in det["landmarks"][t, k]]}
            for t, k in zip(*np.nonzero(det["valid"]))]


def detections_from(entries: list[dict], n_frames: int) -> dict:
    """Returns numpy detections [T, K, ...] of a sidecar's video face entries."""
    per = np.zeros(n_frames, int)
    for e in entries:
        per[e["frame"]] += 1
    k = max(1, int(per.max()) if n_frames else 1)
    det = {"boxes": np.zeros((n_frames, k, 4), np.float32),
           "landmarks": np.zeros((n_frames, k, 5, 2), np.float32),
           "scores": np.zeros((n_frames, k), np.float32),
           "valid": np.zeros((n_frames, k), bool), "small": np.zeros((n_frames, k), bool)}
    slot = np.zeros(n_frames, int)
    for e in entries:
        t = e["frame"]
        det["boxes"][t, slot[t]] = e["box"]
        det["landmarks"][t, slot[t]] = e["landmarks"]
        det["scores"][t, slot[t]] = 1.0
        det["valid"][t, slot[t]] = True
        slot[t] += 1
    return det


def _video_job(veil: Veil, *, lossless: bool, min_face: float, chunk: int, show_progress: bool):
    from faceveil.engine.pipeline import video

    return video.VideoJob(model=veil.model, other_model=None, chunk=chunk, min_face=min_face,
                          lossless=lossless, progress=show_progress)


def veil_video(source, veil: Veil, *, output=None, min_face: float = 40.0, chunk: int = 16,
               show_progress: bool = True):
    """Returns (VideoResult, sidecar face entries, tracks left alone) of veiling a video.

    Every track of the key's person is veiled (other people's tracks are left alone); a file
    output is written losslessly (`video_io.VideoWriter`) so that recovery stays exact.
    """
    from faceveil.engine.pipeline import video

    job = _video_job(veil, lossless=True, min_face=min_face, chunk=chunk,
                     show_progress=show_progress)
    found = video.find_faces(source, job)
    keep = person_tracks(source, found, veil)
    det = {k: np.array(v, copy=True) for k, v in found.detections.items()}
    for i in np.flatnonzero(~keep):
        for t, s in found.tracks.members(int(i)):
            det["valid"][t, s] = False
    for t in np.flatnonzero(det["valid"].sum(axis=1) > 1):  # overlapping veils: see `apart`
        k = np.flatnonzero(det["valid"][t])
        det["valid"][t, k] = apart(det["landmarks"][t, k], veil.recogniser)
    res = video.protect_video(source, veil.method(), np.asarray(veil.veil, np.float32),
                              output=output, job=job, resume=False,
                              detections=faces.track_faces(det))
    return res, video_entries(det), int((~keep).sum())


def recover_video(source, veil: Veil, entries: list[dict], n_frames: int, *, output=None,
                  chunk: int = 16, show_progress: bool = True):
    """Returns the VideoResult of removing the veil from the faces a sidecar recorded."""
    from faceveil.engine.pipeline import video

    job = _video_job(veil, lossless=False, min_face=0.0, chunk=chunk,
                     show_progress=show_progress)
    det = detections_from(entries, n_frames)
    return video.protect_video(source, veil.method(recover=True),
                               np.asarray(veil.veil, np.float32), output=output, job=job,
                               resume=False, detections=faces.track_faces(det))
