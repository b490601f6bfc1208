"""Protected files paired with their clean originals, and the faces the attack suite judges.

Photo kinds of `faceveil attack` pair each protected file with the original of the same stem:
`cloak` writes `<stem>_cloaked.png`, `veil apply` and `pmt` write `<stem>.png` (PMT's
`<stem>_face<k>.png` chip previews are skipped beside their photo) and `pmt --upload features`
writes `<stem>.features.npz` (arrays `<model>_face<k>`, the cut features, and `layers`). Each
pair is judged on the original's largest face (at least MIN_FACE px, as the methods protect);
the protected face is cut from the protected photo with the original's landmarks (align
"original": the methods paste the face back in place, so this is the same face frame and the
strongest attacker) or with the attacker's own detection (align "detect"). Identities, for the
same-person pairs of verification, are the originals' parent folder names (faces/<name>/x.jpg).

    faces = load_faces(pair_files(["originals/"], ["cloaked/"]))
    embeddings, chips = faces.protected_chips("dlib", "data-abuse")
"""

from __future__ import annotations

import dataclasses
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from faceveil.engine.pipeline import image_io

PROTECTED_SUFFIXES = ("_cloaked", "_veiled", "_protected", "_pmt")  # stripped to pair by stem
FEATURES_SUFFIX = ".features.npz"
MIN_FACE = 40.0  # the photo pipeline leaves smaller faces alone, so they are not judged
_CHIP = re.compile(r"^(?P<stem>.+)_face\d+$")  # PMT's per-face chip previews

class AttackInputError(image_io.InputError):
    """A file of the attack's inputs cannot be used (names the file and the reason)."""


# ---------------------------------------------------------------------------------------------
# Pairing protected files with their originals


@dataclasses.dataclass(frozen=True)
class Pair:
    """A protected file and the clean original it was made from."""

    original: Path
    protected: Path
    identity: str  # the original's parent folder name

    @property
    def features(self) -> bool:
        """True when the protected file is a PMT feature upload (.features.npz)."""
        return self.protected.name.endswith(FEATURES_SUFFIX)


def _stem(path: Path) -> str:
    name = path.name
    return name[:-len(FEATURES_SUFFIX)] if name.endswith(FEATURES_SUFFIX) else path.stem


def _protected_files(paths: Sequence[str | Path]) -> list[Path]:
    """Returns the photos and .features.npz files named by `paths` (folders: all under them)."""
    from faceveil.engine.pipeline import recognise

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and (
                f.suffix.lower() in recognise.PHOTO_SUFFIXES or f.name.endswith(FEATURES_SUFFIX)))
        elif not p.exists():
            raise AttackInputError(p, "no such file or folder")
        elif p.suffix.lower() in recognise.PHOTO_SUFFIXES or p.name.endswith(FEATURES_SUFFIX):
            files.append(p)
        else:
            raise AttackInputError(p, "not a photo (.jpg, .jpeg, .png) or a PMT "
                                      f"{FEATURES_SUFFIX} file")
    if not files:
        raise AttackInputError(", ".join(map(str, paths)) or ".", "no protected photo or "
                               f"{FEATURES_SUFFIX} file")
    return files


def original_files(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Returns {stem: photo} of the clean originals named by `paths` (folders: all under them).

    Raises:
      InputError: a missing path, no photo at all, or two originals with one stem (a protected
        file could not tell them apart).
    """
    from faceveil.engine.pipeline import recognise

    for p in map(Path, paths):
        if not p.exists():
            raise AttackInputError(p, "no such file or folder (the originals)")
    files = recognise.photo_files(paths)
    if not files:
        raise AttackInputError(", ".join(map(str, paths)) or ".",
                               "no original photo (.jpg, .jpeg, .png)")
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out and out[f.stem].resolve() != f.resolve():
            raise AttackInputError(f, f"two originals share the stem '{f.stem}' ({out[f.stem]}); "
                                      "a protected file is paired by stem")
        out[f.stem] = f
    return out


def original_stem(protected: Path, originals: dict[str, Path]) -> str | None:
    """Returns the stem of the original a protected file was made from (None: no original)."""
    stem = _stem(protected)
    if stem in originals:
        return stem
    for suffix in PROTECTED_SUFFIXES:
        if stem.endswith(suffix) and stem[:-len(suffix)] in originals:
            return stem[:-len(suffix)]
    return None


def pair_files(original: Sequence[str | Path], protected: Sequence[str | Path]) -> list[Pair]:
    """Returns a Pair per protected file, each with the original of the same stem.

    PMT's chip previews (`<stem>_face<k>.png`) are skipped when another protected file of
    `<stem>` is given (the photo or its features carry the same face), and so are the originals
    themselves where a protected folder holds them.

    Raises:
      InputError: a missing path, no protected file, or a protected file without an original
        (named).
    """
    originals = original_files(original)
    files = _protected_files(protected)
    # A folder of protected files may hold the originals too (outputs written beside them):
    # an original is never judged against itself.
    clean = {f.resolve() for f in originals.values()}
    files = [f for f in files if f.resolve() not in clean]
    if not files:
        raise AttackInputError(", ".join(map(str, protected)), "every protected file is one of "
                               "the originals (nothing protected to judge)")
    stems = {_stem(f) for f in files}
    pairs = []
    for f in files:
        chip = _CHIP.match(_stem(f))
        if chip and _stem(f) not in originals and chip["stem"] in stems:
            continue
        stem = original_stem(f, originals)
        if stem is None:
            hint = (f"; a PMT face chip: pass its photo {chip['stem']}.png or "
                    f"{chip['stem']}{FEATURES_SUFFIX}" if chip else "")
            raise AttackInputError(f, "no original photo of the same stem among --original "
                                      f"(stripped suffixes: {', '.join(PROTECTED_SUFFIXES)})"
                                      + hint)
        o = originals[stem]
        pairs.append(Pair(original=o, protected=f, identity=o.parent.name))
    return pairs


# ---------------------------------------------------------------------------------------------
# The paired faces


@dataclasses.dataclass
class PairedFaces:
    """Each pair's original face and its protected version (photo or cut features)."""

    pairs: list[Pair]
    images: list[np.ndarray]  # uint8 [H, W, 3] originals
    landmarks: np.ndarray  # [N, 5, 2] the original's judged face
    face_index: np.ndarray  # [N] its index among the original's faces (PMT's face<k>)
    protected_images: list[np.ndarray | None]  # uint8 photos (None: feature upload)
    protected_landmarks: np.ndarray  # [N, 5, 2] where the protected face is cut (NaN: features)
    features: list[dict | None]  # the .features.npz arrays (None: photo)
    _chips: dict = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def _cut(self, model: str, which: str) -> tuple[np.ndarray, np.ndarray]:
        from faceveil.engine.pipeline import recognise

        key = (model, which)
        if key not in self._chips:
            embs, chips = [], []
            for i in range(len(self)):
                img = self.images[i] if which == "original" else self.protected_images[i]
                lms = self.landmarks if which == "original" else self.protected_landmarks
                e, c = recognise.embed_faces(img, lms[i][None], model)
                embs.append(e[0])
                chips.append(c[0])
            self._chips[key] = (np.asarray(embs, np.float32), np.asarray(chips, np.float32))
        return self._chips[key]

    def original_chips(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (embeddings [N, D], chips [N, S, S, 3]) of the original faces for `model`."""
        return self._cut(model, "original")

    def protected_chips(self, model: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (embeddings [N, D], chips [N, S, S, 3]) of the protected faces for `model`.

        Raises:
          InputError: a pair is a feature upload (no image to judge), naming the file.
        """
        for p in self.pairs:
            if p.features:
                raise AttackInputError(p.protected, f"a feature upload has no image; attack "
                                                    f"{kind} needs protected photos")
        return self._cut(model, "protected")

    def uploaded_features(self, i: int, model: str, layers: int) -> np.ndarray | None:
        """Returns pair i's uploaded features [h, w, c] of `model` (None: the file has none).

        Raises:
          InputError: the file's features were cut at another layer than `layers`.
        """
        arrays = self.features[i]
        name = f"{model}_face{self.face_index[i]}"
        if arrays is None or name not in arrays:
            return None
        got = int(np.asarray(arrays.get("layers", -1)))
        if got != layers:
            raise AttackInputError(self.pairs[i].protected,
                                   f"features cut after {got} layer(s), not --layers {layers}")
        return np.asarray(arrays[name], np.float32)

    def protected_features(self, rec, params, layers: int) -> np.ndarray:
        """Returns [N, h, w, c] the shallow features an attacker holds of each protected face.

        Photos: E_c of the protected chip; feature uploads: the uploaded array.

        Raises:
          InputError: a feature upload without this recogniser's features, or cut elsewhere.
        """
        from faceveil.engine.methods import pmt

        out = []
        photo = [i for i, p in enumerate(self.pairs) if not p.features]
        chips = self.protected_chips_of(rec.name, photo)
        feats = np.asarray(pmt.cut_features(rec, params, chips, layers)) if photo else None
        k = 0
        for i, p in enumerate(self.pairs):
            if not p.features:
                out.append(feats[k])
                k += 1
                continue
            f = self.uploaded_features(i, rec.name, layers)
            if f is None:
                raise AttackInputError(p.protected, f"no {rec.name} features in this upload "
                                                    f"(arrays: {', '.join(self.features[i])})")
            out.append(f)
        return np.stack(out)

    def protected_chips_of(self, model: str, rows: list[int]) -> np.ndarray:
        """Returns [len(rows), S, S, 3] protected chips of the photo pairs `rows`."""
        from faceveil.engine.pipeline import recognise

        if not rows:
            return np.zeros((0, 1, 1, 3), np.float32)
        return np.stack([recognise.embed_faces(self.protected_images[i],
                                               self.protected_landmarks[i][None], model)[1][0]
                         for i in rows])


def _judged_face(image: np.ndarray, path: Path):
    """Returns (index, box [4], landmarks [5, 2]) of the largest face of at least MIN_FACE px."""
    from faceveil.engine.pipeline import faces

    found = faces.find_photo_faces(image, min_score=0.9, min_face=MIN_FACE)
    if not len(found.boxes):
        raise AttackInputError(path, f"no face found (score >= 0.9, at least {MIN_FACE:g} px)")
    k = int(np.argmax(faces.box_side(found.boxes)))
    return k, found.boxes[k], found.landmarks[k]


def _attacker_face(image: np.ndarray, path: Path, box: np.ndarray,
                   same_frame: bool) -> np.ndarray:
    """Returns the landmarks [5, 2] of the attacker's detection of the face near `box`."""
    from faceveil.engine.pipeline import faces, track

    found = faces.find_photo_faces(image, min_score=0.9, min_face=0)
    if not len(found.boxes):
        raise AttackInputError(path, "the attacker's detector finds no face (use --align "
                                     "original to judge it with the original's landmarks)")
    if not same_frame:  # another size: the largest face
        return found.landmarks[int(np.argmax(faces.box_side(found.boxes)))]
    iou = track.box_iou(box[None], found.boxes)[0]
    if iou.max() < 0.3:
        raise AttackInputError(path, "the attacker's detector finds no face where the "
                                     "original's is (use --align original)")
    return found.landmarks[int(np.argmax(iou))]


def load_faces(pairs: Sequence[Pair], *, align: str = "original") -> PairedFaces:
    """Returns the PairedFaces of `pairs`, every file read and checked.

    Args:
      pairs: from `pair_files`.
      align: 'original' cuts the protected face with the original's landmarks (the photo must
        have the original's size); 'detect' with the attacker's own detection.

    Raises:
      InputError: an unreadable file, an original without a face, a protected photo of another
        size (align original) or without a face (align detect), a bad .features.npz.
    """
    if align not in ("original", "detect"):
        raise ValueError(f"align must be 'original' or 'detect', got {align!r}")
    images, lms, index, p_images, p_lms, feats = [], [], [], [], [], []
    cache: dict[Path, tuple] = {}
    for p in pairs:
        if p.original not in cache:
            img = image_io.read_image(p.original)
            cache[p.original] = (img, *_judged_face(img, p.original))
        img, k, box, lm = cache[p.original]
        images.append(img)
        lms.append(lm)
        index.append(k)
        if p.features:
            feats.append(_read_features(p.protected))
            p_images.append(None)
            p_lms.append(np.full((5, 2), np.nan, np.float32))
            continue
        prot = image_io.read_image(p.protected)
        same = prot.shape == img.shape
        if align == "original" and not same:
            raise AttackInputError(p.protected, f"{prot.shape[1]}x{prot.shape[0]}, not the size "
                                                f"of its original {p.original} "
                                                f"({img.shape[1]}x{img.shape[0]}); use --align "
                                                "detect")
        feats.append(None)
        p_images.append(prot)
        p_lms.append(lm if align == "original" else _attacker_face(prot, p.protected, box, same))
    return PairedFaces(pairs=list(pairs), images=images, landmarks=np.asarray(lms, np.float32),
                       face_index=np.asarray(index, int), protected_images=p_images,
                       protected_landmarks=np.asarray(p_lms, np.float32), features=feats)


def _read_features(path: Path) -> dict:
    """Returns the arrays of a PMT feature upload, or InputError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, foreign
        raise AttackInputError(path, f"not a readable .npz ({type(e).__name__}: {e})") from None
    if "layers" not in arrays or not any(_CHIP.match(k) for k in arrays):
        raise AttackInputError(path, "not a PMT feature upload (needs 'layers' and "
                                     "'<model>_face<k>' arrays)")
    return arrays

