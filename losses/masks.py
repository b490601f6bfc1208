"""Mask templates (DESIGN.md method 3, Wang et al.): sensitivity maps, low-bit XOR, objective.

Data convention (as all of `faceveil.losses`): float images in [0, 1], NHWC (HWC for one image);
a recogniser enters as a function passed in. `sensitivity_map` is the training target of the
template network (`template_ridge_loss`) and the template of the per-image mode;
`xor_low_bits` is protect = x XOR k written so that gradients reach the key's bits;
`mask_objective` is what a key maximises (feature distance) under the visual budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from faceveil.losses.distances import minkowski
from faceveil.losses.perceptual import SsimReference, budget_dssim
from faceveil.losses.regularisers import budget_hinge

__all__ = ["mask_objective", "sensitivity_map", "straight_through_bits", "xor_low_bits"]


def sensitivity_map(
    chips: ArrayLike,
    *,
    embed_fn: Callable[[jax.Array], jax.Array],
    key: ArrayLike,
    cell: int = 10,
    probes: int = 8,
) -> jax.Array:
    """Returns the normalised sensitivity maps [N, h, w] (or [h, w]) of chips, in [0, 1].

    M[c] = sqrt(mean over the cell's pixels of ||J_p||_F^2), J_p the Jacobian of the embedding
    with respect to pixel p's three channels, over cells of `cell` x `cell` chip pixels
    (h = ceil(S / cell); a partial last cell averages the pixels it has), divided by the
    map's maximum so the most sensitive cell is 1.

    The full Jacobian needs D backward passes (128 for dlib, 512 for FaceNet); Hutchinson's
    identity E_v ||J^T v||^2 = ||J||_F^2 for v ~ N(0, I) estimates it from `probes` of them,
    drawn from `key`: the cell averages pool many pixels, so a few probes rank cells stably.

    Args:
      chips: aligned chips [N, S, S, 3] (or [S, S, 3]), float in [0, 1].
      embed_fn: batched embedding, [N, S, S, 3] -> [N, D] (a recogniser closed over its params;
        examples must be independent, e.g. batch norm in inference mode).
      key: PRNG key of the probes.
      cell: cell side in chip pixels.
      probes: random projections of the embedding.
    """
    chips = jnp.asarray(chips, jnp.float32)
    single = chips.ndim == 3
    x = chips[None] if single else chips
    emb, vjp = jax.vjp(embed_fn, x)
    v = jax.random.normal(key, (probes,) + emb.shape, emb.dtype)
    g = jax.vmap(lambda u: vjp(u)[0])(v)  # [probes, N, S, S, 3]
    sq = jnp.mean(jnp.sum(g * g, axis=-1), axis=0)  # [N, S, S], estimates ||J_p||_F^2
    n, s = sq.shape[0], sq.shape[1]
    h = -(-s // cell)
    pad = h * cell - s
    sq = jnp.pad(sq, ((0, 0), (0, pad), (0, pad)))
    ones = jnp.pad(jnp.ones((s, s), jnp.float32), ((0, pad), (0, pad)))
    sums = sq.reshape(n, h, cell, h, cell).sum(axis=(2, 4))
    counts = ones.reshape(h, cell, h, cell).sum(axis=(1, 3))
    m = jnp.sqrt(sums / counts)
    m = m / jnp.maximum(jnp.max(m, axis=(1, 2), keepdims=True), 1e-30)
    return m[0] if single else m


def straight_through_bits(logits: ArrayLike) -> jax.Array:
    """Returns bits (logits > 0) in {0, 1} whose gradient is that of sigmoid(logits).

    The straight-through estimator of quantisation: the forward pass is the hard key, so the
    objective is evaluated on exactly the key that will be written; the backward pass is the
    soft key's, so every bit learns which way the objective wants it.
    """
    w = jnp.asarray(logits)
    p = jax.nn.sigmoid(w)
    return (w > 0).astype(p.dtype) + p - jax.lax.stop_gradient(p)


def xor_low_bits(x: ArrayLike, bits: ArrayLike) -> jax.Array:
    """Returns x XOR k, float in [0, 1], for x in [0, 1] (uint8 levels) and key bits [..., b].

    x XOR k on uint8 levels is exactly x + sum_j 2^j (1 - 2 x_j) k_j, x_j the j-th bit of x:
    flipping bit j adds 2^j where it was 0 and takes 2^j away where it was 1. It is linear in
    the key's bits for a fixed x, so with `straight_through_bits` the only surrogate gradient is
    the quantisation's; XOR itself is differentiated exactly. No gradient flows to x.

    Args:
      x: images [..., H, W, C], float in [0, 1] holding uint8 levels (level / 255).
      bits: key bits [..., H, W, C, b] in {0, 1} (bit j of the key is bits[..., j]).
    """
    bits = jnp.asarray(bits)
    b = bits.shape[-1]
    levels = jax.lax.stop_gradient(jnp.round(jnp.asarray(x) * 255.0)).astype(jnp.int32)
    powers = 2 ** jnp.arange(b, dtype=jnp.int32)
    x_bits = ((levels[..., None] // powers) % 2).astype(bits.dtype)
    step = powers.astype(bits.dtype) * (1.0 - 2.0 * x_bits)
    return (levels.astype(bits.dtype) + jnp.sum(step * bits, axis=-1)) / 255.0


def mask_objective(
    protected: ArrayLike,
    original: ArrayLike,
    *,
    features_fns: Sequence[Callable[[jax.Array], jax.Array]],
    original_feats: Sequence[ArrayLike],
    scales: Sequence[float],
    rho: float,
    lam: float,
    p: float = 2.0,
    original_reference: SsimReference | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, aux) of a mask key for one face: feature distance against the budget.

        L = - sum_r D(F_r(x'), F_r(x)) / s_r  +  lam * max(DSSIM(x, x') - rho, 0)

    with D the Minkowski distance of order p and s_r the recogniser's same-person threshold, so
    that recognisers with different distance scales weigh alike (the paper maximises the
    feature distance of the frozen recognisers; the budget is its visual constraint).

    Args:
      protected: the protected face x' [H, W, C], float in [0, 1].
      original: the clean face x, same shape.
      features_fns: per recogniser, x' [H, W, C] -> its embedding [D_r] (alignment included).
      original_feats: per recogniser, F_r(x) [D_r].
      scales: per recogniser, s_r > 0.
      rho: DSSIM budget (0.025 is SSIM >= 0.95).
      lam: weight of the budget's excess.
      p: order of the Minkowski distance.
      original_reference: `ssim_reference(original)`, computed once by a caller that scores
        many keys of one face (None: computed here).

    Returns:
      loss: scalar.
      aux: distances [R] (unscaled D_r), dssim, loss.
    """
    dists = jnp.stack([minkowski(f(protected), jax.lax.stop_gradient(o), p=p)
                       for f, o in zip(features_fns, original_feats)])
    d = budget_dssim(original, protected, original_reference)  # SSIM is symmetric
    scaled = dists / jnp.asarray(scales, dists.dtype)
    loss = -jnp.sum(scaled) + lam * budget_hinge(d, rho)
    return loss, {"distances": dists, "dssim": d, "loss": loss}
