"""Perceptual image similarities: SSIM, DSSIM and PSNR.

Data convention (shared by all of `faceveil.losses`): float images in [0, 1] (data range 1),
NHWC; a single image may be HWC. Every function is computed per pair and returned unreduced:
inputs [N, H, W, C] give [N] values, inputs [H, W, C] give a scalar; the caller reduces.
Options are keyword-only; `precision=` is the precision of the Gaussian filtering.

SSIM follows Wang et al. 2004 with the settings of the usual reference
(skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)): an 11-tap Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, the mean of the SSIM map over the valid region (skimage filters the whole
image and then crops (11 - 1) / 2 pixels from each border, which is the same region) and over
channels. It is dm-pix's implementation, hence differentiable and jit-able.

LPIPS is not here: it needs network weights, and losses hold none. Objectives that want it take
it as a function argument (see `faceveil.models.lpips`).
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["dssim", "psnr", "ssim"]

# The reference window: skimage's gaussian_weights=True with sigma=1.5 and truncate=3.5 gives a
# window of 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 taps.
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def _as_float(a: ArrayLike) -> jax.Array:
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        # uint8 input is almost always a forgotten /255; refuse it instead of scoring garbage.
        raise TypeError(f"expected float images in [0, 1], got dtype {a.dtype}")
    return a


# Jitted at definition (inlined under an outer jit): dm-pix's separable filter is many small
# ops, slow when dispatched eagerly.
@functools.partial(
    jax.jit, static_argnames=("filter_size", "filter_sigma", "k1", "k2", "precision")
)
def ssim(
    a: ArrayLike,
    b: ArrayLike,
    *,
    filter_size: int = FILTER_SIZE,
    filter_sigma: float = FILTER_SIGMA,
    k1: float = K1,
    k2: float = K2,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Returns the mean SSIM of each image pair: [N] for NHWC inputs, a scalar for HWC.

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1]; H and W at least `filter_size`.
      b: images of the same shape.
      filter_size: Gaussian window size (taps).
      filter_sigma: Gaussian window standard deviation (pixels).
      k1: SSIM luminance constant (C1 = (k1 * data_range)^2, data_range = 1).
      k2: SSIM contrast constant (C2 = (k2 * data_range)^2).
      precision: precision of the separable Gaussian filtering.
    """
    a, b = _as_float(a), _as_float(b)
    return dm_pix.ssim(
        a,
        b,
        max_val=1.0,
        filter_size=filter_size,
        filter_sigma=filter_sigma,
        k1=k1,
        k2=k2,
        precision=precision,
    )


def dssim(
    a: ArrayLike,
    b: ArrayLike,
    *,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Returns the structural dissimilarity (1 - SSIM) / 2 of each pair, in [0, 1].

    A budget rho on DSSIM is a budget 1 - 2 rho on SSIM (rho = 0.01 is SSIM >= 0.98).

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1].
      b: images of the same shape.
      precision: precision of the Gaussian filtering.
    """
    return (1.0 - ssim(a, b, precision=precision)) / 2.0


def psnr(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Returns the PSNR in dB of each pair (data range 1); +inf for identical images.

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1].
      b: images of the same shape.
    """
    return dm_pix.psnr(_as_float(a), _as_float(b))
