"""Where the time of one compiled engine call goes, and what the host work around it costs.

    python -m benchmarks.profile --engine cloak --json out.json
    python -m benchmarks.profile --engine veil|pmt|mask --json out.json

The engine's compiled call (the function the pipeline runs: `base.chunk_fn` for the per-face
methods, `veil.make_steps` for making a veil) is compiled (timed apart) and timed whole on real
faces. Then each of its parts is compiled and timed alone at the call's shapes with the same
library functions (recogniser forward, forward+backward, warps, anti-aliasing, DSSIM, optimiser
update), times how often one iteration runs it. Their sum against the measured iteration time
leaves the rest to the loop itself (selects, random views, fusion across parts). XLA's cost
analysis gives each part's flops. The host work of the photo pipeline (decode, detection,
cropping, encode, transfers) is timed per face on the same photos. Prints JSON.

Parts are timed in isolation: XLA may fuse or schedule them differently inside the loop, so the
split is an estimate; the whole call's figures are measured.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import benchmarks
from benchmarks import cloak_throughput
from faceveil import losses
from faceveil.engine.methods import base, cloak, mask, pmt, veil
from faceveil.engine.pipeline import align, image_io, recognise
from faceveil.engine.pipeline import faces as face_pipeline

ENGINES = ("cloak", "veil", "pmt", "mask")


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of an engine's iteration: `fn(*args)` runs it for the whole batch once."""

    name: str
    per_iteration: float  # how many times one iteration of the batch runs fn
    fn: Callable
    args: tuple
    note: str = ""


