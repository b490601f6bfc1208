"""The attack suite's kinds on paired faces, each returning an `AttackReport` (DESIGN.md).

    data_abuse        Eq. 10 accuracy of recognisers on the protected faces (`data_abuse`)
    attributes        age and gender read from original and protected faces (`attributes`)
    up_curve          UP(sigma, kappa) of an authorised recogniser (`up`)
    recognise_photos  the attacker re-detects each protected photo, nearest clean photo
    recognise_video   the attacker's view of a cloaked video (`protection.evaluate`)

(white-box and black-box reconstruction: `inversion`.) An AttackReport holds table rows (named
values; None where a value is undefined, NaN never) and JSON details; `format_table` is what
`faceveil attack` prints, `summary` what it writes.

    faces = paired.load_faces(paired.pair_files(["originals/"], ["cloaked/"]))
    print(data_abuse(faces, ["dlib"]).format_table())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from faceveil.engine.attacks.paired import MIN_FACE, AttackInputError, PairedFaces


@dataclasses.dataclass(frozen=True)
class AttackReport:
    """One attack's table (rows of named values) and its JSON details."""

    kind: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[dict, ...]
    notes: tuple[str, ...] = ()
    details: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Returns the JSON form: kind, title, rows, notes and details."""
        return {"kind": self.kind, "title": self.title, "rows": [dict(r) for r in self.rows],
                "notes": list(self.notes), **self.details}

    def format_table(self) -> str:
        """Returns the readable table: title, aligned columns, then the notes."""
        cells = [list(self.columns)] + [[_cell(r.get(c)) for c in self.columns]
                                        for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        numeric = [i for i, c in enumerate(self.columns)
                   if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                          for r in self.rows)]
        lines = [self.title, ""]
        for n, row in enumerate(cells):
            lines.append("  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.notes:
            lines.append("")
            lines += list(self.notes)
        return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def json_float(x) -> float | None:
    """Returns x as a float, None for NaN (JSON null, '-' in the table)."""
    x = float(x)
    return None if np.isnan(x) else x


def json_mean(x) -> float | None:
    """Returns the mean of x as a float, None for no value or NaN."""
    x = np.asarray(x, np.float64)
    return json_float(x.mean()) if x.size else None


# ---------------------------------------------------------------------------------------------
# The kinds on photos


def _centre(model: str, faces: PairedFaces, references: str | None) -> tuple[np.ndarray, str]:
    """Returns (the mean clean embedding the cosines are centred on, where it came from)."""
    from faceveil.engine.pipeline import recognise

    if references:
        _, embs = recognise.photo_gallery([references], model, skip_faceless=True)
        where = f"{len(embs)} reference photo(s) in {references}"
    else:
        seen: dict[Path, int] = {}
        for i, p in enumerate(faces.pairs):
            seen.setdefault(p.original, i)
        embs = faces.original_chips(model)[0][list(seen.values())]
        where = f"{len(embs)} original(s)"
    if len(embs) < 2:
        raise AttackInputError(references or faces.pairs[0].original,
                               f"the centred cosine needs the mean of at least 2 clean faces, "
                               f"{where} have a face; give more originals or --references DIR")
    return embs.mean(axis=0), where


def _other_photo_pairs(faces: PairedFaces, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (i, j) int arrays of every ordered pair of one identity with other originals."""
    from faceveil.engine.attacks import data_abuse as da

    i, j = da.same_person_pairs(ids)
    i, j = np.concatenate([i, j]), np.concatenate([j, i])  # both directions
    keep = np.array([faces.pairs[a].original != faces.pairs[b].original
                     for a, b in zip(i, j)], bool).reshape(-1)
    return i[keep].astype(int), j[keep].astype(int)


