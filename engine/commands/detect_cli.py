"""`faceveil detect`: faces, boxes and landmarks of an image or a video, as JSON and a picture."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from faceveil.engine.pipeline import image_io, video_io

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def faces_as_dicts(det, index: int, min_score: float = 0.0) -> list[dict]:
    """Returns the valid faces of frame `index` of a Detections as JSON-ready dicts."""
    return face_dicts(det.boxes[index], det.scores[index], det.landmarks[index],
                      det.valid[index], min_score)


def face_dicts(boxes, scores, lms, valid, min_score: float = 0.0) -> list[dict]:
    """Returns JSON-ready dicts of the valid faces among boxes [K, 4], scores, landmarks."""
    boxes, scores, lms, valid = (np.asarray(a) for a in (boxes, scores, lms, valid))
    faces = []
    for k in np.flatnonzero(valid & (scores >= min_score)):
        faces.append({
            "box": [round(float(v), 2) for v in boxes[k]],
            "score": round(float(scores[k]), 5),
            "landmarks": {n: [round(float(lms[k, i, 0]), 2), round(float(lms[k, i, 1]), 2)]
                          for i, n in enumerate(LANDMARK_NAMES)},
        })
    return faces


def annotate(image: np.ndarray, faces: list[dict]) -> np.ndarray:
    """Returns a copy of a uint8 image with each face's box, score and landmarks drawn."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    width = max(2, round(max(image.shape[:2]) / 400))
    for f in faces:
        x1, y1, x2, y2 = f["box"]
        draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=width)
        draw.text((x1 + 2, max(0, y1 - 12)), f"{f['score']:.3f}", fill=(0, 255, 0))
        r = width + 1
        for x, y in f["landmarks"].values():
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 0, 0))
    return np.asarray(pil)


def _detect_frames(frames: np.ndarray, min_score: float):
    from faceveil.engine.pipeline.detect import detect

    det = detect(frames)
    return [faces_as_dicts(det, i, min_score) for i in range(frames.shape[0])]


def run(input_path: str, *, output: str | None = None, json_path: str | None = None,
        min_score: float = 0.9, overwrite: bool = False) -> dict:
    """Returns the detection report of an image or video and writes the requested outputs."""
    for out in (output, json_path):
        if out:
            image_io.ensure_not_input(out, [input_path], overwrite=overwrite)
    t0 = time.perf_counter()
    if video_io.is_video(input_path):
        report = _run_video(input_path, output, min_score)
    else:
        from faceveil.engine.pipeline import faces as face_pipeline

        image = image_io.read_image(input_path)
        faces = face_dicts(*face_pipeline.detect_photo(image), min_score)
        report = {"images": [{"file": str(input_path), "width": image.shape[1],
                              "height": image.shape[0], "faces": faces}]}
        if output:
            image_io.write_image(output, annotate(image, faces))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if json_path:
        image_io.write_json(json_path, report)
    n = sum(len(im["faces"]) for im in report.get("images", report.get("frames", [])))
    where = ", ".join(p for p in (output, json_path) if p) or "nothing written"
    print(f"{input_path}: {n} face(s) found ({where})")
    return report


def _run_video(path: str, output: str | None, min_score: float, chunk: int = 16) -> dict:
    info = video_io.probe(path)
    frames_out = []
    writer = None
    if output:
        if not video_io.is_video(output):
            raise image_io.InputError(output, "a video input needs a video output (.mp4)")
        writer = video_io.VideoWriter(output, info.fps,
                                      audio_from=path if info.audio_codec else None)
        writer.__enter__()
    ok = False
    try:
        done = 0
        for frames in video_io.iter_chunks(path, chunk):
            if frames.shape[0] < chunk:  # pad the last chunk: one compiled shape for all
                pad = np.repeat(frames[-1:], chunk - frames.shape[0], axis=0)
                faces = _detect_frames(np.concatenate([frames, pad]), min_score)
                faces = faces[: frames.shape[0]]
            else:
                faces = _detect_frames(frames, min_score)
            for i, f in enumerate(faces):
                frames_out.append({"frame": done + i, "faces": f})
                if writer:
                    writer.write(annotate(frames[i], f))
            done += frames.shape[0]
            print(f"\rdetect: {done}/{info.frames} frames", end="", file=sys.stderr)
        print(file=sys.stderr)
        ok = True
    finally:
        if writer:
            writer.__exit__(None if ok else RuntimeError, None, None)
    return {"video": {"file": os.fspath(path), "width": info.width, "height": info.height,
                      "fps": info.fps, "frames": info.frames}, "frames": frames_out}
