"""Differentiable approximation of baseline JPEG (libjpeg, 4:2:0) for jit-compiled loops.

`jpeg(image, quality)` returns what encoding `image` with Pillow's defaults
(`Image.save(format="JPEG", quality=q)`: IJG-scaled Annex K tables, 4:2:0 chroma) and decoding
it again (libjpeg's fancy upsampling) gives, up to libjpeg's integer arithmetic. `quality` is
traced, so one compilation serves every quality; `offset` lines the 8x8 / 16x16 blocks up
with those of the full photo that `image` was cut from.

Rounding of the quantised DCT coefficients is straight-through (forward round(x), gradient
identity) rather than the cubic round(x) + (x - round(x))^3 of Shin & Song 2017: the forward
value is then exactly libjpeg's, not off by up to 1/8 of a quantisation step, and the gradient
does not vanish for the many coefficients that sit near an integer (all the high frequencies
quantised to 0), which would starve a sign-step attack of signal (BPDA, Athalye et al. 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["jpeg", "quant_tables"]

BLOCK = 8  # DCT block side
MCU = 16  # 4:2:0 minimum coded unit: 16x16 luma pixels, one 8x8 block of each chroma
LEVEL = 128.0  # level shift and chroma offset, on the 0..255 sample scale
# Full float32 matmuls: TF32 / bf16 passes on accelerators would move coefficients across
# rounding boundaries.
HIGHEST = jax.lax.Precision.HIGHEST

# ITU-T T.81 Annex K tables K.1 (luminance) and K.2 (chrominance), in natural (row) order.
LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float32,
)
CHROMA_TABLE = np.array(
    [
        [17, 18, 24, 47, 99, 99, 99, 99],
        [18, 21, 26, 66, 99, 99, 99, 99],
        [24, 26, 56, 99, 99, 99, 99, 99],
        [47, 66, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
    ],
    np.float32,
)

# JFIF (T.871) full-range RGB -> YCbCr, rows Y, Cb, Cr; the inverse is the exact matrix inverse.
RGB_TO_YCC = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ],
    np.float64,
)
YCC_TO_RGB = np.linalg.inv(RGB_TO_YCC)


def _dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Returns the orthonormal DCT-II matrix D [n, n]: coefficients = D @ x, x = D.T @ c."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


DCT = _dct_matrix()


def quant_tables(quality: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Returns the (luma, chroma) [8, 8] quantisation tables libjpeg uses at `quality`.

    IJG scaling as in libjpeg's jpeg_set_quality(q, force_baseline=TRUE): integer 5000 / q
    below 50, else 200 - 2q; entries floor((base * scale + 50) / 100) clipped to [1, 255].
    The floors keep integer qualities bit-exact; the tables carry no gradient (none is needed
    with respect to the quality).
    """
    q = jnp.clip(jnp.asarray(quality, jnp.float32), 1.0, 100.0)
    scale = jnp.where(q < 50.0, jnp.floor(5000.0 / q), 200.0 - 2.0 * q)

    def scaled(base):
        return jnp.clip(jnp.floor((base * scale + 50.0) / 100.0), 1.0, 255.0)

    return scaled(jnp.asarray(LUMA_TABLE)), scaled(jnp.asarray(CHROMA_TABLE))


def _round_ste(x: jax.Array) -> jax.Array:
    """Returns round(x) in the forward pass with the identity's gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _block_codec(plane: jax.Array, table: jax.Array) -> jax.Array:
    """Returns the plane [h, w] (h, w multiples of 8, level-shifted) after DCT, quantise, IDCT."""
    h, w = plane.shape
    blocks = plane.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK)
    d = jnp.asarray(DCT)
    coef = jnp.einsum("ui,aibj,vj->aubv", d, blocks, d, precision=HIGHEST)
    coef = _round_ste(coef / table[None, :, None, :]) * table[None, :, None, :]
    blocks = jnp.einsum("ui,aubv,vj->aibj", d, coef, d, precision=HIGHEST)
    return blocks.reshape(h, w)


def _downsample(plane: jax.Array) -> jax.Array:
    """Returns the 2x2 box average of the plane [h, w] (h, w even), as libjpeg's h2v2."""
    h, w = plane.shape
    return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """Returns x doubled along `axis` by libjpeg's fancy (triangular) upsampling.

    Each output sample is 3/4 of its own input sample plus 1/4 of the nearer neighbour, with
    the edge sample repeated past the border (what libjpeg does at the image edges).
    """
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad, mode="edge")
    mid = jax.lax.slice_in_dim(xp, 1, n + 1, axis=axis)
    prev = jax.lax.slice_in_dim(xp, 0, n, axis=axis)
    nxt = jax.lax.slice_in_dim(xp, 2, n + 2, axis=axis)
    even = 0.75 * mid + 0.25 * prev
    odd = 0.75 * mid + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


def jpeg(
    image: jax.Array,
    quality: jax.typing.ArrayLike,
    *,
    offset: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] = (0, 0),
) -> jax.Array:
    """Returns the image [H, W, 3] after a JPEG round trip at `quality`, float32 in [0, 1].

    Differentiable with respect to `image` (straight-through rounding, see the module
    docstring); jit- and vmap-able; `quality` and `offset` may be traced.

    Args:
      image: RGB [H, W, 3] float in [0, 1], any H, W.
      quality: JPEG quality in [1, 100] (Pillow's `quality=`), scalar, may be non-integer;
        under jit pass it as a float every time (an int is another signature, a retrace).
      offset: (x, y) of the image's top-left pixel in the full photo that the encoder sees,
        so blocks line up with that photo's 16x16 MCU grid. Pixels of the photo outside the
        image are unknown: the image's edge pixels stand in for them.
    """
    image = jnp.asarray(image, jnp.float32)
    h, w, _ = image.shape
    # Place the image at (y mod 16, x mod 16) in a canvas that is a whole number of MCUs;
    # the shapes are static, only the shift depends on the (possibly traced) offset.
    ox = jnp.mod(jnp.asarray(offset[0], jnp.int32), MCU)
    oy = jnp.mod(jnp.asarray(offset[1], jnp.int32), MCU)
    ch = -(-(h + MCU - 1) // MCU) * MCU
    cw = -(-(w + MCU - 1) // MCU) * MCU
    # Edge padding mirrors libjpeg's own expansion of the last row / column to the MCU.
    padded = jnp.pad(image, ((MCU, ch - h), (MCU, cw - w), (0, 0)), mode="edge")
    zero = jnp.zeros((), jnp.int32)
    canvas = jax.lax.dynamic_slice(padded, (MCU - oy, MCU - ox, zero), (ch, cw, 3))

    ycc = 255.0 * jnp.matmul(canvas, jnp.asarray(RGB_TO_YCC.T, jnp.float32), precision=HIGHEST)
    lum_table, chroma_table = quant_tables(quality)
    y = _block_codec(ycc[..., 0] - LEVEL, lum_table) + LEVEL
    # Cb and Cr carry the +128 offset, which is exactly the level shift: both cancel.
    chroma = [_block_codec(_downsample(ycc[..., c]), chroma_table) for c in (1, 2)]
    cb, cr = (_upsample_axis(_upsample_axis(p, 0), 1) for p in chroma)
    ycc_out = jnp.stack([y, cb, cr], axis=-1)
    rgb = jnp.matmul(ycc_out, jnp.asarray(YCC_TO_RGB.T, jnp.float32), precision=HIGHEST) / 255.0
    rgb = jax.lax.dynamic_slice(rgb, (oy, ox, zero), (h, w, 3))
    return jnp.clip(rgb, 0.0, 1.0)
