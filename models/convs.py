"""A drop-in `lax.conv_general_dilated` whose input gradient is a plain forward convolution.

Autodiff writes the gradient of a convolution with respect to its input as a convolution with
the reversed kernel and its input/output feature axes swapped in the dimension numbers
('01oi'). Inside the cloak's compiled loop XLA's CPU backend does not hand that form to its fast
convolution library and emits a generic loop nest instead: there dlib's backward pass ran 3x
slower than its forward pass, the largest cost of a cloak step after the photo-sized image
work (`benchmarks.profile`). `conv_general_dilated` here computes the same forward; its input
gradient convolves the cotangent with an explicitly reversed and transposed kernel (a small
materialised array, kept out of the dimension numbers by an optimisation barrier), the form the
fast library takes. A strided convolution's input gradient is the same with the cotangent
dilated by the stride. The kernel's gradient is autodiff's. Values and gradients equal
`lax.conv_general_dilated`'s up to float rounding.

Supported: 2-D, NHWC inputs with HWIO kernels (Flax's `nn.Conv` layout), no kernel or input
dilation, one feature group; anything else falls back to `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated"]

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                    precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, res, g):
    x, w = res
    # Reversed in space, input and output features swapped: a forward HWIO kernel again.
    w_t = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    back = []
    for axis, (lo, hi) in enumerate(pads):
        n, k, s = x.shape[1 + axis], w.shape[axis], strides[axis]
        n_out = g.shape[1 + axis]
        # Input rows past the last window (a strided conv may skip a few) get no gradient.
        rest = n + lo + hi - k - (n_out - 1) * s
        back.append((k - 1 - lo, k - 1 - hi + rest))
    dx = lax.conv_general_dilated(g, w_t, (1, 1), back, lhs_dilation=strides,
                                  dimension_numbers=_NHWC, precision=precision)
    _, pull_w = jax.vjp(lambda w_: lax.conv_general_dilated(
        x, w_, strides, pads, dimension_numbers=_NHWC, precision=precision), w)
    return dx, pull_w(g)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """Returns `lax.conv_general_dilated(...)` of the same arguments (module docstring)."""
    plain = (
        lhs.ndim == 4
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)
