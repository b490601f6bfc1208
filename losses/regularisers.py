"""Image regularisers and the budget hinge: block variance, total variation, max(d - rho, 0).

Data convention: float images in [0, 1], NHWC ([..., H, W, C]; any leading axes are batch
axes); one value per image, unreduced. Options are keyword-only. The block sums below are the
3x3 all-ones convolution written as nine shifted adds, which is exact in float32 on every
backend, so no `precision=` is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "block_sums",
    "block_variance",
    "block_variance_terms",
    "budget_hinge",
    "total_variation",
]


def block_sums(x: ArrayLike, *, size: int = 3, stride: int = 1) -> jax.Array:
    """Returns S, the sums over size x size blocks per channel: [..., H', W', C].

    S is the 'VALID' correlation of each channel with a size x size all-ones kernel
    (H' = (H - size) // stride + 1), i.e. the veil paper's 3x3 all-ones convolution.

    Args:
      x: images [..., H, W, C].
      size: block side.
      stride: step between blocks (1: every overlapping block, `size`: a tiling).
    """
    x = jnp.asarray(x)
    h, w = x.shape[-3], x.shape[-2]
    ho, wo = h - size + 1, w - size + 1
    s = sum(x[..., i : i + ho, j : j + wo, :] for i in range(size) for j in range(size))
    return s[..., ::stride, ::stride, :]


def block_variance_terms(
    x: ArrayLike, *, size: int = 3, stride: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Returns (Var_inner, Var_intra) [...] of each image, DESIGN.md's text taken literally.

    With S_bc the block sums (block b, channel c; `block_sums`), mean_b over blocks:

        Var_inner = sum_c var_b(S_bc)                          (population variance)
        Var_intra = sum_c mean_b (S_bc / 9 - mean_b S_bc)^2

    Note the literal Var_intra compares the block *mean* S_bc/9 with the mean block *sum*
    mean_b S_bc; that is what the design prints and what is implemented (9 is size^2).

    Args:
      x: images [..., H, W, C].
      size: block side (3 in the paper).
      stride: step between blocks (1: the convolution's every position).
    """
    s = block_sums(x, size=size, stride=stride)
    axes = (-3, -2)
    mean_s = jnp.mean(s, axis=axes, keepdims=True)
    inner = jnp.sum(jnp.mean((s - mean_s) ** 2, axis=axes), axis=-1)
    intra = jnp.sum(jnp.mean((s / (size * size) - mean_s) ** 2, axis=axes), axis=-1)
    return inner, intra


def block_variance(x: ArrayLike, *, size: int = 3, stride: int = 1) -> jax.Array:
    """Returns the veil paper's block-variance loss L_var = Var_inner + Var_intra per image.

    Both terms are minimised together in the veil objective (see `block_variance_terms` for
    their literal definitions).

    Args:
      x: images [..., H, W, C].
      size: block side (3 in the paper).
      stride: step between blocks.
    """
    inner, intra = block_variance_terms(x, size=size, stride=stride)
    return inner + intra


def total_variation(x: ArrayLike, *, beta: float = 2.0) -> jax.Array:
    """Returns the beta-total variation of each image (Mahendran & Vedaldi 2015).

        TV_beta(x) = sum_{i<H-1, j<W-1, c} ((x[i,j+1,c]-x[i,j,c])^2 + (x[i+1,j,c]-x[i,j,c])^2)^(beta/2)

    Args:
      x: images [..., H, W, C].
      beta: the exponent; 2 is the smooth squared version, 1 the isotropic TV.
    """
    x = jnp.asarray(x)
    dx = x[..., :-1, 1:, :] - x[..., :-1, :-1, :]
    dy = x[..., 1:, :-1, :] - x[..., :-1, :-1, :]
    sq = dx * dx + dy * dy
    if beta == 2:
        val = sq
    else:
        pos = sq > 0
        # Double-where: (.)^(beta/2) has an infinite derivative at 0 for beta < 2.
        val = jnp.where(pos, jnp.where(pos, sq, 1.0) ** (beta / 2.0), 0.0)
    return jnp.sum(val, axis=(-3, -2, -1))


def budget_hinge(d: ArrayLike, rho: ArrayLike) -> jax.Array:
    """Returns max(d - rho, 0): zero within the budget rho, the excess beyond it.

    Args:
      d: a distance (e.g. DSSIM), any shape.
      rho: the budget, broadcastable against `d`.
    """
    return jax.nn.relu(jnp.asarray(d) - jnp.asarray(rho))
