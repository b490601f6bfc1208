"""`faceveil cloak` and `faceveil cloak-video`: the library calls plus the files a person reads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from faceveil.engine import distributed
from faceveil.engine.commands import report
from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import image_io, photos, video, video_io


def _face_crop(frame: np.ndarray, box: np.ndarray, margin: float = 0.25) -> np.ndarray:
    """Returns the square crop around a face box (with margin), clipped to the frame."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = frame.shape[:2]
    xa, ya = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    xb, yb = int(min(cx + side / 2, w)), int(min(cy + side / 2, h))
    return frame[ya:yb, xa:xb]


def write_video_report(path: str, result: video.VideoResult) -> dict:
    """Returns the JSON-ready report after writing it and its PNGs beside `path`."""
    out = Path(path)
    stem = out.with_suffix("")
    rep = video.summary(result)
    pngs = {}
    iters, mask, samples, boxes = result.iterations, result.mask, result.samples, result.boxes
    curves = result.metrics.get("loss_curve")
    if mask.any():
        pngs["iterations"] = str(report.plot_iterations(
            f"{stem}_iterations.png", iters, mask=mask,
            labels=[f"track {i}" for i in range(iters.shape[0])],
            max_iters=rep["config"]["max_iters"]))
        if curves is not None:
            t = int(np.argmax(mask.sum(axis=1)))
            frames = np.flatnonzero(mask[t])
            pngs["loss_curves"] = str(report.plot_loss_curves(
                f"{stem}_loss_curves.png", curves[t][frames], frames))
    if samples:
        ids = sorted(samples)
        originals, protected, labels = [], [], []
        for f in ids:
            t = int(np.flatnonzero(mask[:, f])[0])
            originals.append(_face_crop(samples[f][0], boxes[t, f]))
            protected.append(_face_crop(samples[f][1], boxes[t, f]))
            labels.append({"frame": f, "iters": int(iters[t, f])})
        pngs["crops"] = str(report.crop_strip(f"{stem}_crops.png", originals, protected, labels))
        f = ids[len(ids) // 2]
        pngs["side_by_side"] = str(report.side_by_side(
            f"{stem}_side_by_side.png", samples[f][0], samples[f][1],
            labels=(f"original, frame {f}", "cloaked")))
    rep["outputs"] = {"report": str(out), **pngs}
    if result.output:
        rep["outputs"]["video"] = str(result.output)
    image_io.write_json(out, rep)
    return rep


def run_video(input_path: str, output: str, *, report_path: str | None, reuse: str,
              model: str, mode: str, chunk: int, max_frames: int | None,
              resume: bool = True, overwrite: bool = False,
              segment: int | None = None, field: str = "chip") -> dict:
    """Returns the report of cloaking a video file (the `cloak-video` command)."""
    if not video_io.is_video(output):
        raise image_io.InputError(output, "the output must be a video file (.mp4, .mkv, ...)")
    image_io.ensure_not_input(output, [input_path], overwrite=overwrite)
    report_path = report_path or str(Path(output).with_suffix(".json"))
    config = cloak.preset(mode, model, reuse=reuse, field=field)
    if segment is not None and segment < 1:
        raise image_io.InputError(input_path, f"--segment must be at least 1 frame, got {segment}")
    job = video.VideoJob(model=model, chunk=chunk, max_frames=max_frames, segment=segment)
    result = video.cloak_video(input_path, output=output, config=config, job=job, resume=resume)
    rep = write_video_report(report_path, result)
    rep["reuse"] = reuse
    print(_headline(rep), file=sys.stderr)
    return rep


def _headline(rep: dict) -> str:
    lines = [(f"{rep['frames_in']} frames in, {rep['frames_out']} out, {rep['tracks']} face "
              f"track(s), "
              f"{rep.get('faces', 0)} faces cloaked against {rep['model']}")]
    if rep.get("faces"):
        lines.append(f"iterations: {rep['total_iterations']} "
                     f"({rep['mean_iterations']:.1f} per face, reuse {rep['config'].get('reuse')}, "
                     f"{rep.get('chains')} chain(s) in {rep.get('segments')} segment(s); "
                     f"compile {rep.get('compile_seconds')} s, optimise "
                     f"{rep.get('optimise_seconds')} s)")
        lines.append(f"protection ({rep['model']}): mean {rep['mean_protection']:.3f}, "
                     f"min {rep['min_protection']:.3f}; SSIM mean {rep['mean_ssim']:.4f}")
        other = rep.get("other_model")
        if other and other.get("mean_protection") is not None:
            lines.append(f"protection ({other['model']}, not cloaked against): mean "
                         f"{other['mean_protection']:.3f}")
    if rep.get("note"):
        lines.append(rep["note"])
    lines.append(f"speed: {rep.get('frames_per_second')} frames/s "
                 f"({rep.get('wall_seconds')} s)")
    lines.extend(f"{k}: {v}" for k, v in rep.get("outputs", {}).items())
    return "\n".join(lines)


def run_images(paths: list[str], out_dir: str, *, model: str, mode: str,
               target_pool: str | None, overwrite: bool = False, field: str = "chip",
               budget: str = "dssim") -> dict:
    """Returns the report of cloaking photos (the `cloak` command); writes PNGs into out_dir."""
    if not paths:
        raise image_io.InputError(out_dir, "no input images given")
    images = [image_io.read_image(p) for p in paths]  # every input is checked before any work
    out = Path(out_dir)
    targets = [out / f"{Path(p).stem}_cloaked.png" for p in paths]
    for t in targets:
        image_io.ensure_not_input(t, paths, overwrite=overwrite)
    config = cloak.preset(mode, model, targeted=target_pool is not None, field=field,
                          budget=budget)
    result = photos.cloak_images(images, model=model, mode=mode, target_pool=target_pool,
                                 config=config, names=[Path(p).name for p in paths])
    rep = photos.summary(result)
    for p, t, img, entry in zip(paths, targets, result.images, rep["images"]):
        # PNG: a lossy format would wash out the cloak it carries.
        image_io.write_image(t, img)
        entry.update({"file": str(p), "output": str(t)})
        n = len(entry["faces"])
        msg = f"{p}: {n} face(s) cloaked -> {t}"
        if entry["small_faces_left_alone"]:
            msg += f" ({entry['small_faces_left_alone']} too small, left alone)"
        if n == 0:
            msg += " (no face found: copied unchanged)"
        print(msg, file=sys.stderr)
    # On a cluster every process reports its own share (`distributed.own_path`).
    report_path = distributed.own_path(out / "report.json")
    image_io.write_json(report_path, rep)
    if rep.get("faces"):
        seen = "; ".join(f"{name} {r['mean_protection']:.3f}, "
                         f"{r['fraction_beyond_threshold']:.0%} beyond {r['threshold']}"
                         for name, r in rep["recognised_by"].items())
        print(f"{rep['faces']} faces: mean protection {rep['mean_protection']:.3f} "
              f"(on the written photos: {seen}), face SSIM {rep['mean_ssim']:.4f}, "
              f"face LPIPS {rep.get('mean_lpips', float('nan')):.4f}, "
              f"{rep['wall_seconds']:.0f} s, report -> {report_path}", file=sys.stderr)
    return rep


__all__ = ["run_images", "run_video", "write_video_report"]
