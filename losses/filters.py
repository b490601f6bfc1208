"""Separable linear filters whose backward pass is a filter too.

A 'valid' correlation with k taps along one axis is a sum of k shifted slices: XLA fuses it into
one loop over the output. Autodiff's backward pass of that sum is a sum of k zero-padded
copies, each the size of the input, which XLA's CPU backend runs several times slower than the
forward. The backward pass here is the correlation of the zero-padded cotangent with the
reversed taps (the 'full' convolution that is the adjoint), the same fused loop again. A
banded matrix product was tried too: it needed a transposed copy of the image per filtered
axis and ran 2x slower than the direct form (`benchmarks.profile`, traces of the cloak loop).

Taps may be traced (a blur whose width depends on the input) and batched under `vmap`; the
taps' own gradient is provided (XLA drops it when nothing uses it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

__all__ = ["correlate_valid", "separable_same", "separable_valid"]


def _shifted_sum(x: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """Returns sum_i taps[i] * x[..., i : i + n_out, ...] along axis (n_out = n - k + 1)."""
    # x is materialised first: fused into the sum, its producer (a warp, the other axis'
    # pass) would be recomputed once per tap. Inside the cloak's loop XLA did fuse so, and
    # SSIM ran 5x slower than alone.
    x = lax.optimization_barrier(x)
    k = taps.shape[-1]
    n_out = x.shape[axis] - k + 1
    return sum(taps[i] * lax.slice_in_dim(x, i, i + n_out, axis=axis) for i in range(k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _correlate(x, taps, axis):
    return _shifted_sum(x, taps, axis)


def _correlate_fwd(x, taps, axis):
    return _shifted_sum(x, taps, axis), (x, taps)


def _correlate_bwd(axis, res, g):
    x, taps = res
    k = taps.shape[-1]
    pad = [(0, 0, 0)] * g.ndim
    pad[axis] = (k - 1, k - 1, 0)
    # d out[o] / d x[j] = taps[j - o]: correlate the padded cotangent with the reversed taps.
    dx = _shifted_sum(lax.pad(g, jnp.zeros((), g.dtype), pad), taps[::-1], axis)
    n_out = g.shape[axis]
    dtaps = jnp.stack([jnp.sum(g * lax.slice_in_dim(x, i, i + n_out, axis=axis))
                       for i in range(k)])
    return dx, dtaps


_correlate.defvjp(_correlate_fwd, _correlate_bwd)


def correlate_valid(x: ArrayLike, taps: ArrayLike, *, axis: int) -> jax.Array:
    """Returns x correlated with `taps` along `axis` ('valid': that axis shrinks by k - 1).

    out[..., o, ...] = sum_i taps[i] * x[..., o + i, ...], as `numpy.correlate(mode='valid')`
    along the axis.

    Args:
      x: float array.
      taps: [k] float filter taps (k at most the axis' length).
      axis: the filtered axis.
    """
    x = jnp.asarray(x)
    taps = jnp.asarray(taps, x.dtype)
    axis = axis % x.ndim
    k, n = taps.shape[-1], x.shape[axis]
    if k > n:
        raise ValueError(f"{k} taps need at least {k} samples along axis {axis}, got {n}")
    return _correlate(x, taps, axis)


def separable_valid(x: ArrayLike, taps: ArrayLike, *, axes: tuple[int, int] = (-3, -2),
                    precision=None) -> jax.Array:
    """Returns x correlated with the same taps along both `axes` ('valid' on each).

    Args:
      x: float array, e.g. images [..., H, W, C] with axes (-3, -2).
      taps: [k] float filter taps.
      axes: the two filtered axes.
      precision: accepted for dm-pix's `filter_fn` interface; the sums are exact float32.
    """
    del precision
    y = correlate_valid(x, taps, axis=axes[1])
    return correlate_valid(y, taps, axis=axes[0])


def separable_same(x: ArrayLike, taps: ArrayLike, *, axes: tuple[int, int] = (0, 1)) -> jax.Array:
    """Returns x correlated with odd-length `taps` along both `axes`, edges extended: x's shape.

    The edge samples repeat past the border ('nearest'), as `scipy.ndimage` filters do by
    default with mode='nearest'.
    """
    x = jnp.asarray(x)
    r = (jnp.shape(taps)[-1] - 1) // 2
    pad = [(0, 0)] * x.ndim
    for a in axes:
        pad[a % x.ndim] = (r, r)
    return separable_valid(jnp.pad(x, pad, mode="edge"), taps, axes=axes)
