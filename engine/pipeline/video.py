"""Cloaking a whole video: detect, track, optimise call by call, compose, encode, report.

Two passes over the frames:
  1. detection: frames are decoded in chunks, detected in one compiled call per chunk, and the
     per-frame detections linked into tracks (`faceveil.engine.pipeline.track`);
  2. cloaking: frames are decoded again (a background thread keeps the next call's frames
     ready), and `faceveil.engine.pipeline.chains.ChainRunner` runs every chain (a track, or a segment
     of one) present in the call's frame windows as one compiled call (vmap over chains, scan
     over frames, while_loop with early stop per frame), adds the cloaks back into the frames,
     and the frames go to the encoder (a second background thread) in order.
Each chain's carry (cloak, landmarks, features) is kept on the host between calls, so a call
only runs the chains it contains (padded to a few lane counts so that the compiled function is
reused). With `VideoJob.segment` the segments of the video run in lockstep (one decoder per
segment); windows of later segments wait on disk (or in memory) until the frames before them
are encoded.

Resume: a file job keeps its state beside the output (`<output>.partial/`): the detections,
every finished window's frames and records, and the chain carries after the last finished
call. A re-run with the same input and settings skips the finished calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from faceveil.engine.pipeline import chains, image_io, track, video_io
from faceveil.engine.methods import cloak


@dataclasses.dataclass(frozen=True)
class VideoJob:
    """Settings of a video cloak job besides the CloakConfig."""

    model: str = "dlib"
    other_model: str | None = "facenet"  # cross-model protection figure (None: skip)
    chunk: int = 16  # frames per compiled call
    min_score: float = 0.9  # detections below this are ignored
    min_face: float = 40.0  # faces whose box side is smaller are left alone (too small)
    seed: int = 0
    max_frames: int | None = None
    # Frames per segment: each track is cut into chains of at most this many frames that run
    # side by side (their heads cold-start). None: one chain per track.
    segment: int | None = None


def _progress(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def detect_all(source, info_frames: int, job: VideoJob):
    """Returns (detections as numpy dict [T, K, ...], number of frames) of a whole video."""
    from faceveil.engine.pipeline.detect import detect

    parts = []
    done = 0
    for frames in _chunks(source, job.chunk, 0, job.max_frames):
        n = frames.shape[0]
        if n < job.chunk:  # one compiled shape: pad the last chunk by repeating its last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], job.chunk - n, 0)])
        det = detect(frames)
        parts.append({k: np.asarray(v)[:n] for k, v in det._asdict().items()})
        done += n
        _progress(f"\rdetect: {done}/{info_frames} frames", end="")
    _progress("")
    if not parts:
        raise image_io.InputError(_name(source), "no frames could be decoded")
    det = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    side = np.minimum(det["boxes"][..., 2] - det["boxes"][..., 0],
                      det["boxes"][..., 3] - det["boxes"][..., 1])
    det["small"] = det["valid"] & (det["scores"] >= job.min_score) & (side < job.min_face)
    det["valid"] = det["valid"] & (det["scores"] >= job.min_score) & (side >= job.min_face)
    return det, done


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<frames>"


def _chunks(source, size: int, start: int, limit: int | None):
    if isinstance(source, np.ndarray):
        end = source.shape[0] if limit is None else min(limit, source.shape[0])
        for t in range(start, end, size):
            yield source[t:min(t + size, end)]
    else:
        left = None if limit is None else max(limit - start, 0)
        yield from video_io.iter_chunks(source, size, start=start, limit=left)


def _prefetch(iterable, depth: int = 2):
    """Yields the items of `iterable`, produced by a background thread `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()

    def work():
        try:
            for item in iterable:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)
        q.put(sentinel)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not sentinel:
        if isinstance(item, BaseException):
            raise item
        yield item


class _Encoder:
    """Writes frames in order on a background thread (or collects them in memory)."""

    def __init__(self, writer: video_io.VideoWriter | None):
        self.writer = writer
        self.frames: list[np.ndarray] = []
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        while (frames := self.q.get()) is not None:
            try:
                if self.writer is None:
                    self.frames.append(frames)
                else:
                    self.writer.write(frames)
            except BaseException as e:  # noqa: BLE001 - raised in the caller by put/close
                self.error = e

    def put(self, frames: np.ndarray):
        if self.error:
            raise self.error
        self.q.put(frames)

    def close(self) -> np.ndarray | None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        return np.concatenate(self.frames) if self.writer is None and self.frames else None


def _state_key(source, job: VideoJob, config: cloak.CloakConfig) -> str:
    st = os.stat(source)
    blob = json.dumps([os.path.abspath(source), st.st_size, st.st_mtime_ns,
                       dataclasses.asdict(job), dataclasses.asdict(config)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cloak_video(source, *, output: str | None = None, config: cloak.CloakConfig | None = None,
                job: VideoJob | None = None, resume: bool = True,
                detections: dict | None = None):
    """Returns (protected uint8 frames [T, H, W, 3] or None when written to `output`, report).

    Args:
      source: a video path, or uint8 frames [T, H, W, 3].
      output: where to write the cloaked video (paths only; audio and frame rate are kept).
      config: the cloak optimisation settings (default CloakConfig()).
      job: detection/tracking/chunking settings.
      resume: continue from `<output>.partial/` when it matches this job.
      detections: the output of `detect_all` for this source and job (skips the detection
        pass; e.g. to cloak one video several ways).
    """
    config = config or cloak.CloakConfig()
    job = job or VideoJob()
    t_start = time.perf_counter()
    is_path = not isinstance(source, np.ndarray)
    if is_path:
        info = video_io.probe(source)
        n_total = info.frames if job.max_frames is None else min(info.frames, job.max_frames)
        fps = info.fps
        if output:
            image_io.ensure_not_input(output, [source])
    else:
        source = np.asarray(source)
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {source.dtype} "
                             f"{source.shape}")
        n_total = source.shape[0] if job.max_frames is None else job.max_frames
        fps, info = None, None

    state_dir = Path(f"{output}.partial") if (is_path and output) else None
    state_key = _state_key(source, job, config) if state_dir else None
    if state_dir and (not resume or not (state_dir / "state.json").exists()
                      or json.loads((state_dir / "state.json").read_text())["key"] != state_key):
        shutil.rmtree(state_dir, ignore_errors=True)
    det = _detections(source, n_total, job, state_dir, state_key, detections)
    n_frames = int(det["boxes"].shape[0])
    tracks = track.track(_Dets(det))
    report = {"source": _name(source), "frames": n_frames, "fps": fps,
              "tracks": tracks.num_tracks, "model": job.model,
              "config": dataclasses.asdict(config), "job": dataclasses.asdict(job),
              "small_faces_left_alone": int(det["small"].sum())}

    if tracks.num_tracks == 0:
        report["note"] = "no face found: the video is passed through unchanged"
        report["wall_seconds"] = time.perf_counter() - t_start
        if is_path and output:
            tmp = Path(output).with_name(f".{Path(output).name}.copy")
            shutil.copyfile(source, tmp)
            os.replace(tmp, output)
            if state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
            return None, report
        return source[:n_frames].copy(), report

    runner, lms_t = _runner(det, tracks, config, job, n_frames)
    sched = runner.schedule
    first = 0  # calls already finished (a resumed job)
    if state_dir:
        while (state_dir / f"call_{first:05d}.done").exists():
            first += 1
        if first:
            with np.load(state_dir / f"carry_{first - 1:05d}.npz") as z:
                runner.restore_carries(z)
            for k in range(first):
                for _, t0, _ in sched.windows(k):
                    with np.load(_window_file(state_dir, t0)) as z:
                        runner.restore_window(t0, z)
            _progress(f"resume: {first}/{sched.num_calls} calls already done")

    writer = None
    if is_path and output:
        writer = video_io.VideoWriter(output, fps, audio_from=source if info.audio_codec else None)
        writer.__enter__()
    encoder = _Encoder(writer)
    ok = False
    other = _OtherModel(job.other_model) if job.other_model else None
    # A few frames with faces are kept for the report's before/after pictures.
    with_faces = np.flatnonzero(tracks.mask.any(axis=0))
    sample_ids = set(with_faces[np.linspace(0, len(with_faces) - 1, 6).round().astype(int)]
                     .tolist())
    samples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # Finished windows wait here (or on disk, None) until every frame before them is encoded.
    pending: dict[int, tuple | None] = {t0: None for k in range(first)
                                        for _, t0, _ in sched.windows(k)}
    flushed = 0

    def flush():
        nonlocal flushed
        while flushed in pending:
            item = pending.pop(flushed)
            if item is None:
                with np.load(_window_file(state_dir, flushed)) as z:
                    item = (z["clean"], z["frames"])
            clean, out = item
            for f in range(out.shape[0]):
                if flushed + f in sample_ids:
                    samples[flushed + f] = (clean[f].copy(), out[f].copy())
            encoder.put(out)
            flushed += out.shape[0]

    try:
        flush()
        for k, windows in enumerate(_prefetch(_windows(source, sched, first)), start=first):
            out, _ = runner.run(k, windows)
            if other is not None:
                for _, t0, _ in sched.windows(k):
                    other.measure(windows[t0], out[t0], t0, lms_t, tracks.mask)
            for s, t0, t1 in sched.windows(k):
                if state_dir:
                    _save_window(state_dir, t0, windows[t0], out[t0],
                                 runner.window_state(t0, t1))
                # Keep in memory what can be encoded now; later segments wait on disk.
                pending[t0] = None if (state_dir and s > 0) else (windows[t0], out[t0])
            if state_dir:
                _save_carries(state_dir, k, runner.carry_state())
            flush()
            done = sum(t1 - t0 for kk in range(k + 1) for _, t0, t1 in sched.windows(kk))
            _progress(f"\rcloak: {done}/{n_frames} frames, {int(runner.iters.sum())} "
                      f"iterations", end="")
        _progress("")
        flush()
        protected = encoder.close()
        ok = True
    finally:
        if not ok:  # stop the encoder before the writer's ffmpeg is closed under it
            encoder.q.put(None)
            encoder.thread.join(timeout=60)
        if writer is not None:
            writer.__exit__(None if ok else RuntimeError, None, None)
    wall = time.perf_counter() - t_start
    if state_dir:
        shutil.rmtree(state_dir, ignore_errors=True)
    iters, metrics = runner.iters, runner.metrics
    report.update(_summarise(tracks, iters, metrics, wall, n_frames))
    report.update({
        "segments": sched.num_segments, "chains": _chain_count(runner),
        "compile_seconds": round(runner.compile_seconds, 3),
        "optimise_seconds": round(runner.run_seconds, 3),
        "lane_counts_compiled": runner.lane_counts})
    if other is not None:
        report["other_model"] = other.summary()
    report["per_track"] = [{"track": i, "frames": np.flatnonzero(tracks.mask[i]).tolist(),
                            "iterations": iters[i][tracks.mask[i]].tolist(),
                            "protection": _clean(metrics["protection"][i][tracks.mask[i]]),
                            "ssim": _clean(metrics["ssim"][i][tracks.mask[i]])}
                           for i in range(tracks.num_tracks)]
    report["_samples"] = samples
    report["_boxes"] = tracks.gather(det["boxes"])
    report["_landmarks"] = lms_t
    report["_curves"] = runner.curves
    report["_iters"] = iters
    report["_metrics"] = metrics
    report["_mask"] = tracks.mask
    return protected, report


def _detections(source, n_total, job, state_dir, state_key, given):
    """Returns the detections of pass 1 (given, saved by an interrupted job, or computed)."""
    det_file = state_dir / "detections.npz" if state_dir else None
    if given is not None:
        det = dict(given)
    elif det_file is not None and det_file.exists():
        with np.load(det_file) as z:
            det = {k: z[k] for k in z.files}
        _progress(f"resume: detections of {det['boxes'].shape[0]} frames from {det_file}")
        return det
    else:
        det, _ = detect_all(source, n_total, job)
    if state_dir:
        state_dir.mkdir(parents=True, exist_ok=True)
        np.savez(state_dir / ".detections.tmp.npz", **det)
        os.replace(state_dir / ".detections.tmp.npz", det_file)
        image_io.write_json(state_dir / "state.json", {"key": state_key})
    return det


def _runner(det, tracks, config, job, n_frames):
    """Returns (ChainRunner over the tracks, landmarks [tracks, T, 5, 2])."""
    from faceveil.engine.pipeline import recognise

    rec, params = recognise.recogniser_params(job.model)
    lms_t = tracks.gather(det["landmarks"])
    sizes = [cloak.plan_track(lms_t[i], tracks.mask[i], rec.template, rec.chip_size).size
             for i in range(tracks.num_tracks)]
    size = max(sizes)  # one patch side for the job: one compiled shape
    plans = [cloak.plan_track(lms_t[i], tracks.mask[i], rec.template, rec.chip_size, size=size)
             for i in range(tracks.num_tracks)]
    sched = chains.make_schedule(n_frames, job.chunk, job.segment)
    runner = chains.ChainRunner(rec, params, config, plans, size, sched,
                                jax.random.PRNGKey(job.seed))
    return runner, lms_t


def _chain_count(runner) -> int:
    return len({(i, s) for k in range(runner.schedule.num_calls)
                for i, s, _, _ in runner.active(k)})


def _windows(source, sched: chains.Schedule, first: int):
    """Yields {t0: frames} of calls first, first + 1, ... (one decoder per segment)."""
    segs = range(sched.num_segments)
    ends = [min((s + 1) * sched.segment, sched.n_frames) for s in segs]
    readers = [_chunks(source, sched.chunk, s * sched.segment + first * sched.chunk, ends[s])
               for s in segs]
    for k in range(first, sched.num_calls):
        yield {t0: next(readers[s]) for s, t0, _ in sched.windows(k)}


def _window_file(state_dir: Path, t0: int) -> Path:
    return state_dir / f"window_{t0:07d}.npz"


def _save_window(state_dir, t0, clean, frames, records):
    tmp = state_dir / f".window_{t0:07d}.tmp.npz"
    np.savez(tmp, clean=clean, frames=frames, **records)
    os.replace(tmp, _window_file(state_dir, t0))


def _save_carries(state_dir, k, carries):
    """Saves the carries after call k and marks call k finished (what resume looks for)."""
    tmp = state_dir / f".carry_{k:05d}.tmp.npz"
    np.savez(tmp, **carries)
    os.replace(tmp, state_dir / f"carry_{k:05d}.npz")
    (state_dir / f"call_{k:05d}.done").touch()
    # The carries of the call before are no longer needed to resume.
    (state_dir / f"carry_{k - 1:05d}.npz").unlink(missing_ok=True)


def _clean(a) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(a)]


class _Dets:
    """Detections-like view of the numpy detection dict (what `track.track` reads)."""

    def __init__(self, det):
        self.boxes, self.landmarks = det["boxes"], det["landmarks"]
        self.valid, self.scores = det["valid"], det["scores"]


class _OtherModel:
    """Cross-model figure: distance between clean and protected faces for a second model."""

    def __init__(self, name: str):
        from faceveil.engine.pipeline import recognise

        self.name = name
        self.rec, self.params = recognise.recogniser_params(name)
        self.dist: list[float] = []

    def measure(self, frames, protected, t0, lms_t, mask):
        """Adds the distances of the faces in frames [t0, t0 + n) (mask [tracks, T])."""
        from faceveil.engine.attacks import protection

        sl = slice(t0, t0 + frames.shape[0])
        m = mask[:, sl]
        if not m.any():
            return
        clean = protection.track_embeddings(frames, lms_t[:, sl], m, self.name)
        prot = protection.track_embeddings(protected, lms_t[:, sl], m, self.name)
        self.dist.extend(np.linalg.norm(clean[m] - prot[m], axis=-1).tolist())

    def summary(self) -> dict:
        d = np.asarray(self.dist)
        return {"model": self.name, "threshold": self.rec.threshold,
                "mean_protection": float(d.mean()) if d.size else None,
                "min_protection": float(d.min()) if d.size else None,
                "fraction_beyond_threshold": float((d >= self.rec.threshold).mean())
                if d.size else None}


def _summarise(tracks, iters, metrics, wall, n_frames) -> dict:
    mask = tracks.mask
    prot = metrics["protection"][mask]
    ssim = metrics["ssim"][mask]
    return {
        "faces": int(mask.sum()),
        "total_iterations": int(iters.sum()),
        "mean_iterations": float(iters[mask].mean()) if mask.any() else 0.0,
        "iterations_per_frame": iters.sum(axis=0).tolist(),
        "passed_fraction": float(np.nanmean(metrics["passed"][mask])) if mask.any() else None,
        "mean_protection": float(np.nanmean(prot)) if prot.size else None,
        "min_protection": float(np.nanmin(prot)) if prot.size else None,
        "mean_ssim": float(np.nanmean(ssim)) if ssim.size else None,
        "min_ssim": float(np.nanmin(ssim)) if ssim.size else None,
        "ssim_per_frame": _clean(np.nanmean(np.where(mask, metrics["ssim"], np.nan), axis=0))
        if mask.any() else [],
        "wall_seconds": round(wall, 3),
        "frames_per_second": round(n_frames / wall, 3) if wall > 0 else None,
    }