def data_abuse(faces: PairedFaces, models: Sequence[str], *, kappa: float = 0.2,
               references: str | None = None) -> AttackReport:
    """Returns the data-abuse report: Eq. 10 accuracy of each recogniser on the protected faces.

    Per recogniser: `accuracy`, the fraction of protected faces whose centred cosine to their
    own original exceeds kappa (a feature upload: the embedding the recogniser finishes from
    the uploaded features; uploads without its features are not counted); `cross`, the same
    against the person's *other* clean photos (pairs of one identity); `clean`, verification of
    those clean pairs (the baseline).
    """
    from faceveil.engine.attacks import data_abuse as da
    from faceveil.engine.pipeline import recognise

    rows, notes, per_face = [], [], {}
    ids = np.asarray([p.identity for p in faces.pairs])
    for m in models:
        rec, params = recognise.recogniser_params(m)
        e_o = faces.original_chips(m)[0]
        centre, where = _centre(m, faces, references)
        e_p = np.full_like(e_o, np.nan)
        photo = [i for i, p in enumerate(faces.pairs) if not p.features]
        if photo:
            e_p[photo] = np.asarray(rec.embed(params, faces.protected_chips_of(m, photo)))
        for i, p in enumerate(faces.pairs):
            if p.features:
                layers = int(np.asarray(faces.features[i]["layers"]))
                f = faces.uploaded_features(i, m, layers)
                if f is not None:  # the authorised service finishes its own embedding
                    e_p[i] = np.asarray(rec.rest(params, f[None], layers))[0]
        ok = ~np.isnan(e_p).any(axis=1)
        if (~ok).any():
            notes.append(f"{m}: {int((~ok).sum())} feature upload(s) carry no {m} features "
                         "(unusable by it, not counted)")
        cos = np.full(len(faces), np.nan)
        cos[ok] = da.centred_cosine(e_p[ok], e_o[ok], centre)
        i, j = _other_photo_pairs(faces, ids)
        cross = ok[i]
        cross_cos = da.centred_cosine(e_p[i[cross]], e_o[j[cross]], centre)
        # The clean baseline is symmetric: each pair of different originals once.
        unique: dict[frozenset, tuple[int, int]] = {}
        for a, b in zip(i.tolist(), j.tolist()):
            unique.setdefault(frozenset((faces.pairs[a].original, faces.pairs[b].original)),
                              (a, b))
        ci = np.asarray([a for a, _ in unique.values()], int)
        cj = np.asarray([b for _, b in unique.values()], int)
        clean_cos = da.centred_cosine(e_o[ci], e_o[cj], centre)
        rows.append({
            "model": m, "faces": int(ok.sum()),
            "accuracy": json_float(np.mean(cos[ok] > kappa)) if ok.any() else None,
            "mean_cosine": json_mean(cos[ok]),
            "cross": json_float(np.mean(cross_cos > kappa)) if len(cross_cos) else None,
            "clean": json_float(np.mean(clean_cos > kappa)) if len(clean_cos) else None,
            "pairs": len(clean_cos)})
        per_face[m] = [{"protected": str(p.protected), "original": str(p.original),
                        "cosine": json_float(c)} for p, c in zip(faces.pairs, cos)]
        notes.append(f"{m}: centred on the mean of {where}")
    notes.insert(0, f"accuracy: protected face matched to its own original (centred cosine > "
                    f"{kappa:g}, Eq. 10); cross: to the person's other clean photos; clean: "
                    "those clean photo pairs (baseline); pairs: same-person photo pairs")
    return AttackReport(
        kind="data-abuse", title=f"Data abuse: Eq. 10 accuracy, kappa {kappa:g}",
        columns=("model", "faces", "accuracy", "mean_cosine", "cross", "clean", "pairs"),
        rows=tuple(rows), notes=tuple(notes), details={"kappa": kappa, "per_face": per_face})


