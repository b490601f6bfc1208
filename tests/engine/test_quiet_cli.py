"""A normal `faceveil` run prints no backend noise (absl INFO logs, JAX's fork warning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio_ffmpeg

from faceveil.engine.pipeline import video_io

NOISE = ("Unable to initialize backend", "os.fork()", "xla_bridge.py")


def test_detect_on_a_video_has_a_clean_stderr(tmp_path):
    # A tiny face-less clip with audio: detection (JAX) and ffmpeg reading and writing.
    src = tmp_path / "clip.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
                    "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=0.5",
                    "-f", "lavfi", "-i", "sine=duration=0.3", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", str(src)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    proc = subprocess.run(
        [sys.executable, "-m", "faceveil.engine.commands.cli", "detect", "--input", str(src),
         "--output", str(tmp_path / "out.mp4"), "--json", str(tmp_path / "faces.json")],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "0 face(s) found" in proc.stdout
    assert len(json.loads((tmp_path / "faces.json").read_text())["frames"]) == 5
    assert video_io.count_frames(tmp_path / "out.mp4") == 5
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr
