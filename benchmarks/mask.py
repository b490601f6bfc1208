"""Mask templates, both modes (issue 14 item 6): F_c, T_o, T_r, r_s, quality, exactness.

    python -m benchmarks.mask --json out/mask.json [--data DIR] [--max_photos N] [--iters K]
        [--bits 1,2,3,4] [--against dlib,facenet,dlib+facenet] [--grid_rows 4] [--budget_s S]
        [--modes per-image,generator] [--models out/mask_models] [--gen_steps N]

Generator mode: ONE model for every recogniser named in `--against` (`pipeline.mask_training`:
template network, then key generator, against all of them; MaskTrainConfig's settings,
`--gen_steps` generator steps); each recogniser set uses its rows of tau (superposed
templates) and every b the same generator. It is trained on every face of every shared photo
(the probes included: the set is too small to hold people out; stated in the JSON) and kept
under `--models` (a rerun resumes or reuses it). Its settings run first (one forward pass per face), then the
per-image mode's.

Probes: the photos of every identity folder under DATA/faces with two or more photos (taken
round-robin over the identities, so `--max_photos N` keeps every person in; sorted within a
person). Every face our MTCNN finds in a probe (score >= 0.9, side >= 40 px) is masked by the
library (`pipeline.masks.mask_images`, the per-image mode `methods.mask`), one call per photo,
for each recogniser protected against (`--against`: dlib, FaceNet, and both at once with
superposed templates, written dlib+facenet) and each b in `--bits`, with the preset a user
gets for that b (`mask.PRESETS`: b = 1..3 the DSSIM budget 0.025, b = 4 the default 0.05) and
`--iters` Adam steps (default: MaskConfig's 60).

Attacker (the same for clean, protected and restored photos, each photo as written): our
MTCNN re-detects the faces in the photo (score >= 0.9, any size) and each recogniser embeds
the largest one on its own chip (`recognise.embed_faces`; the attacker's landmarks, not the
ones the key was made with). A photo where the attacker finds no face counts as a failure of
recognition (and is counted in `no_face`).

Gallery choice (stated, as the issue leaves it open): 1:N identification of a probe is
rank-1 against a gallery of every clean photo of every shared identity (those with one photo
are distractors) EXCEPT the probe's own original: a person who publishes a protected photo
has other photos of them around, not the original of this one. `obama1_240p.jpg` is a
downscaled copy of `obama1.jpg`; both stay in, so for those two probes the gallery holds a
near-duplicate of the original (the strict case for the protection). Identification is
correct when the nearest gallery embedding is the probe's identity (closed set, no
threshold). Verification against the person's other photos: recognised when the nearest of
them is within the recogniser's same-person threshold (dlib 0.6, FaceNet 0.94).

Figures per setting (recognisers protected against, b) and per attacking recogniser:
- T_o: clean accuracy of the same identification (and verification) on the probes;
- F_c: failure rate of identification (and verification) on the protected photos: the
  fraction of probes NOT recognised (the issue's definition; `losses.r_s`'s docstring reads
  F_c as an accuracy, but its formula is the paper's and is used as is);
- T_r: accuracy on the restored photos (protected XOR key, the key through `pack_key` /
  `unpack_key`); a restored photo that is bit-identical to its original gets the original's
  embeddings (the attacker is deterministic), any other is attacked afresh;
- r_s = F_c / (1 + T_o - F_c) (`losses.r_s`);
- cross-model F_c: the attacking recogniser is not among those protected against;
- SSIM and PSNR of the protected photo vs the clean one, on the face region (the detector box
  of the largest face enlarged 20% about its centre, at the photo's own scale, as
  benchmarks.photo_protection) and on the whole photo;
- restoration: bit-exact photos over all probes (the summary: over every photo and b);
- speed on this backend: protect seconds per photo (the library call: templates, key
  optimisation, paste; the first call of each patch size and setting includes compilation,
  the others are the steady state, reported apart), restore seconds per photo (unpack + XOR).
  GPU figures: "not measured" unless this runs on a GPU.

Settings run from the largest b down; the JSON and PNG are rewritten after every setting
(`"in_progress": true` until the last), so a run cut short keeps what it measured; with
`--budget_s` a setting predicted to end past the budget is skipped and listed in `skipped`.

`summary`: `restore_bit_exact_fraction` (every photo and setting), `f_c_per_image` (the best
identification F_c on the recogniser(s) protected against, the lowest member's for the pair,
among settings whose mean face-region SSIM is >= 0.9; verification's beside it),
`ssim_at_best`, and the same for the generator mode (`f_c_generator`, its
`ssim_at_best_generator`, and `f_c_generator_any_ssim`, its best whatever the SSIM). PNG grids
beside the JSON (`<name>.png`, the per-image mode's best setting; `<name>_generator.png`, the
generator's): original, template, key (amplified to full range), protected, restored, face
regions of a few probes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from benchmarks import parity_dlib
from benchmarks.photo_protection import face_crop_box, identity_photos, ours_attacker
from faceveil import losses
from faceveil.engine.commands import report as report_lib
from faceveil.engine.methods import mask
from faceveil.engine.pipeline import faces, image_io, mask_training, masks, progress, recognise
from faceveil.models import registry

DEFAULT_DATA = parity_dlib.DEFAULT_DATA
MODELS = ("dlib", "facenet")
AGAINST = ("dlib", "facenet", "dlib,facenet")
MODES = ("per-image", "generator")
PRESET_OF_BITS = {1: "b1", 2: "b2", 3: "b3", 4: "default"}
SSIM_BAR = 0.9
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the JSON report here too (the PNG grid beside it).")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder (faces/<identity>/).")
    flags.DEFINE_integer("max_photos", None, "Protect only the first N probes (round-robin "
                         "over the identities); the gallery keeps every photo.")
    flags.DEFINE_integer("iters", None, "Adam steps per key (default: MaskConfig's).")
    flags.DEFINE_list("bits", ["1", "2", "3", "4"], "The b values (low-order bits) to run.")
    flags.DEFINE_list("against", ["dlib", "facenet", "dlib+facenet"],
                      "Recognisers protected against; '+' joins several (superposed).")
    flags.DEFINE_list("modes", list(MODES), "per-image (keys optimised per photo) and/or "
                      "generator (one model trained by mask_training for every --against).")
    flags.DEFINE_string("models", "out/mask_models", "Folder of the trained models "
                        "(<models>/<recognisers>/mask_model.npz; trained there when missing, "
                        "resumed when interrupted).")
    flags.DEFINE_integer("gen_steps", None, "Generator training steps (default: "
                         "MaskTrainConfig's).")
    flags.DEFINE_integer("grid_rows", 4, "Probes in the PNG grid.")
    flags.DEFINE_bool("resume", False, "Keep the settings an interrupted run wrote to --json "
                      "(same probes and steps) and run only the others.")
    flags.DEFINE_integer("seed", 0, "Seed of the sensitivity probes and the keys' start.")
    flags.DEFINE_float("budget_s", None, "Start no setting that would end past this many seconds "
                       "of the run (predicted from the last setting against the same "
                       "recognisers); the ones not run are listed in `skipped`.")


def _log(msg: str) -> None:
    progress.say(f"mask benchmark: {msg}")


# --------------------------------------------------------------------------------------------
# Photos and the attacker


def probe_photos(data: Path, max_photos: int | None) -> list[tuple[str, Path]]:
    """Returns (identity, path) of the probes: round-robin over identities with >= 2 photos."""
    by: dict[str, list[Path]] = {}
    for who, p in identity_photos(data):
        by.setdefault(who, []).append(p)
    order, k = [], 0
    while any(k < len(v) for v in by.values()):
        order += [(who, v[k]) for who, v in sorted(by.items()) if k < len(v)]
        k += 1
    return order[:max_photos] if max_photos else order


def gallery_photos(data: Path) -> list[tuple[str, Path]]:
    """Returns (identity, path) of every shared photo (every identity, sorted)."""
    return [(f.parent.name, f) for f in recognise.photo_files([Path(data) / "faces"])]


def identify(view: dict | None, gallery: list[tuple[str, Path, dict]], who: str,
             exclude: Path, threshold: float) -> dict:
    """Returns the rank-1 identification and the verification of one attacker view.

    gallery: (identity, path, view) of every clean photo; the probe's own original (`exclude`)
    is left out of both the gallery and the person's references.
    """
    if view is None:
        return {"identified": False, "verified": False, "no_face": True, "rank1": None,
                "distance_rank1": None, "distance_same": None}
    ref = [(w, g["emb"]) for w, p, g in gallery if p != exclude and g is not None]
    d = np.linalg.norm(np.stack([e for _, e in ref]) - view["emb"][None], axis=-1)
    k = int(np.argmin(d))
    same = [float(v) for v, (w, _) in zip(d, ref) if w == who]
    d_same = min(same) if same else None
    return {"identified": ref[k][0] == who, "verified": d_same is not None and d_same <= threshold,
            "no_face": False, "rank1": ref[k][0], "distance_rank1": round(float(d[k]), 5),
            "distance_same": None if d_same is None else round(d_same, 5)}


def _quality(clean: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    a, b = image_io.to_float(clean), image_io.to_float(other)
    return float(losses.ssim(a, b)), float(losses.psnr(a, b))


def _largest(boxes: np.ndarray) -> int:
    return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))


def template_on_photo(res: masks.MaskResult, found: faces.PhotoFaces, against: str,
                      shape: tuple[int, ...]) -> np.ndarray:
    """Returns [H, W] bool: the union of the faces' templates carried to the photo's grid."""
    rec = registry.get(against)
    out = np.zeros(shape[:2], bool)
    tmpl = res.photos.faces.metrics["template"]
    h, w = shape[:2]
    for j in range(len(found.boxes)):
        t = tmpl[j] > 0.5
        plan = faces.plan_faces(found.landmarks[j][None], np.ones(1, bool), rec, size=t.shape[0])
        x, y = plan.offsets[0]
        ys, xs = np.nonzero(t)
        ok = (ys + y >= 0) & (ys + y < h) & (xs + x >= 0) & (xs + x < w)
        out[ys[ok] + y, xs[ok] + x] = True
    return out


# --------------------------------------------------------------------------------------------
# One setting


def run_setting(against: str, bits: int, probes, images, found, clean_views, gallery,
                *, iters, seed, grid_rows, compiled: set, model=None) -> tuple[dict, list]:
    """Returns (report, grid crops) of one setting: every probe masked, attacked, restored.

    `model`: a trained `mask_training.MaskModel` (generator mode); None: per-image mode.
    """
    over = {} if iters is None else {"iters": iters}
    cfg = mask.preset(PRESET_OF_BITS[bits], **over)
    members = [r.name for r in registry.members(registry.get(against))]
    mode = "per-image" if model is None else "generator"
    thr = {m: float(registry.get(m).threshold) for m in MODELS}
    attacker = ours_attacker(MODELS)
    rows, crops = [], []
    first_calls, steady_calls, restore_s = [], [], []
    for i, (who, p) in enumerate(probes):
        img, pf = images[p], found[p]
        plans = [faces.plan_faces(pf.landmarks[j][None], np.ones(1, bool),
                                  registry.get(against)).size for j in range(len(pf.boxes))]
        sides = tuple(sorted(set(faces.merge_sides(plans))))
        t = time.perf_counter()
        res = masks.mask_images([img], recognisers=against, config=cfg, seed=seed, found=[pf],
                                names=[p.name], show_progress=False, measure=False,
                                model=model)
        dt = time.perf_counter() - t
        fresh = (sides, len(pf.boxes)) not in compiled
        compiled.add((sides, len(pf.boxes)))
        (first_calls if fresh else steady_calls).append(dt)
        prot, key = res.images[0], res.keys[0]
        t = time.perf_counter()
        restored = masks.restore(prot, masks.unpack_key(masks.pack_key(key, bits), key.shape,
                                                        bits))
        restore_s.append(time.perf_counter() - t)
        exact = bool(np.array_equal(restored, img))
        views_p = attacker(prot)
        views_r = clean_views[p] if exact else attacker(restored)
        box = pf.boxes[_largest(pf.boxes)]
        x0, y0, x1, y1 = face_crop_box(box, img.shape)
        f_ssim, f_psnr = _quality(img[y0:y1, x0:x1], prot[y0:y1, x0:x1])
        w_ssim, w_psnr = _quality(img, prot)
        row = {"photo": f"{who}/{p.name}", "identity": who, "faces": len(pf.boxes),
               "seconds": round(dt, 2), "compiled_here": fresh, "bit_exact": exact,
               "key_nonzero_fraction": round(float(np.mean(key != 0)), 6),
               "face_ssim": round(f_ssim, 6), "face_psnr": round(f_psnr, 3),
               "photo_ssim": round(w_ssim, 6), "photo_psnr": round(w_psnr, 3),
               "attack": {}}
        for m in MODELS:
            row["attack"][m] = {
                "protected_against": m in members,
                "clean": identify(clean_views[p][m], gallery[m], who, p, thr[m]),
                "protected": identify(views_p[m], gallery[m], who, p, thr[m]),
                "restored": identify(views_r[m], gallery[m], who, p, thr[m]),
                "distance_to_own_original": (
                    None if views_p[m] is None or clean_views[p][m] is None else round(float(
                        np.linalg.norm(views_p[m]["emb"] - clean_views[p][m]["emb"])), 5))}
        rows.append(row)
        if i < grid_rows:
            tmpl = template_on_photo(res, pf, against, img.shape)
            amp = key.astype(np.float32) / float((1 << bits) - 1)
            crops.append({"photo": row["photo"],
                          "original": img[y0:y1, x0:x1], "template": tmpl[y0:y1, x0:x1],
                          "key": amp[y0:y1, x0:x1], "protected": prot[y0:y1, x0:x1],
                          "restored": restored[y0:y1, x0:x1]})
        a = row["attack"]
        _log(f"{mode} {against} b={bits} {i + 1}/{len(probes)} {row['photo']}: {dt:.1f} s"
             f"{' (compile incl.)' if fresh else ''}, face SSIM {f_ssim:.4f}, "
             + ", ".join(f"{m} id {'ok' if a[m]['protected']['identified'] else 'FOOLED'} "
                         f"d={a[m]['distance_to_own_original']}" for m in MODELS)
             + f", exact {exact}")
    rep = {"mode": mode, "against": against, "bits": bits,
           "config": dict(cfg.__dict__) if model is None else {"bits": bits},
           "photos": len(rows), "faces": int(sum(r["faces"] for r in rows)),
           "restore_bit_exact": int(sum(r["bit_exact"] for r in rows)),
           "face_ssim_mean": float(np.mean([r["face_ssim"] for r in rows])),
           "face_ssim_min": float(np.min([r["face_ssim"] for r in rows])),
           "face_psnr_mean": float(np.mean([r["face_psnr"] for r in rows])),
           "photo_ssim_mean": float(np.mean([r["photo_ssim"] for r in rows])),
           "photo_psnr_mean": float(np.mean([r["photo_psnr"] for r in rows])),
           "attackers": {},
           "speed": {"backend": jax.default_backend(),
                     "protect_seconds_per_photo_steady": (
                         float(np.mean(steady_calls)) if steady_calls else None),
                     "protect_seconds_per_photo_with_compile": (
                         float(np.mean(first_calls)) if first_calls else None),
                     "calls_with_compile": len(first_calls), "calls_steady": len(steady_calls),
                     "restore_seconds_per_photo": float(np.mean(restore_s))},
           "rows": rows}
    for m in MODELS:
        per = [r["attack"][m] for r in rows]
        out = {"protected_against": m in members, "threshold": thr[m]}
        for task, key in (("identification", "identified"), ("verification", "verified")):
            t_o = float(np.mean([v["clean"][key] for v in per]))
            f_c = float(np.mean([not v["protected"][key] for v in per]))
            t_r = float(np.mean([v["restored"][key] for v in per]))
            out[task] = {"T_o": t_o, "F_c": f_c, "T_r": t_r,
                         "r_s": float(losses.r_s(t_o, f_c))}
        out["no_face_protected"] = int(sum(v["protected"]["no_face"] for v in per))
        d = [v["distance_to_own_original"] for v in per if v["distance_to_own_original"]
             is not None]
        out["distance_to_own_original_mean"] = float(np.mean(d)) if d else None
        rep["attackers"][m] = out
    return rep, crops


# --------------------------------------------------------------------------------------------
# Summary and grid


def _own_f_c(rep: dict, task: str = "identification") -> float:
    """Returns F_c on the recogniser(s) protected against (the lowest member's for a pair)."""
    return min(a[task]["F_c"] for a in rep["attackers"].values() if a["protected_against"])


def _best(settings: list[dict]) -> dict | None:
    """Returns the setting of highest own F_c (identification) among those at SSIM_BAR."""
    ok = [s for s in settings if s["face_ssim_mean"] >= SSIM_BAR]
    return max(ok, key=lambda s: (_own_f_c(s), s["face_ssim_mean"])) if ok else None


def summary(settings: list[dict], generator: dict | None = None) -> dict:
    """Returns the issue's summary of the settings run (module docstring)."""
    exact = sum(s["restore_bit_exact"] for s in settings)
    total = sum(s["photos"] for s in settings)
    best = _best([s for s in settings if s["mode"] == "per-image"])
    gen_settings = [s for s in settings if s["mode"] == "generator"]
    gen = _best(gen_settings)
    steady = {}
    for s in settings:
        v = s["speed"]["protect_seconds_per_photo_steady"]
        if v is not None:
            steady.setdefault(f"{s['mode']} {s['against']}", []).append(v)
    steady = {a: round(float(np.mean(v)), 3) for a, v in steady.items()}
    cpu = jax.default_backend() == "cpu"

    def where(s):
        return None if s is None else {"mode": s["mode"], "against": s["against"],
                                       "bits": s["bits"]}

    out = {
        "restore_bit_exact_fraction": exact / total if total else None,
        "restore_bit_exact": f"{exact}/{total} (every photo, mode and b run)",
        "f_c_per_image": None if best is None else _own_f_c(best),
        "f_c_per_image_verification": None if best is None else _own_f_c(best, "verification"),
        "ssim_at_best": None if best is None else best["face_ssim_mean"],
        "best_setting": where(best),
        "f_c_generator": None if gen is None else _own_f_c(gen),
        "f_c_generator_verification": None if gen is None else _own_f_c(gen, "verification"),
        "ssim_at_best_generator": None if gen is None else gen["face_ssim_mean"],
        "best_generator_setting": where(gen),
        "f_c_generator_any_ssim": max((_own_f_c(s) for s in gen_settings), default=None),
        "generator_training": generator,
        "ssim_bar": SSIM_BAR,
        "ssim_measure": "mean face-region SSIM over the probes (box enlarged 20%)",
        # Steady state (compilation apart), mean over the b run, per mode and recogniser set.
        "protect_seconds_per_photo_cpu": steady if cpu else "not measured",
        "protect_seconds_per_photo_gpu": "not measured" if cpu else steady,
        "restore_seconds_per_photo": float(np.mean(
            [s["speed"]["restore_seconds_per_photo"] for s in settings])) if settings else None,
    }
    return out


def write_grid(path: Path, crops: list[dict], title: str) -> None:
    """Writes original / template / key (amplified) / protected / restored face regions."""
    cols = ("original", "template", "key", "protected", "restored")
    titles = {"original": "original", "template": "template (red)",
              "key": "key (amplified)", "protected": "protected", "restored": "restored"}
    n = len(crops)
    fig = Figure(figsize=(1.9 * len(cols), 1.9 * n + 0.5), dpi=90, layout="constrained")
    fig.suptitle(title, fontsize=8)
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r, c in enumerate(crops):
        for k, name in enumerate(cols):
            ax = axes[r, k]
            img = c[name]
            if name == "template":  # tinted red over the face
                f = image_io.to_float(c["original"])
                img = np.where(img[..., None], 0.45 * f + 0.55 * np.array([1.0, 0.1, 0.1]), f)
            ax.imshow(np.clip(img, 0, 255) if img.dtype == np.uint8 else np.clip(img, 0, 1),
                      interpolation="nearest" if name in ("key", "template") else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[name], fontsize=8)
            if k == 0:
                ax.set_ylabel(c["photo"], fontsize=6)
    report_lib._save(fig, path)


# --------------------------------------------------------------------------------------------
# Run


def train_model(data: Path, against, models_dir: Path, gen_steps: int | None, images: dict,
                found: dict):
    """Returns (MaskModel, training record): ONE model for every recogniser in `against`
    (its tau has a row per recogniser, so it serves each set: the templates superpose),
    trained on every face of every shared photo, resumed from `models_dir` when there."""
    names = tuple(dict.fromkeys(r.name for a in against
                                for r in registry.members(registry.get(a))))
    cfg = mask_training.MaskTrainConfig(
        **({} if gen_steps is None else {"generator_steps": gen_steps}))
    t = time.perf_counter()
    paths = sorted(images)
    train_faces = mask_training.crop_faces([images[p] for p in paths],
                                           [found[p] for p in paths],
                                           names, names=[str(p) for p in paths])
    model = mask_training.train(None, names, out=models_dir / "+".join(names), config=cfg,
                                data=train_faces)
    record = {"recognisers": list(names), "faces": len(train_faces.names),
              "template_steps": model.template_step, "generator_steps": model.generator_step,
              "seconds_this_run": round(time.perf_counter() - t, 1),
              "config": dict(cfg.__dict__), "model_config": dict(model.config.__dict__),
              "note": "trained on every shared photo, the probes included (the shared set is "
                      "too small to hold people out); the paper trains on a separate set"}
    _log(f"model for {','.join(names)}: {record['generator_steps']} generator steps")
    return model, record


def run(data: Path, *, max_photos=None, iters=None, bits=(1, 2, 3, 4), against=AGAINST,
        seed=0, grid_rows=4, budget_s=None, on_setting=None, modes=MODES, resume=None,
        models_dir: Path = Path("out/mask_models"), gen_steps=None) -> tuple[dict, dict]:
    """Returns (report, {"key": best setting, "crops": its grid crops}).

    Settings run from the largest b down (the ones that protect first), each recogniser set in
    turn; with `budget_s`, a setting predicted to end past it is skipped (listed in `skipped`).
    `on_setting(report, grid)` is called after every setting with the report so far (partial).
    `resume`: a partial report of the same probes and steps; its settings are kept, not rerun.
    """
    t0 = time.perf_counter()
    probes = probe_photos(data, max_photos)
    gal = gallery_photos(data)
    images = {p: image_io.read_image(p) for _, p in gal}
    attacker = ours_attacker(MODELS)
    t = time.perf_counter()
    clean_views = {}
    for k, (_, p) in enumerate(gal):
        clean_views[p] = attacker(images[p])
        _log(f"clean {k + 1}/{len(gal)} {p.parent.name}/{p.name}")
    attack_s = (time.perf_counter() - t) / len(gal)
    gallery = {m: [(w, p, clean_views[p][m]) for w, p in gal] for m in MODELS}
    # Every photo's faces, found once: the probes' are protected, all train the generator.
    found = {p: faces.find_photo_faces(images[p]) for _, p in gal}
    # A probe needs a face to protect and, for each attacker, another clean photo of the person
    # in which that attacker finds a face (else verification has no reference).
    kept, dropped = [], []
    for who, p in probes:
        refs = all(any(w == who and q != p and clean_views[q][m] is not None for w, q in gal)
                   for m in MODELS)
        (kept if len(found[p].boxes) and refs else dropped).append((who, p))
    _log(f"{len(kept)} probe(s) of {len({w for w, _ in kept})} people, gallery "
         f"{len(gal)} photos of {len({w for w, _ in gal})} identities; dropped {len(dropped)}")
    head = {
        "benchmark": "mask", "modes": list(modes), "data": str(data),
        "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "gpu": "not measured" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind,
        "iters": iters if iters is not None else mask.MaskConfig().iters,
        "probes": [f"{w}/{p.name}" for w, p in kept],
        "dropped_probes": [f"{w}/{p.name}" for w, p in dropped],
        "gallery": {"photos": len(gal), "identities": len({w for w, _ in gal}),
                    "rule": "every shared clean photo except the probe's own original"},
        "attack_seconds_per_photo": round(attack_s, 3),
    }
    model, head["generator_training"] = None, None
    if "generator" in modes:
        model, head["generator_training"] = train_model(data, against, models_dir, gen_steps,
                                                               images, found)
    settings, grids, skipped, took = [], {}, [], {}
    done = {}
    if resume and resume.get("probes") == head["probes"] and resume.get("iters") == head["iters"]:
        done = {(r["mode"], r["against"], r["bits"]): r for r in resume.get("settings", [])}
        _log(f"resuming: {len(done)} setting(s) of the earlier run kept")
    # The generator first (seconds per setting), then the per-image mode from the largest b.
    order = [(m, a, b) for m in sorted(modes, key=lambda m: m != "generator")
             for b in sorted(bits, reverse=True) for a in against]
    result = ({}, {})
    for mode, a, b in order:
        if (mode, a, b) in done:
            settings.append(done[(mode, a, b)])
            continue
        elapsed = time.perf_counter() - t0
        guess = took.get((mode, a), max(took.values(), default=0.0))
        if budget_s is not None and elapsed + guess > budget_s:
            _log(f"skip {mode} {a} b={b}: {elapsed:.0f} s + ~{guess:.0f} s > budget "
                 f"{budget_s:.0f} s")
            skipped.append({"mode": mode, "against": a, "bits": b, "reason": "time budget"})
            continue
        _log(f"{mode}: protect against {a}, b = {b}")
        t = time.perf_counter()
        rep, crops = run_setting(a, b, kept, images, found, clean_views, gallery,
                                 iters=iters, seed=seed, grid_rows=grid_rows, compiled=set(),
                                 model=model if mode == "generator" else None)
        took[(mode, a)] = time.perf_counter() - t
        rep["seconds"] = round(took[(mode, a)], 1)
        settings.append(rep)
        grids[(mode, a, b)] = crops
        _log(f"{mode} {a} b={b}: " + ", ".join(
            f"{m} F_c id {v['identification']['F_c']:.2f} ver "
            f"{v['verification']['F_c']:.2f}" for m, v in rep["attackers"].items())
             + f", face SSIM {rep['face_ssim_mean']:.4f}, exact {rep['restore_bit_exact']}"
               f"/{rep['photos']} ({took[(mode, a)]:.0f} s)")
        # Every setting compiles its own executables; a long run that keeps them all exhausts
        # the process's memory maps (LLVM "Cannot allocate memory"), so they are dropped.
        jax.clear_caches()
        result = _assemble(head, settings, skipped, grids, t0, in_progress=True)
        if on_setting is not None:
            on_setting(*result)
    if settings:
        result = _assemble(head, settings, skipped, grids, t0, in_progress=False)
    return result


def _assemble(head: dict, settings: list, skipped: list, grids: dict, t0: float,
              in_progress: bool) -> tuple[dict, dict]:
    """Returns (report, grid) of the settings run so far."""
    rank = {a: k for k, a in enumerate(AGAINST)}
    done = sorted(settings, key=lambda s: (s["mode"], rank.get(s["against"], 9), s["bits"]))
    summ = summary(done, head.get("generator_training"))
    tables = {
        "columns": ["mode", "against", "bits", "attacker", "cross_model", "T_o_id", "F_c_id", "T_r_id",
                    "r_s_id", "T_o_ver", "F_c_ver", "T_r_ver", "r_s_ver", "face_ssim",
                    "face_psnr", "photo_ssim", "photo_psnr", "bit_exact",
                    "protect_s_per_photo_steady"],
        "rows": [[s["mode"], s["against"], s["bits"], m, not v["protected_against"],
                  *(round(v[t][k], 4) for t in ("identification", "verification")
                    for k in ("T_o", "F_c", "T_r", "r_s")),
                  round(s["face_ssim_mean"], 4), round(s["face_psnr_mean"], 2),
                  round(s["photo_ssim_mean"], 5), round(s["photo_psnr_mean"], 2),
                  f"{s['restore_bit_exact']}/{s['photos']}",
                  s["speed"]["protect_seconds_per_photo_steady"]]
                 for s in done for m, v in s["attackers"].items()]}
    report = {"summary": summ, **head, "in_progress": in_progress, "skipped": skipped,
              "tables": tables, "settings": done,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    grid = {}
    for name in ("best_setting", "best_generator_setting"):
        best = summ[name]
        if best is not None:
            k = (best["mode"], best["against"], best["bits"])
            grid[k] = grids.get(k, [])
    if not grid:
        last = done[-1]
        k = (last["mode"], last["against"], last["bits"])
        grid[k] = grids.get(k, [])
    return report, grid


def write_outputs(rep: dict, grid: dict, json_path: str | None) -> None:
    """Writes the JSON report and, beside it, the PNG grid of each mode's best setting
    (`<name>.png` the per-image mode's, `<name>_generator.png` the generator's)."""
    if not json_path:
        return
    rep["png"] = []
    for (mode, a, b), crops in grid.items():
        if not crops:
            continue
        png = Path(json_path).with_suffix(".png")
        if mode == "generator":
            png = png.with_name(png.stem + "_generator.png")
        s = next(x for x in rep["settings"]
                 if x["mode"] == mode and x["against"] == a and x["bits"] == b)
        steps = f"{rep['iters']} steps" if mode == "per-image" else "trained generator"
        title = (f"faceveil mask, {mode} mode, against {a}, b = {b}, {steps}: "
                 + ", ".join(f"{m} F_c (1:N) {v['identification']['F_c']:.2f}"
                             for m, v in s["attackers"].items())
                 + f"\nface SSIM {s['face_ssim_mean']:.3f}, restored bit-exact "
                   f"{s['restore_bit_exact']}/{s['photos']}")
        write_grid(png, crops, title)
        rep["png"].append(str(png))
    image_io.write_json(json_path, rep)


def _earlier(json_path: str | None) -> dict | None:
    """Returns the report at json_path, if there is a readable one."""
    try:
        return json.loads(Path(json_path).read_text()) if json_path else None
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    """Prints the JSON report; writes it and the PNG grid with --json."""
    del argv
    data = Path(FLAGS.data)
    if not (data / "faces").is_dir():
        print(f"mask benchmark: --data={data}: no faces/ folder", file=sys.stderr)
        return 2
    try:
        bits = [int(b) for b in FLAGS.bits]
        against = [a.replace("+", ",") for a in FLAGS.against]
        modes = list(FLAGS.modes)
        if not modes or set(modes) - set(MODES):
            raise ValueError(f"--modes must be among {', '.join(MODES)}, got {modes}")
        for b in bits:
            mask.MaskConfig(bits=b)
        for a in against:
            registry.get(a)
    except (KeyError, ValueError) as e:
        print(f"mask benchmark: --bits/--against: {e}", file=sys.stderr)
        return 2
    rep, grid = run(data, max_photos=FLAGS.max_photos, iters=FLAGS.iters, bits=bits,
                    against=against, seed=FLAGS.seed, grid_rows=FLAGS.grid_rows,
                    budget_s=FLAGS.budget_s, modes=modes, models_dir=Path(FLAGS.models),
                    gen_steps=FLAGS.gen_steps, resume=_earlier(FLAGS.json) if FLAGS.resume
                    else None, on_setting=lambda r, g: write_outputs(r, g, FLAGS.json))
    if not rep:
        print("mask benchmark: no setting ran (--budget_s too small?)", file=sys.stderr)
        return 1
    write_outputs(rep, grid, FLAGS.json)
    print(json.dumps(rep, indent=2, default=image_io._json_default))
    if FLAGS.json:
        _log(f"wrote {FLAGS.json} and {', '.join(rep['png'])}")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
