"""Video reading and writing through ffmpeg (imageio-ffmpeg), in chunks, keeping the audio.

Frames are uint8 [H, W, 3] RGB at the I/O boundary. Output is written to a temporary name in
the destination folder and renamed when complete. The audio track of the source (if any) is
muxed in afterwards, padded with silence or cut to the length of the written picture: the
output always holds every written frame at the given frame rate.

ffmpeg runs in its own process group (so Ctrl+C reaches Python, which stops it cleanly), set
up without a Python `preexec_fn` (see `_patch_imageio_ffmpeg_spawn`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from faceveil.engine.pipeline.image_io import InputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def _patch_imageio_ffmpeg_spawn() -> None:
    """Starts imageio-ffmpeg's reader/writer with `process_group=0` instead of a preexec_fn.

    imageio-ffmpeg puts ffmpeg in its own process group with `preexec_fn=os.setpgrp`. A
    preexec_fn makes `subprocess` fork() the whole (multithreaded, once JAX runs) process and
    run Python in the child: a deadlock risk, and the reason for JAX's "RuntimeWarning:
    os.fork() was called ..." on every video read or write. Python >= 3.11 sets the process
    group in the child's C code (`process_group=0`, with vfork), so the behaviour stays the
    same without the fork. Older Pythons, or an imageio-ffmpeg without `_popen_kwargs`, are
    left as they are.
    """
    import imageio_ffmpeg._io as ffio

    original = getattr(ffio, "_popen_kwargs", None)
    if (sys.version_info < (3, 11) or original is None
            or getattr(original, "_faceveil_patched", False)):
        return

    def _popen_kwargs(*args, **kwargs):
        result = dict(original(*args, **kwargs))
        if result.get("preexec_fn") is os.setpgrp:
            result["preexec_fn"] = None
            result["process_group"] = 0
        return result

    _popen_kwargs._faceveil_patched = True
    ffio._popen_kwargs = _popen_kwargs


def _imageio_ffmpeg():
    """Returns the imageio_ffmpeg module, its subprocess start-up patched (see above)."""
    import imageio_ffmpeg

    _patch_imageio_ffmpeg_spawn()
    return imageio_ffmpeg


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg says about a video: size, frame rate, frame count, audio."""

    path: str
    width: int
    height: int
    fps: float
    frames: int
    duration: float
    audio_codec: str | None
    # Seconds by which the first picture starts after the audio (the picture is read without
    # filler frames, so a writer must keep this gap to keep the sound in sync).
    audio_lead: float = 0.0


