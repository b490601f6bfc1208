"""Parity of both ported recognisers with their original libraries, on the shared real faces.

    python -m benchmarks.recogniser_parity --json out.json [--data DIR] [--min_cosine 0.9999]

dlib ResNet against dlib-bin's compute_face_descriptor on dlib.get_face_chip chips
(benchmarks/parity_dlib.py); FaceNet against cv2.dnn running the same frozen graph on the same
input tensors, in both preprocessing modes (benchmarks/parity_facenet.py). Prints JSON per
model (max abs difference, minimum cosine, per-face rows) and exits 1 if any cosine is below
--min_cosine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags

from faceveil.engine.pipeline import image_io

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLAGS = flags.FLAGS


def run(data: Path) -> dict:
    """Returns {model: parity report} for dlib and FaceNet."""
    from benchmarks import parity_dlib, parity_facenet

    t0 = time.perf_counter()
    dl = parity_dlib.run(data)
    fn = parity_facenet.run(data)
    worst = {
        "dlib": {"min_cosine": dl["summary"]["min_cosine"],
                 "max_abs_diff": dl["summary"]["max_abs_diff"], "faces": dl["summary"]["faces"]},
        **{f"facenet_{mode}": {"min_cosine": s["min_cosine"], "max_abs_diff": s["max_abs_diff"],
                               "faces": len(fn["faces"])}
           for mode, s in fn["summary"].items()},
    }
    return {"summary": worst, "dlib": dl, "facenet": fn,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv):
    del argv
    report = run(Path(FLAGS.data))
    print(json.dumps(report["summary"], indent=2))
    if FLAGS.json:
        image_io.write_json(FLAGS.json, report)
    worst = min(s["min_cosine"] for s in report["summary"].values())
    if worst < FLAGS.min_cosine:
        print(f"FAIL: minimum cosine {worst:.7f} < {FLAGS.min_cosine}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.DEFINE_string("json", None, "Write the full JSON report here.")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder.")
    flags.DEFINE_float("min_cosine", 0.9999, "Exit 1 if any face's cosine is below this.")
    app.run(main)
