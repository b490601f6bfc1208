"""Runs three engines with their lanes sharded over every device and unsharded; saves both.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m tests.engine.sharded_runs OUT.npz

`tests/engine/test_sharding.py` starts this in a subprocess (its own pytest process already
initialised JAX with one CPU device) and compares the two runs. Each engine runs once over all
local devices (`sharding.lane_mesh()`) and once with `sharding.use_devices(1)`:

    cloak_photo   the photo cloak (dlib, 2 iterations) on 5 faces of one photo:
                  `photos.protect_photos`, 5 lanes padded to 8
    pmt           PMT (dlib, 2 iterations) on 3 faces in one call (`lanes=256`, as
                  `pmts.pmt_images` runs it): 3 lanes padded to 8
    cloak_video   the video cloak (dlib, 2 iterations) on 6 frames cut into 3 segments of 2:
                  `chains.ChainRunner`, 3 chains per call, carried over 2 calls

Every array goes into OUT.npz as `<engine>/<devices>/<name>`; `devices` and `lane_counts`
record what the runs saw.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from faceveil.engine import sharding
from faceveil.engine.methods import cloak, pmt
from faceveil.engine.pipeline import faces, image_io, photos, recognise, synth_video, video
from tests.conftest import DATA

ITERS = 2


def _photo_faces(n: int) -> tuple[np.ndarray, faces.PhotoFaces]:
    """Returns (photo, its first n faces): the group photo's faces, found once."""
    img = image_io.read_image(DATA / "multi" / "multiface.jpg")
    pf = faces.find_photo_faces(img, min_face=0.0)
    assert len(pf.boxes) >= n, f"multiface.jpg: {len(pf.boxes)} faces, need {n}"
    return img, faces.PhotoFaces(boxes=pf.boxes[:n], scores=pf.scores[:n],
                                 landmarks=pf.landmarks[:n], small=0)


def _photo_arrays(res: photos.PhotoResult) -> dict:
    out = {"image": res.images[0], "iterations": res.faces.iterations}
    out.update({f"m_{k}": np.asarray(v) for k, v in res.faces.metrics.items()})
    return out


def run(devices: int | None) -> dict[str, dict]:
    """Returns {engine: {name: array}} of the three engines over `devices` (None: all)."""
    rec, params = recognise.recogniser_params("dlib")
    img, five = _photo_faces(5)
    three = faces.PhotoFaces(boxes=five.boxes[:3], scores=five.scores[:3],
                             landmarks=five.landmarks[:3], small=0)
    # One alignment view, no anti-aliasing: a smaller program to compile, the same lanes.
    cfg = cloak.CloakConfig(max_iters=ITERS, jitter=0.0, antialias=False)
    clip = synth_video.make_demo_video(_astronaut(), seconds=0.3, fps=20, size=(180, 320),
                                       focus=synth_video.ASTRONAUT_FACE, key=1).frames
    out = {}
    with sharding.use_devices(devices):
        out["lanes"] = {"mesh": np.array(sharding.lane_multiple(sharding.lane_mesh()))}
        res = photos.protect_photos([img], cloak.CloakMethod(rec, cfg),
                                    cloak.method_params(cfg, params), key=jax.random.PRNGKey(0),
                                    found=[five], measure=False, show_progress=False)
        out["cloak_photo"] = _photo_arrays(res)
        _say(f"cloak_photo over {devices or 'all'} device(s)")
        res = photos.protect_photos([img], pmt.PmtMethod(rec, pmt.PmtConfig(iters=ITERS)),
                                    params, key=jax.random.PRNGKey(0), found=[three],
                                    measure=False, show_progress=False, lanes=256)
        out["pmt"] = _photo_arrays(res)
        _say(f"pmt over {devices or 'all'} device(s)")
        job = video.VideoJob(chunk=1, segment=2, other_model=None, progress=False)
        vres = video.cloak_video(clip, config=cfg, job=job)
        out["cloak_video"] = {"frames": vres.frames, "iterations": vres.iterations,
                              "lane_counts": np.array(vres.lane_counts),
                              "chains": np.array(vres.chains)}
        out["cloak_video"].update({f"m_{k}": np.asarray(v) for k, v in vres.metrics.items()})
        _say(f"cloak_video over {devices or 'all'} device(s)")
    return out


_T0 = [time.perf_counter()]


def _say(what: str) -> None:
    now = time.perf_counter()
    print(f"{what}: {now - _T0[0]:.1f} s", file=sys.stderr, flush=True)
    _T0[0] = now


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def main(path: str) -> None:
    """Writes both runs' arrays to `path` (.npz)."""
    flat = {"devices": np.array(jax.local_device_count())}
    for devices, tag in ((None, "all"), (1, "one")):
        for engine, arrays in run(devices).items():
            flat.update({f"{engine}/{tag}/{k}": v for k, v in arrays.items()})
    np.savez(path, **flat)


if __name__ == "__main__":
    main(sys.argv[1])
