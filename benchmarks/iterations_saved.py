"""Iterations saved by cloak reuse (DESIGN.md method 1): modes none, copy and affine on a video.

    python -m benchmarks.iterations_saved --video ../shared/data/video/hamilton_clip.mp4 \
        --json out/iterations_saved.json [--frames N --start S --segment L]

Decodes the frames and detects them once, then cloaks them once per reuse mode through the
library's own video pipeline (`faceveil.engine.pipeline.video.cloak_video`, the code behind
`faceveil cloak-video`): the same tracks, objective, stopping rule, PRNG key and chunking in
every mode. Prints JSON keyed by mode: total iterations, iterations saved = 1 - iters(mode) /
iters(none), protection (embedding distance clean vs protected after uint8 rounding) and SSIM
(face patch) mean/min, and time: `optimise_s` is the compiled calls alone (compiled ahead of
time and timed apart as `compile_s`; results fetched before the clock is read), `wall_s` the
whole pipeline (detection excluded, done once). Under vmap a frame's while_loop runs until the
slowest lane stops, so `lockstep_iterations` (per call window, the most iterations any lane
needed, summed) is reported beside the per-face total: that is what the time follows.

The attacker's view (`faceveil.engine.attacks.protection`, DESIGN.md item "protection that works"):
for the modes in --attack_modes the cloaked frames are re-detected and embedded as a
recogniser would, and compared with the person's clean references (the track's other frames;
the labelled photos of --references), with --model and with --other_model, on the frames as
cloaked and after H.264 encoding with the writer's settings (what `cloak-video` publishes).
The `dlib_bin` attacker (`benchmarks.dlib_attacker`) does the same with dlib-bin's own
detector, landmarks and ResNet, independent of our code; faces it cannot find in the CLEAN
frame are left out of its figures (counted in `clean_missed_face`). `--attackers` picks
`ours` (the recognisers above), `dlib_bin`, or both.
A PNG of iterations per frame is written next to the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from faceveil.engine.attacks import protection
from faceveil.engine.methods import cloak
from faceveil.engine.pipeline import chains, recognise, video, video_io

MODES = ("none", "copy", "affine")
ATTACKERS = ("ours", "dlib_bin")
DLIB_BIN_THRESHOLD = 0.6

flags.DEFINE_string("video", None, "Video to read.")
flags.DEFINE_integer("frames", None, "Frames to use (default: all from --start on).")
flags.DEFINE_integer("start", 0, "First frame to use.")
flags.DEFINE_string("model", "dlib", "Recogniser cloaked against (registry name).")
flags.DEFINE_enum("mode", "mid", ["low", "mid", "high"], "Cloak mode (as `faceveil cloak`).")
flags.DEFINE_string("other_model", "facenet", "Second recogniser for the cross-model figure.")
flags.DEFINE_string("json", None, "Where to write the JSON report (also printed).")
flags.DEFINE_list("modes", list(MODES), "Reuse modes to run; 'none' is the baseline.")
flags.DEFINE_list("attack_modes", ["affine"], "Modes whose output the attacker's view checks.")
flags.DEFINE_list("attackers", list(ATTACKERS),
                  "Attackers of the attacker's view: 'ours' (--model, --other_model), "
                  "'dlib_bin' (dlib-bin's own pipeline).")
flags.DEFINE_list("references", ["../shared/data/faces"],
                  "Labelled reference photos (folders: faces/<identity>/*.jpg) for the "
                  "attacker's view; empty for none.")
flags.DEFINE_integer("chunk", 16, "Frames per compiled chunk call.")
flags.DEFINE_integer("segment", None, "Frames per segment (parallel chains per track).")
flags.DEFINE_integer("seed", 0, "PRNG seed of the cold starts (the same for every mode).")
flags.DEFINE_float("threshold", None, "Protection threshold (default: CloakConfig's).")
flags.DEFINE_float("lr", None, "Adadelta learning rate (default: CloakConfig's).")
flags.DEFINE_float("lambda1", None, "Temporal term weight (default: CloakConfig's).")
flags.DEFINE_float("rho", None, "DSSIM budget (default: CloakConfig's).")
flags.DEFINE_integer("max_iters", None, "Iteration cap per frame (default: CloakConfig's).")
flags.DEFINE_float("min_score", 0.9, "Detections scoring below this are ignored.")
flags.DEFINE_float("min_face", 40.0, "Faces whose box side is below this are left alone.")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lockstep(iters: np.ndarray, schedule) -> int:
    """Returns the iterations a lockstep device runs: per window frame, the slowest lane's."""
    total = 0
    for k in range(schedule.num_calls):
        rows = [iters[:, t0:t1] for _, t0, t1 in schedule.windows(k)]
        width = max(r.shape[1] for r in rows)
        # Lanes of one call share a scan step f: all windows' frame f wait for the slowest.
        pad = [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
        total += int(np.concatenate(pad).max(axis=0).sum())
    return total


def summarise(runs: dict, mask: np.ndarray, max_iters: int, schedule,
              attacks: dict | None = None) -> dict:
    """Returns the JSON-ready per-mode summary, savings relative to 'none' when it ran."""
    base = runs.get("none")
    attacks = attacks or {}
    out = {}
    for mode, r in runs.items():
        it = np.where(mask, r.iterations, 0)
        m = r.metrics
        prot, ssim = m["protection"][mask], m["ssim"][mask]
        s = {
            "faces": int(mask.sum()),
            "total_iterations": int(it.sum()),
            "iterations_per_face": float(it.sum() / max(int(mask.sum()), 1)),
            "lockstep_iterations": lockstep(it, schedule),
            "frames_at_cap": int((it >= max_iters).sum()),
            "passed_fraction": float(m["passed"][mask].mean()),
            "protection_mean": float(prot.mean()), "protection_min": float(prot.min()),
            "ssim_mean": float(ssim.mean()), "ssim_min": float(ssim.min()),
            "optimise_s": round(r.optimise_seconds, 3), "compile_s": round(r.compile_seconds, 3),
            "wall_s": round(r.wall_seconds, 3),
            "face_iterations_per_s": float(it.sum() / r.optimise_seconds)
            if r.optimise_seconds > 0 else None,
            "iterations_per_frame": it.sum(axis=0).tolist()}
        if base is not None:
            b_it = np.where(mask, base.iterations, 0)
            s["iterations_saved"] = 1.0 - s["total_iterations"] / max(int(b_it.sum()), 1)
            s["lockstep_saved"] = 1.0 - s["lockstep_iterations"] / max(lockstep(b_it, schedule),
                                                                        1)
            s["time_saved"] = 1.0 - r.optimise_seconds / base.optimise_seconds
            s["wall_time_saved"] = 1.0 - r.wall_seconds / base.wall_seconds
            b_m = base.metrics
            s["protection_vs_none"] = s["protection_mean"] / float(b_m["protection"][mask].mean())
            s["ssim_minus_none"] = s["ssim_mean"] - float(b_m["ssim"][mask].mean())
        if mode in attacks:
            s["attack"] = attacks[mode]
        out[mode] = s
    return out


def h264_round_trip(frames: np.ndarray, fps: float) -> np.ndarray:
    """Returns frames after the H.264 encoding `cloak-video` writes, decoded again."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with video_io.VideoWriter(path, fps) as w:
            w.write(frames)
        return video_io.read_video(path)


def attack_dlib_bin(clip, frames: np.ndarray, result: video.VideoResult, gallery_paths,
                    cache: dict) -> dict:
    """Returns dlib-bin's attacker's-view summary of one cloaked version of the clip."""
    from benchmarks import dlib_attacker  # needs the dlib oracle; only this attacker does

    boxes, mask = result.boxes, result.mask
    if "dlib_bin" not in cache:  # clean embeddings and gallery: once
        gallery = dlib_attacker.photo_gallery_dlib_bin(gallery_paths) if gallery_paths else None
        cache["dlib_bin"] = (*dlib_attacker.track_embeddings_dlib_bin(clip, boxes, mask),
                             gallery)
    clean, clean_found, gallery = cache["dlib_bin"]
    # A face dlib-bin misses in the clean frame says nothing about the cloak: left out.
    used = mask & clean_found
    attacked, found = dlib_attacker.track_embeddings_dlib_bin(frames, boxes, used)
    dist, who = protection.reference_distances(clean, attacked, found, used, gallery,
                                               threshold=DLIB_BIN_THRESHOLD)
    return protection.summarise(dist, found, used, DLIB_BIN_THRESHOLD) | {
        "model": "dlib_bin", "clean_missed_face": int((mask & ~clean_found).sum()),
        "track_identities": who}


def attack(clip, versions: dict, result: video.VideoResult, models, gallery_paths,
           cache: dict, attackers=ATTACKERS) -> dict:
    """Returns {version: {model: attacker's-view summary}} for cloaked versions of the clip."""
    lms, boxes, mask = result.landmarks, result.boxes, result.mask
    out = {}
    for name, frames in versions.items():
        out[name] = {}
        if "dlib_bin" in attackers:
            t0 = time.perf_counter()
            out[name]["dlib_bin"] = attack_dlib_bin(clip, frames, result, gallery_paths, cache)
            _progress(f"  attack {name} dlib_bin: protected vs all references "
                      f"{out[name]['dlib_bin']['fraction_protected_all']:.3f} "
                      f"({time.perf_counter() - t0:.1f} s)")
        if "ours" not in attackers:
            continue
        det = protection.detect_frames(frames)
        for model in models:
            if model not in cache:  # clean embeddings and gallery: once per model
                gallery = (recognise.photo_gallery(gallery_paths, model)
                           if gallery_paths else None)
                cache[model] = (recognise.track_embeddings(clip, lms, mask, model), gallery)
            clean, gallery = cache[model]
            out[name][model] = protection.evaluate(
                clip, frames, lms, boxes, mask, model=model, gallery=gallery, detections=det,
                clean=clean)
            _progress(f"  attack {name} {model}: protected vs all references "
                      f"{out[name][model]['fraction_protected_all']:.3f}")
    return out


def measure(path: str, *, start: int = 0, frames: int | None = None, model: str = "dlib",
            mode: str = "mid",
            other_model: str | None = "facenet", modes=MODES, attack_modes=("affine",),
            attackers=ATTACKERS, references=(), chunk: int = 16, segment: int | None = None,
            seed: int = 0, min_score: float = 0.9, min_face: float = 40.0,
            **config_overrides) -> dict:
    """Returns the benchmark report: {mode: summary, ..., 'setup': what was measured}."""
    t0 = time.perf_counter()
    clip = np.concatenate(list(video_io.iter_chunks(path, 64, start=start, limit=frames)))
    fps = video_io.probe(path).fps
    _progress(f"decoded {len(clip)} frames {clip.shape[1:3]} in {time.perf_counter() - t0:.1f} s")
    job = video.VideoJob(model=model, other_model=None, chunk=chunk, min_score=min_score,
                         min_face=min_face, seed=seed, segment=segment)
    t0 = time.perf_counter()
    det = video.find_faces(clip, job, len(clip))
    _progress(f"detected in {time.perf_counter() - t0:.1f} s")
    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    base = cloak.preset(mode, model, **overrides)
    runs, attacks, cache = {}, {}, {}
    models = [m for m in (model, other_model) if m]
    for reuse in modes:
        cfg = dataclasses.replace(base, reuse=reuse)
        _progress(f"reuse {reuse}:")
        res = video.cloak_video(clip, config=cfg, job=job, detections=det)
        if res.faces.tracks.num_tracks == 0:
            raise SystemExit(f"{path}: no face track in frames {start}..{start + len(clip) - 1}")
        if reuse in attack_modes:
            versions = {"frames": res.frames, "h264": h264_round_trip(res.frames, fps)}
            attacks[reuse] = attack(clip, versions, res, models, list(references), cache,
                                    attackers)
        runs[reuse] = res
    r0 = runs[modes[0]]
    sched = chains.make_schedule(len(clip), chunk, segment)
    report = summarise(runs, r0.mask, base.max_iters, sched, attacks)
    mask = r0.mask
    report["setup"] = {
        "video": str(path), "start": start, "frames": len(clip), "model": model, "mode": mode,
        "other_model": other_model, "attackers": list(attackers),
        "references": list(references),
        "tracks": int(mask.shape[0]), "faces_per_track": mask.sum(axis=1).tolist(),
        "track_spans": [[int(np.flatnonzero(m)[0]) + start, int(np.flatnonzero(m)[-1]) + start]
                        for m in mask],
        "segments": r0.segments, "chains": r0.chains,
        "chunk": chunk, "segment": segment, "seed": seed, "backend": jax.default_backend(),
        "device": str(jax.devices()[0]), "config": dataclasses.asdict(base) | {"reuse": None}}
    return report


def _main(argv):
    del argv
    if not FLAGS.video:
        raise app.UsageError("--video is required")
    unknown = [m for m in FLAGS.modes if m not in MODES]
    if unknown:
        raise app.UsageError(f"unknown modes {unknown}; modes are {MODES}")
    unknown = [a for a in FLAGS.attackers if a not in ATTACKERS]
    if unknown:
        raise app.UsageError(f"unknown attackers {unknown}; attackers are {ATTACKERS}")
    report = measure(FLAGS.video, start=FLAGS.start, frames=FLAGS.frames, model=FLAGS.model,
                     mode=FLAGS.mode,
                     other_model=FLAGS.other_model or None, modes=FLAGS.modes,
                     attack_modes=FLAGS.attack_modes, attackers=FLAGS.attackers,
                     references=FLAGS.references,
                     chunk=FLAGS.chunk, segment=FLAGS.segment, seed=FLAGS.seed,
                     min_score=FLAGS.min_score, min_face=FLAGS.min_face,
                     threshold=FLAGS.threshold, lr=FLAGS.lr, lambda1=FLAGS.lambda1,
                     rho=FLAGS.rho, max_iters=FLAGS.max_iters)
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if FLAGS.json:
        path = Path(FLAGS.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
        try:
            from faceveil.engine.commands import report as report_lib

            series = {m: np.asarray(report[m]["iterations_per_frame"]) for m in FLAGS.modes}
            png = report_lib.plot_iterations(path.with_suffix(".png"), series,
                                             max_iters=report["setup"]["config"]["max_iters"])
            _progress(f"wrote {path} and {png}")
        except ImportError as e:  # the figure is a convenience; the JSON is the result
            _progress(f"wrote {path} (no figure: {e})")


FLAGS = flags.FLAGS

if __name__ == "__main__":
    app.run(_main)
