"""Verification on the shared faces (folder = identity): genuine/impostor distances per model.

    python -m benchmarks.verification --json out.json [--models dlib,facenet] [--data DIR]

For each model: the largest face of every photo under DATA/faces is detected, aligned and
embedded; every pair of photos is genuine (same folder) or impostor. Prints JSON with the two
distance distributions, accuracy at the model's standard threshold and at the best threshold
on this set, and every pair the standard threshold gets wrong. This is the yardstick later
protection benchmarks use.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from faceveil.engine.pipeline import image_io, recognise

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so other benchmarks can import this module.
    flags.DEFINE_string("json", None, "Write the JSON report here too.")
    flags.DEFINE_list("models", ["dlib", "facenet"], "Recognisers to evaluate.")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder.")


def face_photos(data: Path) -> list[tuple[str, Path]]:
    """Returns (identity, path) for every photo under data/faces, sorted."""
    return sorted((p.parent.name, p) for p in (data / "faces").glob("*/*")
                  if p.suffix.lower() in IMAGE_SUFFIXES)


def best_threshold(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """Returns (threshold, accuracy) maximising pair accuracy of `distance < threshold`."""
    cands = np.sort(np.concatenate([genuine, impostor]))
    mids = np.concatenate([[cands[0] - 1e-3], (cands[1:] + cands[:-1]) / 2, [cands[-1] + 1e-3]])
    accs = [(np.sum(genuine < t) + np.sum(impostor >= t)) / (len(genuine) + len(impostor))
            for t in mids]
    i = int(np.argmax(accs))
    return float(mids[i]), float(accs[i])


def evaluate(model: str, photos, landmarks) -> dict:
    """Returns the verification figures of one recogniser on the photos."""
    rec, _ = recognise.recogniser_params(model)
    embs = []
    for (_, path), lms in zip(photos, landmarks):
        emb, _ = recognise.embed_faces(image_io.read_image(path), lms[None], model)
        embs.append(emb[0])
    genuine, impostor, errors = [], [], []
    for (i, (ida, pa)), (j, (idb, pb)) in itertools.combinations(enumerate(photos), 2):
        d = float(np.linalg.norm(embs[i] - embs[j]))
        same = ida == idb
        (genuine if same else impostor).append(d)
        if (d < rec.threshold) != same:
            errors.append({"a": str(pa.relative_to(pa.parents[2])),
                           "b": str(pb.relative_to(pb.parents[2])),
                           "distance": round(d, 4), "genuine": same})
    g, im = np.array(genuine), np.array(impostor)
    thr, acc = best_threshold(g, im)

    def stats(x):
        return {"n": int(x.size), "min": float(x.min()), "mean": float(x.mean()),
                "max": float(x.max())}

    return {
        "threshold": rec.threshold,
        "genuine": stats(g), "impostor": stats(im),
        "accuracy_at_threshold": float((np.sum(g < rec.threshold) + np.sum(im >= rec.threshold))
                                       / (g.size + im.size)),
        "best_threshold": thr, "accuracy_at_best": acc,
        "errors_at_threshold": errors,
    }


def main(argv):
    del argv
    data = Path(FLAGS.data)
    photos = face_photos(data)
    t0 = time.perf_counter()
    landmarks = []
    for _, path in photos:
        _, lms, _ = recognise.largest_face(image_io.read_image(path), source=str(path))
        landmarks.append(lms)
    report = {"photos": len(photos), "identities": len({i for i, _ in photos}),
              "models": {m: evaluate(m, photos, landmarks) for m in FLAGS.models}}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if FLAGS.json:
        image_io.write_json(FLAGS.json, report)
    sys.exit(0)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