def _timed(fn: Callable, args: tuple, repeats: int) -> dict:
    """Returns compile seconds, the median call seconds and XLA's flop count of jit(fn)."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(exe(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*args))
        times.append(time.perf_counter() - t0)
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return {"compile_s": round(compile_s, 3), "call_s": float(np.median(times)),
            "gflops": None if flops is None else round(flops / 1e9, 3)}


def forward_backward(f: Callable) -> Callable:
    """Returns x, *rest -> (f's value, d<f(x), ct>/dx): a forward pass and its backward pass."""
    def run(x, ct, *rest):
        y, pull = jax.vjp(lambda v: f(v, *rest), x)
        return y, pull(ct)[0]

    return run


def _cotangent(f: Callable, x, *rest):
    shape = jax.eval_shape(lambda v: f(v, *rest), x)
    return jax.random.normal(jax.random.PRNGKey(1), shape.shape, shape.dtype)


def _fb_part(name: str, per_iteration: float, f: Callable, x, *rest, note: str = "") -> Part:
    return Part(name, per_iteration, forward_backward(f), (x, _cotangent(f, x, *rest), *rest),
                note)


# ----------------------------------------------------------------------------------------------
# The engines: the whole call and its parts


class _Faces(NamedTuple):
    patches: np.ndarray  # [B, P, P, 3] uint8
    m_chip: np.ndarray  # [B, 2, 3] chip -> patch pixels
    x: jax.Array  # the patches as float in [0, 1]
    m: jax.Array  # m_chip on the device
    chips: jax.Array  # [B, S, S, 3] each face's chip (the detected alignment)


# Each face of a batch through its own transform: [B, H, W, C], [B, 2, 3] -> [B, S, S, C].
_warp_each = jax.vmap(align.warp, (0, 0, None))


def _faces(rec, batch: int) -> _Faces:
    """Returns the _Faces of real faces (cloak_throughput's), repeated to `batch`."""
    patches, m_chip = cloak_throughput.face_patches(rec)
    take = np.arange(batch) % len(patches)
    patches, m_chip = patches[take], m_chip[take]
    x = jnp.asarray(patches, jnp.float32) / 255.0
    m = jnp.asarray(m_chip)
    s = rec.chip_size
    return _Faces(patches, m_chip, x, m, _warp_each(x, m, (s, s)))


def _chunk_call(method, params, patches, m_chip, seed: int = 0):
    """Returns (fn, args) of the per-face method's compiled chunk on these faces."""
    b, size = patches.shape[0], int(patches.shape[1])
    frames = base.still_frames(patches, m_chip)
    carry = base.init_carry(method, params, jax.random.split(jax.random.PRNGKey(seed), b), size)
    target = base.empty_target(method, params, b, size)
    return base.chunk_fn(method), (params, frames, carry, target)


def cloak_engine(batch: int, iters: int) -> tuple:
    """Returns (whole call, its iterations, parts) of the photo cloak ('mid', dlib)."""
    rec, params = recognise.recogniser_params("dlib")
    cfg = dataclasses.replace(cloak.preset("mid", rec), threshold=math.inf, max_iters=iters)
    f = _faces(rec, batch)
    call = _chunk_call(cloak.CloakMethod(rec, cfg), params, f.patches, f.m_chip)
    v, s, p = cfg.views, rec.chip_size, f.patches.shape[1]
    x, m = f.x, f.m
    m_views = jnp.repeat(m, v, axis=0).reshape(batch, v, 2, 3)
    chips = jax.vmap(jax.vmap(align.warp, (None, 0, None)), (0, 0, None))(x, m_views, (s, s))
    chips = chips.reshape(batch * v, s, s, 3)
    field = jnp.zeros((batch, s, s, 3), jnp.float32)

    def warp_views(xb, mb):  # each face's patch through its V views
        return jax.vmap(jax.vmap(align.warp, (None, 0, None)), (0, 0, None))(xb, mb, (s, s))

    def embed(c):
        return rec.apply(params, c)[0]

    def field_to_patch(z, mb):
        return jax.vmap(lambda zi, mi: align.warp_image(zi, align.invert(mi), (p, p)))(z, mb)

    ref = losses.ssim_reference(x)  # the engine computes the clean half once per face

    def dssim(a, b_):
        return losses.dssim(a, b_, reference=ref)

    opt = optax.adadelta(cfg.lr, rho=cfg.adadelta_rho, eps=cfg.adadelta_eps)

    def update(g, st, z):
        upd, st = opt.update(g, st, z)
        return jnp.clip(z + upd, -1.0, 1.0), st

    parts = [
        _fb_part("field warp chip->patch, fwd+bwd", 1, field_to_patch, field, m,
                 note="field 'chip': the optimised chip-space field carried to the patch"),
        _fb_part("anti-aliasing blur, fwd+bwd", 1, lambda xb, mb: jax.vmap(align.antialias)(
            xb, mb), x, m),
        _fb_part(f"chip warps patch->chip x{v} views, fwd+bwd", 1, warp_views, x, m_views),
        _fb_part(f"recogniser x{v} views, fwd+bwd", 1, embed, chips),
        Part(f"clean chip warps x{v} views, fwd", 1, warp_views, (x, m_views)),
        Part(f"recogniser x{v} clean views, fwd", 1, embed, (chips,)),
        Part("DSSIM budget, fwd", 1, dssim, (x, x)),
        _fb_part("DSSIM budget, fwd+bwd", 0, lambda a, b_: dssim(a, b_), x, x,
                 note="the backward pass runs only in iterations where a face is over budget "
                      "(losses.lazy); not counted"),
        Part("Adadelta update + clip", 1, update, (field, opt.init(field), field)),
    ]
    return call, iters, parts


def pmt_engine(batch: int, iters: int) -> tuple:
    """Returns (whole call, its iterations, parts) of PMT (dlib, 'enhanced')."""
    rec, params = recognise.recogniser_params("dlib")
    cfg = dataclasses.replace(pmt.preset(), iters=iters)
    f = _faces(rec, batch)
    call = _chunk_call(pmt.PmtMethod(rec, cfg), params, f.patches, f.m_chip)
    s, chips = rec.chip_size, f.chips
    m_aug = jnp.tile(jnp.asarray([[1.01, 0.01, 0.5], [-0.01, 1.01, 0.4]], jnp.float32),
                     (batch, 1, 1))

    def shallow(c):
        return losses.aggregate_layers(rec.shallow(params, c, cfg.layers), None,
                                       window=cfg.pool)

    smoother = losses.smooth(cfg.kernel, cfg.kernel_size)

    def step(g, xb):
        g, _ = smoother.update(g, smoother.init(g))
        return jnp.clip(xb - cfg.step * jnp.sign(g), 0.0, 1.0)

    parts = [
        _fb_part("augmentation warp, fwd+bwd", 1, lambda c, mb: _warp_each(c, mb, (s, s)),
                 chips, m_aug),
        Part("augmentation warp (clean), fwd", 1, lambda c, mb: _warp_each(c, mb, (s, s)),
             (chips, m_aug)),
        _fb_part(f"shallow recogniser ({cfg.layers} layers) + pooling, fwd+bwd", 1, shallow,
                 chips),
        Part(f"shallow recogniser ({cfg.layers} layers) + pooling (clean), fwd", 1, shallow,
             (chips,)),
        Part("gradient smoothing + sign step", 1, jax.vmap(step), (chips, chips)),
    ]
    return call, iters, parts


def mask_engine(batch: int, iters: int) -> tuple:
    """Returns (whole call, its iterations, parts) of the per-image mask key (dlib, b = 4)."""
    rec, params = recognise.recogniser_params("dlib")
    cfg = dataclasses.replace(mask.preset(), iters=iters)
    f = _faces(rec, batch)
    call = _chunk_call(mask.MaskMethod(rec, cfg), params, f.patches, f.m_chip)
    s, x, m, chips = rec.chip_size, f.x, f.m, f.chips
    logits = jnp.zeros(x.shape + (cfg.bits,), jnp.float32)
    tx = optax.adam(cfg.lr)

    def keyed(lg, xb):
        return losses.xor_low_bits(xb, losses.straight_through_bits(lg))

    def update(g, st, lg):
        upd, st = tx.update(g, st)
        return optax.apply_updates(lg, upd), st

    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    parts = [
        _fb_part(f"XOR of the {cfg.bits} low bits (straight-through), fwd+bwd", 1, keyed,
                 logits, x),
        _fb_part("chip warp patch->chip, fwd+bwd", 1, lambda xb, mb: _warp_each(xb, mb, (s, s)),
                 x, m),
        _fb_part("recogniser, fwd+bwd", 1, lambda c: rec.embed(params, c), chips),
        _fb_part("DSSIM budget, fwd+bwd", 1, losses.dssim, x, x),
        Part("Adam update", 1, update, (logits, tx.init(logits), logits)),
        Part("template: sensitivity map (once per face)", 1 / iters, lambda xb, mb, k: jax.vmap(
            lambda a, b_, c: mask.template(rec, params, a, b_, c, cfg))(xb, mb, k),
            (x, m, keys)),
    ]
    return call, iters, parts


def veil_engine(batch: int, iters: int) -> tuple:
    """Returns (whole call, its steps, parts) of making one veil from `batch` chips (dlib)."""
    rec, params = recognise.recogniser_params("dlib")
    cfg = veil.preset()
    s, chips = rec.chip_size, _faces(rec, batch).chips
    basis = rec.apply(params, chips)[0]
    weights = jnp.ones(batch, jnp.float32)
    state = veil.init_veil(jax.random.PRNGKey(0), s, cfg)
    call = (veil.make_steps(rec, cfg, iters), (params, state, chips, basis, weights))
    sigma = jnp.full((batch,), cfg.blur_views / 2, jnp.float32)
    blended = cfg.alpha * chips + (1 - cfg.alpha) * state.veil  # x' = alpha x + (1 - alpha) v
    tx = veil._optimiser(cfg)
    opt = tx.init(state.veil)

    def update(g, st, v):
        upd, st = tx.update(g, st)
        return jnp.clip(v + upd, 0.0, 1.0), st

    parts = [
        _fb_part("random blur of each veiled chip, fwd+bwd", 1, jax.vmap(veil.blur), blended,
                 sigma),
        _fb_part("recogniser, fwd+bwd", 1, lambda c: rec.apply(params, c)[0], blended),
        _fb_part("block variance of the veil, fwd+bwd", 1, lambda v: losses.block_variance(
            v[None]), state.veil),
        Part("MI-FGSM update", 1, update, (state.veil, opt, state.veil)),
    ]
    return call, iters, parts


# ----------------------------------------------------------------------------------------------
# The whole call's trace, by part

# (part, words of its ops' names): named scopes of the engines, the recognisers' Flax modules,
# the library functions' jit names. The first match wins.
SCOPES = (
    ("recogniser", ("recogniser", "dlibresnet", "facenet", "shallow")),
    ("SSIM / DSSIM", ("ssim",)),
    ("anti-aliasing blur", ("antialias",)),
    ("chip warps", ("chip_warp",)),
    ("field warp chip->patch", ("field",)),
    ("optimiser update", ("update",)),
    ("JPEG", ("jpeg",)),
    ("blur", ("blur",)),
    ("template", ("template", "sensitivity")),
    ("augmentation warps", ("augment",)),
    ("XOR key", ("xor",)),
    ("random views and keys", ("threefry", "_uniform", "jitter", "random")),
)


def _op_names(hlo_text: str) -> dict:
    """Returns {HLO instruction name: its op_name metadata} of a compiled module's text."""
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text,
                         re.MULTILINE):
        out[m.group(1)] = m.group(2)
    return out