def attributes(faces: PairedFaces) -> AttackReport:
    """Returns the attribute report: age and gender read from the original and protected faces."""
    from faceveil.engine.attacks import attributes as attr
    from faceveil.models import attributes as attribute_models

    x = faces.original_chips("dlib")[1]  # dlib's template, padding 0.25: the networks' frame
    y = faces.protected_chips("dlib", "attributes")[1]
    res = attr.evaluate(attribute_models.load(), x, y)
    s = res.summary()
    rows = [{"photo": p.protected.name, "age_original": json_float(a["age_original"]),
             "age_protected": json_float(a["age_protected"]), "age_error": json_float(a["age_error"]),
             "male_original": a["p_male_original"] > 0.5,
             "male_protected": a["p_male_protected"] > 0.5, "cosine": json_float(a["cosine"])}
            for p, a in zip(faces.pairs, s["per_face"])]
    rows.append({"photo": "mean", "age_error": json_float(res.mean_age_error),
                 "cosine": json_float(res.mean_cosine)})
    for r, p in zip(s["per_face"], faces.pairs):
        r["protected"] = str(p.protected)
    return AttackReport(
        kind="attributes", title="Attribute estimation (age and gender networks)",
        columns=("photo", "age_original", "age_protected", "age_error", "male_original",
                 "male_protected", "cosine"),
        rows=tuple(rows),
        notes=((f"gender agreement {res.gender_agreement:.3f}; cosine: of the 83 output "
               "probabilities (81 age classes, female, male), 1 = the same reading"),),
        details={"summary": {k: v for k, v in s.items() if k != "per_face"},
                 "per_face": s["per_face"]})


def up_curve(faces: PairedFaces, model: str = "dlib", *, kappa: float = 0.2,
             sigmas: Sequence[float] | None = None, references: str | None = None):
    """Returns (the UP report, UpResult) of the authorised recogniser `model`."""
    from faceveil.engine.attacks import up
    from faceveil.engine.pipeline import recognise

    rec, params = recognise.recogniser_params(model)
    centre, where = _centre(model, faces, references)
    x = faces.original_chips(model)[1]
    y = faces.protected_chips(model, "up")[1]
    res = up.evaluate(rec, params, x, y, centre=centre, kappa=kappa,
                      sigmas=up.DEFAULT_SIGMAS if sigmas is None else sigmas)
    rows = [{"sigma": float(g), "private": json_mean(res.privacy >= g), "up": json_float(u)}
            for g, u in zip(res.sigmas, res.up)]
    s = res.summary()
    note = (f"{len(faces)} face(s): mean privacy LPIPS {s['mean_privacy_lpips']:.3f}, mean "
            f"utility cosine {s['mean_utility_cosine']:.3f}, useful (utility >= kappa) "
            f"{res.useful:.3f}; centred on the mean of {where}")
    report = AttackReport(
        kind="up", title=f"UP(sigma, kappa={kappa:g}): private (LPIPS >= sigma) and useful "
                         f"({model} centred cosine >= kappa)",
        columns=("sigma", "private", "up"), rows=tuple(rows), notes=(note,),
        details={"model": model, **s, "files": [str(p.protected) for p in faces.pairs]})
    return report, res


def recognise_photos(faces: PairedFaces, models: Sequence[str]) -> AttackReport:
    """Returns the attacker's verdict on each protected photo (as `faceveil check` judges).

    The attacker re-detects every face of the protected photo and takes the nearest to the
    person's clean photos: `own`, the photo's original (the strictest reference), and `others`,
    the person's other originals (same identity folder). Protected when farther than the
    recogniser's threshold; a photo in which no face is found counts as protected.
    """
    from faceveil.engine.pipeline import faces as face_mod
    from faceveil.engine.pipeline import recognise

    for p in faces.pairs:
        if p.features:
            raise AttackInputError(p.protected, "a feature upload has no image; attack "
                                                "recognise needs protected photos")
    rows = []
    for m in models:
        rec, _ = recognise.recogniser_params(m)
        e_o = faces.original_chips(m)[0]
        for i, p in enumerate(faces.pairs):
            found = face_mod.find_photo_faces(faces.protected_images[i], min_score=0.9,
                                              min_face=0)
            others = [j for j, q in enumerate(faces.pairs)
                      if q.identity == p.identity and q.original != p.original]
            others = list({faces.pairs[j].original: j for j in others}.values())
            row = {"photo": p.protected.name, "model": m, "faces": len(found.boxes),
                   "own": None, "others": None, "threshold": float(rec.threshold)}
            if len(found.boxes):
                emb, _ = recognise.embed_faces(faces.protected_images[i], found.landmarks, m)
                row["own"] = float(np.linalg.norm(emb - e_o[i], axis=-1).min())
                if others:
                    d = np.linalg.norm(emb[:, None] - e_o[others][None], axis=-1)
                    row["others"] = float(d.min())
            near = [d for d in (row["own"], row["others"]) if d is not None]
            row["protected"] = not near or min(near) > rec.threshold
            rows.append(row)
    summary = {m: {"photos": sum(r["model"] == m for r in rows),
                   "protected_vs_own": json_mean([r["own"] is None or r["own"] > r["threshold"]
                                              for r in rows if r["model"] == m]),
                   "protected_vs_others": json_mean([r["others"] > r["threshold"] for r in rows
                                                 if r["model"] == m and r["others"] is not None]
                                                or [np.nan])}
               for m in models}
    notes = [f"{m}: protected vs own original {s['protected_vs_own']}, vs the person's other "
             f"photos {s['protected_vs_others']}" for m, s in summary.items()]
    return AttackReport(
        kind="recognise", title="Recognition by the attacker (re-detect, nearest clean photo)",
        columns=("photo", "model", "faces", "own", "others", "threshold", "protected"),
        rows=tuple(rows),
        notes=(("own: distance to the photo's own original; others: to the person's other "
               "originals; protected: farther than the threshold from both (or no face found)"),
               *notes),
        details={"summary": summary})


