"""Image-cloak throughput: faces/s of the batched cloak at a fixed number of iterations.

    python -m benchmarks.cloak_throughput --batch 64 --iters 40 --json out.json
    python -m benchmarks.cloak_throughput --batch 256 --jitter 0 --json out.json

Real faces (the largest face of each photo under ../shared/data/faces, or scikit-image's
astronaut when that folder is absent) are cut into patches of one size and repeated up to the
batch, then cloaked by the compiled chunk function `faceveil.engine.methods.base.solve_faces` uses,
with the stop threshold at infinity so every face makes exactly --iters Adadelta updates (the
figure DESIGN.md asks for: faces/s at 40 iterations with dlib). Compilation (lower + compile)
is timed apart; one warm-up call is not counted; results are fetched before the clock stops.
Everything else is the default ('mid') mode, including the alignment jitter: each iteration
sees two jittered views (`CloakConfig.views`), each a forward+backward of the cloaked face and a
forward of the clean face (--jitter 0 to measure one detected view). Prints JSON.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import benchmarks
from faceveil.engine.methods import base, cloak
from faceveil.engine.pipeline import faces as face_pipeline
from faceveil.engine.pipeline import image_io, recognise

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "faces"


def face_patches(recogniser, size: int | None = None, folder: Path = DATA):
    """Returns (uint8 patches [F, P, P, 3], m_chip [F, 2, 3]) of real faces.

    P is `size`, or (None) the smallest patch bucket that holds every face with its margin.
    """
    images = []
    if folder.is_dir():
        images = [image_io.read_image(p) for p in sorted(folder.rglob("*"))
                  if p.suffix.lower() in recognise.PHOTO_SUFFIXES]
    if not images:
        from faceveil.engine.commands import demo

        images = [demo.default_image()]
    faces = []
    for img in images:
        try:
            faces.append((img, recognise.largest_face(img)[1]))
        except recognise.NoFaceError:
            continue
    if size is None:
        size = max(face_pipeline.plan_faces(lms[None], np.ones(1, bool), recogniser).size
                   for _, lms in faces)
    patches, m_chips = [], []
    for img, lms in faces:
        plan = face_pipeline.plan_faces(lms[None], np.ones(1, bool), recogniser, size=size)
        patches.append(face_pipeline.crop_patches(img[None], plan.offsets, size)[0])
        m_chips.append(plan.m_chip[0])
    return np.stack(patches), np.stack(m_chips)


def measure(*, model: str = "dlib", batch: int = 64, iters: int = 40, size: int | None = None,
            repeats: int = 3, jitter: float | None = None, seed: int = 0) -> dict:
    """Returns the throughput report (module docstring)."""
    rec, params = recognise.recogniser_params(model)
    config = cloak.preset("mid", rec)
    config = dataclasses.replace(config, threshold=math.inf, max_iters=iters)
    if jitter is not None:
        config = dataclasses.replace(config, jitter=jitter)
    patches, m_chip = face_patches(rec, size)
    take = np.arange(batch) % len(patches)
    method = cloak.CloakMethod(rec, config)
    frames = base.still_frames(patches[take], m_chip[take])
    carry = base.init_carry(method, params, jax.random.split(jax.random.PRNGKey(seed), batch),
                            int(patches.shape[1]))
    target = base.empty_target(method, params, batch, int(patches.shape[1]))
    fn = base.chunk_fn(method)
    t0 = time.perf_counter()
    exe = fn.lower(params, frames, carry, target).compile()
    compile_s = time.perf_counter() - t0
    def fresh():  # the carry is donated on accelerators: each call gets its own copy
        return jax.block_until_ready(jax.tree.map(jnp.copy, carry))

    _, res = jax.device_get(exe(params, frames, fresh(), target))  # warm-up
    times = []
    for _ in range(repeats):
        c = fresh()
        t0 = time.perf_counter()
        _, res = jax.device_get(exe(params, frames, c, target))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    dev = jax.devices()[0]
    return {
        "model": model, "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__,
        "cpu_count": len(os.sched_getaffinity(0)), "batch": batch, "distinct_faces":
        len(patches), "patch_size": int(patches.shape[1]), "iterations_per_face": iters,
        "all_faces_ran_all_iterations": bool((np.asarray(res.iters) == iters).all()),
        "jitter": config.jitter, "views": config.views if config.jitter > 0 else 1,
        "antialias": config.antialias, "compile_s": round(compile_s, 2),
        "call_s": [round(t, 3) for t in times], "faces_per_s": round(batch / step, 2),
        "face_iterations_per_s": round(batch * iters / step, 1),
        "mean_protection": float(np.mean(res.metrics.protection)),
        "mean_ssim": float(np.mean(res.metrics.ssim))}


def _define_flags() -> None:
    flags.DEFINE_string("model", "dlib", "Recogniser cloaked against.")
    flags.DEFINE_integer("batch", 64, "Faces per compiled call.")
    flags.DEFINE_integer("iters", 40, "Adadelta updates per face.")
    flags.DEFINE_integer("size", None, "Patch side (default: the bucket that holds every face).")
    flags.DEFINE_integer("repeats", 3, "Timed calls after one warm-up call (median reported).")
    flags.DEFINE_float("jitter", None, "Alignment jitter (default: the mid mode's).")
    flags.DEFINE_string("json", None, "Write the JSON report here too.")


def main(argv) -> None:
    """Prints the JSON report of `measure`."""
    del argv
    o = flags.FLAGS
    report = measure(model=o.model, batch=o.batch, iters=o.iters, size=o.size,
                     repeats=o.repeats, jitter=o.jitter)
    benchmarks.emit(report, o.json)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