def _part_of(op_name: str) -> str:
    low = op_name.lower()
    for part, words in SCOPES:
        if any(w in low for w in words):
            return part
    return "rest (loop, clip, quantise, selects, copies)"


def trace_breakdown(exe, args: tuple) -> dict:
    """Returns the time of one traced call split by part and by forward / backward pass.

    XLA's CPU runtime records every executed thunk with its HLO instruction; the instruction's
    op_name (named scopes, `transpose(...)` for backward passes) names the part. A loop thunk
    (while, conditional, call) is left out: its body's thunks are counted.
    """
    names = _op_names(exe.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*args))
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        files = list(Path(tmp).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(files[0]))
    spent: dict = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is None or op.split(".")[0] in ("while", "conditional", "call"):
                    continue
                op_name = names.get(op, "")
                key = (_part_of(op_name), "backward" if "transpose(" in op_name else "forward")
                spent[key] = spent.get(key, 0.0) + event.duration_ns * 1e-9
    total = sum(spent.values())
    rows = [{"part": p, "pass": d, "s": round(v, 4), "share": round(v / total, 3)}
            for (p, d), v in sorted(spent.items(), key=lambda kv: -kv[1])]
    return {"traced_call_s": round(wall, 3), "thunk_s": round(total, 3), "parts": rows}


