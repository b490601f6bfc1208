"""White-box reconstruction: an attacker who knows the shallow model inverts released features.

Given the features E_c(x~) a user released (or a shallow model's view of any protected face),
the attacker optimises an image r from mid-grey to match them,

    minimise  mean (E_c(r) - f)^2 + tv * TV(r) / pixels      with sign steps, r in [0, 1],

(`faceveil.losses.total_variation`, step decaying linearly to a tenth) and is judged by how much
of the original face comes back: SSIM and PSNR of r against the original chip, the cosine of
the recogniser's embeddings of r and of the original, and SRRA, the fraction of faces the
recogniser still matches to the original (distance below its threshold). The same evaluator
measures unprotected features (f = E_c(x)): the baseline any protection must beat.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from faceveil import losses


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of the white-box reconstruction attack."""

    iters: int = 200
    step: float = 4.0 / 255.0
    tv: float = 80.0  # weight of total variation per pixel: strong, the attacker's best choice
    #                   on unprotected features (a weak one leaves sign-step noise)


@dataclasses.dataclass
class ReconstructionResult:
    """Reconstructed chips and how close they come to the originals."""

    chips: np.ndarray  # [N, S, S, 3] reconstructed
    ssim: np.ndarray  # [N] vs the original chips
    psnr: np.ndarray  # [N]
    cosine: np.ndarray  # [N] cos(F(r), F(x)) with the full recogniser
    matched: np.ndarray  # [N] bool, distance(F(r), F(x)) < the recogniser's threshold

    @property
    def srra(self) -> float:
        """Returns the success rate of the reconstruction attack (fraction matched)."""
        return float(np.mean(self.matched)) if len(self.matched) else float("nan")


def _reconstruct(recogniser, cut: int, cfg: ReconstructionConfig, params, feats):
    size = recogniser.chip_size
    r0 = jnp.full((feats.shape[0], size, size, 3), 0.5, jnp.float32)
    pixels = size * size * 3

    def loss(r):
        got = recogniser.shallow(params, r, cut)[-1]
        return jnp.sum(jnp.mean((got - feats) ** 2, axis=(1, 2, 3))
                       + cfg.tv * losses.total_variation(r) / pixels)

    grad = jax.grad(loss)

    def body(k, r):
        step = cfg.step * (1.0 - 0.9 * k / max(cfg.iters - 1, 1))
        return jnp.clip(r - step * jnp.sign(grad(r)), 0.0, 1.0)

    return jax.lax.fori_loop(0, cfg.iters, body, r0)


_FNS: dict = {}


def reconstruct(recogniser, params, features, cut: int,
                config: ReconstructionConfig | None = None) -> np.ndarray:
    """Returns [N, S, S, 3] images whose cut features match `features` [N, h, w, c]."""
    cfg = config or ReconstructionConfig()
    key = (recogniser.name, cut, cfg)
    if key not in _FNS:
        _FNS[key] = jax.jit(functools.partial(_reconstruct, recogniser, cut, cfg))
    return np.asarray(_FNS[key](params, jnp.asarray(features, jnp.float32)))


def judge(recogniser, params, reconstructed: np.ndarray,
          originals: np.ndarray) -> ReconstructionResult:
    """Returns the ReconstructionResult of reconstructed chips against the original chips."""
    r, x = jnp.asarray(reconstructed, jnp.float32), jnp.asarray(originals, jnp.float32)
    er, ex = recogniser.embed(params, r), recogniser.embed(params, x)
    dist = np.asarray(jnp.linalg.norm(er - ex, axis=-1))
    return ReconstructionResult(
        chips=np.asarray(reconstructed), ssim=np.asarray(losses.ssim(x, r)),
        psnr=np.asarray(losses.psnr(x, r)),
        cosine=np.asarray(losses.cosine_similarity(er, ex)),
        matched=dist < recogniser.threshold)


def attack(recogniser, params, features, originals, cut: int,
           config: ReconstructionConfig | None = None) -> ReconstructionResult:
    """Returns the ReconstructionResult of inverting released features [N, h, w, c]."""
    return judge(recogniser, params, reconstruct(recogniser, params, features, cut, config),
                 originals)
