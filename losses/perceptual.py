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
channels. It is dm-pix's formula, differentiable and jit-able, with the separable Gaussian
filtering of `faceveil.losses.filters` (on XLA's CPU backend dm-pix's batched 1-D convolutions
and their gradients are several times slower), and the statistics of a fixed image reusable
(`ssim_reference`).

LPIPS is not here: it needs network weights, and losses hold none. Objectives that want it take
it as a function argument (see `faceveil.models.lpips`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import dm_pix
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from faceveil.losses import filters
from faceveil.losses.lazy import skip_zero_cotangent

__all__ = ["SsimReference", "dssim", "psnr", "ssim", "ssim_reference"]

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


class SsimReference(NamedTuple):
    """The Gaussian-filtered mean and mean square of fixed images, reused by `ssim`."""

    mu: jax.Array  # filter(a)
    mean_sq: jax.Array  # filter(a * a)


# Jitted at definition (inlined under an outer jit): the separable filter is many small ops,
# slow when dispatched eagerly.
@functools.partial(jax.jit, static_argnames=("filter_size", "filter_sigma"))
def ssim_reference(
    a: ArrayLike,
    *,
    filter_size: int = FILTER_SIZE,
    filter_sigma: float = FILTER_SIGMA,
) -> SsimReference:
    """Returns the SsimReference of images a: the part of `ssim(a, b)` that depends on a only.

    An optimisation that compares many candidates b with one original a (a cloak's budget, one
    evaluation per iteration) computes it once, saving two of the five filterings per call.

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1].
      filter_size: Gaussian window size (taps).
      filter_sigma: Gaussian window standard deviation (pixels).
    """
    a = _as_float(a)
    filt = _filter(filter_size, filter_sigma, a.dtype)
    return SsimReference(mu=filt(a), mean_sq=filt(a * a))


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
    reference: SsimReference | None = None,
) -> jax.Array:
    """Returns the mean SSIM of each image pair: [N] for NHWC inputs, a scalar for HWC.

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1]; H and W at least `filter_size`.
      b: images of the same shape.
      filter_size: Gaussian window size (taps).
      filter_sigma: Gaussian window standard deviation (pixels).
      k1: SSIM luminance constant (C1 = (k1 * data_range)^2, data_range = 1).
      k2: SSIM contrast constant (C2 = (k2 * data_range)^2).
      precision: accepted for dm-pix's signature; the filter sums are exact float32.
      reference: `ssim_reference(a)` computed before (same filter settings), or None.
    """
    del precision
    a, b = _as_float(a), _as_float(b)
    filt = _filter(filter_size, filter_sigma, a.dtype)
    ref = ssim_reference(a, filter_size=filter_size, filter_sigma=filter_sigma) \
        if reference is None else reference
    # dm-pix's formula (Wang et al. 2004), with its clipping of the (co)variances.
    mu0, mu1 = ref.mu, filt(b)
    mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
    eps = jnp.finfo(jnp.float32).eps ** 2
    sigma00 = jnp.maximum(eps, ref.mean_sq - mu00)
    sigma11 = jnp.maximum(eps, filt(b * b) - mu11)
    sigma01 = filt(a * b) - mu01
    sigma01 = jnp.sign(sigma01) * jnp.minimum(jnp.sqrt(sigma00 * sigma11), jnp.abs(sigma01))
    c1, c2 = k1 ** 2, k2 ** 2
    ssim_map = ((2 * mu01 + c1) * (2 * sigma01 + c2)) / (
        (mu00 + mu11 + c1) * (sigma00 + sigma11 + c2))
    return jnp.mean(ssim_map, axis=(-3, -2, -1))


def _filter(size: int, sigma: float, dtype):
    """Returns images -> images filtered by SSIM's separable Gaussian ('valid')."""
    return functools.partial(filters.separable_valid, taps=_gaussian_taps(size, sigma, dtype),
                             axes=(-3, -2))


def _gaussian_taps(size: int, sigma: float, dtype=jnp.float32) -> jax.Array:
    """Returns the [size] normalised Gaussian window SSIM filters with (dm-pix's taps)."""
    half = size // 2
    shift = (2 * half - size + 1) / 2  # an even window is centred between two taps
    taps = jnp.exp(-0.5 * ((jnp.arange(size, dtype=dtype) - half + shift) / sigma) ** 2)
    return taps / jnp.sum(taps)


def dssim(
    a: ArrayLike,
    b: ArrayLike,
    *,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
    reference: SsimReference | None = None,
) -> jax.Array:
    """Returns the structural dissimilarity (1 - SSIM) / 2 of each pair, in [0, 1].

    A budget rho on DSSIM is a budget 1 - 2 rho on SSIM (rho = 0.01 is SSIM >= 0.98).

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1].
      b: images of the same shape.
      precision: accepted for dm-pix's signature (see `ssim`).
      reference: `ssim_reference(a)` computed before, or None.
    """
    return (1.0 - ssim(a, b, precision=precision, reference=reference)) / 2.0


def psnr(a: ArrayLike, b: ArrayLike) -> jax.Array:
    """Returns the PSNR in dB of each pair (data range 1); +inf for identical images.

    Args:
      a: images [N, H, W, C] or [H, W, C], float in [0, 1].
      b: images of the same shape.
    """
    return dm_pix.psnr(_as_float(a), _as_float(b))


def _dssim_with_reference(original, protected, reference):
    return dssim(original, protected, reference=reference)


def budget_dssim(original: ArrayLike, protected: ArrayLike,
                 reference: SsimReference | None = None) -> jax.Array:
    """Returns dssim(original, protected) for a budget hinge: no backward pass under budget.

    The hinge sends a zero gradient while the budget holds; the DSSIM backward pass (the
    costliest pass over a large face's patch) is then skipped (`losses.lazy`). `reference`:
    `ssim_reference(original)` computed once by a caller that scores many candidates.
    """
    if reference is None:
        reference = ssim_reference(original)
    return skip_zero_cotangent(_dssim_with_reference)(original, protected, reference)

