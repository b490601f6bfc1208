"""UP(sigma, kappa): the share of faces a protection keeps both private and useful (PMT's suite).

For N original faces x_i and their protected versions x~_i:

    privacy_i = LPIPS(x_i, x~_i)                            (AlexNet LPIPS, larger: more hidden)
    utility_i = cos(F(x~_i) - c, F(x_i) - c)                (the authorised recogniser F)
    UP(sigma, kappa) = (1 / N) sum_i [privacy_i >= sigma and utility_i >= kappa]

(`faceveil.losses.up`). The utility is the centred cosine of `data_abuse` (c: the mean clean
embedding of a reference set), so kappa = 0.2 means the same for dlib as for FaceNet. The curve
over a grid of sigma shows the trade-off: a method that hides the face (high LPIPS) while the
authorised service still recognises it keeps UP high to large sigma. (`faceveil attack up --png`
draws it: `engine/commands/attack_figures.py`.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from faceveil import losses
from faceveil.engine.attacks import data_abuse

DEFAULT_SIGMAS = tuple(round(s, 2) for s in np.linspace(0.0, 0.8, 17))  # LPIPS 0 .. 0.8


@dataclasses.dataclass(frozen=True)
class UpResult:
    """Per-face privacy and utility and the UP curve over a sigma grid."""

    privacy: np.ndarray  # [N] LPIPS(x, x~)
    utility: np.ndarray  # [N] centred cosine of the authorised embeddings
    sigmas: np.ndarray  # [G] privacy thresholds
    up: np.ndarray  # [G] UP(sigma_g, kappa)
    kappa: float

    @property
    def useful(self) -> float:
        """Returns the fraction of faces with utility >= kappa (UP at sigma = 0)."""
        return float(np.mean(self.utility >= self.kappa)) if len(self.utility) else float("nan")

    def summary(self) -> dict:
        """Returns the JSON form: means, the curve and the per-face values."""
        n = len(self.privacy)
        return {
            "faces": n, "kappa": self.kappa,
            "mean_privacy_lpips": float(np.mean(self.privacy)) if n else None,
            "mean_utility_cosine": float(np.mean(self.utility)) if n else None,
            "useful": self.useful,
            "curve": [{"sigma": float(s), "up": float(u)} for s, u in zip(self.sigmas, self.up)],
            "privacy": self.privacy.tolist(), "utility": self.utility.tolist(),
        }


def curve(privacy, utility, *, sigmas: Iterable[float] = DEFAULT_SIGMAS,
          kappa: float = 0.2) -> UpResult:
    """Returns the UpResult of per-face privacy [N] and utility [N] over the sigma grid."""
    p = np.asarray(privacy, np.float64)
    u = np.asarray(utility, np.float64)
    s = np.asarray(list(sigmas), np.float64)
    if p.shape != u.shape:
        raise ValueError(f"privacy {p.shape} and utility {u.shape} are not per face alike")
    ups = np.array([float(losses.up(jnp.asarray(p, jnp.float32), jnp.asarray(u, jnp.float32),
                                    sigma=float(g), kappa=kappa)) if len(p) else np.nan
                    for g in s])
    return UpResult(privacy=p, utility=u, sigmas=s, up=ups, kappa=float(kappa))


def evaluate(recogniser, params, originals, protected, *, centre,
             sigmas: Iterable[float] = DEFAULT_SIGMAS, kappa: float = 0.2,
             protected_embeddings=None) -> UpResult:
    """Returns the UpResult of protected chips against their originals for an authorised model.

    Args:
      recogniser, params: the authorised recogniser (a `registry` entry) and its parameters.
      originals, protected: [N, S, S, 3] float chips in [0, 1] of the recogniser's template.
      centre: [D] the mean clean embedding the cosines are centred on (`data_abuse`).
      sigmas: the privacy (LPIPS) thresholds of the curve.
      kappa: the utility (centred cosine) threshold.
      protected_embeddings: the authorised embeddings of x~ when the service finishes them
        otherwise (feature upload); by default `recogniser.embed(params, protected)`.
    """
    from faceveil.engine.pipeline import photos

    x = np.asarray(originals, np.float32)
    y = np.asarray(protected, np.float32)
    if x.shape != y.shape:
        raise ValueError(f"originals {x.shape} and protected {y.shape} chips differ in shape")
    if not len(x):
        return curve(np.zeros(0), np.zeros(0), sigmas=sigmas, kappa=kappa)
    privacy = photos.chip_lpips(x, y)
    e_x = np.asarray(recogniser.embed(params, jnp.asarray(x)))
    e_y = (np.asarray(recogniser.embed(params, jnp.asarray(y))) if protected_embeddings is None
           else np.asarray(protected_embeddings))
    utility = data_abuse.centred_cosine(e_y, e_x, centre)
    return curve(privacy, utility, sigmas=sigmas, kappa=kappa)
