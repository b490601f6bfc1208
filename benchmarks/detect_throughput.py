"""Throughput of the batched MTCNN detector: first-call (compile) time and steady frames/s.

    python -m benchmarks.detect_throughput --json out.json [--sizes 640x360,1920x1080] \
        [--batch 8] [--repeats 3] [--data ../shared/data]

Frames are real photos from <data>/faces and <data>/multi, resized and centre-cropped to each
size (the R-Net/O-Net loops run as many chunks as there are candidates, so content matters;
without the data folder the frames are uniform noise and the report says so). The first call
traces and compiles (reported on its own); then `--repeats` timed calls on the same
device-resident batch, each ended by `block_until_ready`, give the steady-state rate. Runs
unchanged on CPU or GPU (whatever jax's default backend is).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_JSON = flags.DEFINE_string("json", None, "Write the report here (it is printed too).")
_SIZES = flags.DEFINE_string("sizes", "640x360,1920x1080", "Comma-separated WxH frame sizes.")
_BATCH = flags.DEFINE_integer("batch", 8, "Frames per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the first one.")
_DATA = flags.DEFINE_string("data", str(DEFAULT_DATA), "Shared data folder (faces/, multi/).")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Returns [(width, height), ...] from "640x360,1920x1080"."""
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise ValueError(f"bad size {part!r}; expected WxH such as 1920x1080")
        sizes.append((int(w), int(h)))
    return sizes


def make_frames(data_dir: Path, width: int, height: int, n: int) -> tuple[np.ndarray, str]:
    """Returns ([n, height, width, 3] uint8 frames, a word saying what they show)."""
    paths = sorted(p for sub in ("multi", "faces") for p in (data_dir / sub).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8), "noise"
    frames = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            im = im.convert("RGB")
            s = max(width / im.width, height / im.height)  # cover, then centre-crop
            im = im.resize((max(width, round(im.width * s)), max(height, round(im.height * s))),
                           Image.BILINEAR)
            x0, y0 = (im.width - width) // 2, (im.height - height) // 2
            frames.append(np.asarray(im.crop((x0, y0, x0 + width, y0 + height))))
    return np.stack(frames), "photos"


def run(sizes, batch: int, repeats: int, data_dir: Path, log=print) -> dict:
    """Returns the throughput report for every (width, height) in `sizes`."""
    import jax

    from faceveil.engine.pipeline import detect as det_lib

    params = jax.device_put(det_lib.default_params())
    results = []
    for width, height in sizes:
        frames_np, content = make_frames(Path(data_dir), width, height, batch)
        frames = jax.device_put(frames_np)
        t0 = time.perf_counter()
        det = det_lib.detect(frames, params)
        jax.block_until_ready(det)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            det = det_lib.detect(frames, params)
            jax.block_until_ready(det)
            times.append(time.perf_counter() - t0)
        best = min(times)
        row = {
            "size": f"{width}x{height}", "batch": batch, "content": content,
            "first_call_s_incl_compile": round(first, 3),
            "steady_s_per_batch": [round(t, 4) for t in times],
            "frames_per_s": round(batch / float(np.median(times)), 3),
            "frames_per_s_best": round(batch / best, 3),
            "faces_per_frame_mean": float(np.asarray(det.valid).sum(axis=1).mean()),
        }
        log(json.dumps(row), file=sys.stderr)
        results.append(row)
    dev = jax.devices()[0]
    return {
        "benchmark": "faceveil.engine.pipeline.detect.detect (MTCNN, static batched pipeline)",
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "n_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }


def main(argv):
    del argv
    report = run(parse_sizes(_SIZES.value), _BATCH.value, _REPEATS.value, Path(_DATA.value))
    text = json.dumps(report, indent=2)
    print(text)
    if _JSON.value:
        Path(_JSON.value).write_text(text + "\n")


if __name__ == "__main__":
    app.run(main)
