"""Protecting a whole video with any method: detect, track, run chains call by call, encode.

`protect_video(source, method, params)` runs a method of `faceveil.engine.methods` over every
face track; `cloak_video` is the video cloak (DESIGN.md method 1). Two passes over the frames:
  1. detection: frames are decoded in chunks, detected in one compiled call per chunk, and the
     per-frame detections linked into tracks (`faceveil.engine.pipeline.track`);
  2. cloaking: frames are decoded again (a background thread keeps the next call's frames
     ready), and `faceveil.engine.pipeline.chains.ChainRunner` runs every chain (a track, or a segment
     of one) present in the call's frame windows as one compiled call (vmap over chains, scan
     over frames, while_loop with early stop per frame), adds the changes back into the frames,
     and the frames go to the encoder (a second background thread) in order.
Each chain's carry (for the cloak: cloak, landmarks, features) is kept on the host between calls, so a call
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
import threading
import time
from pathlib import Path

import jax
import numpy as np

from faceveil.engine.methods import base, cloak
from faceveil.engine.pipeline import chains, faces, image_io, progress, video_io


@dataclasses.dataclass(frozen=True)
class VideoJob:
    """Settings of a video job besides the method's config."""

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
    progress: bool = True  # progress lines on stderr
    lossless: bool = False  # write the picture losslessly (`video_io.VideoWriter`)


@dataclasses.dataclass
class VideoResult:
    """What a video run did: per-face records as [tracks, frames] arrays, tracks, timings."""

    source: str
    method: str
    model: str
    config: object  # the method's frozen config
    job: VideoJob
    fps: float | None
    faces: faces.VideoFaces  # detections and tracks (clean video)
    iterations: np.ndarray  # [C, T] int32 optimisation steps per face
    metrics: dict  # name -> [C, T] (or [C, T, ...]) per-face diagnostics, NaN where no face
    frames_in: int  # frames decoded from the source
    frames_out: int  # frames written (the file's own count) or returned
    frames: np.ndarray | None = None  # protected uint8 [T, H, W, 3] (None when written)
    output: str | None = None
    samples: dict = dataclasses.field(default_factory=dict)  # frame -> (clean, protected)
    segments: int = 1
    chains: int = 0
    lane_counts: list = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    optimise_seconds: float = 0.0
    wall_seconds: float = 0.0
    other_model: dict | None = None  # cross-model figure (`VideoJob.other_model`)
    note: str | None = None

    @property
    def mask(self) -> np.ndarray:
        """Returns [C, T] bool, where each track has a face."""
        return self.faces.tracks.mask

    @property
    def boxes(self) -> np.ndarray:
        """Returns [C, T, 4] the tracked faces' boxes."""
        return self.faces.boxes

    @property
    def landmarks(self) -> np.ndarray:
        """Returns [C, T, 5, 2] the tracked faces' landmarks."""
        return self.faces.landmarks


def _clean(a) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(a)]


def _per_frame_mean(values: np.ndarray, mask: np.ndarray) -> list:
    """Returns per frame the mean of values [C, T] over the tracks with a face (None if none)."""
    n = mask.sum(axis=0)
    total = np.where(mask, np.nan_to_num(values), 0.0).sum(axis=0)
    return _clean(np.where(n > 0, total / np.maximum(n, 1), np.nan))


def summary(result: VideoResult) -> dict:
    """Returns the JSON-ready report of a video run (pure: no I/O)."""
    mask, iters, m = result.mask, result.iterations, result.metrics
    has = mask.any()

    def faces_of(name):
        return m[name][mask] if name in m else np.zeros(0)

    prot, ssim = faces_of("protection"), faces_of("ssim")
    out = {
        "source": result.source, "method": result.method, "model": result.model,
        "fps": result.fps, "frames_in": result.frames_in,
        "frames_out": result.frames_out, "tracks": result.faces.tracks.num_tracks,
        "config": dataclasses.asdict(result.config), "job": dataclasses.asdict(result.job),
        "small_faces_left_alone": int(result.faces.detections["small"].sum()),
        "faces": int(mask.sum()),
        "total_iterations": int(iters.sum()),
        "mean_iterations": float(iters[mask].mean()) if has else 0.0,
        "iterations_per_frame": iters.sum(axis=0).tolist(),
        "passed_fraction": float(np.nanmean(faces_of("passed"))) if has else None,
        "mean_protection": float(np.nanmean(prot)) if prot.size else None,
        "min_protection": float(np.nanmin(prot)) if prot.size else None,
        "mean_ssim": float(np.nanmean(ssim)) if ssim.size else None,
        "min_ssim": float(np.nanmin(ssim)) if ssim.size else None,
        "ssim_per_frame": _per_frame_mean(m["ssim"], mask) if has and "ssim" in m else [],
        "segments": result.segments, "chains": result.chains,
        "lane_counts_compiled": list(result.lane_counts),
        "compile_seconds": round(result.compile_seconds, 3),
        "optimise_seconds": round(result.optimise_seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3),
        "frames_per_second": round(result.frames_in / result.wall_seconds, 3)
        if result.wall_seconds > 0 else None,
    }
    if result.other_model is not None:
        out["other_model"] = result.other_model
    if result.note:
        out["note"] = result.note
    out["per_track"] = [{"track": i, "frames": np.flatnonzero(mask[i]).tolist(),
                         "iterations": iters[i][mask[i]].tolist(),
                         "protection": _clean(m["protection"][i][mask[i]])
                         if "protection" in m else [],
                         "ssim": _clean(m["ssim"][i][mask[i]]) if "ssim" in m else []}
                        for i in range(result.faces.tracks.num_tracks)]
    return out