# ----------------------------------------------------------------------------------------------
# Host work of the photo pipeline


def host_work(rec, photos: list[Path], size: int) -> dict:
    """Returns seconds per face of decode, detection, crop, encode and transfers.

    Every photo goes through twice: the second pass is reported; the first, whose detection
    compiles the detector's programs for each new photo size, is reported apart.
    """
    def one_pass(tmp: str) -> tuple[dict, int]:
        t = dict.fromkeys(("decode", "detect", "crop", "to_device", "from_device",
                           "encode_png", "encode_jpeg"), 0.0)
        n = 0
        for path in photos:
            marks = [time.perf_counter()]
            img = image_io.read_image(path)
            marks.append(time.perf_counter())
            found = face_pipeline.find_photo_faces(img)
            marks.append(time.perf_counter())
            if not len(found.boxes):
                continue
            crops = np.stack([face_pipeline.crop_patches(img[None], face_pipeline.plan_faces(
                lms[None], np.ones(1, bool), rec, size=size).offsets, size)[0]
                for lms in found.landmarks])
            marks.append(time.perf_counter())
            on = jax.block_until_ready(jax.device_put(crops))
            marks.append(time.perf_counter())
            np.asarray(jax.device_get(on + 0))
            marks.append(time.perf_counter())
            image_io.write_image(Path(tmp) / "o.png", img, overwrite=True)
            marks.append(time.perf_counter())
            image_io.write_image(Path(tmp) / "o.jpg", img, overwrite=True)
            marks.append(time.perf_counter())
            n += len(found.boxes)
            for k, a, b in zip(t, marks, marks[1:]):
                t[k] += b - a
        return {k: round(v / max(n, 1), 5) for k, v in t.items()}, n

    with tempfile.TemporaryDirectory() as tmp:
        first, n = one_pass(tmp)
        steady, _ = one_pass(tmp)
    return {"faces": n, "photos": len(photos), "seconds_per_face": steady,
            "seconds_per_face_first_pass": first}