# ---------------------------------------------------------------------------------------------
# Videos


def recognise_video(original: str, protected: str, models: Sequence[str], *,
                    references: str | None = None, frames: int | None = None) -> AttackReport:
    """Returns the attacker's view of a cloaked video (`protection.evaluate`) per recogniser.

    The clean video's faces are detected and tracked as `cloak-video` does; the attacker
    re-detects the cloaked frames and compares each face with the track's other clean frames
    (centroid, nearest frame) and with labelled photos (--references, identity folders).
    """
    from faceveil.engine.attacks import protection
    from faceveil.engine.pipeline import faces, recognise, video_io

    clean = video_io.read_video(original, limit=frames)
    cloaked = video_io.read_video(protected, limit=frames)
    n = min(len(clean), len(cloaked))  # cloak-video --frames N may write only N frames
    if clean.shape[1:] != cloaked.shape[1:]:
        raise AttackInputError(protected, f"{cloaked.shape[2]}x{cloaked.shape[1]} frames, not "
                                          f"the size of {original} "
                                          f"({clean.shape[2]}x{clean.shape[1]})")
    clean, cloaked = clean[:n], cloaked[:n]
    found = faces.track_faces(faces.detect_frames(clean, min_score=0.9, min_face=MIN_FACE))
    mask = found.tracks.mask
    if not mask.any():
        raise AttackInputError(original, f"no face found in {n} frame(s) (score >= 0.9, at "
                                         f"least {MIN_FACE:g} px)")
    det = protection.detect_frames(cloaked)
    rows, details = [], {}
    for m in models:
        gallery = (recognise.photo_gallery([references], m, skip_faceless=True)
                   if references else None)
        s = protection.evaluate(clean, cloaked, found.landmarks, found.boxes, mask, model=m,
                                gallery=gallery, detections=det)
        details[m] = s
        row = {"model": m, "faces": s["faces"], "missed": s["attacker_missed_face"]}
        for r in protection.REFERENCES:
            row[r] = None if s[r] is None else json_float(s[r]["fraction_protected"])
        # With no reference at all (a track of one frame, no --references) nothing was judged.
        row["all"] = (None if all(s[r] is None for r in protection.REFERENCES)
                      else s["fraction_protected_all"])
        rows.append(row)
    return AttackReport(
        kind="recognise", title=f"Recognition by the attacker: {protected} vs {original} "
                                f"({n} frames)",
        columns=("model", "faces", "missed", *protection.REFERENCES, "all"), rows=tuple(rows),
        notes=(("fraction of faces protected (farther than the recogniser's threshold) against "
               "each reference: centroid of the track's other clean frames, nearest clean frame, "
               "nearest labelled photo (--references); missed: faces the attacker's detector "
               "does not find (protected)"),),
        details={"frames": n, "summary": details})

