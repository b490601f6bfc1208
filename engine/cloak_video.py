"""Cloaking a whole video: detect, track, optimise chunk by chunk, compose, encode, report.

Two passes over the frames:
  1. detection: frames are decoded in chunks, detected in one compiled call per chunk, and the
     per-frame detections linked into tracks (`faceveil.engine.track`);
  2. cloaking: frames are decoded again (a background thread keeps the next chunk ready), the
     faces of every track active in the chunk are cut into fixed-size patches, one compiled
     call (`faceveil.engine.cloak.chunk_fn`) optimises all of them (vmap over tracks, scan over
     frames, while_loop with early stop per frame), the cloaks are added back into the frames
     and the frames go to the encoder (a second background thread).
Each track has its own warm-start chain; its carry (cloak, landmarks, features) is kept on the
host between chunks, so a chunk only runs the tracks it contains (padded to a few lane counts
so that the compiled function is reused).

Resume: a file job keeps its state beside the output (`<output>.partial/`): the detections,
every finished chunk's frames and metrics, and the track carries after it. A re-run with the
same input and settings skips the finished chunks.
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
import jax.numpy as jnp
import numpy as np

from faceveil.engine import cloak, image_io, track, video_io

LANE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


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


def _progress(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def detect_all(source, info_frames: int, job: VideoJob):
    """Returns (detections as numpy dict [T, K, ...], number of frames) of a whole video."""
    from faceveil.engine.detect import detect

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


def _lane_count(n: int) -> int:
    return next((b for b in LANE_BUCKETS if b >= n), -(-n // 64) * 64)


def _state_key(source, job: VideoJob, config: cloak.CloakConfig) -> str:
    st = os.stat(source)
    blob = json.dumps([os.path.abspath(source), st.st_size, st.st_mtime_ns,
                       dataclasses.asdict(job), dataclasses.asdict(config)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cloak_video(source, *, output: str | None = None, config: cloak.CloakConfig | None = None,
                job: VideoJob | None = None, resume: bool = True):
    """Returns (protected uint8 frames [T, H, W, 3] or None when written to `output`, report).

    Args:
      source: a video path, or uint8 frames [T, H, W, 3].
      output: where to write the cloaked video (paths only; audio and frame rate are kept).
      config: the cloak optimisation settings (default CloakConfig()).
      job: detection/tracking/chunking settings.
      resume: continue from `<output>.partial/` when it matches this job.
    """
    from faceveil.engine import recognise

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

    # Pass 1: detection and tracking (kept in the state folder for a resumed job).
    det_file = state_dir / "detections.npz" if state_dir else None
    if det_file is not None and det_file.exists():
        with np.load(det_file) as z:
            det = {k: z[k] for k in z.files}
        n_frames = int(det["boxes"].shape[0])
        _progress(f"resume: detections of {n_frames} frames from {det_file}")
    else:
        det, n_frames = detect_all(source, n_total, job)
        if state_dir:
            state_dir.mkdir(parents=True, exist_ok=True)
            np.savez(state_dir / ".detections.tmp.npz", **det)
            os.replace(state_dir / ".detections.tmp.npz", det_file)
            image_io.write_json(state_dir / "state.json", {"key": state_key})
    dets = _Dets(det)
    tracks = track.track(dets)
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

    rec, params = recognise.recogniser_params(job.model)
    lms_t = tracks.gather(det["landmarks"])  # [tracks, T, 5, 2]
    plans0 = [cloak.plan_track(lms_t[i], tracks.mask[i], rec.template, rec.chip_size)
              for i in range(tracks.num_tracks)]
    size = max(p.size for p in plans0)  # one patch side for the job: one compiled shape
    plans = [cloak.plan_track(lms_t[i], tracks.mask[i], rec.template, rec.chip_size, size=size)
             for i in range(tracks.num_tracks)]
    key = jax.random.PRNGKey(job.seed)
    carries = [jax.tree.map(lambda a: np.asarray(a[0]), cloak.init_carry(
        rec, params, config, jax.random.fold_in(key, i), 1, size))
        for i in range(tracks.num_tracks)]
    step = cloak.chunk_fn(rec, config)

    T = job.chunk
    n_chunks = -(-n_frames // T)
    iters = np.zeros((tracks.num_tracks, n_frames), np.int32)
    metric_names = [f for f in cloak.FrameMetrics._fields if f != "loss_curve"]
    metrics = {k: np.full((tracks.num_tracks, n_frames), np.nan, np.float32)
               for k in metric_names}
    curves = np.full((tracks.num_tracks, n_frames, config.max_iters), np.nan, np.float32)
    first = 0
    if state_dir:
        while (state_dir / f"chunk_{first:05d}.npz").exists():
            first += 1
        if first:
            with np.load(state_dir / f"carry_{first - 1:05d}.npz") as z:
                carries = _load_carries(z, carries)
            _progress(f"resume: {first}/{n_chunks} chunks already done")

    writer = None
    if is_path and output:
        writer = video_io.VideoWriter(output, fps, audio_from=source if info.audio_codec else None)
        writer.__enter__()
    encoder = _Encoder(writer)
    ok = False
    compile_s = None
    other = _OtherModel(job.other_model) if job.other_model else None
    # A few frames with faces are kept for the report's before/after pictures.
    with_faces = np.flatnonzero(tracks.mask.any(axis=0))
    sample_ids = set(with_faces[np.linspace(0, len(with_faces) - 1, 6).round().astype(int)]
                     .tolist())
    samples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for j in range(first):  # finished chunks of a resumed job: encode their saved frames
            with np.load(state_dir / f"chunk_{j:05d}.npz") as z:
                encoder.put(z["frames"])
                _restore_metrics(z, j * T, iters, metrics, curves)
        frames_iter = _prefetch(_chunks(source, T, first * T, n_frames))
        for j, frames in enumerate(frames_iter, start=first):
            t0 = j * T
            n = frames.shape[0]
            active = [i for i in range(tracks.num_tracks) if tracks.mask[i, t0:t0 + n].any()]
            out = frames
            if active:
                t_call = time.perf_counter()
                lanes, carry_batch = _build_lanes(frames, t0, T, active, plans, carries, size)
                target = carry_batch.feat
                new_carry, res = step(params, lanes, carry_batch, target)
                res = jax.device_get(res)
                if compile_s is None:
                    compile_s = time.perf_counter() - t_call
                new_carry = jax.device_get(new_carry)
                for lane, i in enumerate(active):
                    carries[i] = jax.tree.map(lambda a, lane=lane: np.asarray(a[lane]),
                                              new_carry)
                    pres = plans[i].present[t0:t0 + n]
                    out = cloak.paste_patches(out, np.asarray(lanes.patches[lane, :n]),
                                              res.protected[lane, :n],
                                              plans[i].offsets[t0:t0 + n], pres)
                    iters[i, t0:t0 + n] = res.iters[lane, :n]
                    for k in metric_names:
                        metrics[k][i, t0:t0 + n] = res.metrics._asdict()[k][lane, :n]
                    curves[i, t0:t0 + n] = res.metrics.loss_curve[lane, :n]
                if other is not None:
                    other.measure(frames, out, t0, active, plans, lms_t, tracks)
            for f in range(n):
                if t0 + f in sample_ids:
                    samples[t0 + f] = (frames[f].copy(), out[f].copy())
            encoder.put(out)
            if state_dir:
                _save_chunk(state_dir, j, out, t0, iters, metrics, curves, carries)
            _progress(f"\rcloak: {min(t0 + n, n_frames)}/{n_frames} frames, "
                      f"{int(iters.sum())} iterations", end="")
        _progress("")
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
    report.update(_summarise(tracks, iters, metrics, curves, wall, compile_s, n_frames))
    if other is not None:
        report["other_model"] = other.summary()
    report["per_track"] = [{"track": i, "frames": np.flatnonzero(tracks.mask[i]).tolist(),
                            "iterations": iters[i][tracks.mask[i]].tolist(),
                            "protection": _clean(metrics["protection"][i][tracks.mask[i]]),
                            "ssim": _clean(metrics["ssim"][i][tracks.mask[i]])}
                           for i in range(tracks.num_tracks)]
    report["_samples"] = samples
    report["_boxes"] = tracks.gather(det["boxes"])
    report["_curves"] = curves
    report["_iters"] = iters
    report["_mask"] = tracks.mask
    return protected, report


def _clean(a) -> list:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(a)]


class _Dets:
    """Detections-like view of the numpy detection dict (what `track.track` reads)."""

    def __init__(self, det):
        self.boxes, self.landmarks = det["boxes"], det["landmarks"]
        self.valid, self.scores = det["valid"], det["scores"]


def _build_lanes(frames, t0, T, active, plans, carries, size):
    """Returns (ChainFrames [C, T], ChainCarry [C]) for the active tracks of one chunk."""
    n = frames.shape[0]
    c = _lane_count(len(active))
    patches = np.zeros((c, T, size, size, 3), np.uint8)
    m_chip = np.tile(np.eye(2, 3, dtype=np.float32), (c, T, 1, 1))
    lms = np.zeros((c, T, 5, 2), np.float32)
    offs = np.zeros((c, T, 2), np.float32)
    present = np.zeros((c, T), bool)
    for lane, i in enumerate(active):
        p = plans[i]
        sl = slice(t0, t0 + n)
        patches[lane, :n] = cloak.crop_patches(frames, p.offsets[sl], size)
        m_chip[lane, :n] = p.m_chip[sl]
        lms[lane, :n] = p.landmarks[sl]
        offs[lane, :n] = p.offsets[sl]
        present[lane, :n] = p.present[sl]
    lane_carries = [carries[i] for i in active] + [carries[active[0]]] * (c - len(active))
    carry = jax.tree.map(lambda *xs: np.stack(xs), *lane_carries)
    frames_b = cloak.ChainFrames(jnp.asarray(patches), jnp.asarray(m_chip), jnp.asarray(lms),
                                 jnp.asarray(offs), jnp.asarray(present))
    return frames_b, jax.tree.map(jnp.asarray, carry)


def _save_chunk(state_dir, j, frames, t0, iters, metrics, curves, carries):
    n = frames.shape[0]
    sl = slice(t0, t0 + n)
    arrays = {"frames": frames, "t0": np.int64(t0), "iters": iters[:, sl],
              "curves": curves[:, sl]}
    arrays.update({f"m_{k}": v[:, sl] for k, v in metrics.items()})
    for name, arrs in (("chunk", arrays), ("carry", _flat_carries(carries))):
        tmp = state_dir / f".{name}_{j:05d}.tmp.npz"
        np.savez(tmp, **arrs)
        os.replace(tmp, state_dir / f"{name}_{j:05d}.npz")
    # The carry of the chunk before is no longer needed to resume.
    (state_dir / f"carry_{j - 1:05d}.npz").unlink(missing_ok=True)


def _flat_carries(carries):
    return {f"{i}/{f}": np.asarray(v) for i, c in enumerate(carries)
            for f, v in c._asdict().items()}


def _load_carries(z, carries):
    return [type(c)(**{f: z[f"{i}/{f}"] for f in c._fields}) for i, c in enumerate(carries)]


def _restore_metrics(z, t0, iters, metrics, curves):
    n = z["iters"].shape[1]
    sl = slice(t0, t0 + n)
    iters[:, sl] = z["iters"]
    curves[:, sl] = z["curves"]
    for k in metrics:
        metrics[k][:, sl] = z[f"m_{k}"]


class _OtherModel:
    """Cross-model figure: distance between clean and protected faces for a second model."""

    def __init__(self, name: str):
        from faceveil.engine import recognise

        self.name = name
        self.rec, self.params = recognise.recogniser_params(name)
        self.dist: list[float] = []

    def measure(self, frames, protected, t0, active, plans, lms_t, tracks):
        from faceveil.engine import recognise

        for f in range(frames.shape[0]):
            lms = [lms_t[i, t0 + f] for i in active if tracks.mask[i, t0 + f]]
            if not lms:
                continue
            lms = np.stack(lms)
            clean, _ = recognise.embed_faces(frames[f], lms, self.name)
            prot, _ = recognise.embed_faces(protected[f], lms, self.name)
            self.dist.extend(np.linalg.norm(clean - prot, axis=1).tolist())

    def summary(self) -> dict:
        d = np.asarray(self.dist)
        return {"model": self.name, "threshold": self.rec.threshold,
                "mean_protection": float(d.mean()) if d.size else None,
                "min_protection": float(d.min()) if d.size else None,
                "fraction_beyond_threshold": float((d >= self.rec.threshold).mean())
                if d.size else None}


def _summarise(tracks, iters, metrics, curves, wall, compile_s, n_frames) -> dict:
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
        "first_chunk_seconds_incl_compile": None if compile_s is None else round(compile_s, 3),
        "frames_per_second": round(n_frames / wall, 3) if wall > 0 else None,
    }
