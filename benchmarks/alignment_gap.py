"""How far dlib's own face chip sits from ours: the alignment gap a cloak has to survive.

    python -m benchmarks.alignment_gap --json out.json [--data ../shared/data] [--video_stride 10]

Ours: MTCNN landmarks (`faces.find_photo_faces` on photos, `faces.detect_frames` on video
frames, the engine's score and size filters) fitted to dlib's template,
`faces.chip_transforms(landmarks, registry.get("dlib"))` (chip pixels -> frame pixels).
dlib's: `dlib.get_frontal_face_detector()` (upsampling once), the 5-point shape predictor and
the chip `dlib.get_face_chip(img, shape, size=150, padding=0.25)` extracts, whose full-resolution
chip -> frame transform `parity_dlib._chip_to_dlib` rebuilds from its chip_details.

Faces are paired one-to-one by box IoU (Hungarian, IoU >= 0.3). Per pair, r = ours^-1 o dlib's
is dlib's chip in our chip's pixels (chip -> chip), written like `cloak.jitter_transform`:
r(u) = s R(angle) (u - c) + c + shift, c the chip centre. So `compose(m_ours, r)` is dlib's chip,
exactly as `compose(m_ours, jitter)` is a training view, and the four numbers compare directly
with the jitter's ranges: shift_x, shift_y (in chip sizes), log_scale (log s; > 0: dlib's chip
covers more of the face) and angle (radians, image axes: x right, y down).

Data: the photos of <data>/faces/*/ and <data>/multi/, and every --video_stride-th frame of
<data>/video/hamilton_clip.mp4. Per set the summary holds the face counts and, per component,
mean, std, median, the 90th percentile of |value|, and the fraction outside +-jitter; the
`jitter` entry gives the same statistics of uniform +-jitter for reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags
from scipy.optimize import linear_sum_assignment

from benchmarks import parity_dlib
from faceveil.engine.pipeline import align, faces, image_io, track, video_io
from faceveil.models import registry

COMPONENTS = ("shift_x", "shift_y", "log_scale", "angle")
MIN_IOU = 0.3


def relative_params(m_ours: np.ndarray, m_dlib: np.ndarray, chip: int) -> np.ndarray:
    """Returns (shift_x, shift_y, log_scale, angle) of r = m_ours^-1 o m_dlib (chip -> chip).

    The shift is r's image of the chip centre minus the centre, in chip sizes.
    """
    r = np.asarray(align.compose(align.invert(m_ours), m_dlib), np.float64)
    lin, c = r[:, :2], np.full(2, (chip - 1) / 2.0)
    shift = (lin @ c + r[:, 2] - c) / chip
    log_scale = 0.5 * np.log(abs(np.linalg.det(lin)))
    angle = np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])
    return np.array([shift[0], shift[1], log_scale, angle])


class DlibOracle:
    """dlib's detector, 5-point predictor and chip geometry."""

    def __init__(self, chip: int):
        import dlib  # the oracle; only benchmarks and tests need it

        self.dlib, self.chip = dlib, chip
        self.detector = dlib.get_frontal_face_detector()
        self.sp5 = dlib.shape_predictor(str(parity_dlib.oracle_files()["predictor5"]))

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (boxes [N, 4] x1 y1 x2 y2, chip -> frame transforms [N, 2, 3]) of a frame."""
        boxes, ms = [], []
        for det in self.detector(frame, 1):
            cd = self.dlib.get_face_chip_details(
                self.sp5(frame, det), self.chip, parity_dlib.PADDING
            )
            boxes.append([det.left(), det.top(), det.right() + 1, det.bottom() + 1])
            ms.append(parity_dlib._chip_to_dlib(cd))
        return np.reshape(np.asarray(boxes, np.float64), (-1, 4)), np.reshape(ms, (-1, 2, 3))


def pair_faces(name: str, ours: tuple, theirs: tuple, chip: int) -> list[dict]:
    """Returns one row per IoU-matched face of (boxes, chip transforms) ours and theirs."""
    (b0, m0), (b1, m1) = ours, theirs
    if not len(b0) or not len(b1):
        return []
    iou = track.box_iou(b0, b1)
    rows = []
    for i, j in zip(*linear_sum_assignment(-iou)):
        if iou[i, j] >= MIN_IOU:
            p = relative_params(m0[i], m1[j], chip)
            rows.append(
                {"source": name, "face": int(i), "iou": round(float(iou[i, j]), 3)}
                | {k: float(v) for k, v in zip(COMPONENTS, p)}
            )
    return rows


def summarise(rows: list[dict], jitter: float) -> dict:
    """Returns per-component mean, std, median, p90 |value| and fraction outside +-jitter."""
    out = {"faces": len(rows)}
    for k in COMPONENTS:
        v = np.array([r[k] for r in rows])
        out[k] = (
            {
                "mean": v.mean(),
                "std": v.std(),
                "median": np.median(v),
                "p90_abs": np.percentile(np.abs(v), 90),
                "outside_jitter": (np.abs(v) > jitter).mean(),
                "mean_exceeds_jitter": bool(abs(v.mean()) > jitter),
            }
            if len(v)
            else {}
        )
        out[k] = {
            n: (round(float(x), 4) if not isinstance(x, bool) else x) for n, x in out[k].items()
        }
    return out


def run(data_dir: Path, *, video_stride: int = 10, jitter: float = 0.03) -> dict:
    """Returns the report (see the module docstring)."""
    rec = registry.get("dlib")
    oracle = DlibOracle(rec.chip_size)
    photo_rows, photo_counts = [], [0, 0]
    for path in parity_dlib.image_files(data_dir):
        image = image_io.read_image(path)
        found = faces.find_photo_faces(image)
        ours = (found.boxes, faces.chip_transforms(found.landmarks, rec))
        theirs = oracle(image)
        photo_counts[0] += len(ours[0])
        photo_counts[1] += len(theirs[0])
        photo_rows += pair_faces(str(path.relative_to(data_dir)), ours, theirs, rec.chip_size)

    video = data_dir / "video" / "hamilton_clip.mp4"
    frames = video_io.read_video(video)[::video_stride]
    det = faces.detect_frames(frames, min_face=40.0)
    video_rows, video_counts = [], [0, 0]
    for t, frame in enumerate(frames):
        ok = det["valid"][t]
        ours = (det["boxes"][t][ok], faces.chip_transforms(det["landmarks"][t][ok], rec))
        theirs = oracle(frame)
        video_counts[0] += len(ours[0])
        video_counts[1] += len(theirs[0])
        video_rows += pair_faces(f"{video.name}#{t * video_stride}", ours, theirs, rec.chip_size)

    uniform = np.linspace(-jitter, jitter, 100001)
    ref = {"std": jitter / np.sqrt(3), "p90_abs": float(np.percentile(np.abs(uniform), 90))}
    summary = {}
    for name, rows, counts in (
        ("photos", photo_rows, photo_counts),
        ("video", video_rows, video_counts),
        ("all", photo_rows + video_rows, [a + b for a, b in zip(photo_counts, video_counts)]),
    ):
        summary[name] = {"faces_ours": counts[0], "faces_dlib": counts[1]} | summarise(rows, jitter)
    return {
        "chip": rec.chip_size,
        "padding": parity_dlib.PADDING,
        "min_iou": MIN_IOU,
        "video_stride": video_stride,
        "oracle": f"dlib {oracle.dlib.__version__}",
        "jitter": {"amount": jitter} | {k: round(float(v), 4) for k, v in ref.items()},
        "summary": summary,
        "faces": photo_rows + video_rows,
    }


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the JSON report here too.")
    flags.DEFINE_string("data", str(parity_dlib.DEFAULT_DATA), "The shared data folder.")
    flags.DEFINE_integer("video_stride", 10, "Use every n-th frame of the video.")
    flags.DEFINE_float("jitter", 0.03, "The cloak's jitter amount to compare with.")


def main(argv: list[str]) -> None:
    """Prints the JSON report."""
    del argv
    opts = flags.FLAGS
    report = run(Path(opts.data), video_stride=opts.video_stride, jitter=opts.jitter)
    print(json.dumps(report, indent=2))
    if opts.json:
        image_io.write_json(opts.json, report)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
