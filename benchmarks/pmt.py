"""PMT on the shared faces: data abuse, reconstruction, attributes, UP, ablation, speed.

    python -m benchmarks.pmt --json out.json [--data DIR] [--iters K] [--max_faces N]
        [--ablation_faces N] [--recon_iters K] [--decoder_steps K] [--noblackbox]

Faces: the largest face of every photo under DATA/faces (folder = identity), planned by the
shared pipeline for the authorised recogniser(s) and obfuscated by `methods.pmt.PmtMethod`
(enhanced PMT, the default config) in one compiled call per configuration; each recogniser
(dlib, FaceNet) is authorised in turn, then both (MR-PMT). Every attack is a library evaluator
of `faceveil.engine.attacks`, the same that `faceveil attack` runs on any method's outputs.

- Data abuse (`data_abuse`, Eq. 10, kappa 0.2 on centred cosines, the centre being the mean
  clean embedding of these faces): authorised = the embedding finished from the released
  features E_c(x~) (`Recogniser.rest`) against the clean face's; unauthorised = the other
  recogniser's full model on its own chip of the photo with the face replaced. `clean`
  rows: the same recogniser on pairs of different clean photos of one person.
- White-box reconstruction (`reconstruction`, knowing the shallow model) and black-box
  (`decoder`: a U-Net trained on (E_c(x), x) of clean faces, two folds by identity so that
  no decoder has seen the person it reconstructs): from E_c(x~) (PMT) and from E_c(x)
  (unprotected features), SSIM / PSNR / cosine / SRRA against the clean chip; the
  random-noise baseline is SSIM of uniform noise against the clean chip.
- Attributes (`attributes`): age and gender networks on the clean vs the uploaded photo's
  dlib chip.
- UP(sigma, kappa=0.2) (`up`): privacy LPIPS(x, x~), utility the authorised centred cosine;
  the curves are written as a PNG.
- Ablation (Table X): basic, each enhancement alone, enhanced; dlib authorised, on the first
  `--ablation_faces` faces.
- Speed: faces per second of the one compiled call over all faces (compilation included).
The JSON starts with `summary` (`summary()` says how each figure is drawn). A PNG grid beside
the JSON: original, obfuscated, reconstructed white- and black-box from PMT features and from
unprotected features.
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
from faceveil.engine.attacks import attributes, data_abuse, decoder, reconstruction, up
from faceveil.engine.commands import report
from faceveil.engine.methods import base, pmt
from faceveil.engine.pipeline import align, faces, image_io, progress, recognise
from faceveil.models import attributes as attribute_models
from faceveil.models import registry

DEFAULT_DATA = parity_dlib.DEFAULT_DATA
MODELS = ("dlib", "facenet")
AUTHORISED = ("dlib", "facenet", "dlib,facenet")
ABLATION = ("basic", "augment_only", "aggregate_only", "kernel_only", "enhanced")
SIGMAS = tuple(np.round(np.linspace(0.0, 1.0, 21), 3))
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the JSON report here too (PNGs beside it).")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder (faces/<identity>/).")
    flags.DEFINE_integer("iters", None, "PMT iterations (default: PmtConfig's).")
    flags.DEFINE_integer("layers", 2, "The cut (stages in the shared shallow model).")
    flags.DEFINE_integer("max_faces", None, "Use only the first N faces.")
    flags.DEFINE_integer("ablation_faces", 8, "Faces in the ablation (dlib authorised).")
    flags.DEFINE_integer("recon_iters", 200, "White-box reconstruction iterations.")
    flags.DEFINE_integer("decoder_steps", None, "Black-box decoder training steps (default: "
                         "DecoderConfig's).")
    flags.DEFINE_bool("blackbox", True, "Train the black-box decoders (two folds per "
                      "recogniser) and attack with them.")


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
    # One patch side for all faces (one compiled call): the largest any face needs, so no
    # chip samples past its patch edge (a clipped chip would make PMT match a black border).
    side = max(faces.plan_faces(lm[None], np.ones(1, bool), rec).size for lm in lms)
    plans = [faces.plan_faces(lm[None], np.ones(1, bool), rec, size=side) for lm in lms]
    patches = np.stack([faces.crop_patches(img[None], p.offsets, side)[0]
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
    return {"chips": np.asarray(out.metrics.obfuscated), "photos": replaced, "images": images,
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


def train_decoders(clean: dict, ids, layers: int, steps: int | None) -> dict:
    """Returns model -> (fold of each face [N], [decoder per fold]): the black-box attacker.

    Two folds by identity: each face is decoded by the decoder trained on the other fold's
    faces, so no decoder has seen the person it reconstructs.
    """
    names = sorted(set(ids.tolist()))
    fold = np.array([names.index(i) % 2 for i in ids.tolist()])
    cfg = decoder.DecoderConfig() if steps is None else decoder.DecoderConfig(steps=steps)
    out = {}
    for mname in MODELS:
        decs = []
        for f in (0, 1):
            _log(f"black-box decoder for {mname}, trained on fold {1 - f}")
            decs.append(decoder.train(mname, clean[mname][0][fold != f], layers, cfg))
        out[mname] = (fold, decs)
    return out


def upload_canvases(chips: np.ndarray, images, lms, primary: str) -> list[np.ndarray]:
    """Returns uint8 photos: each uploaded chip at its face's place on a mid-grey canvas.

    The unauthorised attacker of the paper holds only what was uploaded, the obfuscated face;
    this is that face, aligned for it perfectly (the original landmarks), with nothing of the
    photo around it. The photo with its face region replaced keeps the hair, ears and
    background, which a recogniser with a wider crop (FaceNet's) matches to the same photo.
    """
    rec = registry.get(primary)
    out = []
    for chip, img, lm in zip(chips, images, lms):
        canvas = np.full(img.shape, 0.5, np.float32)
        m = faces.chip_transforms(lm[None], rec)[0]
        out.append(np.asarray(jnp.round(align.paste(canvas, chip, m) * 255)).astype(np.uint8))
    return out


def _upload_accuracy(canvases, lms, model: str, reference: np.ndarray, centre) -> float:
    """Returns Eq. 10's accuracy of `model` on the uploaded faces against clean `reference`."""
    emb = np.concatenate([recognise.embed_faces(c, lm[None], model)[0]
                          for c, lm in zip(canvases, lms)])
    return data_abuse.match_accuracy(emb, reference, centre=centre)


def _blackbox(decoders, mname: str, feats: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Returns the chips decoded from feats [n, ...] of faces `index` by their fold's decoder."""
    fold, decs = decoders[mname]
    out = np.zeros((len(feats),) + (decs[0].decode(feats[:1]).shape[1:]), np.float32)
    for f, dec in enumerate(decs):
        sel = fold[index] == f
        if sel.any():
            out[sel] = dec.decode(feats[sel])
    return out


def _recon_report(r: reconstruction.ReconstructionResult) -> dict:
    return {"ssim": float(np.mean(r.ssim)), "psnr": float(np.mean(r.psnr)),
            "cosine": float(np.mean(r.cosine)), "srra": r.srra}


def evaluate(authorised: str, res: dict, ids, lms, clean, cfg, *, recon_iters: int,
             centres, decoders=None, attribute_model=None, index=None) -> tuple[dict, dict]:
    """Returns (report, pictures) of one authorised configuration (faces `index` of clean)."""
    index = np.arange(len(ids)) if index is None else np.asarray(index)
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
    photo_chips = {}
    for mname in MODELS:
        emb, chips = zip(*[recognise.embed_faces(ph, lm[None], mname)
                           for ph, lm in zip(res["photos"], lms)])
        photo_chips[mname] = np.concatenate(chips)
        role = "authorised" if mname in members else "unauthorised"
        rep["accuracy"][f"{role}_{mname}_photo"] = data_abuse.match_accuracy(
            np.concatenate(emb), clean[mname][1], centre=centres[mname])
        if role == "unauthorised":
            rep["accuracy"][f"unauthorised_{mname}"] = _upload_accuracy(
                upload_canvases(res["chips"], res["images"], lms, primary), lms, mname,
                clean[mname][1], centres[mname])
    x = clean[primary][0]
    curve = up.evaluate(rec, params, x, res["chips"], centre=centres[primary],
                        sigmas=SIGMAS, protected_embeddings=emb_auth)
    rep["up"] = {str(s): float(u) for s, u in zip(curve.sigmas, curve.up)}
    rep["lpips_obfuscated"] = float(np.mean(curve.privacy))
    rep["ssim_obfuscated"] = float(np.mean(np.asarray(losses.ssim(jnp.asarray(x),
                                                                   jnp.asarray(res["chips"])))))
    if attribute_model is not None:  # on the dlib chip of the uploaded photo
        rep["attributes"] = {k: v for k, v in attributes.evaluate(
            attribute_model, clean["dlib"][0], photo_chips["dlib"]).summary().items()
            if k != "per_face"}
    pics = {}
    if recon_iters:
        rcfg = reconstruction.ReconstructionConfig(iters=recon_iters)
        clean_feats = np.asarray(pmt.cut_features(rec, params, x, cfg.layers))
        for tag, f in (("pmt", feats), ("unprotected", clean_feats)):
            r = reconstruction.attack(rec, params, f, x, cfg.layers, rcfg)
            rep[f"white_box_{tag}"] = _recon_report(r)
            pics[tag] = r.chips
            if decoders is not None:
                b = reconstruction.judge(rec, params, _blackbox(decoders, primary, f, index), x)
                rep[f"black_box_{tag}"] = _recon_report(b)
                pics[f"black_{tag}"] = b.chips
        noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
        rep["random_noise_ssim"] = float(np.mean(np.asarray(losses.ssim(jnp.asarray(x),
                                                                         jnp.asarray(noise)))))
    pics["original"], pics["obfuscated"] = x, res["chips"]
    return rep, pics


def summary(report: dict) -> dict:
    """Returns the headline figures of the default PMT (the issue's `summary`).

    authorised: the lowest over the recognisers authorised in turn; unauthorised: the highest
    of any unauthorised recogniser on the uploaded face (`_photo`: on the photo with its face
    region replaced, context included); reconstruction_ssim: the highest of white- and black-box
    on PMT features; reconstruction_ssim_unprotected: per recogniser the attacker's best
    (white- or black-box) on unprotected features, the lowest over the recognisers.
    """
    single = [r for r in report["authorised"] if "," not in r["authorised"]]
    auth = [v for r in single for k, v in r["accuracy"].items()
            if k == f"authorised_{r['authorised']}"]
    unauth = [v for r in report["authorised"] for k, v in r["accuracy"].items()
              if k.startswith("unauthorised") and not k.endswith("_photo")]
    unauth_photo = [v for r in report["authorised"] for k, v in r["accuracy"].items()
                    if k.startswith("unauthorised") and k.endswith("_photo")]
    attacks = ("white_box", "black_box")
    recon = [r[f"{a}_pmt"]["ssim"] for r in single for a in attacks if f"{a}_pmt" in r]
    unprot = [max(r[f"{a}_unprotected"]["ssim"] for a in attacks if f"{a}_unprotected" in r)
              for r in single if "white_box_unprotected" in r]
    dlib = next(r for r in single if r["authorised"] == "dlib")
    return {"authorised_accuracy": min(auth), "unauthorised_accuracy": max(unauth),
            "unauthorised_accuracy_photo": max(unauth_photo),
            "reconstruction_ssim": max(recon) if recon else None,
            "reconstruction_ssim_unprotected": min(unprot) if unprot else None,
            "faces_per_second": dlib["faces_per_second"]}


def write_grid(path: Path, pics: dict, ids, rows: int = 6) -> None:
    """Writes original / obfuscated / reconstructed (PMT) / reconstructed (unprotected)."""
    cols = [k for k in ("original", "obfuscated", "pmt", "black_pmt", "unprotected",
                        "black_unprotected") if k in pics]
    titles = {"original": "original", "obfuscated": "obfuscated x~",
              "pmt": "white-box\nfrom E_c(x~)", "unprotected": "white-box\nfrom E_c(x)",
              "black_pmt": "black-box\nfrom E_c(x~)", "black_unprotected": "black-box\nfrom E_c(x)"}
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
        recon_iters=200, decoder_steps=None, blackbox=True) -> tuple[dict, dict]:
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
              "clean_verification_upload": {
                  f"{m}_on_{chip}_chips": data_abuse.verification(np.concatenate(
                      [recognise.embed_faces(c, lm[None], m)[0] for c, lm in zip(
                          upload_canvases(clean[chip][0], images, lms, chip), lms)]),
                      ids, centre=centres[m])
                  for chip, m in (("dlib", "facenet"), ("facenet", "dlib"))},
              "authorised": []}
    decoders = train_decoders(clean, ids, layers, decoder_steps) if blackbox else None
    attribute_model = attribute_models.load()
    report["attributes_clean"] = {k: v for k, v in attributes.evaluate(
        attribute_model, clean["dlib"][0], clean["dlib"][0]).summary().items()
        if k != "per_face"}
    pics_dlib = {}
    common = {"centres": centres, "decoders": decoders, "attribute_model": attribute_model}
    for auth in AUTHORISED:
        _log(f"authorised {auth}: {len(ids)} faces")
        cfg = pmt.preset("enhanced", **over)
        res = run_pmt(images, lms, auth, cfg)
        rep, pics = evaluate(auth, res, ids, lms, clean, cfg,
                             recon_iters=recon_iters if auth != "dlib,facenet" else 0, **common)
        report["authorised"].append(rep)
        if auth == "dlib":
            pics_dlib = pics
    k = min(ablation_faces, len(ids))
    report["ablation"] = {}
    for name in ABLATION if k else ():  # --ablation_faces 0: no ablation
        _log(f"ablation {name}: {k} faces")
        cfg = pmt.preset(name, **over)
        res = run_pmt(images[:k], lms[:k], "dlib", cfg)
        sub = {m: (clean[m][0][:k], clean[m][1][:k]) for m in MODELS}
        rep, _ = evaluate("dlib", res, ids[:k], lms[:k], sub, cfg, recon_iters=recon_iters,
                          index=np.arange(k), **common)
        report["ablation"][name] = {key: rep[key] for key in (
            "accuracy", "white_box_pmt", "black_box_pmt", "lpips_obfuscated",
            "ssim_obfuscated") if key in rep}
    report["summary"] = summary(report)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return {"summary": report.pop("summary")} | report, {"pics": pics_dlib, "ids": ids}


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
                        recon_iters=FLAGS.recon_iters, decoder_steps=FLAGS.decoder_steps,
                        blackbox=FLAGS.blackbox)
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
