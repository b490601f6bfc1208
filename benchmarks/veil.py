"""Person-specific veils on the shared identities: privacy, identification, recovery, speed.

    python -m benchmarks.veil --json out.json [--data DIR] [--model dlib] [--iters N]
        [--variants default,no_block_variance,vuap]

Identities: every folder under DATA/faces with two or more photos. Leave-one-out: each
identity's last photo (sorted) is held back; its veil is made (`faceveil.engine.pipeline.veils`
.make_veil, the library path) from the other photos, then applied with the library to EVERY
photo of the identity, held-back one included, as the tool does it: detect, match the person,
blend on the photo's pixel grid, uint8.

Per photo, from the veiled photo (at the clean photo's landmarks, i.e. the stored alignment):
- SSIM and LPIPS (AlexNet) of the white-box recogniser's aligned chip, clean vs veiled;
- 1:N identification (MSR) of the veiled face against a gallery of every shared photo of every
  identity (clean, the probe's own clean photo excluded), on the white-box model (its chip of
  the veiled photo) and on the other model (its own chip of the same veiled photo);
- recovery (`recover_images` on the uint8 veiled photo): SSIM and LPIPS of the chip vs clean;
- robustness (default variant): MSR of the veiled chip after Gaussian noise (sigma 10..120 on
  0-255), salt-and-pepper (5% of pixels), a 3x3 median filter, and JPEG quality 75;
- `chip_msr_white_box`: the paper's protocol, x' = alpha x + (1 - alpha) veil on the chip itself.
Variants: `default` (VeilConfig()), `no_block_variance` (the ablation), `vuap` (V-UAP: each chip
pulled to its own features, no block variance). The summary holds the default variant's means
over identities. Speed: make seconds per identity (compilation included, and apart), and
apply / recover chips per second through the pipeline's compiled call (`base.solve_faces`,
64 faces of 256 px patches, steady state). A PNG grid (rows: identities' held-back photos;
columns: original, veiled, recovered chips) is written beside the JSON.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure
from PIL import Image

from benchmarks import parity_dlib
from faceveil import losses
from faceveil.engine.commands import report
from faceveil.engine.methods import base
from faceveil.engine.methods import veil as veil_core
from faceveil.engine.pipeline import faces, image_io, photos, progress, recognise, veils
from faceveil.models import registry

DEFAULT_DATA = parity_dlib.DEFAULT_DATA
VARIANTS = ("default", "no_block_variance", "vuap")
NOISE_SIGMAS = (10, 20, 40, 80, 120)
SALT_PEPPER = 0.05
JPEG_QUALITY = 75
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the JSON report here too (the PNG grid beside it).")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder (faces/<identity>/).")
    flags.DEFINE_string("model", "dlib", "White-box recogniser the veils are made against.")
    flags.DEFINE_integer("iters", None, "MI-FGSM iterations (default: VeilConfig's).")
    flags.DEFINE_list("variants", list(VARIANTS), "Veil presets to run.")
    flags.DEFINE_integer("seed", 1, "Seed of the veils' initial noise.")
    flags.DEFINE_list("identities", None, "Only these identities (default: every one with two "
                      "or more photos; the gallery always holds every identity).")


def _log(msg: str) -> None:
    progress.say(f"veil benchmark: {msg}")


def identities(data: Path) -> dict[str, list[Path]]:
    """Returns identity -> sorted photo paths of every identity folder."""
    root = Path(data) / "faces"
    return {d.name: recognise.photo_files([d]) for d in sorted(root.iterdir()) if d.is_dir()}


def _other(model: str) -> str:
    return "facenet" if model == "dlib" else "dlib"


def _u8(x) -> np.ndarray:
    return np.round(np.clip(np.asarray(x), 0, 1) * 255).astype(np.uint8)


def attacked(chips_u8: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Returns name -> uint8 chips [N, S, S, 3] after each distortion of the robustness test."""
    import scipy.ndimage as ndi

    x = chips_u8.astype(np.float32)
    out = {f"gaussian_{s}": np.clip(np.round(x + rng.normal(0, s, x.shape)), 0, 255)
           .astype(np.uint8) for s in NOISE_SIGMAS}
    sp = chips_u8.copy()
    hit = rng.random(sp.shape[:3]) < SALT_PEPPER
    sp[hit] = np.where(rng.random(hit.sum()) < 0.5, 0, 255)[:, None].astype(np.uint8)
    out["salt_pepper"] = sp
    out["median_3x3"] = ndi.median_filter(chips_u8, size=(1, 3, 3, 1))
    jp = []
    for c in chips_u8:
        buf = io.BytesIO()
        Image.fromarray(c).save(buf, format="JPEG", quality=JPEG_QUALITY)
        buf.seek(0)
        jp.append(np.asarray(Image.open(buf).convert("RGB")))
    out[f"jpeg_{JPEG_QUALITY}"] = np.stack(jp)
    return out


