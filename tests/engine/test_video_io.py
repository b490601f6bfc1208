"""VideoWriter keeps every frame and the frame rate whatever the audio's length; count_frames."""

from __future__ import annotations

import re
import subprocess
import warnings

import imageio_ffmpeg
import pytest

from faceveil.engine.pipeline import video_io
from faceveil.engine.pipeline.image_io import InputError

FPS, N, W, H = 30, 30, 320, 240  # a 1.0 s picture
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _make_clip(path, audio_seconds: float | None):
    """Writes N frames of testsrc at FPS (H.264) with an AAC sine of `audio_seconds`, or none."""
    cmd = [FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi",
           "-i", f"testsrc=size={W}x{H}:rate={FPS}:duration={N / FPS}"]
    if audio_seconds is not None:
        sine = f"sine=frequency=440:sample_rate=44100:duration={audio_seconds}"
        cmd += ["-f", "lavfi", "-i", sine, "-c:a", "aac"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return str(path)


def _audio_seconds(path) -> float:
    """Returns how long the first audio stream of `path` plays, by decoding it."""
    proc = subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0",
                           "-f", "null", "-progress", "pipe:1", "-nostats", "-"],
                          capture_output=True, text=True, check=True)
    return int(re.findall(r"^out_time_us=(\d+)$", proc.stdout, re.MULTILINE)[-1]) / 1e6


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Source clips of N frames: audio 0.3 s short, 0.02 s short, 0.5 s long, and none."""
    d = tmp_path_factory.mktemp("clips")
    made = {"short": _make_clip(d / "short.mp4", N / FPS - 0.3),
            "slightly_short": _make_clip(d / "slightly_short.mp4", N / FPS - 0.02),
            "long": _make_clip(d / "long.mp4", N / FPS + 0.5),
            "silent": _make_clip(d / "silent.mp4", None)}
    for path in made.values():
        assert video_io.count_frames(path) == N
    return made


def _rewrite(src, out, n=N):
    frames = video_io.read_video(src)
    assert frames.shape == (N, H, W, 3)
    info = video_io.probe(src)
    with video_io.VideoWriter(out, info.fps,
                              audio_from=src if info.audio_codec else None) as writer:
        writer.write(frames[:n])
    assert writer.frames_written == n
    return str(out)


@pytest.mark.parametrize("name", ["short", "slightly_short", "long"])
def test_every_frame_kept_and_audio_fitted_to_the_picture(clips, tmp_path, name):
    out = _rewrite(clips[name], tmp_path / "out.mp4")
    info = video_io.probe(out)
    assert video_io.count_frames(out) == N
    assert info.fps == FPS and (info.width, info.height) == (W, H)
    assert info.audio_codec is not None
    # Padded with silence or cut, the audio plays as long as the picture (one AAC frame).
    assert abs(_audio_seconds(out) - N / FPS) < 0.03
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary files left


def test_first_frames_only_cut_the_audio_there(clips, tmp_path):
    out = _rewrite(clips["long"], tmp_path / "out.mp4", n=10)
    assert video_io.count_frames(out) == 10
    assert video_io.probe(out).fps == FPS
    assert abs(_audio_seconds(out) - 10 / FPS) < 0.03


def test_clip_without_audio(clips, tmp_path):
    out = _rewrite(clips["silent"], tmp_path / "out.mp4")
    info = video_io.probe(out)
    assert video_io.count_frames(out) == N and info.fps == FPS and info.audio_codec is None
    # A source without an audio stream named as audio_from gives a silent output too.
    frames = video_io.read_video(clips["silent"])
    with video_io.VideoWriter(tmp_path / "out2.mp4", FPS, audio_from=clips["silent"]) as w:
        w.write(frames)
    info = video_io.probe(tmp_path / "out2.mp4")
    assert video_io.count_frames(tmp_path / "out2.mp4") == N and info.audio_codec is None


def test_failed_block_leaves_nothing(clips, tmp_path):
    frames = video_io.read_video(clips["short"], limit=3)
    writer = video_io.VideoWriter(tmp_path / "out.mp4", FPS, audio_from=clips["short"])
    with pytest.raises(KeyError), writer:
        writer.write(frames)
        raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []


def test_count_frames_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        video_io.count_frames(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="bad.mp4"):
        video_io.count_frames(bad)


def test_ffmpeg_starts_without_fork_warning_after_jax(clips, tmp_path):
    """Reading and writing once JAX runs threads must not fork (JAX warns on os.fork())."""
    import jax

    jax.devices()  # starts the backend, which installs JAX's at-fork warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _rewrite(clips["short"], tmp_path / "out.mp4", n=5)
    assert not [w for w in caught if "os.fork()" in str(w.message)]