def find_faces(source, job: VideoJob, n_total: int | None = None) -> faces.VideoFaces:
    """Returns the VideoFaces of a video (pass 1: chunked detection, filters, tracks)."""
    def show(done):
        progress.say(f"\rdetect: {done}/{n_total or '?'} frames", end="", enabled=job.progress)

    det = faces.detect_frames(source, chunk=job.chunk, min_score=job.min_score,
                              min_face=job.min_face, max_frames=job.max_frames, progress=show)
    progress.say("", enabled=job.progress)
    return faces.track_faces(det)


def _prefetch(iterable, depth: int = 2):
    """Yields the items of `iterable`, produced by a background thread `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    # Set when the consumer stops early (an error, or a generator closed), so the producer
    # does not block for ever on a full queue, holding the reader and its frames.
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)
            return
        put(sentinel)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not sentinel:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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


def _state_key(source, job: VideoJob, method: base.Method) -> str:
    st = os.stat(source)
    blob = json.dumps([os.path.abspath(source), st.st_size, st.st_mtime_ns, method.name,
                       dataclasses.asdict(job), dataclasses.asdict(method.config)],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cloak_video(source, *, output: str | None = None, config: cloak.CloakConfig | None = None,
                job: VideoJob | None = None, resume: bool = True,
                detections: faces.VideoFaces | None = None) -> VideoResult:
    """Returns the VideoResult of cloaking a video (DESIGN.md method 1) against `job.model`.

    Args:
      source: a video path, or uint8 frames [T, H, W, 3].
      output: where to write the cloaked video (paths only; audio and frame rate are kept).
      config: the cloak optimisation settings (default CloakConfig()).
      job: detection/tracking/chunking settings.
      resume: continue from `<output>.partial/` when it matches this job.
      detections: `find_faces(source, job)` computed before (skips the detection pass; e.g.
        to cloak one video several ways).
    """
    from faceveil.engine.pipeline import recognise

    job = job or VideoJob()
    rec, params = recognise.recogniser_params(job.model)
    method = cloak.CloakMethod(rec, config or cloak.CloakConfig())
    params = cloak.method_params(method.config, params)
    return protect_video(source, method, params, output=output, job=job, resume=resume,
                         detections=detections)


def protect_video(source, method: base.Method, params, *, output: str | None = None,
                  job: VideoJob | None = None, resume: bool = True,
                  detections: faces.VideoFaces | None = None) -> VideoResult:
    """Returns the VideoResult of running a method over every face track of a video.

    Two passes (module docstring): find the faces, then run every chain call by call and
    encode. The output file has exactly the input's frame count and frame rate.
    """
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
    state_key = _state_key(source, job, method) if state_dir else None
    if state_dir and (not resume or not (state_dir / "state.json").exists()
                      or json.loads((state_dir / "state.json").read_text())["key"] != state_key):
        shutil.rmtree(state_dir, ignore_errors=True)
    found = _detections(source, n_total, job, state_dir, state_key, detections)
    n_frames = found.num_frames
    tracks = found.tracks
    result = VideoResult(
        source=faces.source_name(source), method=method.name, model=method.recogniser.name,
        config=method.config, job=job, fps=fps, faces=found,
        iterations=np.zeros(tracks.mask.shape, np.int32), metrics={}, frames_in=n_frames,
        frames_out=n_frames, output=output if is_path else None)

    if tracks.num_tracks == 0:
        result.note = "no face found: the video is passed through unchanged"
        result.wall_seconds = time.perf_counter() - t_start
        if is_path and output:
            tmp = Path(output).with_name(f".{Path(output).name}.copy")
            shutil.copyfile(source, tmp)
            os.replace(tmp, output)
            if state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
            result.frames_out = video_io.count_frames(output)
            return result
        result.frames = source[:n_frames].copy()
        return result

    runner = _runner(found, method, params, job, n_frames)
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
            progress.say(f"resume: {first}/{sched.num_calls} calls already done",
                         enabled=job.progress)

    writer = None
    if is_path and output:
        writer = video_io.VideoWriter(output, fps, audio_from=source if info.audio_codec else None,
                                     audio_lead=info.audio_lead, lossless=job.lossless)
        writer.__enter__()
    encoder = _Encoder(writer)
    ok = False
    other = _OtherModel(job.other_model) if job.other_model else None
    lms_t = found.landmarks
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
            progress.say(f"\r{method.name}: {done}/{n_frames} frames, "
                         f"{int(runner.iters.sum())} iterations", end="", enabled=job.progress)
        progress.say("", enabled=job.progress)
        flush()
        protected = encoder.close()
        ok = True
    finally:
        if not ok:  # stop the encoder before the writer's ffmpeg is closed under it
            encoder.q.put(None)
            encoder.thread.join(timeout=60)
        if writer is not None:
            writer.__exit__(None if ok else RuntimeError, None, None)
    if state_dir:
        shutil.rmtree(state_dir, ignore_errors=True)
    result.frames = protected
    result.frames_out = (video_io.count_frames(output) if writer is not None
                         else int(protected.shape[0]))
    result.iterations, result.metrics = runner.iters, runner.metrics
    result.samples = samples
    result.segments, result.chains = sched.num_segments, _chain_count(runner)
    result.lane_counts = runner.lane_counts
    result.compile_seconds, result.optimise_seconds = runner.compile_seconds, runner.run_seconds
    result.other_model = other.summary() if other is not None else None
    result.wall_seconds = time.perf_counter() - t_start
    if result.frames_out != n_frames:  # a lost frame is a bug, never a silent result
        raise RuntimeError(f"{result.source}: wrote {result.frames_out} frames of {n_frames}")
    return result


def _detections(source, n_total, job, state_dir, state_key, given) -> faces.VideoFaces:
    """Returns the faces of pass 1 (given, saved by an interrupted job, or computed)."""
    det_file = state_dir / "detections.npz" if state_dir else None
    if given is not None:
        found = given
    elif det_file is not None and det_file.exists():
        with np.load(det_file) as z:
            det = {k: z[k] for k in z.files}
        progress.say(f"resume: detections of {det['boxes'].shape[0]} frames from {det_file}",
                     enabled=job.progress)
        return faces.track_faces(det)
    else:
        found = find_faces(source, job, n_total)
    if state_dir:
        state_dir.mkdir(parents=True, exist_ok=True)
        np.savez(state_dir / ".detections.tmp.npz", **found.detections)
        os.replace(state_dir / ".detections.tmp.npz", det_file)
        image_io.write_json(state_dir / "state.json", {"key": state_key})
    return found


def _runner(found: faces.VideoFaces, method, params, job, n_frames) -> chains.ChainRunner:
    """Returns the ChainRunner over the tracks (one patch side for the job: one shape)."""
    lms_t, mask = found.landmarks, found.tracks.mask
    rec = method.recogniser
    size = max(faces.plan_faces(lms_t[i], mask[i], rec).size for i in range(len(mask)))
    plans = [faces.plan_faces(lms_t[i], mask[i], rec, size=size) for i in range(len(mask))]
    sched = chains.make_schedule(n_frames, job.chunk, job.segment)
    return chains.ChainRunner(method, params, plans, size, sched, jax.random.PRNGKey(job.seed))


def _chain_count(runner) -> int:
    return len({(i, s) for k in range(runner.schedule.num_calls)
                for i, s, _, _ in runner.active(k)})


def _windows(source, sched: chains.Schedule, first: int):
    """Yields {t0: frames} of calls first, first + 1, ... (one decoder per segment)."""
    segs = range(sched.num_segments)
    ends = [min((s + 1) * sched.segment, sched.n_frames) for s in segs]
    readers = [faces.iter_frames(source, sched.chunk, s * sched.segment + first * sched.chunk,
                                 ends[s]) for s in segs]
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


class _OtherModel:
    """Cross-model figure: distance between clean and protected faces for a second model."""

    def __init__(self, name: str):
        from faceveil.engine.pipeline import recognise

        self.name = name
        self.rec, self.params = recognise.recogniser_params(name)
        self.dist: list[float] = []

    def measure(self, frames, protected, t0, lms_t, mask):
        """Adds the distances of the faces in frames [t0, t0 + n) (mask [tracks, T])."""
        from faceveil.engine.pipeline import recognise

        sl = slice(t0, t0 + frames.shape[0])
        m = mask[:, sl]
        if not m.any():
            return
        clean = recognise.track_embeddings(frames, lms_t[:, sl], m, self.name)
        prot = recognise.track_embeddings(protected, lms_t[:, sl], m, self.name)
        self.dist.extend(np.linalg.norm(clean[m] - prot[m], axis=-1).tolist())

    def summary(self) -> dict:
        """Returns the JSON-ready cross-model figures."""
        d = np.asarray(self.dist)
        return {"model": self.name, "threshold": self.rec.threshold,
                "mean_protection": float(d.mean()) if d.size else None,
                "min_protection": float(d.min()) if d.size else None,
                "fraction_beyond_threshold": float((d >= self.rec.threshold).mean())
                if d.size else None}
