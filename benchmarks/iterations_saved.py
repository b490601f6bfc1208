"""Iterations saved by cloak reuse (DESIGN.md method 1): modes none, copy and affine on a video.

    python -m benchmarks.iterations_saved --video ../shared/data/video/hamilton_clip.mp4 \
        --frames 30 --start 45 --model dlib --json out/iterations_saved.json

Decodes the frames, detects faces (MTCNN) and links them into tracks, cuts every track's faces
into patches, then runs the same frames through the compiled chunk function once per reuse
mode, with the same stopping rule, the same PRNG key and the same chunking. Prints JSON keyed
by mode: total iterations, iterations saved = 1 - iters(mode) / iters(none), protection
(embedding distance clean vs protected after uint8 rounding) and SSIM (face patch) mean/min,
and wall time with compilation timed separately (ahead-of-time compile, then every chunk
through the compiled executable; `block_until_ready` before the clock is read). Under vmap a
frame's while_loop runs until the slowest track stops, so `lockstep_iterations` (sum over
frames of the most iterations any track needed) is reported beside the per-face total: that is
what the wall time follows. A PNG of iterations per frame is written next to the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from faceveil.engine import cloak, detect, track, video_io
from faceveil.models import registry

MODES = ("none", "copy", "affine")

flags.DEFINE_string("video", None, "Video to read.")
flags.DEFINE_integer("frames", None, "Frames to use (default: all from --start on).")
flags.DEFINE_integer("start", 0, "First frame to use.")
flags.DEFINE_string("model", "dlib", "Recogniser (faceveil.models.registry name).")
flags.DEFINE_string("json", None, "Where to write the JSON report (also printed).")
flags.DEFINE_list("modes", list(MODES), "Reuse modes to run; 'none' is the baseline.")
flags.DEFINE_integer("chunk", 16, "Frames per compiled chunk call.")
flags.DEFINE_integer("seed", 0, "PRNG seed of the cold starts (the same for every mode).")
flags.DEFINE_float("threshold", None, "Protection threshold (default: CloakConfig's).")
flags.DEFINE_float("lr", None, "Adadelta learning rate (default: CloakConfig's).")
flags.DEFINE_float("lambda1", None, "Temporal term weight (default: CloakConfig's).")
flags.DEFINE_float("rho", None, "DSSIM budget (default: CloakConfig's).")
flags.DEFINE_integer("max_iters", None, "Iteration cap per frame (default: CloakConfig's).")
flags.DEFINE_float("min_score", 0.9, "Detections scoring below this are ignored.")
flags.DEFINE_float("min_face", 40.0, "Tracks whose largest box side is below this are skipped.")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def detect_video(frames: np.ndarray, batch: int = 8):
    """Returns the Detections (numpy) of frames [T, H, W, 3] uint8, in fixed-size batches."""
    out = []
    for s in range(0, len(frames), batch):
        part = frames[s:s + batch]
        n = len(part)
        if n < batch:  # pad with the last frame: one compiled batch shape
            part = np.concatenate([part, np.repeat(part[-1:], batch - n, axis=0)])
        out.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], detect.detect(part)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def prepare(frames: np.ndarray, recogniser, *, min_score: float = 0.9, min_face: float = 40.0):
    """Returns (tracks, plans, patches [C, T, P, P, 3]) for the faces tracked in the frames."""
    dets = detect_video(frames)
    tracks = track.track(dets, min_score=min_score)
    boxes = tracks.gather(dets.boxes)
    side = np.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    tracks = tracks.select(np.where(tracks.mask, side, 0).max(axis=1) >= min_face)
    lms = tracks.gather(dets.landmarks)
    plans = [cloak.plan_track(lms[i], tracks.mask[i], recogniser.template, recogniser.chip_size)
             for i in range(tracks.num_tracks)]
    size = max((p.size for p in plans), default=cloak.PATCH_BUCKETS[0])
    plans = [cloak.plan_track(lms[i], tracks.mask[i], recogniser.template, recogniser.chip_size,
                              size=size) for i in range(tracks.num_tracks)]
    patches = np.stack([cloak.crop_patches(frames, p.offsets, size) for p in plans])
    return tracks, plans, patches


LANE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _lane_count(n: int) -> int:
    return next((b for b in LANE_BUCKETS if b >= n), n)


def _chunk_lanes(plans, patches, start: int, chunk: int, active: list[int]):
    """Returns ChainFrames [C, chunk] of the active tracks, padded with absent lanes/frames."""
    c = _lane_count(len(active))
    n = min(chunk, patches.shape[1] - start)
    size = patches.shape[2]
    out = cloak.ChainFrames(
        patches=np.zeros((c, chunk, size, size, 3), np.uint8),
        m_chip=np.tile(np.eye(2, 3, dtype=np.float32), (c, chunk, 1, 1)),
        landmarks=np.zeros((c, chunk, 5, 2), np.float32),
        offsets=np.zeros((c, chunk, 2), np.float32),
        present=np.zeros((c, chunk), bool))
    sl = slice(start, start + n)
    for lane, i in enumerate(active):
        out.patches[lane, :n] = patches[i, sl]
        out.m_chip[lane, :n] = plans[i].m_chip[sl]
        out.landmarks[lane, :n] = plans[i].landmarks[sl]
        out.offsets[lane, :n] = plans[i].offsets[sl]
        out.present[lane, :n] = plans[i].present[sl]
    return n, jax.tree.map(jnp.asarray, out)


def run_mode(recogniser, params, config: cloak.CloakConfig, plans, patches, *, chunk: int,
             seed: int) -> dict:
    """Returns per-face iterations, metrics and timings of one reuse mode over all chunks.

    Each chunk runs only the tracks with a face in it, packed into 1, 2, 4, ... lanes (one
    compilation per lane count, compiled ahead of time and timed apart); every track keeps its
    own carry on the host between chunks, as the video pipeline does.
    """
    c, t, size = patches.shape[:3]
    carries = cloak.init_carry(recogniser, params, config, jax.random.key(seed), c, size)
    # Per-track carries stay jax arrays (typed PRNG keys have no numpy form).
    carries = [jax.tree.map(lambda a, i=i: a[i], carries) for i in range(c)]
    fn = cloak.chunk_fn(recogniser, config)
    compiled, compile_s, wall = {}, 0.0, 0.0
    shape = (c, t)
    res_all = {k: np.full(shape, np.nan, np.float32) for k in ("protection", "ssim")}
    res_all["iters"] = np.zeros(shape, np.int32)
    res_all["passed"] = np.zeros(shape, bool)
    starts = list(range(0, t, chunk))
    for k, s in enumerate(starts):
        active = [i for i in range(c) if plans[i].present[s:s + chunk].any()]
        if not active:
            continue
        n, frames = _chunk_lanes(plans, patches, s, chunk, active)
        lanes = frames.present.shape[0]
        pad = [carries[active[0]]] * (lanes - len(active))
        carry = jax.tree.map(lambda *xs: jnp.stack(xs), *[carries[i] for i in active], *pad)
        if lanes not in compiled:
            t0 = time.perf_counter()
            compiled[lanes] = fn.lower(params, frames, carry, carry.feat).compile()
            compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        carry, res = compiled[lanes](params, frames, carry, carry.feat)
        res, carry = jax.block_until_ready((res, carry))
        wall += time.perf_counter() - t0
        for lane, i in enumerate(active):
            carries[i] = jax.tree.map(lambda a, lane=lane: a[lane], carry)
            res_all["iters"][i, s:s + n] = np.asarray(res.iters[lane, :n])
            res_all["protection"][i, s:s + n] = np.asarray(res.metrics.protection[lane, :n])
            res_all["ssim"][i, s:s + n] = np.asarray(res.metrics.ssim[lane, :n])
            res_all["passed"][i, s:s + n] = np.asarray(res.metrics.passed[lane, :n])
        _progress(f"  {config.reuse}: chunk {k + 1}/{len(starts)} ({len(active)} tracks in "
                  f"{lanes} lanes), {int(res_all['iters'].sum())} iterations, {wall:.1f} s")
    return res_all | {"wall_s": wall, "compile_s": compile_s}


def summarise(runs: dict, mask: np.ndarray, max_iters: int) -> dict:
    """Returns the JSON-ready per-mode summary, savings relative to 'none' when it ran."""
    base = runs.get("none")
    base_total = int(np.where(mask, base["iters"], 0).sum()) if base is not None else 0
    out = {}
    for mode, r in runs.items():
        it = np.where(mask, r["iters"], 0)
        total = int(it.sum())
        prot = r["protection"][mask]
        ssim = r["ssim"][mask]
        s = {
            "faces": int(mask.sum()),
            "total_iterations": total,
            "iterations_per_face": total / max(int(mask.sum()), 1),
            "lockstep_iterations": int(it.max(axis=0).sum()) if it.size else 0,
            "frames_at_cap": int((it >= max_iters).sum()),
            "passed_fraction": float(r["passed"][mask].mean()),
            "protection_mean": float(prot.mean()), "protection_min": float(prot.min()),
            "ssim_mean": float(ssim.mean()), "ssim_min": float(ssim.min()),
            "wall_s": r["wall_s"], "compile_s": r["compile_s"],
            "face_iterations_per_s": total / r["wall_s"] if r["wall_s"] > 0 else None,
            "iterations_per_frame": it.sum(axis=0).tolist()}
        if base is not None:
            s["iterations_saved"] = 1.0 - total / max(base_total, 1)
            s["time_saved"] = 1.0 - r["wall_s"] / base["wall_s"]
            s["protection_vs_none"] = s["protection_mean"] / float(base["protection"][mask].mean())
            s["ssim_minus_none"] = s["ssim_mean"] - float(base["ssim"][mask].mean())
        out[mode] = s
    return out


def measure(video: str, *, start: int = 0, frames: int | None = None, model: str = "dlib",
            modes=MODES, chunk: int = 16, seed: int = 0, min_score: float = 0.9,
            min_face: float = 40.0, **config_overrides) -> dict:
    """Returns the benchmark report: {mode: summary, ..., 'setup': what was measured}."""
    t0 = time.perf_counter()
    clip = np.concatenate(list(video_io.iter_chunks(video, 64, start=start, limit=frames)))
    _progress(f"decoded {len(clip)} frames {clip.shape[1:3]} in {time.perf_counter() - t0:.1f} s")
    rec = registry.get(model)
    params = rec.load_params()
    t0 = time.perf_counter()
    tracks, plans, patches = prepare(clip, rec, min_score=min_score, min_face=min_face)
    _progress(f"detected and tracked: {tracks.num_tracks} tracks, lengths "
              f"{tracks.lengths().tolist()}, patch {patches.shape[2]} px, "
              f"{time.perf_counter() - t0:.1f} s")
    if tracks.num_tracks == 0:
        raise SystemExit(f"{video}: no face track in frames {start}..{start + len(clip) - 1}")
    overrides = {k: v for k, v in config_overrides.items() if v is not None}
    base = cloak.CloakConfig(**overrides)
    runs = {}
    for mode in modes:
        cfg = dataclasses.replace(base, reuse=mode)
        runs[mode] = run_mode(rec, params, cfg, plans, patches, chunk=chunk, seed=seed)
    report = summarise(runs, tracks.mask, base.max_iters)
    report["setup"] = {
        "video": str(video), "start": start, "frames": len(clip), "model": model,
        "tracks": tracks.num_tracks,
        "faces_per_track": tracks.lengths().tolist(),
        "track_spans": [[int(np.flatnonzero(m)[0]) + start, int(np.flatnonzero(m)[-1]) + start]
                        for m in tracks.mask], "patch_size": int(patches.shape[2]),
        "chunk": chunk, "seed": seed, "backend": jax.default_backend(),
        "device": str(jax.devices()[0]), "config": dataclasses.asdict(base) | {"reuse": None}}
    return report


def _main(argv):
    del argv
    if not FLAGS.video:
        raise app.UsageError("--video is required")
    unknown = [m for m in FLAGS.modes if m not in MODES]
    if unknown:
        raise app.UsageError(f"unknown modes {unknown}; modes are {MODES}")
    report = measure(FLAGS.video, start=FLAGS.start, frames=FLAGS.frames, model=FLAGS.model,
                     modes=FLAGS.modes, chunk=FLAGS.chunk, seed=FLAGS.seed,
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
            from faceveil.engine import report as report_lib

            series = {m: np.asarray(report[m]["iterations_per_frame"]) for m in FLAGS.modes}
            png = report_lib.plot_iterations(path.with_suffix(".png"), series,
                                             max_iters=report["setup"]["config"]["max_iters"])
            _progress(f"wrote {path} and {png}")
        except ImportError as e:  # the figure is a convenience; the JSON is the result
            _progress(f"wrote {path} (no figure: {e})")


FLAGS = flags.FLAGS

if __name__ == "__main__":
    app.run(_main)
