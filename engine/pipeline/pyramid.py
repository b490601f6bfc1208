"""Static image pyramid and exact area resampling for MTCNN, from a summed-area table.

Everything that depends only on the frame size is planned once on the host (`plan_pyramid`):
the scales, each level's size, the source row/column ranges that torch's
`interpolate(mode="area")` (adaptive average pooling) averages for every output pixel, and the
P-Net cell boxes. On the device, a uint32 summed-area table (SAT) of the 8-bit frame gives any
such average exactly with four lookups: the sums are integers, so the wrap-around of uint32
arithmetic cancels in the differences (exact for any frame size; only one output pixel's source
block must sum below 2**32).

Data convention: frames are [H, W, 3] integer-valued 0..255 pixels (uint8 or any int/float
dtype holding whole numbers); outputs are float32 0..255 pixel values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

P_NET_CELL = 12  # P-Net receptive field (pixels of a pyramid level)
P_NET_STRIDE = 2  # P-Net output stride


class Level(NamedTuple):
    """One pyramid level, all host numpy (compile-time constants)."""

    scale: float
    size: tuple[int, int]  # (h, w) of the resampled level
    row_start: np.ndarray  # [h] int32, first source row averaged into each level row
    row_end: np.ndarray  # [h] int32, one past the last source row
    col_start: np.ndarray  # [w] int32
    col_end: np.ndarray  # [w] int32
    grid: tuple[int, int]  # (gh, gw) P-Net output cells
    cell_x: np.ndarray  # [gw, 2] float32 (x1, x2) frame-pixel box edges of each cell column
    cell_y: np.ndarray  # [gh, 2] float32 (y1, y2) of each cell row


def area_ranges(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (start, end) int32 source ranges of adaptive average pooling n_in -> n_out.

    Output i averages [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)), torch's
    adaptive_avg_pool formula, in exact integer arithmetic.
    """
    i = np.arange(n_out, dtype=np.int64)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    return start.astype(np.int32), end.astype(np.int32)


