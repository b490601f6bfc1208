"""The differentiable JPEG against Pillow's real encoder and decoder on a real face photo."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceveil.losses.jpeg import jpeg, quant_tables

CROP_H, CROP_W = 200, 168
# obama1.jpg is itself a quality-90 4:2:0 JPEG on its own 16-px grid: a crop on that grid
# re-encodes almost losslessly at q = 90, which would hide the compression; (4, 12) mod 16 is
# off that grid.
CROP_XY = (100, 60)
# An odd offset for the alignment test: (5, 7) mod 16, off every block grid.
ODD_XY = (37, 23)
QUALITIES = (70, 85, 90)
# Jitted once per module: one compilation serves all the qualities and offsets below.
_jpeg = jax.jit(jpeg)


def _psnr(a, b) -> float:
    """Returns the PSNR in dB between two images in [0, 1], in float64."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10.0 * np.log10(1.0 / mse))


def _pillow_jpeg(u8: np.ndarray, quality: int) -> np.ndarray:
    """Returns the uint8 RGB image after Pillow's JPEG round trip with default settings."""
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def photo(data_dir) -> np.ndarray:
    """Returns the full obama1.jpg face photo, uint8 RGB [512, 410, 3]."""
    return np.asarray(Image.open(data_dir / "faces" / "obama" / "obama1.jpg").convert("RGB"))


def _crop(u8: np.ndarray, xy) -> np.ndarray:
    x, y = xy
    return u8[y : y + CROP_H, x : x + CROP_W]


def test_quant_tables_match_pillow():
    # Pillow reports the tables it wrote in natural order; integer qualities must be exact,
    # both sides of the q = 50 switch and at the 1 / 255 clips.
    for q in (1, 7, 33, 50, 70, 85, 90, 100):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        ref = Image.open(buf).quantization
        luma, chroma = quant_tables(float(q))
        np.testing.assert_array_equal(np.asarray(luma), np.reshape(ref[0], (8, 8)), str(q))
        np.testing.assert_array_equal(np.asarray(chroma), np.reshape(ref[1], (8, 8)), str(q))


def test_matches_pillow_jpeg(photo):
    # Measured (approx vs Pillow / input vs Pillow): q70 45.0 / 34.1, q85 45.8 / 36.7,
    # q90 45.9 / 38.4 dB; the residue is libjpeg's integer arithmetic (mostly +-1 level).
    crop = _crop(photo, CROP_XY)
    x = jnp.asarray(crop / 255.0, jnp.float32)
    for q in QUALITIES:
        ref = _pillow_jpeg(crop, q) / 255.0
        ours = np.asarray(_jpeg(x, float(q)))
        assert ours.shape == crop.shape and ours.dtype == np.float32
        approx_db, input_db = _psnr(ours, ref), _psnr(x, ref)
        assert approx_db > 42.0, (q, approx_db, input_db)
        assert approx_db > input_db + 5.0, (q, approx_db, input_db)


def test_offset_lines_blocks_up_with_the_full_photo(photo):
    # A crop of Pillow's JPEG of the whole photo: the crop's blocks are the photo's blocks
    # only when the offset is passed. Measured (offset / (0, 0) / interior with offset):
    # q70 42.1 / 34.7 / 46.9, q85 42.4 / 36.8 / 47.3, q90 47.6 / 40.2 / 50.9 dB; the border
    # blocks are lower because the photo's pixels outside the crop are unknown to `jpeg`.
    crop = _crop(photo, ODD_XY)
    x = jnp.asarray(crop / 255.0, jnp.float32)
    inner = (slice(16, -16), slice(16, -16))
    for q in QUALITIES:
        ref = _crop(_pillow_jpeg(photo, q), ODD_XY) / 255.0
        aligned = np.asarray(_jpeg(x, float(q), offset=ODD_XY))
        unaligned = np.asarray(_jpeg(x, float(q)))
        aligned_db, unaligned_db = _psnr(aligned, ref), _psnr(unaligned, ref)
        assert aligned_db > 40.0, (q, aligned_db, unaligned_db)
        assert aligned_db > unaligned_db + 3.0, (q, aligned_db, unaligned_db)
        assert _psnr(aligned[inner], ref[inner]) > 44.0, q


def test_vmap_over_qualities_and_offsets_matches_single_calls(photo):
    crops = np.stack([_crop(photo, CROP_XY), _crop(photo, ODD_XY)]) / 255.0
    xs = jnp.asarray(crops, jnp.float32)
    qs = jnp.array([70.0, 90.0])
    offsets = (jnp.array([CROP_XY[0], ODD_XY[0]]), jnp.array([CROP_XY[1], ODD_XY[1]]))
    batched = jax.jit(jax.vmap(lambda x, q, ox, oy: jpeg(x, q, offset=(ox, oy))))
    out = np.asarray(batched(xs, qs, *offsets))
    for i in range(2):
        one = _jpeg(xs[i], qs[i], offset=(offsets[0][i], offsets[1][i]))
        np.testing.assert_allclose(out[i], np.asarray(one), atol=1e-5)


def test_gradient_is_finite_and_non_zero(photo):
    x = jnp.asarray(_crop(photo, ODD_XY) / 255.0, jnp.float32)
    target = jnp.flip(x, axis=1)

    def loss(img, q):
        return jnp.mean((jpeg(img, q, offset=ODD_XY) - target) ** 2)

    g = np.asarray(jax.jit(jax.grad(loss))(x, 75.0))
    assert g.shape == x.shape
    assert np.all(np.isfinite(g))
    # Straight-through rounding: the gradient reaches (almost) every pixel, not only those
    # whose DCT coefficients happen to sit between two quantisation levels.
    assert np.mean(g != 0) > 0.9, np.mean(g != 0)


def test_one_compilation_serves_every_quality():
    traces = []

    def counted(img, q):
        traces.append(1)  # runs once per trace, not per call
        return jpeg(img, q)

    f = jax.jit(counted)
    # Odd, non-multiple-of-16 sizes: padding to whole MCUs must be undone exactly.
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(37, 53, 3)), jnp.float32)
    outs = [np.asarray(f(x, jnp.float32(q))) for q in (10.0, 55.5, 70.0, 95.0)]
    assert len(traces) == 1 and f._cache_size() == 1
    assert all(o.shape == x.shape and 0.0 <= o.min() and o.max() <= 1.0 for o in outs)
    # The quality is live in the traced function: lower quality, further from the input.
    errors = [float(np.mean((o - np.asarray(x)) ** 2)) for o in outs]
    assert errors == sorted(errors, reverse=True), errors
