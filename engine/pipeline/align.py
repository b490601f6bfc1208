"""Landmark alignment: least-squares similarity/affine transforms and differentiable warps.

Conventions: images float32 NHWC (or HWC for the unbatched functions), landmarks (x, y) in
pixels with pixel centres at integer coordinates (dlib's and OpenCV's convention). A transform
is a (2, 3) matrix M acting on homogeneous points: p_out = M @ [x, y, 1].

`warp(image, M, size)` samples `image` at M @ [u, v, 1] for every output pixel (u, v), so M maps
*output* (chip) coordinates to *input* (frame) coordinates. Sampling is bilinear and
differentiable with respect to the image's pixels (and to M); points outside the image read
`fill`. All functions are pure and jit-able; batch them with `jax.vmap`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from faceveil.losses import filters


def estimate_similarity(src: ArrayLike, dst: ArrayLike) -> jax.Array:
    """Returns the (2, 3) similarity (rotation, uniform scale, translation) taking src to dst.

    Least squares over the point pairs, as dlib's find_similarity_transform (Umeyama) without
    reflection: with a = s cos t, b = s sin t the model x' = a x - b y + tx, y' = b x + a y + ty
    is linear in (a, b, tx, ty), and minimising over it equals minimising over (s, t, tx, ty).

    Args:
      src: [K, 2] points (K >= 2).
      dst: [K, 2] points.
    """
    src = jnp.asarray(src, jnp.float32)
    dst = jnp.asarray(dst, jnp.float32)
    x, y = src[:, 0], src[:, 1]
    one, zero = jnp.ones_like(x), jnp.zeros_like(x)
    rows_x = jnp.stack([x, -y, one, zero], axis=1)
    rows_y = jnp.stack([y, x, zero, one], axis=1)
    a_mat = jnp.concatenate([rows_x, rows_y], axis=0)
    rhs = jnp.concatenate([dst[:, 0], dst[:, 1]])
    a, b, tx, ty = _lstsq(a_mat, rhs)
    return jnp.array([[a, -b, tx], [b, a, ty]])


def estimate_affine(src: ArrayLike, dst: ArrayLike) -> jax.Array:
    """Returns the (2, 3) affine transform taking src to dst in the least-squares sense.

    Args:
      src: [K, 2] points (K >= 3, not collinear).
      dst: [K, 2] points.
    """
    src = jnp.asarray(src, jnp.float32)
    dst = jnp.asarray(dst, jnp.float32)
    homo = jnp.concatenate([src, jnp.ones_like(src[:, :1])], axis=1)  # [K, 3]
    cols = jax.vmap(lambda d: _lstsq(homo, d), in_axes=1)(dst)  # [2, 3]
    return cols


def _lstsq(a_mat: jax.Array, rhs: jax.Array) -> jax.Array:
    # Columns are scaled to unit norm first: raw pixel coordinates (~1e3) beside unit columns
    # make the system badly conditioned in float32; the SVD-based pinv of a K x 4 matrix is cheap.
    scale = jnp.maximum(jnp.linalg.norm(a_mat, axis=0), 1e-12)
    sol = jnp.linalg.pinv(a_mat / scale) @ rhs
    return sol / scale


def apply_transform(m: ArrayLike, points: ArrayLike) -> jax.Array:
    """Returns points [..., 2] mapped by the (2, 3) transform m."""
    m = jnp.asarray(m)
    points = jnp.asarray(points)
    return points @ m[:, :2].T + m[:, 2]


def invert(m: ArrayLike) -> jax.Array:
    """Returns the inverse of a (2, 3) affine transform."""
    m = jnp.asarray(m)
    lin_inv = jnp.linalg.inv(m[:, :2])
    return jnp.concatenate([lin_inv, -(lin_inv @ m[:, 2])[:, None]], axis=1)


def compose(m_outer: ArrayLike, m_inner: ArrayLike) -> jax.Array:
    """Returns the (2, 3) transform p -> m_outer(m_inner(p))."""
    m_outer, m_inner = jnp.asarray(m_outer), jnp.asarray(m_inner)
    lin = m_outer[:, :2] @ m_inner[:, :2]
    return jnp.concatenate([lin, (m_outer[:, :2] @ m_inner[:, 2] + m_outer[:, 2])[:, None]], 1)


def sample_bilinear(image: jax.Array, xs: jax.Array, ys: jax.Array, fill: float = 0.0):
    """Returns image [H, W, C] sampled at float positions (xs, ys) of any shape -> [..., C].

    Each of the four neighbours outside the image contributes `fill`, so a point half a pixel
    past the border blends towards `fill` the way zero padding does.
    """
    h, w = image.shape[0], image.shape[1]
    x0 = jnp.floor(xs)
    y0 = jnp.floor(ys)
    fx = (xs - x0)[..., None]
    fy = (ys - y0)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    def tap(yi, xi):
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        v = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
        return jnp.where(inside[..., None], v, jnp.asarray(fill, image.dtype))

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def warp(image: ArrayLike, m: ArrayLike, size: tuple[int, int], fill: float = 0.0) -> jax.Array:
    """Returns the [size_h, size_w, C] image whose pixel (u, v) is `image` at m @ [u, v, 1].

    Args:
      image: [H, W, C] float image.
      m: (2, 3) transform from output pixel coordinates to input pixel coordinates.
      size: (height, width) of the output.
      fill: value read outside the input image.
    """
    xs, ys = _grid(jnp.asarray(m, jnp.float32), size)
    return sample_bilinear(jnp.asarray(image), xs, ys, fill)


def _grid(m: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Returns (xs, ys) [size_h, size_w]: where each output pixel of `size` falls under m."""
    out_h, out_w = size
    v, u = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32),
                        jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
    return m[0, 0] * u + m[0, 1] * v + m[0, 2], m[1, 0] * u + m[1, 1] * v + m[1, 2]


