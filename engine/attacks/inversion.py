"""Reconstruction attacks of the suite on paired faces: white-box inversion, black-box decoder.

    whitebox   the attacker knows the shallow model and inverts the features (`reconstruction`)
    blackbox   a U-Net decoder trained on (E_c(x), x) pairs decodes them (`decoder`)

Both judge the protected faces' features (photos: E_c of the protected chip; PMT feature
uploads: the uploaded array) and, as the baseline, the originals' against the original chips:
SSIM, PSNR, embedding cosine, SRRA. Each returns (AttackReport, {"unprotected": result,
"protected": result}); `faceveil attack --png` draws them (`commands/attack_figures.py`).

    report, results = whitebox(faces, "dlib", layers=2)
    report, results = blackbox(faces, load_or_train_decoder("dlib", 2, "out/dec", "faces/"))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from faceveil.engine.attacks import decoder
from faceveil.engine.attacks.paired import AttackInputError, PairedFaces
from faceveil.engine.attacks.suite import AttackReport, json_float, json_mean


def _reconstruction_rows(results: dict) -> list[dict]:
    return [{"features": name, "faces": len(r.ssim), "ssim": json_mean(r.ssim),
             "psnr": json_mean(r.psnr), "cosine": json_mean(r.cosine), "srra": json_float(r.srra)}
            for name, r in results.items()]


def _reconstruction_details(results: dict, faces: PairedFaces) -> dict:
    return {"per_face": {name: [{"protected": str(p.protected), "ssim": float(s),
                                 "psnr": float(q), "cosine": float(c), "matched": bool(k)}
                                for p, s, q, c, k in zip(faces.pairs, r.ssim, r.psnr, r.cosine,
                                                         r.matched)]
                         for name, r in results.items()}}


def _attacked_features(faces: PairedFaces, model: str, layers: int):
    """Returns (rec, params, original chips, their cut features, the protected faces')."""
    from faceveil.engine.methods import pmt
    from faceveil.engine.pipeline import recognise

    rec, params = recognise.recogniser_params(model)
    x = faces.original_chips(model)[1]
    clean = np.asarray(pmt.cut_features(rec, params, x, layers))
    return rec, params, x, clean, faces.protected_features(rec, params, layers)


def whitebox(faces: PairedFaces, model: str = "dlib", *, layers: int = 2,
             iters: int | None = None) -> tuple[AttackReport, dict]:
    """Returns (the white-box report, {features: ReconstructionResult}).

    The attacker inverts the shallow features of the protected faces (photos: E_c of the
    protected chip; feature uploads: the uploaded array) and, as the baseline, those of the
    originals; SSIM/PSNR/cosine/SRRA against the original chips (`reconstruction`).
    """
    from faceveil.engine.attacks import reconstruction

    cfg = reconstruction.ReconstructionConfig(
        **({} if iters is None else {"iters": iters}))
    rec, params, x, clean, prot = _attacked_features(faces, model, layers)
    results = {"unprotected": reconstruction.attack(rec, params, clean, x, layers, cfg),
               "protected": reconstruction.attack(rec, params, prot, x, layers, cfg)}
    report = AttackReport(
        kind="whitebox",
        title=f"White-box reconstruction: {model} features after {layers} layer(s), "
              f"{cfg.iters} iterations",
        columns=("features", "faces", "ssim", "psnr", "cosine", "srra"),
        rows=tuple(_reconstruction_rows(results)),
        notes=(("ssim/psnr: reconstruction vs the original chip; cosine: recogniser embeddings "
               "of both; srra: fraction the recogniser still matches (distance < "
               f"{rec.threshold:g})"),),
        details={"model": model, "layers": layers, "iters": cfg.iters,
                 **_reconstruction_details(results, faces)})
    return report, results


def load_or_train_decoder(model: str, layers: int, decoder_dir: str,
                          train_faces: str | None, *, steps: int | None = None):
    """Returns the decoder in `decoder_dir`, trained on `train_faces` first if need be.

    With `train_faces` (a folder of clean photos, `faceveil attack blackbox --train-faces`), a
    folder without a decoder gets one trained (checkpointed there, so an interrupted run
    resumes), and a decoder with fewer than `steps` training steps (an interrupted run, or a
    longer run asked) continues; without it the decoder is used as is.

    Args:
      model, layers: the recogniser and cut whose features the decoder must take.
      decoder_dir: the decoder's folder (`decoder.CHECKPOINT_FILE` in it).
      train_faces: clean photos to train on (None: use the decoder as it is).
      steps: training steps wanted (default: the decoder's config, else DecoderConfig()).

    Raises:
      InputError: no decoder there and no --train-faces, no face to train on, a decoder of
        another recogniser or cut, or a bad checkpoint file (named).
    """
    d = Path(decoder_dir)
    dec = None
    try:
        dec = decoder.Decoder.load(d)
    except FileNotFoundError:
        if not train_faces:
            raise AttackInputError(d, "no trained decoder here; pass --train-faces DIR to "
                                      "train one (checkpointed into this folder)") from None
    except ValueError as e:  # an InputError naming the checkpoint file
        raise AttackInputError(d, f"not a usable decoder ({e})") from None
    if dec is not None and (dec.recogniser != model or dec.cut != layers):
        raise AttackInputError(d, f"a decoder of {dec.recogniser} features after {dec.cut} "
                                  f"layer(s), not --model {model} --layers {layers}")
    cfg = dec.config if dec is not None else decoder.DecoderConfig()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    if train_faces and (dec is None or dec.step < cfg.steps):
        from faceveil.engine.pipeline import recognise

        files = recognise.photo_files([train_faces])
        chips, _ = decoder.face_chips(files, model) if files else ([], [])
        if not len(chips):
            raise AttackInputError(train_faces, "no photo with a face to train the decoder on")
        # train() resumes from a checkpoint of the same run in d and writes one at the end.
        dec = decoder.train(model, chips, layers, cfg, checkpoint_dir=d)
    return dec


def blackbox(faces: PairedFaces, dec) -> tuple[AttackReport, dict]:
    """Returns (the black-box report, {features: ReconstructionResult}) of a trained decoder.

    The decoder maps shallow features to a face (trained on (E_c(x), x) pairs); it decodes the
    protected faces' features and, as the baseline, the originals'.
    """
    rec, _, x, clean, prot = _attacked_features(faces, dec.recogniser, dec.cut)
    results = {"unprotected": decoder.attack(dec, clean, x),
               "protected": decoder.attack(dec, prot, x)}
    report = AttackReport(
        kind="blackbox",
        title=f"Black-box reconstruction (U-Net decoder): {dec.recogniser} features after "
              f"{dec.cut} layer(s)",
        columns=("features", "faces", "ssim", "psnr", "cosine", "srra"),
        rows=tuple(_reconstruction_rows(results)),
        notes=(("ssim/psnr: decoded face vs the original chip; cosine: recogniser embeddings of "
               f"both; srra: fraction matched (distance < {rec.threshold:g})"),),
        details={"model": dec.recogniser, "layers": dec.cut,
                 **_reconstruction_details(results, faces)})
    return report, results