# ----------------------------------------------------------------------------------------------


def profile(engine: str, *, batch: int, iters: int, repeats: int, host_photos: int) -> dict:
    """Returns the profile report of one engine (module docstring)."""
    build = {"cloak": cloak_engine, "veil": veil_engine, "pmt": pmt_engine,
             "mask": mask_engine}[engine]
    (fn, args), iters, parts = build(batch, iters)
    t0 = time.perf_counter()
    exe = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    def fresh():  # a donated carry must be copied for every call
        return jax.block_until_ready(jax.tree.map(jnp.copy, args))

    jax.block_until_ready(exe(*fresh()))
    times = []
    for _ in range(repeats):
        a = fresh()
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*a))
        times.append(time.perf_counter() - t0)
    call_s = float(np.median(times))
    per_iter = call_s / iters
    trace = trace_breakdown(exe, fresh())
    rows, counted = [], 0.0
    for part in parts:
        r = _timed(part.fn, part.args, repeats)
        share = r["call_s"] * part.per_iteration
        counted += share
        rows.append({"part": part.name, "per_iteration": part.per_iteration,
                     "call_ms": round(1e3 * r["call_s"], 3),
                     "ms_per_iteration": round(1e3 * share, 3),
                     "share_of_iteration": round(share / per_iter, 3),
                     "compile_s": r["compile_s"], "gflops": r["gflops"],
                     **({"note": part.note} if part.note else {})})
        jax.clear_caches()  # many small compilations: keep the process's code maps bounded
    dev = jax.devices()[0]
    rec = recognise.recogniser_params("dlib")[0]
    photos = sorted(p for p in cloak_throughput.DATA.rglob("*")
                    if p.suffix.lower() in recognise.PHOTO_SUFFIXES)[:host_photos]
    size = int(args[1].patch.shape[-2]) if engine != "veil" else rec.chip_size
    return {
        "engine": engine, "patch_size": size, "device": f"{dev.platform}:{dev.device_kind}", "jax": jax.__version__,
        "cpu_count": len(os.sched_getaffinity(0)), "batch": batch, "iterations": iters,
        "compile_s": round(compile_s, 2), "call_s": [round(t, 3) for t in times],
        "ms_per_iteration": round(1e3 * per_iter, 2),
        "gflops_per_call": None if not cost or "flops" not in cost
        else round(cost["flops"] / 1e9, 1),
        "trace": trace,
        "parts_alone": rows,
        "rest_ms_per_iteration": round(1e3 * (per_iter - counted), 2),
        "rest_share": round(1 - counted / per_iter, 3),
        "host": host_work(rec, photos, size) if photos else "no photos under " + str(
            cloak_throughput.DATA),
    }


def _define_flags() -> None:
    flags.DEFINE_enum("engine", "cloak", ENGINES, "Engine to profile.")
    flags.DEFINE_integer("batch", 8, "Faces per compiled call (chips per veil).")
    flags.DEFINE_integer("iters", 10, "Iterations per face in the timed call.")
    flags.DEFINE_integer("repeats", 3, "Timed calls after a warm-up (median reported).")
    flags.DEFINE_integer("host_photos", 8, "Photos the host-work timing reads.")
    flags.DEFINE_string("json", None, "Write the JSON report here too.")


def main(argv) -> None:
    """Prints the JSON report of `profile`."""
    del argv
    o = flags.FLAGS
    report = profile(o.engine, batch=o.batch, iters=o.iters, repeats=o.repeats,
                     host_photos=o.host_photos)
    benchmarks.emit(report, o.json)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