def warp_image(image: ArrayLike, m: ArrayLike, size: tuple[int, int],
               fill: float = 0.0) -> jax.Array:
    """Returns `warp(image, m, size, fill)`, differentiable with respect to the image only.

    The value is warp's to the bit. The gradient is one scatter-add of the four taps' weighted
    cotangents (autodiff of the gather builds four masked, transposed copies of the output
    first, several times slower on XLA's CPU backend); `m` gets no gradient.
    """
    xs, ys = _grid(lax.stop_gradient(jnp.asarray(m, jnp.float32)), size)
    return _sample_image(jnp.asarray(image), xs, ys, fill)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sample_image(image, xs, ys, fill):
    return sample_bilinear(image, xs, ys, fill)


def _sample_image_fwd(image, xs, ys, fill):
    return sample_bilinear(image, xs, ys, fill), (image.shape, xs, ys)


def _sample_image_bwd(fill, res, g):
    del fill
    shape, xs, ys = res
    h, w, c = shape
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    fx, fy = xs - x0, ys - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    grad = jnp.zeros((h * w, c), g.dtype)
    # One scatter-add per tap: stacking the four taps' updates first costs a copy of 4x the
    # output's size.
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                       (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yi, xi = y0 + dy, x0 + dx
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(-1)
        grad = grad.at[index].add((jnp.where(inside, wt, 0.0)[..., None] * g).reshape(-1, c))
    return grad.reshape(shape), jnp.zeros_like(xs), jnp.zeros_like(ys)


_sample_image.defvjp(_sample_image_fwd, _sample_image_bwd)


def footprint(m: ArrayLike, out_size: int, source_size: int):
    """Returns (xs, ys, inside), each [out, out]: where each output pixel falls in a square source.

    `m` maps output pixel coordinates to source pixel coordinates (as `warp` takes it);
    `inside` marks the output pixels whose position lies within the source's pixel centres,
    e.g. the patch pixels a chip covers (m: patch -> chip).
    """
    m = jnp.asarray(m, jnp.float32)
    v, u = jnp.meshgrid(jnp.arange(out_size, dtype=jnp.float32),
                        jnp.arange(out_size, dtype=jnp.float32), indexing="ij")
    xs = m[0, 0] * u + m[0, 1] * v + m[0, 2]
    ys = m[1, 0] * u + m[1, 1] * v + m[1, 2]
    last = source_size - 1.0
    return xs, ys, (xs >= 0.0) & (xs <= last) & (ys >= 0.0) & (ys <= last)


def antialias(image: ArrayLike, m: ArrayLike, radius: int = 6) -> jax.Array:
    """Returns image [H, W, C] blurred so that `warp(image, m, ...)` does not alias.

    Bilinear sampling at a scale s > 1 (input pixels per output pixel) reads only the pixels
    next to the sample points: a perturbation optimised through it lands on exactly those
    pixels and vanishes when the alignment moves by a pixel. A Gaussian of sigma
    max(0, (s - 1) / 2) (scikit-image's choice for resizing) first spreads every input pixel
    over its neighbours. s is the geometric mean of m's axis scales; the kernel is truncated
    at `radius` (sigma up to ~radius / 3, i.e. s up to ~5, is exact). No blur when s <= 1.
    The blur runs as banded matrix products (`faceveil.losses.filters`), whose gradient is
    cheap on every backend.
    """
    image = jnp.asarray(image)
    m = jnp.asarray(m, jnp.float32)
    s = jnp.sqrt(jnp.abs(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]))
    sigma = jnp.maximum((s - 1.0) / 2.0, 1e-3)  # at 1e-3 the kernel is exactly [.., 0, 1, 0, ..]
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (taps / sigma) ** 2)
    k = k / k.sum()
    return filters.separable_same(image, k, axes=(0, 1))