def is_video(path: str | os.PathLike) -> bool:
    """Returns True when the path's suffix names a video container."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def probe(path: str | os.PathLike) -> VideoInfo:
    """Returns the VideoInfo of a video file, or raises InputError naming the file and reason."""
    imageio_ffmpeg = _imageio_ffmpeg()

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    try:
        gen = imageio_ffmpeg.read_frames(path)
        meta = next(gen)
        gen.close()
    except (RuntimeError, OSError, StopIteration) as e:
        raise InputError(path, f"not a readable video ({str(e).splitlines()[0][:200]})") from e
    w, h = meta["size"]
    frames = count_frames(path)
    if frames <= 0:
        raise InputError(path, "the video holds no frames")
    audio_codec = meta.get("audio_codec")
    return VideoInfo(path, int(w), int(h), float(meta["fps"]), int(frames),
                     float(meta.get("duration") or 0.0), audio_codec,
                     _audio_lead(path) if audio_codec else 0.0)


def _audio_lead(path: str) -> float:
    """Returns how many seconds the first video stream starts after the first audio stream."""
    proc = subprocess.run([_imageio_ffmpeg().get_ffmpeg_exe(), "-nostdin", "-hide_banner",
                           "-i", path], capture_output=True, text=True, errors="replace",
                          check=False)
    starts = {}
    for kind, start in re.findall(r"Stream #\d+:\d+.*?: (Video|Audio): .*?start (-?[\d.]+)",
                                  proc.stderr):
        starts.setdefault(kind, float(start))
    return max(0.0, starts.get("Video", 0.0) - starts.get("Audio", 0.0))


def iter_chunks(path: str | os.PathLike, chunk: int, *, start: int = 0,
                limit: int | None = None) -> Iterator[np.ndarray]:
    """Yields uint8 arrays [<=chunk, H, W, 3] of consecutive frames from frame `start` on.

    A truncated or corrupt stream ends with an InputError that says how many frames were
    decoded, rather than a silent short video.
    """
    imageio_ffmpeg = _imageio_ffmpeg()

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    # Passthrough: the stream's own pictures only. By default ffmpeg fills a late-starting
    # picture (the shared clip starts 0.85 s after its audio) with 26 copies of its first frame,
    # frames the file does not hold (probe's count would then disagree with what is decoded).
    gen = imageio_ffmpeg.read_frames(path, output_params=["-fps_mode", "passthrough"])
    try:
        width, height = next(gen)["size"]  # the decoder's own metadata: no second pass
    except (RuntimeError, OSError, StopIteration) as e:
        gen.close()
        raise InputError(path, f"not a readable video ({str(e).splitlines()[0][:200]})") from e
    buf, index, emitted = [], 0, 0
    n_frame_bytes = width * height * 3
    try:
        for raw in gen:
            if len(raw) != n_frame_bytes:
                raise InputError(path, f"frame {index} is incomplete (truncated file?)")
            if index >= start:
                buf.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
                emitted += 1
                if len(buf) == chunk:
                    yield np.stack(buf)
                    buf = []
                if limit is not None and emitted >= limit:
                    break
            index += 1
    except RuntimeError as e:
        raise InputError(path, f"decoding stopped after {index} frames ({e})") from e
    finally:
        gen.close()
    if buf:
        yield np.stack(buf)


def count_frames(path: str | os.PathLike) -> int:
    """Returns how many video frames of `path` (its first video stream) decode.

    The whole stream is decoded (imageio-ffmpeg's counter), so it is the number of pictures a
    player shows; e.g. to compare a job's output with its input.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    try:
        frames, _ = _imageio_ffmpeg().count_frames_and_secs(path)
    except (RuntimeError, OSError) as e:
        reason = (str(e).strip().splitlines() or ["ffmpeg failed"])[-1][:200]
        raise InputError(path, f"its frames could not be decoded ({reason})") from e
    return int(frames)


def read_video(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Returns all frames (or the first `limit`) of a video as uint8 [T, H, W, 3]."""
    chunks = list(iter_chunks(path, 64, limit=limit))
    if not chunks:
        raise InputError(path, "no frames could be decoded")
    return np.concatenate(chunks)


class VideoWriter:
    """Writes frames to an H.264 video atomically, muxing in the audio of `audio_from`.

    Use as a context manager; the output appears under its name only when the block exits
    without an exception (otherwise the temporary files are removed).

    The output holds exactly the frames written, at `fps`, whatever the length of the audio:
    the picture is encoded first, then the first audio stream of `audio_from` (if it has
    one) is muxed in, re-encoded (AAC; Opus for .webm), padded with silence when it ends
    before the last frame and cut where the last frame ends (a job limited to the first N
    frames does not carry the whole soundtrack). The picture is copied, never trimmed.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, audio_from: str | None = None,
                 quality: int = 8, audio_lead: float | None = None, lossless: bool = False):
        self.path = Path(path)
        self.fps = fps
        self.audio_from = None if audio_from is None else str(audio_from)
        # The picture starts this many seconds after the audio, as in the source (default:
        # read from audio_from), so the sound stays in sync with the frames.
        if audio_lead is None:
            audio_lead = _audio_lead(self.audio_from) if self.audio_from else 0.0
        self.audio_lead = float(audio_lead)
        self.quality = quality
        # Lossless: H.264 in RGB at qp 0 (bit-exact frames; e.g. a veiled video, whose
        # recovery would amplify coding error 1 / alpha times). Large files, fewer players.
        self.lossless = lossless
        self.frames_written = 0
        self._gen = None
        self._tmp = None
        self._video_tmp = None

    def __enter__(self):
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError(self.path, f"the output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise InputError(self.path, f"no permission to write in {folder}")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.stem}.",
                                   suffix=self.path.suffix)
        os.close(fd)
        self._tmp = tmp
        if self.audio_from:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.stem}.video.",
                                       suffix=self.path.suffix)
            os.close(fd)
            self._video_tmp = tmp
        return self

    def write(self, frames: np.ndarray) -> None:
        """Appends uint8 frames [T, H, W, 3] (or one frame [H, W, 3])."""
        imageio_ffmpeg = _imageio_ffmpeg()

        frames = np.asarray(frames, np.uint8)
        if frames.ndim == 3:
            frames = frames[None]
        if self._gen is None:
            h, w = frames.shape[1:3]
            # The picture alone; the audio is muxed in by __exit__, once its length is known.
            if self.lossless:
                codec = {"codec": "libx264rgb", "pix_fmt_out": "rgb24", "quality": None,
                         "output_params": ["-qp", "0", "-y"]}
            else:
                codec = {"codec": "libx264", "quality": self.quality, "output_params": ["-y"]}
            self._gen = imageio_ffmpeg.write_frames(
                self._video_tmp or self._tmp, (w, h), fps=self.fps, macro_block_size=1, **codec)
            self._gen.send(None)
        for f in frames:
            self._gen.send(np.ascontiguousarray(f))
            self.frames_written += 1

    def _mux_audio(self) -> None:
        """Writes self._tmp: the picture of self._video_tmp and the audio of audio_from."""
        from fractions import Fraction

        # imageio-ffmpeg passes the rate to ffmpeg as this fraction; the picture ends here.
        fps = self.fps if isinstance(self.fps, Fraction) else Fraction(self.fps).limit_denominator()
        end = float(self.frames_written / fps) + self.audio_lead
        # apad pads a short track well past the end (also when it starts late); atrim then cuts
        # at the last frame's end, by timestamp.
        audio_filter = f"apad=whole_dur={end + 1.0:.6f},atrim=end={end:.6f}"
        codec = ["-c:a", "libopus", "-b:a", "160k"] if self.path.suffix.lower() == ".webm" \
            else ["-c:a", "aac", "-b:a", "192k"]
        cmd = [_imageio_ffmpeg().get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error",
               "-y", "-itsoffset", f"{self.audio_lead:.6f}", "-i", self._video_tmp,
               "-i", self.audio_from,
               "-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy", "-af", audio_filter,
               *codec, self._tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              check=False)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"ffmpeg exit {proc.returncode}"])
            raise InputError(self.audio_from,
                             f"its audio could not be muxed into {self.path} ({reason[-1][:200]})")

    def __exit__(self, exc_type, exc, tb):
        done = False
        try:
            if self._gen is not None:
                self._gen.close()
                if exc_type is None:
                    if self._video_tmp:
                        self._mux_audio()
                    done = True
        finally:
            if done:
                # mkstemp creates 0600; a video output is an ordinary file, like the photos.
                os.chmod(self._tmp, 0o644)
                os.replace(self._tmp, self.path)
            elif self._tmp:
                Path(self._tmp).unlink(missing_ok=True)
            if self._video_tmp:
                Path(self._video_tmp).unlink(missing_ok=True)
        return False