class Judge:
    """Embeddings, gallery identification and chip quality for one recogniser."""

    def __init__(self, model: str, gallery: dict[str, list[tuple[str, np.ndarray, np.ndarray]]]):
        self.model = model
        self.rec, self.params = recognise.recogniser_params(model)
        self.names = [(who, f) for who, items in gallery.items() for f, _, _ in items]
        self.embs = np.stack([e for items in gallery.values() for _, e, _ in items])
        self._embed = jax.jit(lambda p, c: self.rec.apply(p, c)[0])

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """Returns [N, D] embeddings of float chips [N, S, S, 3] in [0, 1]."""
        n = faces.batch_bucket(len(chips))
        e = self._embed(self.params, jnp.asarray(faces.pad_batch(chips, n), jnp.float32))
        return np.asarray(e)[:len(chips)]

    def identified(self, emb: np.ndarray, who: str, own: str) -> bool:
        """Returns whether the nearest gallery photo (the probe's own excluded) is `who`."""
        keep = [k for k, (w, f) in enumerate(self.names) if not (w == who and f == own)]
        d = np.linalg.norm(self.embs[keep] - emb[None], axis=1)
        return self.names[keep[int(np.argmin(d))]][0] == who


def chip_quality(clean: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (SSIM [N], LPIPS [N]) of float chips [N, S, S, 3]."""
    s = np.asarray(losses.ssim(jnp.asarray(clean), jnp.asarray(other)))
    return s, photos.chip_lpips(clean, other)


def speed(veil: veils.Veil, n: int = 64, size: int = 256, reps: int = 5) -> dict:
    """Returns apply / recover chips per second through the pipeline's compiled call."""
    rec = veil.recogniser
    scale = size * 0.8 / rec.chip_size
    m = np.array([[scale, 0, size * 0.1], [0, scale, size * 0.1]], np.float32)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    m_chip = np.repeat(m[None], n, 0)
    out = {}
    for name, recover in (("apply", False), ("recover", True)):
        method = veil.method(recover=recover)
        t = time.perf_counter()
        jax.block_until_ready(base.solve_faces(method, veil.veil, patches, m_chip,
                                               jax.random.PRNGKey(0)).protected)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(base.solve_faces(method, veil.veil, patches, m_chip,
                                                   jax.random.PRNGKey(0)).protected)
        steady = (time.perf_counter() - t) / reps
        out[name] = {"chips_per_second": round(n / steady, 1),
                     "first_call_seconds": round(first, 3), "patch": size, "batch": n}
    return out


def run_variant(name: str, who: str, items, judges, cfg, *, seed: int, rng) -> dict:
    """Returns the report of one identity under one veil preset."""
    white, other = judges
    train = [f for f, _, _ in items[:-1]]
    t = time.perf_counter()
    made = veils.make_veil(train, model=white.model, config=cfg, seed=seed, count=len(train),
                           show_progress=False)
    make_s = time.perf_counter() - t
    veil = made.veil
    rows, grid = [], None
    for k, (f, _, _) in enumerate(items):
        img = image_io.read_image(f)
        _, lm, _ = recognise.largest_face(img)
        veiled = veils.veil_images([img], veil)
        vim = veiled.images[0]
        found = veiled.faces[0]
        if not len(found.boxes):  # the person's face was not matched: nothing veiled
            rows.append({"photo": f.name, "held_out": k == len(items) - 1, "veiled": False})
            continue
        lm_v = found.landmarks[int(np.argmin(np.linalg.norm(
            found.landmarks.mean(1) - lm.mean(0), axis=1)))]
        recovered = veils.recover_images([vim], veil, [found])[0]
        chips = {}
        for j in judges:
            for tag, im in (("clean", img), ("veiled", vim), ("recovered", recovered)):
                e, c = recognise.embed_faces(im, lm_v[None], j.model)
                chips[(j.model, tag)] = (e[0], c[0])
        clean_c = chips[(white.model, "clean")][1]
        veil_c = chips[(white.model, "veiled")][1]
        rec_c = chips[(white.model, "recovered")][1]
        s, lp = chip_quality(np.stack([clean_c, clean_c]), np.stack([veil_c, rec_c]))
        chip_prot = cfg.alpha * clean_c + (1 - cfg.alpha) * veil.veil
        row = {"photo": f.name, "held_out": k == len(items) - 1, "veiled": True,
               "ssim_protected": float(s[0]), "lpips_protected": float(lp[0]),
               "ssim_recovered": float(s[1]), "lpips_recovered": float(lp[1]),
               "white_box_identified": white.identified(chips[(white.model, "veiled")][0],
                                                        who, f.name),
               "other_model_identified": other.identified(chips[(other.model, "veiled")][0],
                                                          who, f.name),
               "chip_white_box_identified": white.identified(
                   white.embed_chips(chip_prot[None])[0], who, f.name),
               "distance_clean_veiled": float(np.linalg.norm(
                   chips[(white.model, "veiled")][0] - chips[(white.model, "clean")][0]))}
        if name == "default":
            att = attacked(_u8(veil_c)[None], rng)
            emb = white.embed_chips(np.concatenate(list(att.values())).astype(np.float32) / 255)
            row["robustness_identified"] = {a: white.identified(e, who, f.name)
                                            for a, e in zip(att, emb)}
        rows.append(row)
        if k == len(items) - 1:
            grid = (clean_c, veil_c, rec_c)
    ok = [r for r in rows if r["veiled"]]
    def mean(key):
        return float(np.mean([r[key] for r in ok])) if ok else None

    rep = {"identity": who, "train_photos": len(train), "photos": rows,
           "veiled_fraction": len(ok) / len(rows),
           "make_seconds": round(make_s, 2), "make_compile_seconds": round(made.compile_seconds, 2),
           "final_feature_distance": float(made.losses.fea[-1]),
           "msr_white_box": mean("white_box_identified"),
           "msr_other_model": mean("other_model_identified"),
           "chip_msr_white_box": mean("chip_white_box_identified"),
           "msr_white_box_held_out": float(rows[-1].get("white_box_identified", False)),
           "ssim_protected": mean("ssim_protected"), "lpips_protected": mean("lpips_protected"),
           "ssim_recovered": mean("ssim_recovered"), "lpips_recovered": mean("lpips_recovered")}
    if name == "default" and ok:
        rep["robustness_msr"] = {a: float(np.mean([r["robustness_identified"][a] for r in ok]))
                                 for a in ok[0]["robustness_identified"]}
    return rep, grid, veil


def write_grid(path: Path, grids: list[tuple[str, tuple]], title: str) -> None:
    """Writes the PNG grid: one row per identity (original, veiled, recovered chips)."""
    fig = Figure(figsize=(6.6, 2.2 * len(grids)), dpi=90, layout="constrained")
    axes = fig.subplots(len(grids), 3, squeeze=False)
    for r, (who, trio) in enumerate(grids):
        for c, (img, label) in enumerate(zip(trio, ("original", "veiled", "recovered"))):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(who, fontsize=8)
    fig.suptitle(title, fontsize=9)
    report._save(fig, path)


def run(data: Path, *, model: str = "dlib", iters: int | None = None, variants=VARIANTS,
        seed: int = 1, only=None) -> tuple[dict, list]:
    """Returns (report, grid rows) of the benchmark."""
    t0 = time.perf_counter()
    ids = identities(data)
    gallery = {m: {} for m in (model, _other(model))}
    for who, files in ids.items():
        for f in files:
            img = image_io.read_image(f)
            _, lm, _ = recognise.largest_face(img, source=str(f))
            for m, per_model in gallery.items():
                e, c = recognise.embed_faces(img, lm[None], m)
                per_model.setdefault(who, []).append((f.name, e[0], c[0]))
    judges = (Judge(model, gallery[model]), Judge(_other(model), gallery[_other(model)]))
    people = {who: [(f, None, None) for f in files] for who, files in ids.items()
              if len(files) >= 2 and (not only or who in only)}
    _log(f"{len(people)} identities with two or more photos; gallery of "
         f"{sum(map(len, ids.values()))} photos of {len(ids)} identities")
    rng = np.random.default_rng(0)
    report = {"model": model, "other_model": _other(model), "identities": list(people),
              "variants": {}, "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0]
              .device_kind, "backend": jax.default_backend()}
    grids, last_veil = [], None
    for name in variants:
        overrides = {} if iters is None else {"iters": iters}
        cfg = veil_core.preset(name, **overrides)
        reps = []
        for who, items in people.items():
            _log(f"{name}: {who} ({len(items) - 1} photos to make the veil from)")
            rep, grid, last_veil = run_variant(name, who, items, judges, cfg, seed=seed, rng=rng)
            reps.append(rep)
            if name == "default" and grid is not None:
                grids.append((who, grid))
        keys = ("msr_white_box", "msr_other_model", "chip_msr_white_box",
                "msr_white_box_held_out", "ssim_protected", "lpips_protected", "ssim_recovered",
                "lpips_recovered", "make_seconds", "veiled_fraction")
        means = {k: float(np.mean([r[k] for r in reps if r[k] is not None])) for k in keys}
        if name == "default":
            means["robustness_msr"] = {a: float(np.mean([r["robustness_msr"][a] for r in reps
                                                         if "robustness_msr" in r]))
                                       for a in reps[0].get("robustness_msr", {})}
        report["variants"][name] = {"config": cfg.__dict__, "identities": reps, "mean": means}
    if "default" in report["variants"]:
        m = report["variants"]["default"]["mean"]
        report["summary"] = {
            "msr_white_box": m["msr_white_box"], "msr_other_model": m["msr_other_model"],
            "ssim_protected": m["ssim_protected"], "lpips_protected": m["lpips_protected"],
            "ssim_recovered": m["ssim_recovered"], "lpips_recovered": m["lpips_recovered"],
            "seconds_per_identity": m["make_seconds"],
            "chip_msr_white_box": m["chip_msr_white_box"],
            "msr_white_box_held_out": m["msr_white_box_held_out"]}
    if last_veil is not None:
        report["speed"] = speed(last_veil)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report, grids


def main(argv: list[str]) -> int:
    """Prints the JSON report; writes it (and the PNG grid beside it) with --json."""
    del argv
    try:
        registry.get(FLAGS.model)
        for v in FLAGS.variants:
            veil_core.preset(v)
    except (KeyError, ValueError) as e:
        print(f"veil benchmark: {e.args[0]}", file=sys.stderr)
        return 2
    data = Path(FLAGS.data)
    if not (data / "faces").is_dir():
        print(f"veil benchmark: --data={data}: no faces/ folder", file=sys.stderr)
        return 2
    report, grids = run(data, model=FLAGS.model, iters=FLAGS.iters, variants=FLAGS.variants,
                        seed=FLAGS.seed, only=FLAGS.identities)
    if FLAGS.json:
        png = Path(FLAGS.json).with_suffix(".png")
        report["png"] = str(png)
    print(json.dumps(report, indent=2, default=image_io._json_default))
    if FLAGS.json:
        image_io.write_json(FLAGS.json, report)
        if grids:
            s = report.get("summary", {})
            write_grid(png, grids, f"faceveil veil ({FLAGS.model}), held-back photos: SSIM "
                                   f"{s.get('ssim_protected', 0):.3f} veiled, "
                                   f"{s.get('ssim_recovered', 0):.3f} recovered")
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
