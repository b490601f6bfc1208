"""Video reading and writing through ffmpeg (imageio-ffmpeg), in chunks, keeping the audio.

Frames are uint8 [H, W, 3] RGB at the I/O boundary. Output is written to a temporary name in
the destination folder and renamed when complete; the audio track of the source (if any) is
copied into the output unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from faceveil.engine.pipeline.image_io import InputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


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


def is_video(path: str | os.PathLike) -> bool:
    """Returns True when the path's suffix names a video container."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def probe(path: str | os.PathLike) -> VideoInfo:
    """Returns the VideoInfo of a video file, or raises InputError naming the file and reason."""
    import imageio_ffmpeg

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "no such file")
    try:
        gen = imageio_ffmpeg.read_frames(path)
        meta = next(gen)
        gen.close()
        frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    except (RuntimeError, OSError, StopIteration) as e:
        raise InputError(path, f"not a readable video ({str(e).splitlines()[0][:200]})") from e
    w, h = meta["size"]
    if frames <= 0:
        raise InputError(path, "the video holds no frames")
    return VideoInfo(path, int(w), int(h), float(meta["fps"]), int(frames),
                     float(meta.get("duration") or 0.0), meta.get("audio_codec"))


def iter_chunks(path: str | os.PathLike, chunk: int, *, start: int = 0,
                limit: int | None = None) -> Iterator[np.ndarray]:
    """Yields uint8 arrays [<=chunk, H, W, 3] of consecutive frames from frame `start` on.

    A truncated or corrupt stream ends with an InputError that says how many frames were
    decoded, rather than a silent short video.
    """
    import imageio_ffmpeg

    info = probe(path)
    gen = imageio_ffmpeg.read_frames(str(path))
    next(gen)
    buf, index, emitted = [], 0, 0
    n_frame_bytes = info.width * info.height * 3
    try:
        for raw in gen:
            if len(raw) != n_frame_bytes:
                raise InputError(path, f"frame {index} is incomplete (truncated file?)")
            if index >= start:
                buf.append(np.frombuffer(raw, np.uint8).reshape(info.height, info.width, 3))
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


def read_video(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Returns all frames (or the first `limit`) of a video as uint8 [T, H, W, 3]."""
    chunks = list(iter_chunks(path, 64, limit=limit))
    if not chunks:
        raise InputError(path, "no frames could be decoded")
    return np.concatenate(chunks)


class VideoWriter:
    """Writes frames to an H.264 video atomically, muxing in the audio of `audio_from`.

    Use as a context manager; the output appears under its name only when the block exits
    without an exception (otherwise the temporary file is removed).
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, audio_from: str | None = None,
                 quality: int = 8):
        self.path = Path(path)
        self.fps = fps
        self.audio_from = None if audio_from is None else str(audio_from)
        self.quality = quality
        self._gen = None
        self._tmp = None

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
        return self

    def write(self, frames: np.ndarray) -> None:
        """Appends uint8 frames [T, H, W, 3] (or one frame [H, W, 3])."""
        import imageio_ffmpeg

        frames = np.asarray(frames, np.uint8)
        if frames.ndim == 3:
            frames = frames[None]
        if self._gen is None:
            h, w = frames.shape[1:3]
            kwargs, extra = {}, []
            if self.audio_from:
                # The source's audio, unchanged; -shortest ends it with the last written frame
                # (a job limited to the first N frames must not carry the whole soundtrack).
                kwargs = {"audio_path": self.audio_from, "audio_codec": "copy"}
                extra = ["-shortest"]
            self._gen = imageio_ffmpeg.write_frames(
                self._tmp, (w, h), fps=self.fps, quality=self.quality, codec="libx264",
                macro_block_size=1, output_params=["-y", *extra], **kwargs)
            self._gen.send(None)
        for f in frames:
            self._gen.send(np.ascontiguousarray(f))

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._gen is not None:
                self._gen.close()
        finally:
            if exc_type is None and self._gen is not None:
                os.replace(self._tmp, self.path)
            elif self._tmp:
                Path(self._tmp).unlink(missing_ok=True)
        return False
