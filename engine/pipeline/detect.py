"""MTCNN face detection as one static-shape, batched, jit-compiled function.

`detect(frames)` finds faces with their 5 landmarks in a batch of same-sized frames with
exactly the semantics of facenet-pytorch's `MTCNN.detect` (facenet-pytorch 2.6.0, its
`detect_face`), the reference implementation we check parity against:

1. P-Net on every pyramid level (area-resampled, see `faceveil.engine.pipeline.pyramid`); cells with
   p >= t0 become 12x12 boxes; greedy NMS (IoU > 0.5 suppresses) per level, then 0.7 across
   levels; box regression with w = x2 - x1; squared up ("rerec").
2. R-Net on 24x24 area-resized crops img[y-1:ey, x-1:ex]; keep p > t1; NMS 0.7 on the input
   boxes; regression with w = x2 - x1 + 1; squared up.
3. O-Net on 48x48 crops; keep p > t2; landmarks from the input box (w = x2 - x1 + 1); regression;
   NMS 0.7 with the "Min" overlap (intersection over the smaller area, +1 pixel areas).

Static shapes: each stage keeps a fixed number of candidate slots plus a validity mask (top-k
by score, masked greedy NMS), so the whole pipeline compiles once per (batch, H, W, dtype,
options). P-Net and the slot bookkeeping are vmapped over frames; R-Net and O-Net run on the
valid candidates of the whole batch packed together, in fixed-size chunks, and greedy NMS walks
only the valid prefix of its score-sorted slots: both are loops with data-dependent trip counts
over static shapes, so their cost follows the number of candidates rather than the number of
slots. The caps (`max_proposals` per level, `max_refine` R-Net inputs, `max_verify` R-Net
passes) only matter when a stage has more candidates than slots; then the lowest-scored ones
are dropped. On the shared test photos the defaults hold every candidate (up to 1068 R-Net
inputs) except on one pyramid level of shea_whigham1.jpg (1176 cells pass P-Net for 1024
slots), whose final faces are still identical to facenet-pytorch's.

Differences from facenet-pytorch, on purpose: every candidate is cropped (facenet-pytorch skips
empty crops but then misaligns its scores with its boxes; here an empty crop is simply invalid),
and the output is sorted by score (facenet-pytorch's `select_largest` sorts by box area).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from faceveil.engine.pipeline import pyramid
from faceveil.models import mtcnn

# Full float32 precision in the nets, so results agree with the CPU reference on any backend
# (TF32/bf16 convolutions on GPUs move probabilities by ~1e-3). The nets are small.
_PRECISION = lax.Precision.HIGHEST
_PNET = mtcnn.PNet(precision=_PRECISION)
_RNET = mtcnn.RNet(precision=_PRECISION)
_ONET = mtcnn.ONet(precision=_PRECISION)
# Crops per chunk of the R-Net / O-Net loops (candidates of the whole batch packed together).
_RNET_CHUNK = 128
_ONET_CHUNK = 32


class Detections(NamedTuple):
    """Faces found in a batch of frames; slots sorted by score, invalid slots last."""

    boxes: jax.Array  # [N, K, 4] float32 (x1, y1, x2, y2) frame pixels, not clipped to the frame
    scores: jax.Array  # [N, K] float32 O-Net face probability (0 in invalid slots)
    landmarks: jax.Array  # [N, K, 5, 2] float32 (x, y): left eye, right eye, nose, mouth l, r
    valid: jax.Array  # [N, K] bool


class _Config(NamedTuple):
    height: int
    width: int
    min_face_size: float
    thresholds: tuple[float, float, float]
    factor: float
    max_faces: int
    max_proposals: int
    max_refine: int
    max_verify: int


# ----------------------------------------------------------------------------- box arithmetic


def overlap(box: jax.Array, boxes: jax.Array, *, mode: str = "union",
            plus_one: bool = False) -> jax.Array:
    """Returns the overlap of `box` [..., 1, 4] with each of `boxes` [..., K, 4] -> [..., K].

    mode "union" is IoU (torchvision.ops.nms); "min" is intersection over the smaller area
    (facenet-pytorch's numpy NMS). plus_one counts areas as (x2 - x1 + 1) * (y2 - y1 + 1).
    Written operation by operation as the references, so float32 results agree bit for bit.
    """
    one = 1.0 if plus_one else 0.0
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    bx1, by1, bx2, by2 = (box[..., i] for i in range(4))
    area = (x2 - x1 + one) * (y2 - y1 + one)
    barea = (bx2 - bx1 + one) * (by2 - by1 + one)
    iw = jnp.maximum(jnp.minimum(bx2, x2) - jnp.maximum(bx1, x1) + one, 0.0)
    ih = jnp.maximum(jnp.minimum(by2, y2) - jnp.maximum(by1, y1) + one, 0.0)
    inter = iw * ih
    if mode == "min":
        return inter / jnp.minimum(barea, area)
    return inter / (barea + area - inter)


def greedy_nms(boxes: jax.Array, valid: jax.Array, threshold: float, *, mode: str = "union",
               plus_one: bool = False) -> jax.Array:
    """Returns the [..., K] bool mask that greedy NMS keeps, for boxes sorted by score.

    Args:
      boxes: [..., K, 4] (x1, y1, x2, y2), sorted by descending score along K.
      valid: [..., K] bool; invalid boxes are neither kept nor suppress anything.
      threshold: a box is dropped when its overlap with a kept, higher-scored box is > this.
      mode: "union" (IoU, torchvision.ops.nms) or "min" (intersection over the smaller area).
      plus_one: areas as (x2 - x1 + 1) * (y2 - y1 + 1), as in facenet-pytorch's numpy NMS.
    """
    k = boxes.shape[-2]
    rank = jnp.arange(k)
    # Visit boxes in score order up to the last valid one only (valid boxes usually come
    # first, so the loop runs as many steps as there are candidates, not K); each step is one
    # row of overlaps, so memory stays O(K) instead of a K x K matrix.
    n = jnp.max(jnp.where(valid, rank + 1, 0))

    def step(i, keep):
        box = lax.dynamic_slice_in_dim(boxes, i, 1, axis=-2)  # [..., 1, 4]
        kept = lax.dynamic_slice_in_dim(keep, i, 1, axis=-1)  # [..., 1]
        hit = overlap(box, boxes, mode=mode, plus_one=plus_one) > threshold
        return keep & ~(hit & kept & (rank > i))

    return lax.fori_loop(0, n, step, valid)


def _regress(boxes: jax.Array, reg: jax.Array, plus_one: bool) -> jax.Array:
    # Written term by term in facenet-pytorch's order so the float32 rounding matches.
    one = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    return jnp.stack([boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
                      boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h], axis=1)


def _square(boxes: jax.Array) -> jax.Array:
    # facenet-pytorch rerec: side max(w, h) without +1, same centre.
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = jnp.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return jnp.stack([x1, y1, x1 + side, y1 + side], axis=1)


def _crop_blocks(boxes: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Returns ([K, 4] int source blocks (r0, c0, r1, c1), [K] bool non-empty) of float boxes."""
    # facenet-pytorch `pad`: truncate to int, clamp x, y >= 1 and ex <= W, ey <= H, then slice
    # img[y - 1:ey, x - 1:ex] (1-based MATLAB corners, no zero padding).
    b = jnp.trunc(boxes).astype(jnp.int32)
    x, y = jnp.maximum(b[:, 0], 1), jnp.maximum(b[:, 1], 1)
    ex, ey = jnp.minimum(b[:, 2], width), jnp.minimum(b[:, 3], height)
    blocks = jnp.stack([y - 1, x - 1, ey, ex], axis=1)
    return blocks, (ey > y - 1) & (ex > x - 1)


def _rank(scores: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Returns the indices of the k best valid scores, best first (stable; invalid ones last)."""
    # Scores are probabilities in [0, 1]; -1 puts invalid slots after every valid one.
    return lax.top_k(jnp.where(valid, scores, -1.0), k)[1]


def _pad_to(a: jax.Array, n: int) -> jax.Array:
    """Returns `a` zero-padded (False for bool) along axis 0 to at least n entries."""
    return jnp.pad(a, ((0, max(n - a.shape[0], 0)),) + ((0, 0),) * (a.ndim - 1))


# ----------------------------------------------------------------------------- the three stages


def _propose(sat: jax.Array, pnet: dict, levels: tuple[pyramid.Level, ...], cfg: _Config):
    """Returns stage-1 (boxes [L,P,4], regression [L,P,4], scores [L,P], kept [L,P])."""
    out = []
    for lv in levels:
        x = mtcnn.normalise(pyramid.resample_level(sat, lv))[None]
        reg, probs = _PNET.apply({"params": pnet}, x)
        score = probs[0, :, :, 1].reshape(-1)
        k = min(cfg.max_proposals, score.shape[0])
        top, idx = lax.top_k(jnp.where(score >= cfg.thresholds[0], score, -1.0), k)
        gy, gx = idx // lv.grid[1], idx % lv.grid[1]
        cx, cy = jnp.asarray(lv.cell_x)[gx], jnp.asarray(lv.cell_y)[gy]
        boxes = jnp.stack([cx[:, 0], cy[:, 0], cx[:, 1], cy[:, 1]], axis=1)
        fields = (boxes, reg[0].reshape(-1, 4)[idx], top, top >= cfg.thresholds[0])
        pad = cfg.max_proposals - k
        out.append([jnp.pad(f, ((0, pad),) + ((0, 0),) * (f.ndim - 1)) for f in fields])
    boxes, reg, scores, valid = (jnp.stack(f) for f in zip(*out))
    keep = greedy_nms(boxes, valid, 0.5)  # per level: the leading axis is batched
    return boxes, reg, scores, keep


def _stage1(sat: jax.Array, pnet: dict, levels, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    """Returns one frame's R-Net input boxes [R, 4] and valid mask [R], valid boxes first."""
    boxes, reg, scores, keep = _propose(sat, pnet, levels, cfg)
    boxes, reg, scores, keep = (_pad_to(a.reshape(-1, *a.shape[2:]), cfg.max_refine)
                                for a in (boxes, reg, scores, keep))
    order = _rank(scores, keep, cfg.max_refine)
    boxes, reg, scores, valid = boxes[order], reg[order], scores[order], keep[order]
    valid = greedy_nms(boxes, valid, 0.7)  # across levels
    order = _rank(scores, valid, cfg.max_refine)  # pack survivors at the front for chunking
    boxes = _square(_regress(boxes[order], reg[order], plus_one=False))
    return boxes, valid[order]


def _stage2(boxes, valid, nonempty, reg, probs, cfg: _Config):
    """Returns one frame's O-Net input boxes [V, 4] and valid mask [V], valid boxes first."""
    score = probs[:, 1]
    valid = valid & nonempty & (score > cfg.thresholds[1])
    order = _rank(score, valid, cfg.max_verify)
    boxes, reg, score, valid = boxes[order], reg[order], score[order], valid[order]
    valid = greedy_nms(boxes, valid, 0.7)
    order = _rank(score, valid, cfg.max_verify)
    return _square(_regress(boxes[order], reg[order], plus_one=True)), valid[order]


def _stage3(boxes, valid, nonempty, reg, marks, probs, cfg: _Config) -> Detections:
    """Returns one frame's Detections from the O-Net outputs on its V input boxes."""
    score = probs[:, 1]
    valid = valid & nonempty & (score > cfg.thresholds[2])
    # Landmarks are relative to the O-Net input box, with +1 sizes (facenet-pytorch).
    bw = boxes[:, 2] - boxes[:, 0] + 1
    bh = boxes[:, 3] - boxes[:, 1] + 1
    px = bw[:, None] * marks[:, :5] + boxes[:, :1] - 1
    py = bh[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1
    marks = jnp.stack([px, py], axis=-1)  # [V, 5, 2]
    boxes = _regress(boxes, reg, plus_one=True)
    order = _rank(score, valid, boxes.shape[0])
    boxes, marks, score, valid = boxes[order], marks[order], score[order], valid[order]
    valid = greedy_nms(boxes, valid, 0.7, mode="min", plus_one=True)
    boxes, marks, score, valid = (_pad_to(a, cfg.max_faces) for a in (boxes, marks, score, valid))
    order = _rank(score, valid, cfg.max_faces)
    valid = valid[order]
    return Detections(
        boxes=jnp.where(valid[:, None], boxes[order], 0.0),
        scores=jnp.where(valid, score[order], 0.0),
        landmarks=jnp.where(valid[:, None, None], marks[order], 0.0),
        valid=valid,
    )


def _run_in_chunks(net, params, sat, boxes, valid, size: int, chunk: int):
    """Returns (outputs of `net` on the crops of boxes [N, K, 4], non-empty mask [N, K]).

    The valid boxes of all frames are packed together and the net runs on ceil(total valid /
    chunk) chunks (a loop with a data-dependent trip count over static-shape chunks), so the
    cost follows the number of candidates, not the number of slots; the outputs of invalid
    slots are zero, which no threshold passes.
    """
    n, k = valid.shape
    blocks, nonempty = _crop_blocks(boxes.reshape(n * k, 4), sat.shape[1] - 1, sat.shape[2] - 1)
    frame = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    flat_valid = valid.reshape(n * k)
    total = n * k + (-n * k) % chunk  # room for whole chunks
    order = jnp.argsort(~flat_valid, stable=True)  # valid slots first, in slot order
    order = jnp.pad(order, (0, total - n * k))  # padding slots redo slot 0 and are dropped
    out_shapes = jax.eval_shape(lambda x: net.apply({"params": params}, x),
                                jax.ShapeDtypeStruct((chunk, size, size, 3), jnp.float32))
    packed = tuple(jnp.zeros((total, *o.shape[1:]), o.dtype) for o in out_shapes)
    n_chunks = (jnp.sum(flat_valid) + chunk - 1) // chunk

    def body(i, packed):
        idx = lax.dynamic_slice_in_dim(order, i * chunk, chunk)
        crops = pyramid.crop_resample(sat, blocks[idx], size, frame=frame[idx])
        ys = net.apply({"params": params}, mtcnn.normalise(crops))
        return tuple(lax.dynamic_update_slice_in_dim(p, y, i * chunk, axis=0)
                     for p, y in zip(packed, ys))

    packed = lax.fori_loop(0, n_chunks, body, packed)
    inverse = jnp.argsort(order[:n * k], stable=True)  # slot s sits at packed[inverse[s]]
    outs = tuple(jnp.where(flat_valid.reshape((-1,) + (1,) * (p.ndim - 1)), p[inverse], 0)
                 .reshape(n, k, *p.shape[1:]) for p in packed)
    return outs, nonempty.reshape(n, k)


def _detect_batch(frames: jax.Array, params: dict, *, levels, cfg: _Config) -> Detections:
    """Returns the Detections of a batch of [N, H, W, 3] frames."""
    sat = jax.vmap(pyramid.summed_area_table)(_to_pixels(frames))
    boxes, valid = jax.vmap(_stage1, in_axes=(0, None, None, None))(
        sat, params["pnet"], levels, cfg)
    (reg, probs), nonempty = _run_in_chunks(_RNET, params["rnet"], sat, boxes, valid, 24,
                                            _RNET_CHUNK)
    boxes, valid = jax.vmap(_stage2, in_axes=(0, 0, 0, 0, 0, None))(
        boxes, valid, nonempty, reg, probs, cfg)
    (reg, marks, probs), nonempty = _run_in_chunks(_ONET, params["onet"], sat, boxes, valid, 48,
                                                   _ONET_CHUNK)
    return jax.vmap(_stage3, in_axes=(0, 0, 0, 0, 0, 0, None))(
        boxes, valid, nonempty, reg, marks, probs, cfg)


def _to_pixels(frames: jax.Array) -> jax.Array:
    """Returns 0..255 integer-valued pixels of uint8 frames or float frames in [0, 1]."""
    if frames.dtype == jnp.uint8:
        return frames
    if jnp.issubdtype(frames.dtype, jnp.integer):
        return jnp.clip(frames, 0, 255).astype(jnp.uint8)
    # MTCNN is defined on 8-bit pixels (and the SAT resampling relies on whole numbers).
    return jnp.round(jnp.clip(frames.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


_TRACES = [0]  # how often a detector was traced; a test checks that a second call is not


@functools.lru_cache(maxsize=16)
def _compiled(cfg: _Config):
    """Returns the jitted, frame-vmapped detector for one frame size and configuration."""
    levels = pyramid.plan_pyramid(cfg.height, cfg.width, cfg.min_face_size, cfg.factor)
    if not levels:
        raise ValueError(f"frame {cfg.height}x{cfg.width} is smaller than 12 pixels after "
                         f"scaling for min_face_size={cfg.min_face_size}")

    def run(frames, params):
        _TRACES[0] += 1
        return _detect_batch(frames, params, levels=levels, cfg=cfg)

    return jax.jit(run)


@functools.lru_cache(maxsize=1)
def default_params() -> dict:
    """Returns the MTCNN params from the weight store (run `faceveil fetch-weights` first)."""
    return mtcnn.load()


def detect(
    frames: ArrayLike,
    params: dict | None = None,
    *,
    min_face_size: float = 20,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    factor: float = 0.709,
    max_faces: int = 16,
    max_proposals: int = 1024,
    max_refine: int = 2048,
    max_verify: int = 256,
) -> Detections:
    """Returns the faces (boxes, scores, 5 landmarks, valid mask) in each of N same-sized frames.

    The whole batch runs as one compiled call; a later call with the same batch size, frame
    size, dtype and options reuses it without compiling again.

    Args:
      frames: [N, H, W, 3] RGB, uint8 0..255, or float in [0, 1] (faceveil's convention; it
        is scaled by 255 and rounded to 8-bit levels, as MTCNN is defined on 8-bit pixels).
        A single [H, W, 3] frame is accepted too and gets a batch axis of 1.
      params: {'pnet', 'rnet', 'onet'} from `faceveil.models.mtcnn`; default: the weight store.
      min_face_size: smallest face side searched for, in pixels.
      thresholds: face-probability thresholds of P-Net (>=), R-Net (>) and O-Net (>).
      factor: pyramid scale step.
      max_faces: output slots per frame (the best-scored faces are kept).
      max_proposals: P-Net candidate slots per pyramid level (before NMS).
      max_refine: R-Net input slots per frame.
      max_verify: slots per frame for the R-Net passes (p > t1) that enter the R-Net NMS and
        O-Net (at most max_refine).

    Returns:
      Detections with arrays [N, max_faces, ...]; faces sorted by score, invalid slots last.
    """
    frames = jnp.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {frames.shape}")
    if min(max_faces, max_proposals, max_refine, max_verify) < 1:
        raise ValueError("max_faces, max_proposals, max_refine and max_verify must be >= 1")
    refine = int(max_refine)
    verify = min(int(max_verify), refine)  # R-Net passes come out of the R-Net slots
    cfg = _Config(int(frames.shape[1]), int(frames.shape[2]), float(min_face_size),
                  tuple(float(t) for t in thresholds), float(factor), int(max_faces),
                  int(max_proposals), refine, verify)
    params = default_params() if params is None else params
    return _compiled(cfg)(frames, params)


def trace_count() -> int:
    """Returns how many times a detector was traced (compiled) in this process."""
    return _TRACES[0]


def to_lists(det: Detections) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Returns per frame (boxes [n, 4], scores [n], landmarks [n, 5, 2]) numpy arrays of valid faces."""
    boxes, scores, marks, valid = (np.asarray(a) for a in det)
    return [(boxes[i][valid[i]], scores[i][valid[i]], marks[i][valid[i]])
            for i in range(valid.shape[0])]


def largest_face(det: Detections, i: int) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Returns (box [4], score, landmarks [5, 2]) of frame i's largest valid face, or None."""
    boxes, scores, marks = to_lists(det)[i]
    if len(scores) == 0:
        return None
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    j = int(np.argmax(area))
    return boxes[j], float(scores[j]), marks[j]
