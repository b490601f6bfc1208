"""Evaluation metrics: matching success rate, PMT verification accuracy, r_s and UP.

Data convention: features on the last axis ([N, D]); identities as integer labels. The
per-item functions (`match_success`, `verification_correct`, `up_success`) return one value
per probe / pair, unreduced; the rate functions are their means. All are jit-able.

Readings of the papers (the PMT paper's full text could not be consulted from here, so Eq. 10
and UP are implemented in their standard forms, stated below):
- PMT Eq. 10, data-abuse accuracy: a verification pair (a, b) is declared "same person" when
  cos(F(a), F(b)) > kappa (kappa = 0.2); accuracy = (correct same + correct different) / pairs.
- UP(sigma, kappa): the fraction of images that are both private, LPIPS(x, x~) >= sigma, and
  useful, cos(F_auth(x~), F_auth(x)) >= kappa; kappa is the same cosine threshold as Eq. 10.
- Mask template (Wang et al.): r_s = F_c / (1 + T_o - F_c) with T_o the recogniser's accuracy
  on originals and F_c its accuracy on protected images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from faceveil.losses.distances import cosine_similarity

__all__ = [
    "match_success",
    "msr",
    "pmt_accuracy",
    "r_s",
    "up",
    "up_success",
    "verification_correct",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _pairwise_scores(probe: jax.Array, gallery: jax.Array, metric: str) -> jax.Array:
    """Returns [P, G] scores where larger means closer."""
    if metric == "euclidean":
        # Squared distances via |p|^2 - 2 p.g + |g|^2; only the argmin is used, so the
        # expansion's rounding (far below embedding gaps) is harmless.
        pg = jnp.matmul(probe, gallery.T, precision=_HIGHEST)
        d2 = jnp.sum(probe**2, -1)[:, None] - 2.0 * pg + jnp.sum(gallery**2, -1)[None, :]
        return -d2
    if metric == "cosine":
        return cosine_similarity(probe[:, None, :], gallery[None, :, :])
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def match_success(
    probe_feats: ArrayLike,
    gallery_feats: ArrayLike,
    probe_ids: ArrayLike,
    gallery_ids: ArrayLike,
    *,
    metric: str = "euclidean",
) -> jax.Array:
    """Returns [P] bools: whether each probe's nearest gallery item has the probe's identity.

    Args:
      probe_feats: [P, D] features of the probes (e.g. protected images).
      gallery_feats: [G, D] features of the gallery (e.g. originals of every identity).
      probe_ids: [P] integer identities of the probes.
      gallery_ids: [G] integer identities of the gallery items.
      metric: 'euclidean' (nearest by L2) or 'cosine' (most similar).
    """
    scores = _pairwise_scores(
        jnp.asarray(probe_feats, jnp.float32), jnp.asarray(gallery_feats, jnp.float32), metric
    )
    nearest = jnp.argmax(scores, axis=1)
    return jnp.asarray(gallery_ids)[nearest] == jnp.asarray(probe_ids)


def msr(
    probe_feats: ArrayLike,
    gallery_feats: ArrayLike,
    probe_ids: ArrayLike,
    gallery_ids: ArrayLike,
    *,
    metric: str = "euclidean",
) -> jax.Array:
    """Returns the matching success rate of 1:N identification, in [0, 1].

    MSR = mean over probes of [identity of the nearest gallery item == probe identity].

    Args:
      probe_feats: [P, D] probe features.
      gallery_feats: [G, D] gallery features.
      probe_ids: [P] probe identities.
      gallery_ids: [G] gallery identities.
      metric: 'euclidean' or 'cosine'.
    """
    ok = match_success(probe_feats, gallery_feats, probe_ids, gallery_ids, metric=metric)
    return jnp.mean(ok.astype(jnp.float32))


def verification_correct(
    feats_a: ArrayLike, feats_b: ArrayLike, same: ArrayLike, *, kappa: float = 0.2
) -> jax.Array:
    """Returns [N] bools: whether thresholding cos(a, b) > kappa gets each pair right.

    Args:
      feats_a: [N, D] features of the pairs' first images.
      feats_b: [N, D] features of the pairs' second images.
      same: [N] bools, ground truth: the pair shows one person.
      kappa: cosine-similarity threshold (PMT uses 0.2).
    """
    pred_same = cosine_similarity(feats_a, feats_b) > kappa
    return pred_same == jnp.asarray(same, bool)


def pmt_accuracy(
    feats_a: ArrayLike, feats_b: ArrayLike, same: ArrayLike, *, kappa: float = 0.2
) -> jax.Array:
    """Returns the verification accuracy of PMT's Eq. 10 (as read here), in [0, 1].

    Acc = (#same pairs with cos > kappa + #different pairs with cos <= kappa) / #pairs.

    Args:
      feats_a: [N, D] features of the pairs' first images.
      feats_b: [N, D] features of the pairs' second images.
      same: [N] bools, ground truth.
      kappa: cosine-similarity threshold.
    """
    ok = verification_correct(feats_a, feats_b, same, kappa=kappa)
    return jnp.mean(ok.astype(jnp.float32))


def r_s(t_o: ArrayLike, f_c: ArrayLike) -> jax.Array:
    """Returns the mask-template paper's r_s = F_c / (1 + T_o - F_c).

    Args:
      t_o: recognition accuracy on the originals, in [0, 1].
      f_c: recognition accuracy on the protected images, in [0, 1].
    """
    t_o = jnp.asarray(t_o, jnp.float32)
    f_c = jnp.asarray(f_c, jnp.float32)
    return f_c / (1.0 + t_o - f_c)


def up_success(
    privacy: ArrayLike, utility: ArrayLike, *, sigma: float, kappa: float = 0.2
) -> jax.Array:
    """Returns [N] bools: privacy_i >= sigma and utility_i >= kappa (see the module docstring).

    Args:
      privacy: [N] privacy scores, LPIPS(x, x~) per image (larger: more private).
      utility: [N] cosine similarities cos(F_auth(x~), F_auth(x)) per image.
      sigma: the privacy (LPIPS) threshold.
      kappa: the utility (cosine) threshold.
    """
    return (jnp.asarray(privacy) >= sigma) & (jnp.asarray(utility) >= kappa)


def up(privacy: ArrayLike, utility: ArrayLike, *, sigma: float, kappa: float = 0.2) -> jax.Array:
    """Returns UP(sigma, kappa), the fraction of images both private and useful, in [0, 1].

    Args:
      privacy: [N] LPIPS(x, x~) per image.
      utility: [N] cos(F_auth(x~), F_auth(x)) per image.
      sigma: the privacy (LPIPS) threshold.
      kappa: the utility (cosine) threshold.
    """
    ok = up_success(privacy, utility, sigma=sigma, kappa=kappa)
    return jnp.mean(ok.astype(jnp.float32))
