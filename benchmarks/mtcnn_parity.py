"""Parity of faceveil's MTCNN detector against facenet-pytorch's MTCNN on real photos.

    python -m benchmarks.mtcnn_parity --json out.json [--data ../shared/data]

The oracle is facenet-pytorch 2.6.0 `MTCNN(keep_all=True)` with its own pnet/rnet/onet.pt
weights (an independent copy of the weights we convert from the mtcnn package), run on CPU
torch. Both detectors get the same RGB uint8 array of every photo in <data>/faces/*/ and
<data>/multi/. Faces are matched one-to-one by IoU (Hungarian); per image the JSON lists face
counts, box error (absolute coordinate difference, px), landmark error (point distance, px) and
score difference. Exits non-zero when an image's face counts differ or its mean box or landmark
error exceeds --max_error_px.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image
from scipy.optimize import linear_sum_assignment

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

_JSON = flags.DEFINE_string("json", None, "Write the report here (it is printed too).")
_DATA = flags.DEFINE_string("data", str(DEFAULT_DATA), "Shared data folder (faces/, multi/).")
_MAX_ERROR = flags.DEFINE_float("max_error_px", 2.0, "Largest allowed mean box/landmark error.")


def load_rgb(path: Path) -> np.ndarray:
    """Returns the [H, W, 3] uint8 RGB pixels of an image file (alpha composited on white)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
        return np.asarray(im.convert("RGB"))


def photos(data_dir: Path) -> list[Path]:
    """Returns the photos under data_dir/faces/*/ and data_dir/multi/, sorted."""
    found = [p for sub in ("faces", "multi") for p in (data_dir / sub).rglob("*")
             if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def oracle_detect(mtcnn, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns facenet-pytorch's (boxes [n, 4], scores [n], landmarks [n, 5, 2]) for one image."""
    boxes, probs, points = mtcnn.detect(Image.fromarray(image), landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2))
    # Under numpy 2 facenet-pytorch returns object arrays; make them plain floats.
    return (np.asarray(boxes, float).reshape(-1, 4), np.asarray(probs, float).reshape(-1),
            np.asarray(points, float).reshape(-1, 5, 2))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Returns the [len(a), len(b)] IoU of two sets of (x1, y1, x2, y2) boxes."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def compare(ours, theirs) -> dict:
    """Returns counts and matched errors between two (boxes, scores, landmarks) detections."""
    (b0, s0, l0), (b1, s1, l1) = ours, theirs
    out = {"faces_ours": len(s0), "faces_oracle": len(s1), "matched": 0,
           "box_err_mean_px": 0.0, "box_err_max_px": 0.0,
           "landmark_err_mean_px": 0.0, "landmark_err_max_px": 0.0, "score_diff_max": 0.0}
    if len(s0) and len(s1):
        iou = iou_matrix(b0, b1)
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > 0.3  # a pairing with less overlap is not the same face
        rows, cols = rows[keep], cols[keep]
        box_err = np.abs(b0[rows] - b1[cols])
        lm_err = np.linalg.norm(l0[rows] - l1[cols], axis=-1)
        out.update(
            matched=len(rows),
            box_err_mean_px=float(box_err.mean()) if len(rows) else 0.0,
            box_err_max_px=float(box_err.max()) if len(rows) else 0.0,
            landmark_err_mean_px=float(lm_err.mean()) if len(rows) else 0.0,
            landmark_err_max_px=float(lm_err.max()) if len(rows) else 0.0,
            score_diff_max=float(np.abs(s0[rows] - s1[cols]).max()) if len(rows) else 0.0,
        )
    return out


def run(data_dir: Path, max_error_px: float = 2.0, log=print) -> dict:
    """Returns the parity report (per image and overall) of our detector vs facenet-pytorch."""
    import jax

    from faceveil.benchmarks._oracle_shims import facenet_pytorch_mtcnn
    from faceveil.engine.pipeline import detect as det_lib

    oracle = facenet_pytorch_mtcnn(keep_all=True)
    params = det_lib.default_params()
    images = []
    for path in photos(Path(data_dir)):
        image = load_rgb(path)
        t0 = time.perf_counter()
        det = det_lib.detect(image[None], params)
        jax.block_until_ready(det)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = oracle_detect(oracle, image)
        t_oracle = time.perf_counter() - t0
        row = {"image": str(path.relative_to(data_dir)), "size": list(image.shape[:2]),
               **compare(det_lib.to_lists(det)[0], theirs),
               "seconds_ours_incl_compile": round(t_ours, 2),
               "seconds_oracle": round(t_oracle, 2)}
        row["ok"] = bool(row["faces_ours"] == row["faces_oracle"] == row["matched"]
                         and row["box_err_mean_px"] <= max_error_px
                         and row["landmark_err_mean_px"] <= max_error_px)
        log(json.dumps(row), file=sys.stderr)
        images.append(row)

    def mean(key):
        return float(np.mean([r[key] for r in images])) if images else 0.0

    return {
        "oracle": "facenet-pytorch 2.6.0 MTCNN(keep_all=True), CPU torch",
        "images": images,
        "overall": {
            "n_images": len(images),
            "n_count_mismatch": sum(r["faces_ours"] != r["faces_oracle"] for r in images),
            "box_err_mean_px": mean("box_err_mean_px"),
            "box_err_max_px": max((r["box_err_max_px"] for r in images), default=0.0),
            "landmark_err_mean_px": mean("landmark_err_mean_px"),
            "landmark_err_max_px": max((r["landmark_err_max_px"] for r in images), default=0.0),
            "score_diff_max": max((r["score_diff_max"] for r in images), default=0.0),
            "max_error_px": max_error_px,
            "ok": all(r["ok"] for r in images) and bool(images),
        },
    }


def main(argv):
    del argv
    data_dir = Path(_DATA.value)
    if not data_dir.is_dir():
        sys.exit(f"{data_dir}: data folder not found (pass --data)")
    report = run(data_dir, _MAX_ERROR.value)
    text = json.dumps(report, indent=2)
    print(text)
    if _JSON.value:
        Path(_JSON.value).write_text(text + "\n")
    if not report["overall"]["ok"]:
        sys.exit("parity check failed (see the rows with \"ok\": false)")


if __name__ == "__main__":
    app.run(main)
