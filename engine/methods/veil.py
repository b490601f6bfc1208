"""Person-specific veils (DESIGN.md method 2, Once-for-all): the compiled core.

Make. One veil [S, S, 3] per person, on the recogniser's aligned chip (side S), from n chips
of that person: x'_i = alpha x_i + (1 - alpha) veil, minimising
`faceveil.losses.objectives.veil_objective` (L_fea to the person's feature subspace or hull,
-lam L_vis, +mu L_var) with MI-FGSM sign steps (`faceveil.losses.transforms`), the veil
clipped to [0, 1]. The veil starts from uniform noise drawn from the seed the person's key
file owns, so it cannot be reproduced without the key. `make_steps` runs `steps` iterations as
one compiled `lax.scan` (the host calls it chunk after chunk for progress) and returns the
per-step loss terms for the loss curve.

Apply and recover. `VeilMethod` is a method of `faceveil.engine.methods.base`: its params are
the veil, and its step blends a face patch with the veil carried from chip to patch pixels by
the face's chip transform:

    apply:    x' = alpha x + (1 - alpha) warp(veil)        on the chip's footprint
    recover:  x  = (x' - (1 - alpha) warp(veil)) / alpha,  then a Gaussian filter

The blend is computed on the photo's own pixel grid rather than on a chip pasted back: the
recogniser then sees alpha chip(x) + (1 - alpha) chip(warp(veil)), and recovery inverts the
blend exactly up to the uint8 rounding of x' (at most 0.5 / alpha levels), with no resampling
of the face in between. Pixels outside the footprint are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from faceveil import losses
from faceveil.engine.methods import base
from faceveil.engine.pipeline import align
from faceveil.losses import filters

FEATURE_SETS = ("subspace", "hull", "own")


@dataclasses.dataclass(frozen=True)
class VeilConfig:
    """Settings of a veil: the blend, the objective and its optimiser (presets: PRESETS)."""

    alpha: float = 0.2  # weight of the face in x' (the paper's 0.2)
    feature_set: str = "subspace"  # L_fea's target: 'subspace', 'hull', or 'own' (V-UAP)
    block_variance: bool = True  # the +mu L_var term
    lam: float = 0.01  # weight of the visual-difference reward -lam ||x - x'||
    mu: float = 0.3  # weight of L_var
    iters: int = 200  # MI-FGSM iterations
    step: float = 2.0 / 255.0  # sign-step size
    decay: float = 1.0  # MI-FGSM momentum
    recover_sigma: float = 0.0  # Gaussian filter after recovery (photo pixels; 0: none)
    # Each iteration the recogniser sees the veiled chips through a Gaussian blur of random
    # sigma in [0, blur_views] (chip pixels): a face smaller in its photo than the chip holds
    # the veil resampled, without its finest detail, and must still be identified.
    blur_views: float = 1.5

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set must be one of {FEATURE_SETS}, got "
                             f"{self.feature_set!r}")
        if self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")


# Named presets in one place: the default veil, the ablation without block variance, and the
# V-UAP baseline (each chip pulled to its own features: no feature set, no block variance).
PRESETS = {
    "default": {},
    "no_block_variance": {"block_variance": False},
    "vuap": {"feature_set": "own", "block_variance": False},
}


def preset(name: str = "default", **overrides) -> VeilConfig:
    """Returns the VeilConfig of a named preset with overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return VeilConfig(**{**PRESETS[name], **overrides})


class MakeState(NamedTuple):
    """The veil being made, MI-FGSM's momentum and the augmentation's PRNG key."""

    veil: jax.Array  # [S, S, 3] float32 in [0, 1]
    opt: optax.OptState
    key: jax.Array


class StepLosses(NamedTuple):
    """Per-iteration terms of the objective, means over the person's chips ([steps] each)."""

    loss: jax.Array
    fea: jax.Array
    vis: jax.Array
    var: jax.Array


def _optimiser(cfg: VeilConfig) -> optax.GradientTransformation:
    return optax.chain(losses.mi_fgsm(cfg.decay), losses.sign(), optax.scale(-cfg.step))


def init_veil(key: ArrayLike, chip_size: int, cfg: VeilConfig) -> MakeState:
    """Returns the MakeState of a new veil: uniform noise drawn from `key` (the key's seed)."""
    k_noise, k_aug = jax.random.split(key)
    veil = jax.random.uniform(k_noise, (chip_size, chip_size, 3), jnp.float32)
    return MakeState(veil=veil, opt=_optimiser(cfg).init(veil), key=k_aug)


BLUR_RADIUS = 5


def blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Returns x [H, W, C] under a separable Gaussian of traced sigma (0: unchanged)."""
    t = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    k = jnp.exp(-(t * t) / (2.0 * sigma * sigma + 1e-6))
    k = k / jnp.sum(k)
    return filters.separable_same(x, k, axes=(0, 1))


def _objective(recogniser, cfg: VeilConfig, params, veil, chips, basis, weights, sigma):
    def features_fn(chip):
        if cfg.blur_views > 0:
            with jax.named_scope("blur"):
                chip = blur(chip, sigma)
        with jax.named_scope("recogniser"):
            return recogniser.apply(params, chip[None])[0][0]

    return losses.veil_objective(
        veil, chips, alpha=cfg.alpha, features_fn=features_fn, basis_feats=basis,
        mode=cfg.feature_set, lam=cfg.lam, mu=cfg.mu if cfg.block_variance else 0.0,
        weights=weights, var_terms="inner")


def _make_steps(recogniser, cfg: VeilConfig, steps: int, params, state: MakeState, chips,
                basis, weights):
    tx = _optimiser(cfg)
    n = jnp.maximum(jnp.sum(weights), 1.0)

    def one(st: MakeState, _):
        key, k_sigma = jax.random.split(st.key)
        sigma = jax.random.uniform(k_sigma, (), maxval=cfg.blur_views)
        grad, aux = jax.grad(
            lambda v: _objective(recogniser, cfg, params, v, chips, basis, weights, sigma),
            has_aux=True)(st.veil)
        with jax.named_scope("update"):
            upd, opt = tx.update(grad, st.opt)
            veil = jnp.clip(st.veil + upd, 0.0, 1.0)
        terms = StepLosses(loss=aux["loss"] / n, fea=jnp.sum(weights * aux["fea"]) / n,
                           vis=jnp.sum(weights * aux["vis"]) / n,
                           var=jnp.sum(weights * aux["var"]) / n)
        return MakeState(veil, opt, key), terms

    return jax.lax.scan(one, state, None, length=steps)


_MAKE_FNS: dict = {}


def make_steps(recogniser, cfg: VeilConfig, steps: int) -> callable:
    """Returns the jitted `(params, state, chips, basis, weights) -> (state, StepLosses)`.

    `steps` MI-FGSM iterations in one compiled call over the person's chips [N, S, S, 3]
    (padding rows: weight 0, a copy of row 0), their clean features `basis` [N, D] and
    `weights` [N]. Cached per (recogniser, config, steps): same-shaped calls reuse it.
    """
    key = (recogniser.name, cfg, steps)
    fn = _MAKE_FNS.get(key)
    if fn is None:
        fn = _MAKE_FNS[key] = jax.jit(functools.partial(_make_steps, recogniser, cfg, steps))
    return fn


# ----------------------------------------------------------------------------------------------
# Apply and recover: a method of the shared pipeline


class VeilMetrics(NamedTuple):
    """Per-face diagnostics of an apply or recover step."""

    coverage: jax.Array  # [] fraction of the patch inside the chip's footprint


def blend_patch(patch: ArrayLike, m_chip: ArrayLike, veil: ArrayLike, alpha: float,
                *, recover: bool = False, sigma: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Returns (uint8 patch [P, P, 3], inside [P, P]) with the veil applied or removed.

    Args:
      patch: uint8 [P, P, 3] face patch (clean to apply, veiled to recover).
      m_chip: (2, 3) chip pixels -> patch pixels.
      veil: [S, S, 3] float veil in [0, 1].
      alpha: the face's weight in the blend.
      recover: invert the blend instead of applying it.
      sigma: Gaussian filter (patch pixels) of the recovered face; 0 for none.
    """
    veil = jnp.asarray(veil, jnp.float32)
    x = jnp.asarray(patch).astype(jnp.float32) / 255.0
    xs, ys, inside = align.footprint(align.invert(jnp.asarray(m_chip, jnp.float32)),
                                     x.shape[0], veil.shape[0])
    v = align.sample_bilinear(veil, xs, ys)
    if recover:
        y = jnp.clip((x - (1.0 - alpha) * v) / alpha, 0.0, 1.0)
        if sigma > 0:
            y = blur(y, jnp.float32(sigma))
    else:
        y = alpha * x + (1.0 - alpha) * v
    y = jnp.where(inside[..., None], y, x)
    return jnp.round(y * 255.0).astype(jnp.uint8), inside


@dataclasses.dataclass(frozen=True)
class VeilMethod:
    """Applying (or removing) a veil as a method of `faceveil.engine.methods.base`.

    Its params are the veil [S, S, 3] (float32); the chain state is unused (a veil needs no
    warm start), so every face is one step with no iterations.
    """

    recogniser: object
    config: VeilConfig = VeilConfig()
    recover: bool = False
    name: str = "veil"

    def cache_key(self) -> tuple:
        """Returns what identifies this method's compiled code."""
        return (self.name, self.recover, self.config.alpha, self.config.recover_sigma,
                self.recogniser.chip_size)

    def __hash__(self):
        return hash(self.cache_key())

    def __eq__(self, other):
        return isinstance(other, VeilMethod) and self.cache_key() == other.cache_key()

    def init_state(self, params, key, patch_size: int) -> jax.Array:
        """Returns the (unused) state of one chain."""
        del params, key, patch_size
        return jnp.zeros((), jnp.float32)

    def target_spec(self, params, patch_size: int) -> jax.ShapeDtypeStruct:
        """Returns the (unused) per-chain target."""
        del params, patch_size
        return jax.ShapeDtypeStruct((), jnp.float32)

    def step(self, params, target, state, face: base.FaceFrame):
        """Returns (state, FaceOutput) of one face: the veil blended in or taken out."""
        del target
        out, inside = blend_patch(face.patch, face.m_chip, params, self.config.alpha,
                                  recover=self.recover, sigma=self.config.recover_sigma)
        out = jnp.where(face.present, out, face.patch)
        cov = jnp.where(face.present, jnp.mean(inside.astype(jnp.float32)), jnp.nan)
        return state, base.FaceOutput(protected=out, iters=jnp.zeros((), jnp.int32),
                                      metrics=VeilMetrics(coverage=cov))
