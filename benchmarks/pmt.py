"""PMT on the shared faces: data abuse, white-box reconstruction, UP, ablation, speed.

    python -m benchmarks.pmt --json out.json [--data DIR] [--iters K] [--max_faces N]
        [--ablation_faces N] [--recon_iters K]

Faces: the largest face of every photo under DATA/faces (folder = identity), planned by the
shared pipeline for the authorised recogniser(s) and obfuscated by `methods.pmt.PmtMethod`
(enhanced PMT, cut after stage 2) in one compiled call per configuration; each recogniser
(dlib, FaceNet) is authorised in turn, then both (MR-PMT).

- Data abuse (`engine.attacks.data_abuse`, Eq. 10, kappa 0.2 on centred cosines, the centre
  being the mean clean embedding of these faces): authorised = the embedding finished from the
  released features E_c(x~) (`Recogniser.rest`) against the clean face's; unauthorised = the
  other recogniser's full model on its own chip of the photo with the face replaced. `clean`
  rows: the same recogniser on pairs of different clean photos of one person.
- White-box reconstruction (`engine.attacks.reconstruction`, knowing the shallow model): from
  E_c(x~) (PMT) and from E_c(x) (unprotected features), SSIM / PSNR / cosine / SRRA against
  the clean chip; the random-noise baseline is SSIM of uniform noise against the clean chip.
- UP(sigma, kappa=0.2): privacy LPIPS(x, x~), utility the authorised centred cosine; the curve
  over sigma is written as a PNG.
- Ablation (Table X): basic, each enhancement alone, enhanced; dlib authorised, on the first
  `--ablation_faces` faces.
- Speed: faces per second of the one compiled call over all faces (compilation included).
A PNG grid beside the JSON: original, obfuscated, reconstructed from PMT features,
reconstructed from unprotected features.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from benchmarks import parity_dlib
from faceveil import losses
from faceveil.engine.attacks import data_abuse, reconstruction
from faceveil.engine.commands import report
from faceveil.engine.methods import base, pmt
from faceveil.engine.pipeline import faces, image_io, photos, progress, recognise
from faceveil.models import registry

DEFAULT_DATA = parity_dlib.DEFAULT_DATA
MODELS = ("dlib", "facenet")
AUTHORISED = ("dlib", "facenet", "dlib,facenet")
ABLATION = ("basic", "augment_only", "aggregate_only", "kernel_only", "enhanced")
SIGMAS = tuple(np.round(np.linspace(0.0, 1.0, 21), 3))
PATCH = 256
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the JSON report here too (PNGs beside it).")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder (faces/<identity>/).")
    flags.DEFINE_integer("iters", None, "PMT iterations (default: PmtConfig's).")
    flags.DEFINE_integer("layers", 2, "The cut (stages in the shared shallow model).")
    flags.DEFINE_integer("max_faces", None, "Use only the first N faces.")
    flags.DEFINE_integer("ablation_faces", 8, "Faces in the ablation (dlib authorised).")
    flags.DEFINE_integer("recon_iters", 200, "White-box reconstruction iterations.")


def _log(msg: str) -> None:
    progress.say(f"pmt benchmark: {msg}")


def load_faces(data: Path, max_faces: int | None):
    """Returns (identities [N], photos [N], landmarks [N, 5, 2]) of the largest faces."""
    ids, imgs, lms = [], [], []
    for f in recognise.photo_files([Path(data) / "faces"]):
        img = image_io.read_image(f)
        _, lm, _ = recognise.largest_face(img, source=str(f))
        ids.append(f.parent.name)
        imgs.append(img)
        lms.append(lm)
    n = max_faces or len(ids)
    return np.asarray(ids[:n]), imgs[:n], np.stack(lms[:n])


def run_pmt(images, lms, authorised: str, cfg: pmt.PmtConfig) -> dict:
    """Returns {x~ chips, protected patches, plans, seconds} of one compiled PMT call."""
    rec, params = recognise.recogniser_params(authorised)
    plans = [faces.plan_faces(lm[None], np.ones(1, bool), rec, size=PATCH) for lm in lms]
    patches = np.stack([faces.crop_patches(img[None], p.offsets, PATCH)[0]
                        for img, p in zip(images, plans)])
    m = np.stack([p.m_chip[0] for p in plans])
    method = pmt.PmtMethod(rec, cfg)
    t = time.perf_counter()
    out = jax.device_get(base.solve_faces(method, params, patches, m, jax.random.PRNGKey(0)))
    first = time.perf_counter() - t
    replaced = [faces.paste_patches(img[None], clean[None], prot[None], p.offsets,
                                    np.ones(1, bool))[0]
                for img, p, prot, clean in zip(images, plans, out.protected, patches)]
    # One call, compilation included: a second would double a CPU run.
    return {"chips": np.asarray(out.metrics.obfuscated), "photos": replaced,
            "first_call_seconds": first, "faces_per_second": len(images) / first,
            "authorised_distance": np.asarray(out.metrics.authorised_distance)}


def clean_views(images, lms) -> dict:
    """Returns model -> (chips [N, S, S, 3], embeddings [N, D]) of the clean faces."""
    out = {}
    for mname in MODELS:
        embs, chips = zip(*[recognise.embed_faces(img, lm[None], mname) for img, lm in
                            zip(images, lms)])
        out[mname] = (np.concatenate(chips), np.concatenate(embs))
    return out


def evaluate(authorised: str, res: dict, ids, images, lms, clean, cfg, *, recon_iters: int,
             centres) -> tuple[dict, dict]:
    """Returns (report, pictures) of one authorised configuration."""
    members = [r.name for r in registry.members(registry.get(authorised))]
    rep = {"authorised": authorised, "faces": len(ids),
           "faces_per_second": round(res["faces_per_second"], 3),
           "first_call_seconds": round(res["first_call_seconds"], 2), "accuracy": {}}
    primary = members[0]
    rec, params = recognise.recogniser_params(primary)
    feats = np.asarray(pmt.cut_features(rec, params, res["chips"], cfg.layers))
    emb_auth = np.asarray(rec.rest(params, jnp.asarray(feats), cfg.layers))
    rep["accuracy"][f"authorised_{primary}"] = data_abuse.match_accuracy(
        emb_auth, clean[primary][1], centre=centres[primary])
    for mname in MODELS:
        emb = np.concatenate([recognise.embed_faces(ph, lm[None], mname)[0]
                              for ph, lm in zip(res["photos"], lms)])
        role = "authorised" if mname in members else "unauthorised"
        key = f"{role}_{mname}_photo"
        rep["accuracy"][key] = data_abuse.match_accuracy(emb, clean[mname][1],
                                                         centre=centres[mname])
    x = clean[primary][0]
    cos = data_abuse.centred_cosine(emb_auth, clean[primary][1], centres[primary])
    lp = photos.chip_lpips(x, res["chips"])
    rep["up"] = {str(s): float(losses.up(lp, cos, sigma=float(s), kappa=0.2)) for s in SIGMAS}
    rep["lpips_obfuscated"] = float(np.mean(lp))
    rep["ssim_obfuscated"] = float(np.mean(np.asarray(losses.ssim(jnp.asarray(x),
                                                                   jnp.asarray(res["chips"])))))
    pics = {}
    if recon_iters:
        rcfg = reconstruction.ReconstructionConfig(iters=recon_iters)
        clean_feats = np.asarray(pmt.cut_features(rec, params, x, cfg.layers))
        for tag, f in (("pmt", feats), ("unprotected", clean_feats)):
            r = reconstruction.attack(rec, params, f, x, cfg.layers, rcfg)
            rep[f"white_box_{tag}"] = {"ssim": float(np.mean(r.ssim)),
                                       "psnr": float(np.mean(r.psnr)),
                                       "cosine": float(np.mean(r.cosine)), "srra": r.srra}
            pics[tag] = r.chips
        noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
        rep["random_noise_ssim"] = float(np.mean(np.asarray(losses.ssim(jnp.asarray(x),
                                                                         jnp.asarray(noise)))))
    pics["original"], pics["obfuscated"] = x, res["chips"]
    return rep, pics


def write_grid(path: Path, pics: dict, ids, rows: int = 6) -> None:
    """Writes original / obfuscated / reconstructed (PMT) / reconstructed (unprotected)."""
    cols = [k for k in ("original", "obfuscated", "pmt", "unprotected") if k in pics]
    titles = {"original": "original", "obfuscated": "obfuscated x~",
              "pmt": "reconstructed\nfrom E_c(x~)", "unprotected": "reconstructed\nfrom E_c(x)"}
    n = min(rows, len(ids))
    fig = Figure(figsize=(2.0 * len(cols), 2.0 * n), dpi=90, layout="constrained")
    axes = fig.subplots(n, len(cols), squeeze=False)
    for r in range(n):
        for c, k in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(np.clip(pics[k][r], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[k], fontsize=8)
            if c == 0:
                ax.set_ylabel(ids[r], fontsize=7)
    report._save(fig, path)


def write_up(path: Path, reports: list[dict]) -> None:
    """Writes the UP(sigma, 0.2) curves of every authorised configuration."""
    fig = Figure(figsize=(4.5, 3.2), dpi=90, layout="constrained")
    ax = fig.subplots()
    for rep in reports:
        ax.plot([float(s) for s in rep["up"]], list(rep["up"].values()),
                label=rep["authorised"])
    ax.set_xlabel("sigma (LPIPS privacy threshold)")
    ax.set_ylabel("UP(sigma, 0.2)")
    ax.legend(fontsize=8)
    report._save(fig, path)


def run(data: Path, *, iters=None, layers=2, max_faces=None, ablation_faces=8,
        recon_iters=200) -> tuple[dict, dict]:
    """Returns (report, pictures of the dlib-authorised run)."""
    t0 = time.perf_counter()
    ids, images, lms = load_faces(data, max_faces)
    clean = clean_views(images, lms)
    centres = {m: clean[m][1].mean(axis=0) for m in MODELS}
    over = {"layers": layers} | ({} if iters is None else {"iters": iters})
    report = {"faces": len(ids), "identities": len(set(ids.tolist())),
              "date": time.strftime("%Y-%m-%d"), "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "config": pmt.preset(**over).__dict__,
              "clean_verification": {m: data_abuse.verification(clean[m][1], ids,
                                                                centre=centres[m])
                                     for m in MODELS},
              "authorised": []}
    pics_dlib = {}
    for auth in AUTHORISED:
        _log(f"authorised {auth}: {len(ids)} faces")
        cfg = pmt.preset("enhanced", **over)
        res = run_pmt(images, lms, auth, cfg)
        rep, pics = evaluate(auth, res, ids, images, lms, clean, cfg,
                             recon_iters=recon_iters if auth != "dlib,facenet" else 0,
                             centres=centres)
        report["authorised"].append(rep)
        if auth == "dlib":
            pics_dlib = pics
    k = min(ablation_faces, len(ids))
    report["ablation"] = {}
    for name in ABLATION:
        _log(f"ablation {name}: {k} faces")
        cfg = pmt.preset(name, **over)
        res = run_pmt(images[:k], lms[:k], "dlib", cfg)
        sub = {m: (clean[m][0][:k], clean[m][1][:k]) for m in MODELS}
        rep, _ = evaluate("dlib", res, ids[:k], images[:k], lms[:k], sub, cfg,
                          recon_iters=recon_iters, centres=centres)
        report["ablation"][name] = {key: rep[key] for key in (
            "accuracy", "white_box_pmt", "lpips_obfuscated", "ssim_obfuscated")}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report, {"pics": pics_dlib, "ids": ids}


def main(argv: list[str]) -> int:
    """Prints the JSON report; writes it and the PNGs with --json."""
    del argv
    data = Path(FLAGS.data)
    if not (data / "faces").is_dir():
        print(f"pmt benchmark: --data={data}: no faces/ folder", file=sys.stderr)
        return 2
    try:
        pmt.check_layers(registry.get("dlib,facenet"), FLAGS.layers)
    except ValueError as e:
        print(f"pmt benchmark: --layers: {e}", file=sys.stderr)
        return 2
    report, extra = run(data, iters=FLAGS.iters, layers=FLAGS.layers,
                        max_faces=FLAGS.max_faces, ablation_faces=FLAGS.ablation_faces,
                        recon_iters=FLAGS.recon_iters)
    print(json.dumps(report, indent=2, default=image_io._json_default))
    if FLAGS.json:
        image_io.write_json(FLAGS.json, report)
        base_path = Path(FLAGS.json)
        write_grid(base_path.with_suffix(".png"), extra["pics"], extra["ids"])
        write_up(base_path.with_name(base_path.stem + "_up.png"), report["authorised"])
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