def chip_transform(landmarks: ArrayLike, template: ArrayLike, aspect: float = 1.0) -> jax.Array:
    """Returns the (2, 3) transform from chip pixels to frame pixels for one face.

    A similarity fitted from the template to the landmarks; with `aspect` != 1 the fit is made
    in unsquashed chip coordinates (y * aspect) and the chip squashes the face's height by
    `aspect`, for recognisers trained on crops taller than wide resized to a square.

    Args:
      landmarks: [5, 2] detected landmarks in the frame.
      template: [5, 2] where those landmarks should land in the chip.
      aspect: height/width of the frame region that one square chip covers.
    """
    stretch = jnp.array([1.0, aspect], jnp.float32)
    m = estimate_similarity(jnp.asarray(template, jnp.float32) * stretch, landmarks)
    return m * jnp.array([1.0, aspect, 1.0], jnp.float32)


def extract_chip(frame: ArrayLike, landmarks: ArrayLike, template: ArrayLike, size: int,
                 aspect: float = 1.0):
    """Returns the aligned [size, size, C] chip of the face with these landmarks."""
    return warp(frame, chip_transform(landmarks, template, aspect), (size, size))


def paste(frame: ArrayLike, chip: ArrayLike, m_chip_to_frame: ArrayLike) -> jax.Array:
    """Returns `frame` with the chip's content written back where the chip was taken from.

    Each frame pixel inside the chip's footprint is replaced by the chip sampled at the
    inverse transform; the footprint's border blends with the frame (the warped coverage of an
    all-ones chip is the blending weight), so pasting a chip taken from the same frame returns
    the frame up to interpolation.
    """
    frame = jnp.asarray(frame)
    chip = jnp.asarray(chip)
    m_inv = invert(m_chip_to_frame)
    h, w = frame.shape[:2]
    back = warp(chip, m_inv, (h, w))
    cover = warp(jnp.ones(chip.shape[:2] + (1,), frame.dtype), m_inv, (h, w))
    cover = jnp.clip(cover, 0.0, 1.0)
    return frame * (1 - cover) + back * cover


def paste_delta(frame: ArrayLike, chip_delta: ArrayLike, m_chip_to_frame: ArrayLike):
    """Returns `frame` plus a chip-space perturbation warped back into frame space."""
    m_inv = invert(m_chip_to_frame)
    frame = jnp.asarray(frame)
    return frame + warp(jnp.asarray(chip_delta), m_inv, frame.shape[:2])
