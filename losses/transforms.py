"""Gradient transformations for sign-step attacks, composable with optax.

Each function returns an `optax.GradientTransformation`, so the methods' update rules are
chains of small pieces, e.g.

    veil (MI-FGSM):      optax.chain(mi_fgsm(decay=1.0), sign(), optax.scale(-step))
    PMT (TI + sign):     optax.chain(smooth("gaussian", length=7), sign(), optax.scale(-step))

followed by the caller's clip of the image to [0, 1]. Image leaves follow the library's data
convention, [..., H, W, C] float; `smooth` uses a depthwise convolution with `precision=`.

>>> import jax.numpy as jnp, optax
>>> tx = optax.chain(sign(), optax.scale(-0.5))
>>> upd, _ = tx.update(jnp.array([2.0, -3.0, 0.0]), tx.init(jnp.zeros(3)))
>>> upd.tolist()
[-0.5, 0.5, -0.0]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["MiFgsmState", "mi_fgsm", "sign", "smooth", "smoothing_kernel"]


class MiFgsmState(NamedTuple):
    """MI-FGSM's accumulated gradient direction."""

    momentum: optax.Updates  # same tree, shapes and dtypes as the params


def mi_fgsm(decay: float = 1.0, *, batched: bool = False, eps: float = 1e-12):
    """Returns MI-FGSM's momentum transform: g <- decay * g + grad / ||grad||_1.

    Dong et al. 2018. The output is the new g; chain `sign()` and `optax.scale(-step)` after it.

    Args:
      decay: the momentum factor mu.
      batched: if True the leading axis of every leaf indexes independent examples and each
        example's gradient is L1-normalised on its own; else each leaf is normalised whole.
      eps: floor of the L1 norm (a zero gradient stays zero instead of becoming NaN).
    """

    def normalise(g):
        axes = tuple(range(1, g.ndim)) if batched else tuple(range(g.ndim))
        l1 = jnp.sum(jnp.abs(g), axis=axes, keepdims=True)
        return g / jnp.maximum(l1, eps)

    def init_fn(params):
        return MiFgsmState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        mom = jax.tree.map(lambda m, g: decay * m + normalise(g), state.momentum, updates)
        return mom, MiFgsmState(momentum=mom)

    return optax.GradientTransformation(init_fn, update_fn)


def sign():
    """Returns the stateless transform updates -> sign(updates) (the FGSM step direction)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(jnp.sign, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def smoothing_kernel(kind: str = "gaussian", length: int = 7, *, nsig: float = 3.0) -> np.ndarray:
    """Returns the [length, length] translation-invariance kernel, summing to 1.

    As in TI-FGSM (Dong et al. 2019): 'gaussian' samples exp(-t^2 / 2) at `length` points
    evenly spaced on [-nsig, nsig]; 'linear' is the triangle 1 - |t| / (r + 1) at the integer
    offsets t = -r..r, r = (length - 1) / 2; the 2-D kernel is the outer product, normalised.

    Args:
      kind: 'gaussian' or 'linear'.
      length: kernel side (odd keeps the smoothing centred).
      nsig: half-width of the Gaussian's support in standard deviations.
    """
    if length < 1:
        raise ValueError(f"kernel length must be >= 1, got {length}")
    if kind == "gaussian":
        t = np.linspace(-nsig, nsig, length) if length > 1 else np.zeros(1)
        k1 = np.exp(-0.5 * t * t)
    elif kind == "linear":
        r = (length - 1) / 2.0
        t = np.arange(length) - r
        k1 = 1.0 - np.abs(t) / (r + 1.0)
    else:
        raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kind!r}")
    k2 = np.outer(k1, k1)
    return (k2 / k2.sum()).astype(np.float32)


def _depthwise(x: jax.Array, kernel: np.ndarray, precision) -> jax.Array:
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    xb = x.reshape((-1, h, w, c))
    k = jnp.asarray(kernel, x.dtype)[:, :, None, None] * jnp.ones((1, 1, 1, c), x.dtype)
    # The kernels are symmetric, so XLA's correlation equals the convolution; zero 'SAME'
    # padding as in TI-FGSM keeps the output the size of the gradient image.
    y = jax.lax.conv_general_dilated(
        xb,
        k,
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=precision,
    )
    return y.reshape(lead + (h, w, c))


def smooth(
    kernel: str = "gaussian",
    length: int = 7,
    *,
    nsig: float = 3.0,
    precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST,
):
    """Returns the translation-invariant smoothing transform W (*) grad (depthwise, per channel).

    Leaves with at least 3 axes are treated as images [..., H, W, C] and smoothed; smaller
    leaves pass through unchanged.

    Args:
      kernel: 'linear' or 'gaussian' (see `smoothing_kernel`).
      length: kernel side k.
      nsig: Gaussian support half-width in standard deviations.
      precision: precision of the depthwise convolution.
    """
    kern = smoothing_kernel(kernel, length, nsig=nsig)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def one(g):
            return _depthwise(g, kern, precision) if g.ndim >= 3 else g

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(init_fn, update_fn)
