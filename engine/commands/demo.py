"""`make demo`: cloaks an embedded default video and says where the results are.

The default input is made from scikit-image's astronaut photograph (Eileen Collins, NASA,
public domain), which ships inside the scikit-image package, so the demo needs no network and
no ../shared: a few seconds of video are generated from the photo with smooth head motion
(translation, rotation, zoom, a light change), then cloaked with reuse=affine against dlib.
"""

from __future__ import annotations

from pathlib import Path

from faceveil.engine.commands import cloak_cli
from faceveil.engine.pipeline import synth_video


def default_image():
    """Returns the embedded default photo as uint8 [512, 512, 3] (scikit-image's astronaut)."""
    from skimage import data

    return data.astronaut()


def run(out_dir: str, *, seconds: float = 3.0, fps: float = 20.0) -> dict:
    """Returns the demo's cloak report after writing the input, output, PNGs and JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    video = synth_video.make_demo_video(default_image(), seconds=seconds, fps=fps,
                                        focus=synth_video.ASTRONAUT_FACE, key=0)
    src = synth_video.write_demo_video(out / "astronaut_input.mp4", video.frames, video.fps)
    print(f"demo: generated {len(video.frames)} frames of {video.frames.shape[2]}x"
          f"{video.frames.shape[1]} video from the astronaut photo -> {src}")
    rep = cloak_cli.run_video(str(src), str(out / "astronaut_cloaked.mp4"),
                              report_path=str(out / "report.json"), reuse="affine",
                              model="dlib", mode="mid", chunk=16, max_frames=None,
                              resume=False, overwrite=True)
    outputs = rep["outputs"]
    print(f"demo: cloaked video -> {outputs['video']}")
    if "side_by_side" in outputs:
        print(f"demo: side-by-side -> {outputs['side_by_side']}")
    print(f"demo: report -> {outputs['report']}")
    if rep.get("faces"):
        print(f"demo: {rep['faces']} faces, {rep['total_iterations']} iterations "
              f"({rep['mean_iterations']:.1f} per frame), dlib protection mean "
              f"{rep['mean_protection']:.3f} (same-person threshold 0.6), mean SSIM "
              f"{rep['mean_ssim']:.4f}")
    return rep
