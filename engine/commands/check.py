"""`faceveil check`: the attacker's view of protected photos, so a user can see for themselves
whether a cloak works.

The attacker holds clean photos of the user (the references) and a recogniser. For each
protected photo the faces are found again with our detector, each face is embedded by each
recogniser and compared with the embeddings of the references:

* a face's distance is its minimum Euclidean distance to any reference embedding (the strictest
  gallery: one clean photo close enough is enough for a match); its distance to the centroid of
  the references is reported beside it;
* the photo's distance is that of its face nearest to the references (the smallest distance);
* the photo is protected against the recogniser when that distance is above the recogniser's
  same-person threshold (`registry.get(model).threshold`: dlib 0.6, FaceNet 0.94). A photo in
  which no face is found counts as protected and says so ("no face found").

Every reference is used as is: there is no need to leave out the clean original of a protected
photo (checking a photo against an identical reference just reports distance 0, not protected).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from faceveil.engine.pipeline import image_io

NO_FACE = "no face found"


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One protected photo against one recogniser."""

    photo: str
    model: str
    faces: int  # faces found in the photo (score >= 0.9, any size)
    distance: float | None  # nearest face's minimum distance to any reference; None: no face
    centroid_distance: float | None  # that same face's distance to the references' centroid
    threshold: float  # the recogniser's same-person threshold
    protected: bool  # distance > threshold, or no face found
    face: int | None = None  # index of the nearest face among the photo's faces
    box: tuple[float, float, float, float] | None = None  # its box (x1, y1, x2, y2), pixels
    note: str = ""  # NO_FACE when no face was found

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Rows per (photo, recogniser), photos in input order, recognisers in the order asked."""

    rows: tuple[CheckRow, ...]
    models: tuple[str, ...]
    references: str
    reference_faces: dict[str, int]  # per recogniser: reference photos with a face (embedded)

    @property
    def protected(self) -> bool:
        """True when every photo is protected against every recogniser."""
        return all(r.protected for r in self.rows)

    @property
    def exposed(self) -> tuple[CheckRow, ...]:
        """The rows that are not protected."""
        return tuple(r for r in self.rows if not r.protected)

    def summary(self) -> dict:
        """Returns the JSON form: references, recognisers, rows and the overall verdict."""
        return {
            "references": self.references,
            "reference_faces": dict(self.reference_faces),
            "models": list(self.models),
            "protected": self.protected,
            "not_protected": len(self.exposed),
            "rows": [r.as_dict() for r in self.rows],
        }


def _photos_under(folder: Path, what: str = "") -> list[Path]:
    """Returns every .jpg/.jpeg/.png file under `folder`, sorted; InputError if there is none."""
    from faceveil.engine.pipeline import recognise

    found = recognise.photo_files([folder])
    if not found:
        raise image_io.InputError(
            folder, f"no photo ({', '.join(recognise.PHOTO_SUFFIXES)}) in this folder{what}")
    return found


def protected_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Returns the photos named by `paths`: files as given, folders as every photo under them.

    Raises:
      InputError: a path that does not exist, or a folder holding no .jpg/.jpeg/.png photo.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += _photos_under(p)
        elif p.exists():
            files.append(p)
        else:
            raise image_io.InputError(p, "no such file or folder")
    if not files:
        raise image_io.InputError(".", "no protected photo given")
    return files


def _reference_gallery(references: Path, files: Sequence[Path], model: str) -> np.ndarray:
    """Returns the embeddings [N, D] of the largest face of each reference photo with a face.

    Raises:
      InputError: no reference photo has a face.
    """
    from faceveil.engine.pipeline import recognise

    _, embs = recognise.photo_gallery(files, model, skip_faceless=True)
    if not len(embs):
        raise image_io.InputError(references, "no reference photo with a face")
    return embs


def check_photos(
    protected_paths: Sequence[str | os.PathLike],
    references: str | os.PathLike,
    models: Sequence[str] = ("dlib",),
) -> CheckResult:
    """Returns the attacker's verdict on each protected photo against each recogniser.

    Args:
      protected_paths: photo files and/or folders (every .jpg/.jpeg/.png under a folder).
      references: folder of the user's own clean photos (searched recursively); the largest
        face of each is a reference, photos without a face are skipped.
      models: recogniser names ("dlib", "facenet").

    Raises:
      InputError: a missing path or references folder, a references folder without a photo
        with a face, an unreadable image (each names the path and the reason).
      KeyError: an unknown recogniser.
    """
    from faceveil.engine.pipeline import faces, recognise
    from faceveil.models import registry

    models = tuple(models)
    if not models:
        raise ValueError("check_photos: no recogniser given")
    recs = {m: registry.get(m) for m in models}  # unknown names fail before any work
    references = Path(references)
    if not references.exists():
        raise image_io.InputError(references, "no such folder (the reference photos)")
    if not references.is_dir():
        raise image_io.InputError(references, "not a folder (the reference photos)")
    ref_files = _photos_under(references, " (the reference photos)")
    files = protected_files(protected_paths)

    galleries = {m: _reference_gallery(references, ref_files, m) for m in models}
    centroids = {m: g.mean(axis=0) for m, g in galleries.items()}
    rows = []
    for f in files:
        image = image_io.read_image(f)
        found = faces.find_photo_faces(image, min_score=0.9, min_face=0)
        n = len(found.boxes)
        for m in models:
            threshold = float(recs[m].threshold)
            if n == 0:
                rows.append(CheckRow(photo=str(f), model=m, faces=0, distance=None,
                                     centroid_distance=None, threshold=threshold,
                                     protected=True, note=NO_FACE))
                continue
            emb, _ = recognise.embed_faces(image, found.landmarks, m)  # [K, D]
            d = np.linalg.norm(emb[:, None, :] - galleries[m][None, :, :], axis=-1)  # [K, N]
            nearest = d.min(axis=1)  # [K]
            k = int(np.argmin(nearest))
            distance = float(nearest[k])
            rows.append(CheckRow(
                photo=str(f), model=m, faces=n, distance=distance,
                centroid_distance=float(np.linalg.norm(emb[k] - centroids[m])),
                threshold=threshold, protected=distance > threshold, face=k,
                box=tuple(round(float(v), 1) for v in found.boxes[k])))
    return CheckResult(rows=tuple(rows), models=models, references=str(references),
                       reference_faces={m: len(g) for m, g in galleries.items()})


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(result: CheckResult) -> str:
    """Returns the human table (one line per photo and recogniser) and the closing verdict."""
    head = ("photo", "recogniser", "faces", "distance", "centroid", "threshold", "protected")
    lines = [head]
    for r in result.rows:
        verdict = "yes" if r.protected else "NO"
        if r.note:
            verdict += f" ({r.note})"
        lines.append((r.photo, r.model, str(r.faces), _fmt(r.distance),
                      _fmt(r.centroid_distance), f"{r.threshold:g}", verdict))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    right = {2, 3, 4, 5}  # numbers align right
    out = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    refs = ", ".join(f"{m} {n}" for m, n in result.reference_faces.items())
    photos = len({r.photo for r in result.rows})
    exposed = result.exposed
    out.append("")
    out.append(f"references: {result.references} (reference faces: {refs})")
    out.append("distance: nearest face's minimum distance to any reference; "
               "protected: distance > threshold")
    if exposed:
        out.append(f"NOT PROTECTED: {len({r.photo for r in exposed})} of {photos} photo(s) "
                   f"match the references ({len(exposed)} photo/recogniser pair(s))")
    else:
        out.append(f"protected: all {photos} photo(s) against {', '.join(result.models)}")
    return "\n".join(out)


def write_png(result: CheckResult, path: str | os.PathLike, *,
              inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Returns the path written: a bar chart of distances per photo, one panel per recogniser.

    Bars are each photo's distance (green: protected, red: not), the diamond its centroid
    distance, the dashed line the recogniser's threshold; a photo without a face has no bar
    and is labelled "no face". Written atomically (`report._save`).

    Raises:
      OutputError: `path` is not a .png, or names one of `inputs` (unless `overwrite`).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from faceveil.engine.commands import report

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise image_io.OutputError(path, "the chart is a PNG; use a .png name")
    image_io.ensure_not_input(path, inputs, overwrite=overwrite)
    photos = list(dict.fromkeys(r.photo for r in result.rows))
    labels = [Path(p).name for p in photos]
    n_models = len(result.models)
    fig = Figure(figsize=(max(8.0, 3.0 + 0.7 * len(photos)), 1.5 + 3.0 * n_models), dpi=100,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_models, 1, squeeze=False)[:, 0])
    by_key = {(r.photo, r.model): r for r in result.rows}
    x = np.arange(len(photos))
    for ax, m in zip(axes, result.models):
        rows = [by_key[(p, m)] for p in photos]
        dist = np.array([np.nan if r.distance is None else r.distance for r in rows])
        cent = np.array([np.nan if r.centroid_distance is None else r.centroid_distance
                         for r in rows])
        colours = ["#2ca02c" if r.protected else "#d62728" for r in rows]
        ax.bar(x, np.nan_to_num(dist), color=colours, width=0.6)
        ax.scatter(x, cent, marker="D", color="k", s=18, zorder=3)
        threshold = rows[0].threshold
        ax.axhline(threshold, color="k", ls="--", lw=1.0)
        top = np.nanmax(np.concatenate([dist, cent, [threshold]]))
        for i, r in enumerate(rows):
            if r.distance is None:
                ax.annotate("no face", (i, 0), xytext=(0, 3), textcoords="offset points",
                            ha="center", fontsize=8, rotation=90, va="bottom")
        ax.set_ylim(0, 1.15 * top)
        ax.set_ylabel(f"{m} distance")
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        legend = [Patch(color="#2ca02c", label="nearest reference: protected"),
                  Patch(color="#d62728", label="nearest reference: NOT protected"),
                  Line2D([], [], color="k", marker="D", ls="none", ms=4, label="centroid"),
                  Line2D([], [], color="k", ls="--", lw=1.0, label=f"threshold {threshold:g}")]
        ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False)
    n_exposed = len({r.photo for r in result.exposed})
    verdict = (f"{n_exposed} of {len(photos)} photo(s) NOT protected" if n_exposed
               else f"all {len(photos)} photo(s) protected")
    fig.suptitle(f"Attacker's view against the references in {Path(result.references).name}/: "
                 f"{verdict}", fontsize=10)
    return report._save(fig, path)


def write_json(result: CheckResult, path: str | os.PathLike, *,
               inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Returns the path written: `result.summary()` as JSON, atomically (`image_io.write_json`)."""
    return image_io.write_json(path, result.summary(), inputs=inputs, overwrite=overwrite)