def pnet_grid(h: int, w: int) -> tuple[int, int]:
    """Returns the P-Net output size (gh, gw) for an (h, w) input."""

    def one(n: int) -> int:
        n = n - 2  # conv1 3x3 valid
        n = -(-(n - 2) // 2) + 1  # 2x2/2 max pool, ceil mode
        return n - 4  # conv2, conv3 3x3 valid

    return one(h), one(w)


def pyramid_scales(h: int, w: int, min_face_size: float, factor: float) -> list[float]:
    """Returns the MTCNN pyramid scales m * factor**k (m = 12 / min_face_size) for an (h, w) frame.

    Computed with the same running double-precision products as facenet-pytorch, so the level
    sizes int(h * s + 1) agree to the pixel.
    """
    m = 12.0 / min_face_size
    minl = min(h, w) * m
    scales, s = [], m
    while minl >= 12:
        scales.append(s)
        s = s * factor
        minl = minl * factor
    return scales


def _cell_edges(n: int, scale: float) -> np.ndarray:
    # floor((2i + 1) / s) and floor((2i + 12) / s) in float32 true division, exactly as torch
    # computes them. Done on the host on purpose: under jit, XLA turns a division by a constant
    # into a multiplication by its reciprocal, which is off by one pixel for ~10% of the cells.
    i = np.arange(n, dtype=np.float32)
    s = np.float32(scale)
    lo = np.floor((P_NET_STRIDE * i + 1) / s)
    hi = np.floor((P_NET_STRIDE * i + P_NET_CELL) / s)
    return np.stack([lo, hi], axis=1).astype(np.float32)


def plan_pyramid(h: int, w: int, min_face_size: float, factor: float) -> tuple[Level, ...]:
    """Returns the pyramid levels (sizes, resampling ranges, P-Net cell boxes) of an (h, w) frame."""
    levels = []
    for s in pyramid_scales(h, w, min_face_size, factor):
        hs, ws = int(h * s + 1), int(w * s + 1)
        rs, re = area_ranges(h, hs)
        cs, ce = area_ranges(w, ws)
        gh, gw = pnet_grid(hs, ws)
        levels.append(Level(s, (hs, ws), rs, re, cs, ce, (gh, gw),
                            _cell_edges(gw, s), _cell_edges(gh, s)))
    return tuple(levels)


def summed_area_table(image: ArrayLike, tile: int = 32) -> jax.Array:
    """Returns the [H+1, W+1, C] uint32 summed-area table of integer pixels [H, W, C].

    sat[r, c] = sum of image[:r, :c] modulo 2**32; block sums taken as differences are exact.
    """
    # Built from tile-sized prefix sums done as float32 matmuls with a triangular 0/1 matrix
    # (exact: every partial sum is an integer below 255 * tile**2 < 2**24), joined across tiles
    # with uint32 adds. On CPU this is several times faster than two cumsums over the frame.
    x = jnp.asarray(image)
    h, w, c = x.shape
    hb, wb = -(-h // tile), -(-w // tile)
    x = jnp.pad(x.astype(jnp.float32), ((0, hb * tile - h), (0, wb * tile - w), (0, 0)))
    x = x.reshape(hb, tile, wb, tile, c)
    tri = np.tril(np.ones((tile, tile), np.float32))  # tri[i, k] = k <= i
    hi = lax.Precision.HIGHEST  # exact integers need full float32 products (no TF32/bf16)
    s = jnp.einsum("ik,akbjc->aibjc", tri, x, precision=hi)
    s = jnp.einsum("jl,aiblc->aibjc", tri, s, precision=hi).astype(jnp.uint32)
    right = s[:, :, :, -1]  # [hb, tile, wb, c] tile sums of rows <= i
    band = s + (jnp.cumsum(right, axis=2) - right)[:, :, :, None]  # + tiles to the left
    bottom = band[:, -1]  # [hb, wb, tile, c]
    sat = band + (jnp.cumsum(bottom, axis=0) - bottom)[:, None]  # + tile rows above
    sat = sat.reshape(hb * tile, wb * tile, c)[:h, :w]
    return jnp.pad(sat, ((1, 0), (1, 0), (0, 0)))


def resample_level(sat: jax.Array, level: Level) -> jax.Array:
    """Returns the [h, w, C] float32 area-resampled level (torch interpolate mode='area').

    Separable lookups: first the row differences of the SAT for every output row, then the
    column differences of those, so the cost is about one pass over the frame per level.
    """
    rows = jnp.take(sat, level.row_end, axis=0) - jnp.take(sat, level.row_start, axis=0)
    block = jnp.take(rows, level.col_end, axis=1) - jnp.take(rows, level.col_start, axis=1)
    count = np.outer(level.row_end - level.row_start, level.col_end - level.col_start)
    return block.astype(jnp.float32) / count.astype(np.float32)[:, :, None]


def crop_resample(sat: jax.Array, boxes: ArrayLike, size: int,
                  frame: ArrayLike | None = None) -> jax.Array:
    """Returns [K, size, size, C] float32 area-resized crops of integer boxes [K, 4].

    Each box is (r0, c0, r1, c1): the half-open source block rows [r0, r1), cols [c0, c1), as
    facenet-pytorch slices img[y - 1:ey, x - 1:ex]. Empty blocks are widened to one pixel here
    (the caller marks them invalid); indices are clipped to the frame.

    Args:
      sat: [H+1, W+1, C] summed-area table, or [N, H+1, W+1, C] for a batch with `frame`.
      boxes: [K, 4] int source blocks.
      size: output side.
      frame: [K] int index into the batch of `sat` for each box (only with a batched sat).
    """
    boxes = jnp.asarray(boxes, jnp.int32)
    if frame is None:
        sat = sat[None]
        frame = jnp.zeros(boxes.shape[:1], jnp.int32)
    h, w = sat.shape[1] - 1, sat.shape[2] - 1

    def ranges(lo, hi, limit):
        lo = jnp.clip(lo, 0, limit - 1)
        n = jnp.maximum(jnp.minimum(hi, limit) - lo, 1)
        i = jnp.arange(size, dtype=jnp.int32)
        start = lo[:, None] + (i * n[:, None]) // size
        end = lo[:, None] + ((i + 1) * n[:, None] + size - 1) // size
        return start, end  # [K, size] each

    rs, re = ranges(boxes[:, 0], boxes[:, 2], h)
    cs, ce = ranges(boxes[:, 1], boxes[:, 3], w)
    f = jnp.asarray(frame, jnp.int32)[:, None, None]

    def corner(r, c):  # [K, size, size, C]
        return sat[f, r[:, :, None], c[:, None, :]]

    block = corner(re, ce) - corner(rs, ce) - corner(re, cs) + corner(rs, cs)
    count = (re - rs)[:, :, None] * (ce - cs)[:, None, :]
    return block.astype(jnp.float32) / count.astype(jnp.float32)[..., None]
